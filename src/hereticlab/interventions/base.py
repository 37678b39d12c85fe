"""One intervention shape: a lazy, reversible object.

Constructing an ``Intervention`` changes nothing. ``with intervention:`` applies it on ``__enter__`` and reverts it on
``__exit__`` (also on exceptions); ``apply()`` / ``revert()`` do the same by hand for hot loops. Both are idempotent,
and entry nests: only the outermost ``with`` applies and reverts, so an object may be entered again and again.

Knob names across interventions: ``alpha`` scales an added steering vector; ``strength`` is the ablation kernel
(the fraction of the direction removed, ``1`` = full projection); ``beta`` scales a conceptor's output ``β C h``.

Sites follow ``core.hooks``: ``resid=k`` is the residual stream after ``k`` blocks (``0..L``, negatives from ``L``),
``block=b`` is decoder block ``b`` (``0..L-1``, negatives from ``L - 1``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, ExitStack
from typing import Any, TypeVar

from torch import nn

from ..core.hooks import resolve_site

__all__ = ["HookIntervention", "Intervention", "resolve_residuals"]

_Self = TypeVar("_Self", bound="Intervention")  # apply() / with give back the subclass itself


class Intervention:
    """Base class: subclasses implement ``_apply()`` and ``_revert()``; this class handles state and nesting."""

    def __init__(self) -> None:
        self.active = False
        self._depth = 0

    def _apply(self) -> None:
        raise NotImplementedError

    def _revert(self) -> None:
        raise NotImplementedError

    def apply(self: _Self) -> _Self:
        """Apply now (no-op if already applied). Returns ``self``."""
        if not self.active:
            self._apply()
            self.active = True
        return self

    def revert(self) -> None:
        """Undo exactly (no-op if not applied)."""
        if self.active:
            self._revert()
            self.active = False

    def __enter__(self: _Self) -> _Self:
        if self._depth == 0:
            self.apply()
        self._depth += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self._depth = max(self._depth - 1, 0)
        if self._depth == 0:
            self.revert()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(active={self.active})"


class HookIntervention(Intervention):
    """An intervention made of forward hooks: ``factory()`` returns a context manager that installs them."""

    def __init__(self, factory: Callable[[], AbstractContextManager[Any]]) -> None:
        super().__init__()
        self._factory = factory
        self._stack: ExitStack | None = None

    def _apply(self) -> None:
        stack = ExitStack()
        stack.enter_context(self._factory())
        self._stack = stack

    def _revert(self) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()


def resolve_residuals(
    model: nn.Module,
    *,
    resid: int | Sequence[int] | None = None,
    block: int | Sequence[int] | None = None,
) -> list[int]:
    """``resid=`` and/or ``block=`` (an int or a sequence each) → sorted non-negative residual indices.

    A block site ``b`` means its output, residual ``b + 1`` (as ``core.hooks.Site.residual``).
    """
    out: set[int] = set()
    for kind, value in (("resid", resid), ("block", block)):
        if value is None:
            continue
        for index in [value] if isinstance(value, int) else list(value):
            site = resolve_site(model, resid=index) if kind == "resid" else resolve_site(model, block=index)
            out.add(site.residual)
    return sorted(out)


def warn_layer_keyword(function: str, old: str, value: object, new: str) -> None:
    """The DeprecationWarning for 0.1's ``layer=`` / ``layers=`` keywords, naming the site they mean."""
    warnings.warn(
        f"{function}({old}={value!r}) is deprecated; it means {new}. Use that keyword instead "
        "(sites: resid=k is the stream after k blocks, block=b is block b).",
        DeprecationWarning,
        stacklevel=3,
    )
