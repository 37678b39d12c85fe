"""One addressing scheme and one hook primitive for reading, writing and stopping the residual stream.

Sites. A model with ``L`` blocks has ``L + 1`` residual sites and ``L`` block sites:

- ``resid=k``, ``k ∈ 0..L``: the stream after ``k`` blocks (``0`` = block 0's input, ``L`` = the last block's raw
  output, *before* the final norm). Negatives count from ``L``: ``resid=-1`` is ``L``, ``resid=-2`` is ``L - 1``.
- ``block=b``, ``b ∈ 0..L-1``: decoder block ``b``, which reads residual ``b`` and writes residual ``b + 1``.
  Negatives count from ``L - 1``: ``block=-1`` is the last block.

``resolve_site`` turns either spelling into a ``Site`` with a non-negative index (or raises a ``ValueError`` naming
the valid range); every read and write goes through it.

Hooks. ``trace`` registers forward hooks at residual sites for the duration of a ``with`` block::

    with trace(model, read=[0, -1], stop_after=-1) as t:
        model(**batch, use_cache=False)      # stops after the last block: the final norm and LM head never run
    t.values[0], t.values[L]                 # [batch, seq, d] each, keyed by the resolved residual index

At each hooked site the order is: ``write`` (replace the stream), then read (record the written value), then stop
(raise ``StopForward``, which the context manager swallows). Hooks are removed on exit, also on exceptions.

A write that depends on where the tokens are (steering only the response, only the last prompt token) asks for the
block's call with ``with_call=True``: ``write(site, hidden, call)`` then also gets a ``Call`` — the block's
positional and keyword arguments (``position_ids``, ``cache_position``, the cache, …) and ``call.offset``, the number
of positions already cached, i.e. the absolute index of the call's first token.

Writers and other submodules (attention, MLP, a post-norm) are not residual sites; ``hook_outputs`` hooks their
outputs with the same conventions (a tensor in, a replacement or ``None`` out; removed on exit).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal
from weakref import WeakKeyDictionary

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from . import compat
from .architecture import block_output_tensor, find_layers, replace_block_output

__all__ = [
    "Call",
    "Site",
    "SiteError",
    "SiteLike",
    "StopForward",
    "Trace",
    "hook_outputs",
    "position_dependent_writes",
    "resolve_site",
    "resolve_sites",
    "trace",
]


class SiteError(ValueError, IndexError):
    """A site index out of range for the model (a ``ValueError``; also an ``IndexError`` for 0.1 callers)."""


class StopForward(Exception):
    """Raised inside a forward hook to end the forward pass early (``trace`` catches it on exit)."""


@dataclass(frozen=True)
class Site:
    """A place in the network: ``kind="resid"`` (residual stream after ``index`` blocks) or ``"block"``.

    Build with ``Site.resid(k)`` / ``Site.block(b)`` (negative indices allowed; ``resolve_site`` makes them
    non-negative against a model). ``residual`` is the residual index a hook reads or writes: ``k`` for a residual
    site, the block's output ``b + 1`` for a block site.
    """

    kind: Literal["resid", "block"]
    index: int

    def __post_init__(self) -> None:
        if self.kind not in ("resid", "block"):
            raise ValueError(f"site kind must be 'resid' or 'block', not {self.kind!r}")

    @classmethod
    def resid(cls, k: int) -> Site:
        return cls("resid", int(k))

    @classmethod
    def block(cls, b: int) -> Site:
        return cls("block", int(b))

    @property
    def residual(self) -> int:
        """The residual index this site's hook sees (a block site: its output, ``b + 1``)."""
        return self.index if self.kind == "resid" else self.index + 1

    def __str__(self) -> str:
        return f"{self.kind}={self.index}"


SiteLike = Site | int
"""A ``Site``, or a plain int meaning a residual index."""


def resolve_site(
    model: nn.Module, *, resid: int | None = None, block: int | None = None, site: Site | None = None
) -> Site:
    """Exactly one of ``resid``, ``block`` or ``site`` → a ``Site`` with a non-negative index for ``model``.

    ``resid`` ∈ ``-(L+1)..L`` (``-1`` is ``L``); ``block`` ∈ ``-L..L-1`` (``-1`` is ``L - 1``). Raises
    ``SiteError`` (a ``ValueError``) naming the valid range otherwise.
    """
    given = [x is not None for x in (resid, block, site)]
    if sum(given) != 1:
        raise ValueError("give exactly one of resid=, block= or site=")
    index: int | None  # None cannot remain (exactly one was given); the type check below says so if it does
    if site is not None:
        kind, index = site.kind, site.index
    elif resid is not None:
        kind, index = "resid", resid
    else:
        kind, index = "block", block
    if isinstance(index, bool) or not isinstance(index, int):
        raise TypeError(f"a {kind} index must be an int, not {type(index).__name__}")
    n = len(find_layers(model))
    count = n + 1 if kind == "resid" else n  # residuals 0..L, blocks 0..L-1
    resolved = index + count if index < 0 else index
    if not 0 <= resolved < count:
        name = "residual" if kind == "resid" else "block"
        raise SiteError(
            f"{kind}={index} is out of range for a model with {n} blocks: a {name} index is in "
            f"0..{count - 1} (negatives from {count - 1}: -1..-{count})"
        )
    return Site(kind, resolved)


def _as_site(model: nn.Module, site: SiteLike) -> Site:
    if isinstance(site, Site):
        return resolve_site(model, site=site)
    return resolve_site(model, resid=site)


def resolve_sites(model: nn.Module, sites: Iterable[SiteLike]) -> list[Site]:
    """Resolve each of ``sites`` (``Site`` or residual int) against ``model``, keeping order."""
    return [_as_site(model, s) for s in sites]


_HIDDEN_KWARGS = ("hidden_states", "hidden_state", "x")


def _block_input(args: tuple, kwargs: dict) -> tuple[torch.Tensor, str | None]:
    """The hidden state a block is called with, and the keyword it came as (``None``: first positional)."""
    if args:
        return args[0], None
    for key in _HIDDEN_KWARGS:
        if key in kwargs:
            return kwargs[key], key
    raise RuntimeError(f"cannot find the hidden state among a block's inputs (keywords: {sorted(kwargs)})")


@dataclass(frozen=True)
class Call:
    """The block call a residual write belongs to (``trace(..., with_call=True)`` hands it to ``write``).

    ``block``: the block whose call it is — block 0 for residual 0 (its input), block ``k - 1`` for residual
    ``k ≥ 1`` (its output). ``args`` / ``kwargs``: that block's arguments as the model passed them (hidden state,
    ``position_ids``, ``cache_position``, attention mask, the KV cache, …). ``offset``: positions already in the KV
    cache when the block started, i.e. the absolute index of the call's first token (0 without a cache; the same
    for every block of one forward).
    """

    block: int
    args: tuple
    kwargs: dict[str, Any]
    offset: int


class _Offsets:
    """Counts the positions cached before each block call (``Call.offset``).

    Read from the KV cache handed to the block when this transformers release lets a block see it (self-checked once
    per model by ``compat.check_cache_offsets``, which runs a tiny forward, so this is built before any forward);
    otherwise from the attention mask handed to the model, whose width is cached + new tokens.
    """

    def __init__(self, model: nn.Module, blocks: nn.ModuleList) -> None:
        self.model = model
        self.from_cache = compat.check_cache_offsets(model, blocks)
        self.current = 0

    def register(self) -> list[RemovableHandle]:
        """The model-level pre-hook the attention-mask count needs (none when blocks can read the cache)."""
        if self.from_cache:
            return []

        def model_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            mask = kwargs.get("attention_mask")
            self.current = 0 if mask is None or ids is None else mask.shape[-1] - ids.shape[-1]
            if mask is None and compat.cache_in_call((), kwargs) is not None:
                raise RuntimeError(
                    "position-dependent hooks with a KV cache need an attention_mask on this transformers release "
                    f"({compat.TRANSFORMERS_VERSION}); pass one, or install the locked versions"
                )

        return [self.model.register_forward_pre_hook(model_hook, with_kwargs=True)]

    def __call__(self, block: int, args: tuple, kwargs: dict) -> int:
        if self.from_cache:
            return compat.cached_length(compat.cache_in_call(args, kwargs), block)
        return self.current


ResidualHook = Callable[[torch.Tensor, Call | None], torch.Tensor | None]


def _register(model: nn.Module, k: int, hook: ResidualHook, offsets: _Offsets | None) -> list[RemovableHandle]:
    """Hook residual ``k`` (``k ≥ 0``): ``hook(hidden, call) -> replacement or None``.

    Residual ``k ≥ 1`` is block ``k - 1``'s output (a forward hook). Residual 0 is block 0's *input* (a forward
    pre-hook), which is what HF's ``hidden_states[0]`` is: the embedding output plus whatever the model adds before
    the first block (GPT-2's position embeddings, a VLM's image features). ``call`` is ``None`` unless ``offsets``
    is given; then it is the ``Call`` of the hooked block, its offset read before the block ran (a block appends
    this call's keys/values to the cache while it runs).
    """
    blocks = find_layers(model)
    if k == 0:

        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
            hidden, key = _block_input(args, kwargs)
            call = None if offsets is None else Call(0, args, kwargs, offsets(0, args, kwargs))
            new = hook(hidden, call)
            if new is None:
                return None
            if key is None:
                return (new,) + tuple(args[1:]), kwargs
            return args, {**kwargs, key: new}

        return [blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True)]

    b = k - 1
    handles = []
    latest: list[Call | None] = [None]  # the call of block b now running (blocks are not re-entered)
    if offsets is not None:

        def call_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            latest[0] = Call(b, args, kwargs, offsets(b, args, kwargs))

        handles.append(blocks[b].register_forward_pre_hook(call_hook, with_kwargs=True))

    def post_hook(module: nn.Module, args: tuple, output: Any) -> object:
        call, latest[0] = latest[0], None
        new = hook(block_output_tensor(output), call)
        return None if new is None else replace_block_output(output, new)

    handles.append(blocks[b].register_forward_hook(post_hook))
    return handles


def _remove(handles: Iterable[RemovableHandle]) -> None:
    for handle in handles:
        handle.remove()


OutputHook = Callable[[Any], Any]


@contextmanager
def hook_outputs(hooks: Iterable[tuple[nn.Module, OutputHook]], *, raw: bool = False) -> Iterator[None]:
    """Hook the outputs of arbitrary modules (writers, sublayers, post-norms) for the forwards inside the block.

    ``hooks``: ``(module, fn)`` pairs, registered in order (a module may appear more than once; its functions run
    in that order). ``fn(hidden) -> replacement or None`` gets the module's output tensor (for a tuple / list
    output: its first item, and a replacement goes back in its place); ``raw=True`` hands ``fn`` the output object
    itself and uses what it returns as is. ``None`` keeps the output. Hooks are removed on exit, also on exceptions.
    """

    def wrap(fn: OutputHook) -> Callable[[nn.Module, tuple, object], object]:
        if raw:
            return lambda module, args, output: fn(output)

        def hook(module: nn.Module, args: tuple, output: Any) -> object:
            new = fn(block_output_tensor(output))
            return None if new is None else replace_block_output(output, new)

        return hook

    handles: list[RemovableHandle] = []
    try:
        for module, fn in hooks:
            handles.append(module.register_forward_hook(wrap(fn)))
        yield
    finally:
        _remove(handles)


@dataclass
class Trace:
    """What ``trace`` yields. ``values[k]``: the stream ``[batch, seq, d]`` at residual ``k`` from the last
    forward (as the model computed it, after any write; not copied, not detached beyond what the forward does)."""

    values: dict[int, torch.Tensor] = field(default_factory=dict)
    stopped: bool = False


# Models with a position-dependent write active (``trace(with_call=True)``) → how many: a forward split into a
# shared prefix and the rows' own tokens would position such writes wrongly (``capture.shared_prefix_batch``).
_POSITION_DEPENDENT_WRITES: WeakKeyDictionary[nn.Module, int] = WeakKeyDictionary()


def position_dependent_writes(model: nn.Module) -> int:
    """How many position-dependent writes (``trace(..., with_call=True)``, e.g. steering ``positions="last_prompt"``)
    are active on ``model`` now."""
    return _POSITION_DEPENDENT_WRITES.get(model, 0)


WriteFn = Callable[..., torch.Tensor]
"""``write(site, hidden) -> hidden``, or with ``with_call=True`` ``write(site, hidden, call) -> hidden``."""


@contextmanager
def trace(
    model: nn.Module,
    *,
    read: Iterable[SiteLike] = (),
    write: WriteFn | None = None,
    write_at: Iterable[SiteLike] | None = None,
    stop_after: SiteLike | None = None,
    on_read: Callable[[Site, torch.Tensor], None] | None = None,
    with_call: bool = False,
) -> Iterator[Trace]:
    """Hook the residual stream of ``model`` for the forwards run inside the ``with`` block.

    - ``read``: sites (``Site`` or residual int) whose stream ``[batch, seq, d]`` is recorded into
      ``Trace.values[k]`` — or, when ``on_read`` is given, passed to ``on_read(site, hidden)`` instead of stored.
    - ``write``: ``write(site, hidden[batch, seq, d]) -> hidden`` replaces the stream at each site of ``write_at``
      (default: every residual ``0..L``); the blocks after see the returned tensor.
    - ``with_call``: call ``write(site, hidden, call)`` with the ``Call`` of the block the site belongs to (its
      arguments and ``call.offset``, the positions already cached), for writes that depend on token positions
      (steering the response only, …). Checks once per model, on entry, how a block can see the cache.
    - ``stop_after``: raise ``StopForward`` once this site's stream is computed (after its write and read); the
      exception ends the forward and is swallowed when the ``with`` block exits (``Trace.stopped`` is set), so
      code after the model call inside the block does not run. A trace without ``stop_after`` lets a
      ``StopForward`` raised by someone else pass.

    Sites passed as ``Site`` keep their kind in callbacks (a ``Site.block(b)`` is hooked at its output, residual
    ``b + 1``); ints become ``Site.resid``. Hooks are removed on exit, also on exceptions.
    """
    blocks = find_layers(model)
    n = len(blocks)
    reads = {s.residual: s for s in resolve_sites(model, read)}
    if write is None:
        writes: dict[int, Site] = {}
    elif write_at is None:
        writes = {k: Site("resid", k) for k in range(n + 1)}
    else:
        writes = {s.residual: s for s in resolve_sites(model, write_at)}
    stop = _as_site(model, stop_after).residual if stop_after is not None else None
    offsets = _Offsets(model, blocks) if with_call and writes else None
    result = Trace()

    def make_hook(k: int) -> ResidualHook:
        def hook(hidden: torch.Tensor, call: Call | None) -> torch.Tensor | None:
            replaced = k in writes
            if replaced and write is not None:  # a site is in ``writes`` only when ``write`` is given
                hidden = write(writes[k], hidden, call) if with_call else write(writes[k], hidden)
            if k in reads:
                if on_read is None:
                    result.values[k] = hidden
                else:
                    on_read(reads[k], hidden)
            if k == stop:
                raise StopForward
            return hidden if replaced else None

        return hook

    handles: list[RemovableHandle] = []
    if offsets is not None:
        _POSITION_DEPENDENT_WRITES[model] = position_dependent_writes(model) + 1
    try:
        if offsets is not None:
            handles += offsets.register()
        for k in sorted(set(reads) | set(writes) | ({stop} if stop is not None else set())):
            handles += _register(model, k, make_hook(k), offsets if k in writes else None)
        yield result
    except StopForward:
        if stop is None:
            raise
        result.stopped = True
    finally:
        _remove(handles)
        if offsets is not None:
            _POSITION_DEPENDENT_WRITES[model] -= 1
