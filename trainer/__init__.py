"""The trainer side: ``from trainer import AdaptiveSubset`` for your own training loop.

Rooms, each importing only the ones listed before it (docs/architecture.md):

- ``trainer.cli``, ``trainer.files``: config parsing (flags, YAML, keywords) and whole-file writes, used by all;
- ``trainer.data``: the data sets as in-memory splits;
- ``trainer.client``: the selection client a training loop needs (``AdaptiveSubset``, the round protocol,
  summaries, summary workers, connecting to Ray and starting the selector);
- ``trainer.builtin``: the built-in trainer (models, the weighted step, the loop, its actor, Ray Train);
- ``trainer.launch``: ``python -m trainer.run`` (``trainer.run`` is its entry module);
- ``trainer.experiments``: ``python -m trainer.experiment`` (grids, report, plots).
"""

__all__ = ["AdaptiveSubset"]


def __getattr__(name: str):
    if name == "AdaptiveSubset":  # imported on first use, so `import trainer.data` stays light
        from trainer.client.api import AdaptiveSubset

        return AdaptiveSubset
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")
