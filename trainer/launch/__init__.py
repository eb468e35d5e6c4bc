"""``python -m trainer.run``: flags to run directory (run.py), one job on Ray (job.py)."""
