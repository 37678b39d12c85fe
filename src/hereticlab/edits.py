"""Deprecated path: ``hereticlab.interventions.edits`` (this alias will be removed in 0.3)."""

from ._moved import alias

alias(__name__, "hereticlab.interventions.edits")
