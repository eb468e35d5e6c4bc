"""``python -m trainer.experiment``: grids of runs (runner.py), the report and plots (report.py)."""
