"""``python -m speckv.train fit|validate|test|predict``: the LightningCLI entry point.

With no arguments, ``fit`` trains on every bundled record set (``datamodules/*/``) with the
settings that ship inside the package, one file per LightningCLI group
(``speckv/train/configs/{trainer,model,data}.yaml``, read through importlib.resources, so an
installed wheel trains with the same settings); runs log to TensorBoard under
``lightning_logs/``, where ``version_N/config.yaml`` reproduces the run. Values derived from
the data (feature count and names, candidate γs) are linked from the DataModule to the model,
never typed twice.
"""

from __future__ import annotations

import sys
from importlib import resources
from typing import Final

from lightning.pytorch.cli import LightningCLI

from speckv.errors import SpeckvError
from speckv.train.datamodule import SpeckvDataModule
from speckv.train.module import SpeckvModule

#: the packaged defaults, one file per LightningCLI group, merged in this order.
CONFIG_GROUPS: Final = ("trainer", "model", "data")


def default_configs() -> list[str]:
    """Paths of the packaged group configs (files on disk for any ordinary install)."""
    root = resources.files("speckv.train") / "configs"
    return [str(root / f"{group}.yaml") for group in CONFIG_GROUPS]


class SpeckvCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.n_features", "model.n_features", apply_on="instantiate")
        parser.link_arguments("data.gammas", "model.gammas", apply_on="instantiate")
        parser.link_arguments("data.feature_names", "model.feature_names",
                              apply_on="instantiate")


def cli(args=None) -> SpeckvCLI:
    defaults = default_configs()
    return SpeckvCLI(SpeckvModule, SpeckvDataModule, args=args,
                     parser_kwargs={cmd: {"default_config_files": defaults}
                                    for cmd in ("fit", "validate", "test", "predict")},
                     save_config_kwargs={"overwrite": True})


def main(argv: list[str] | None = None) -> int:
    try:
        cli(argv)
    except SpeckvError as exc:
        print(f"speckv.train: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
