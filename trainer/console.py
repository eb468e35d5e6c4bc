"""The ``gradmatch`` command: ``gradmatch run ...`` is ``python -m trainer.run ...``, ``gradmatch experiment ...`` is
``python -m trainer.experiment ...``."""

from __future__ import annotations

import gc
import importlib
import sys

COMMANDS = {"run": "trainer.run", "experiment": "trainer.experiment"}
USAGE = "usage: gradmatch {run,experiment} [options]  (gradmatch run --help, gradmatch experiment --help)"


def main(argv: list[str] | None = None) -> int:
    code = dispatch(list(sys.argv[1:] if argv is None else argv))
    if argv is None:  # the gradmatch program ends next: its exit skips the final collection (trainer.launch.run)
        sys.stdout.flush()
        sys.stderr.flush()
        gc.freeze()
    return code


def dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: gradmatch {command}: unknown command; use one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    sys.argv = [f"gradmatch {command}", *rest]  # argparse names the command in its usage lines
    module = importlib.import_module(COMMANDS[command])
    return getattr(module, "entry", module.main)(rest)  # a run's program entry where it has one


if __name__ == "__main__":
    sys.exit(main())
