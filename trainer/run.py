"""``python -m trainer.run [flags]``: one run from the command line; the code is in ``trainer.launch.run``."""

import sys

from trainer.launch.run import entry, main

__all__ = ["entry", "main"]  # main: the in-process entry point; entry: the program's

if __name__ == "__main__":
    sys.exit(entry())
