"""``python -m speckv.train fit|validate|test|predict``: the LightningCLI entry point.

With no arguments, ``fit`` trains on the bundled records (``data/records/``) with the tuned
values of ``configs/default.yaml``; runs log to TensorBoard under ``lightning_logs/``, where
``version_N/config.yaml`` reproduces the run. Values derived from the data (feature count and
names, candidate γs) are linked from the DataModule to the model, never typed twice.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

from speckv.datamodules import SpeckvDataModule
from speckv.errors import SpeckvError
from speckv.module import SpeckvModule

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


class SpeckvCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.n_features", "model.n_features", apply_on="instantiate")
        parser.link_arguments("data.gammas", "model.gammas", apply_on="instantiate")
        parser.link_arguments("data.feature_names", "model.feature_names",
                              apply_on="instantiate")


def cli(args=None) -> SpeckvCLI:
    defaults = [str(DEFAULT_CONFIG)] if DEFAULT_CONFIG.is_file() else []
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
