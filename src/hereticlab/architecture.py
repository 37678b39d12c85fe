"""Deprecated path: ``hereticlab.core.architecture`` (this alias will be removed in 0.3)."""

from ._moved import alias

alias(__name__, "hereticlab.core.architecture")
