"""Data sets as in-memory splits: ``trainer.data.splits`` (``load_splits``, ``check_data``), the sources
(sources.py: built-in, imagefolder, factories; formats.py: torchvision's files) and their errors (raw.py)."""
