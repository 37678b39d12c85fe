"""Deprecation aliases for module paths that moved into subpackages in 0.2 (removed in 0.3)."""

from __future__ import annotations

import importlib
import sys
import warnings


def alias(old: str, new: str) -> None:
    """Make ``import old`` give module ``new`` itself (so patches and ``isinstance`` see one module), with a warning."""
    warnings.warn(
        f"{old} moved to {new}; import it from there ({old} goes away in hereticlab 0.3)",
        DeprecationWarning,
        stacklevel=3,
    )
    sys.modules[old] = importlib.import_module(new)
