"""``python -m trainer.run [flags]``: one run from the command line; the code is in ``trainer.launch.run``."""

import sys

from trainer.launch.run import main

if __name__ == "__main__":
    sys.exit(main())
