"""The trainer side: ``from trainer import AdaptiveSubset`` (see ``trainer.api``) for your own training loop."""

__all__ = ["AdaptiveSubset"]


def __getattr__(name: str):
    if name == "AdaptiveSubset":  # imported on first use, so `import trainer.data` stays light
        from trainer.api import AdaptiveSubset

        return AdaptiveSubset
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")
