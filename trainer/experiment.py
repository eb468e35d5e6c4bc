"""``python -m trainer.experiment``: grids of runs and their report; the code is in ``trainer.experiments.runner``."""

import sys

from trainer.experiments.runner import main

if __name__ == "__main__":
    sys.exit(main())
