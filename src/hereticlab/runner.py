"""Deprecated path: ``hereticlab.search.runner`` (this alias will be removed in 0.3)."""

from ._moved import alias

alias(__name__, "hereticlab.search.runner")
