"""``python -m speckv.train fit|validate|test|predict``: the LightningCLI entry point.

With no arguments, ``fit`` trains on the demo's record set (``datamodules/smollm2-demo/``) with the
settings that ship inside the package, one file per LightningCLI group
(``speckv/train/configs/{trainer,model,data}.yaml``, read through importlib.resources, so an
installed wheel trains with the same settings); runs log to TensorBoard under
``lightning_logs/``, where ``version_N/config.yaml`` reproduces the run. Values derived from
the data (feature count and names, candidate γs) are linked from the DataModule to the model,
never typed twice.

**Resuming.** Every run keeps ``version_N/checkpoints/last.ckpt`` (``--checkpoint.*`` sets
Lightning's ``ModelCheckpoint``), written atomically, with the random state the next epoch's
data order draws from. ``fit --ckpt_path=last`` resumes from the newest readable checkpoint
of any earlier run under the log folder (a damaged one is skipped with a warning; none yet:
it trains from the start, so a job script may always pass it), and a resumed run ends where
an uninterrupted one ends, bit for bit. A checkpoint trained with other model or data
settings, or on other records, is refused (:class:`speckv.train.module.ResumeError`).
"""

from __future__ import annotations

import logging
import sys
from importlib import resources
from pathlib import Path
from typing import Any, Final

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from speckv.atomic import remove_stale_temps
from speckv.errors import SpeckvError, refusal
from speckv.train.checkpoint import newest_readable
from speckv.train.datamodule import SpeckvDataModule
from speckv.train.module import SpeckvModule

#: the packaged defaults, one file per LightningCLI group, merged in this order.
CONFIG_GROUPS: Final = ("trainer", "model", "data")


def default_configs() -> list[str]:
    """Paths of the packaged group configs (files on disk for any ordinary install)."""
    root = resources.files("speckv.train") / "configs"
    return [str(root / f"{group}.yaml") for group in CONFIG_GROUPS]


log = logging.getLogger(__name__)


class SpeckvCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.link_arguments("data.n_features", "model.n_features", apply_on="instantiate")
        parser.link_arguments("data.gammas", "model.gammas", apply_on="instantiate")
        parser.link_arguments("data.trees", "model.trees", apply_on="instantiate")
        parser.link_arguments("data.feature_names", "model.feature_names",
                              apply_on="instantiate")
        parser.link_arguments("data.lookup_feature_names", "model.lookup_feature_names",
                              apply_on="instantiate")


    # ------------------------------------------------------------------- the subcommands
    def fit(self, model, **kwargs: Any) -> None:
        for folder in self._checkpoint_dirs():  # what killed runs left half-written
            remove_stale_temps(folder, "*.ckpt")
        self.trainer.fit(model, **self._resolve_last(kwargs))

    def validate(self, model, **kwargs: Any) -> Any:
        return self.trainer.validate(model, **self._resolve_last(kwargs))

    def test(self, model, **kwargs: Any) -> Any:
        return self.trainer.test(model, **self._resolve_last(kwargs))

    def predict(self, model, **kwargs: Any) -> Any:
        return self.trainer.predict(model, **self._resolve_last(kwargs))

    def _checkpoint_dirs(self) -> list[Path]:
        """Where checkpoints of this and earlier runs live: every ``version_*/checkpoints``
        under the logger's folder, and any ``--checkpoint.dirpath``."""
        trainer = self.trainer
        logger = trainer.logger
        root = Path(getattr(logger, "root_dir", None) or trainer.default_root_dir)
        dirs = [*sorted(root.glob("*/checkpoints")), root / "checkpoints"]
        dirs += [Path(cb.dirpath) for cb in trainer.checkpoint_callbacks
                 if getattr(cb, "dirpath", None)]
        return [d for d in dict.fromkeys(dirs) if d.is_dir()]

    def _resolve_last(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """``ckpt_path="last"``: the newest readable checkpoint of any earlier run (Lightning's
        own "last" looks only in this run's new version folder, which is empty)."""
        if kwargs.get("ckpt_path") != "last":
            return kwargs
        dirs = self._checkpoint_dirs()
        found, skipped = newest_readable(f for d in dirs for f in d.glob("*.ckpt"))
        where = ", ".join(map(str, dirs)) or str(getattr(self.trainer.logger, "root_dir", None)
                                                 or self.trainer.default_root_dir)
        if found is None and self.subcommand != "fit":
            raise SpeckvError(f"--ckpt_path=last: no readable checkpoint in {where}"
                              + (f" ({len(skipped)} cannot be read)" if skipped else "")
                              + ". Train one with `python -m speckv.train fit`, or pass the "
                              "checkpoint file with --ckpt_path.")
        if found is None:
            log.info("--ckpt_path=last: no checkpoint in %s yet; training from the start",
                     where)
        else:
            log.info("--ckpt_path=last: resuming from %s", found)
        return {**kwargs, "ckpt_path": str(found) if found is not None else None}


def cli(args=None) -> SpeckvCLI:
    defaults = default_configs()
    return SpeckvCLI(SpeckvModule, SpeckvDataModule, args=args,
                     parser_kwargs={cmd: {"default_config_files": defaults}
                                    for cmd in ("fit", "validate", "test", "predict")},
                     save_config_kwargs={"overwrite": True})


def main(argv: list[str] | None = None) -> int:
    try:
        cli(argv)
    except (SpeckvError, OSError) as exc:  # bad input, or a write the environment refused
        message = refusal(exc)
        if message is None:
            raise
        print(f"speckv.train: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
