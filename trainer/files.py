"""Files a run writes without ever leaving half of one: atomic replacement and whole-line JSONL records."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable

from protocol.errors import RunFailed


NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # a record file that is a symlink is refused, not followed


def temporary_path(path: Path) -> Path:
    """A new, empty file beside ``path`` with an unpredictable name (``mkstemp``: created exclusively, mode 0600),
    so that no one can plant a symlink where the next write goes."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(name, 0o644)  # the file it becomes is as readable as any other the run writes
    return Path(name)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then rename it over ``path``.

    Any failure (disk full, directory gone; ``torch.save`` reports a missing directory as a RuntimeError) is a
    ``RunFailed`` naming the path and the error, and the temporary file is removed.
    """
    tmp = None
    try:
        tmp = temporary_path(path)
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        try:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise RunFailed(f"cannot write {path}: {getattr(exc, 'strerror', None) or exc}") from None


def write_json(path: Path, obj) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2)))


def plain(obj):
    """``obj`` with numpy arrays and scalars made lists and Python numbers (tensors kept), so that a checkpoint
    holding it loads with ``torch.load(..., weights_only=True)``."""
    import numpy as np

    if isinstance(obj, dict):
        return {key: plain(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain(value) for value in obj)
    if isinstance(obj, (np.ndarray, np.generic)):
        return obj.tolist()
    return obj


class RecordFile:
    """A JSONL file that only ever holds whole lines: each record is one ``os.write``; a short write is undone."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | NOFOLLOW, 0o644)
        except OSError as exc:
            raise RunFailed(f"cannot write {path}: {exc.strerror or exc}") from None
        self.size = 0

    @classmethod
    def replacing(cls, path: Path, records: list[dict]) -> "RecordFile":
        """A file that replaces ``path`` with ``records`` in one rename (the old file stays whole until then),
        open for appending more."""
        tmp = temporary_path(path)
        handle = cls(tmp)
        try:
            handle.append(records)
            os.replace(tmp, path)
        except OSError as exc:
            handle.close()
            raise RunFailed(f"cannot write {path}: {exc.strerror or exc}") from None
        except RunFailed:
            handle.close()
            raise
        handle.path = path
        return handle

    def append(self, records: list[dict]) -> int:
        for record in records:
            data = (json.dumps(record) + "\n").encode()
            try:
                written = os.write(self.fd, data)
                if written != len(data):
                    raise OSError(28, "No space left on device")
            except OSError as exc:
                try:
                    os.ftruncate(self.fd, self.size)
                except OSError:
                    pass
                raise RunFailed(f"cannot write {self.path}: {exc.strerror or exc}") from None
            self.size += written
        return len(records)

    def close(self) -> None:
        os.close(self.fd)
