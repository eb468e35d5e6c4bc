"""The built-in trainer of ``python -m trainer.run``: models (models.py), the weighted step and schedule
(training.py), the loop (core.py), its actor (actor.py), data-parallel with Ray Train (distributed.py), energy
(energy.py)."""
