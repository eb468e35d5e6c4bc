"""Optional parts of the package (``pip install 'gradmatch[EXTRA]'``): one line naming the extra when one is missing."""

from __future__ import annotations

import importlib


def require(module: str, what: str, extra: str, package: str | None = None):
    """Import ``module`` or fail in one line naming the extra that installs it (``package``: the name the line
    gives, default the module's top level)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"{what} needs {package or module.split('.')[0]}: pip install 'gradmatch[{extra}]'") from None
