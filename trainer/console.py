"""The ``gradmatch`` command: ``gradmatch run ...`` is ``python -m trainer.run ...``, ``gradmatch experiment ...`` is
``python -m trainer.experiment ...``."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {"run": "trainer.run", "experiment": "trainer.experiment"}
USAGE = "usage: gradmatch {run,experiment} [options]  (gradmatch run --help, gradmatch experiment --help)"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: gradmatch {command}: unknown command; use one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    sys.argv = [f"gradmatch {command}", *rest]  # argparse names the command in its usage lines
    return importlib.import_module(COMMANDS[command]).main(rest)

if __name__ == "__main__":
    sys.exit(main())
