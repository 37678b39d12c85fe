"""Deprecated path: ``hereticlab.ui.chat`` (this alias will be removed in 0.3)."""

from ._moved import alias

alias(__name__, "hereticlab.ui.chat")
