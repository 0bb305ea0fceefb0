"""``python -m speckv COMMAND ...``: one entry point that dispatches to each stage's CLI.

Each command lives in its stage's module as ``main(argv) -> int`` and is imported only when
called, so ``speckv export --help`` does not load transformers. :func:`main` returns the exit
status instead of raising ``SystemExit``: 0 for ``--help``, 2 with one paragraph on stderr for
bad input (argparse's usage errors and every :class:`~speckv.errors.SpeckvError`) and for a
write the environment refused (:func:`~speckv.errors.refused_write`). Training
has its own entry point, ``python -m speckv.train`` (LightningCLI), which ``speckv train``
forwards to.
"""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Final

from speckv.errors import SpeckvError, refusal

COMMANDS: Final = {
    "profile": ("speckv.cli.profile:main", "profile real speculative decoding into step records"),
    "records": ("speckv.cli.profile:records_main", "records merge SHARD... --out FILE"),
    "import-paper": ("speckv.cli.profile:import_paper_main", "import the seed paper's step CSV"),
    "draft": ("speckv.cli.draft:main", "draft data|distill|evaluate: the demo draft"),
    "train": ("speckv.train.cli:main", "python -m speckv.train (LightningCLI)"),
    "evaluate": ("speckv.cli.evaluate:main", "replay every policy on held-out prompts"),
    "export": ("speckv.cli.export:main", "checkpoint -> ONNX controller (+ parity, latency)"),
    "bench-controller": ("speckv.cli.bench_controller:main", "controller latency per decision"),
    "generate": ("speckv.cli.generate:main", "speculative decoding with any policy"),
    "bench": ("speckv.cli.bench:main", "live tokens/s: target alone, HF assisted, speckv"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: speckv COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {doc}" for name, (_, doc) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"speckv: unknown command {name!r}.\n\n{_usage()}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    target, _ = COMMANDS[name]
    module, func = target.split(":")
    try:
        return int(getattr(importlib.import_module(module), func)(rest) or 0)
    except (SpeckvError, OSError) as exc:  # bad input, or a write the environment refused
        message = refusal(exc)
        if message is None:
            raise
        print(f"speckv {name}: error: {message}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # argparse: --help (0) and a usage error (2, already printed)
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(f"speckv {name}: error: {exc.code}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"speckv {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
