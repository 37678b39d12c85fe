"""Deprecated path: ``hereticlab.ui.trial_picker`` (this alias will be removed in 0.3)."""

from ._moved import alias

alias(__name__, "hereticlab.ui.trial_picker")
