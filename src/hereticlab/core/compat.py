"""The one place that knows transformers internals which change between releases.

Everything in hereticlab that hands a KV cache to a model, reads it back from an output, finds it inside a decoder
layer's call, looks into a ``DynamicCache``'s layers or asks for last-position logits goes through here. When a
release renames one of these (5.25 renamed the ``past_key_values`` keyword and output field to ``cache``), this
file is the one to change, and the self-checks that use it (``TrialEvaluator`` at set-up, steering's position
bookkeeping) say so in one line instead of computing a wrong number.

Supported: transformers ``>=5.0`` (the ranges in ``pyproject.toml``); the lock file holds the tested set.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Sequence
from typing import Any, cast

import torch
import transformers
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

TRANSFORMERS_VERSION: str = transformers.__version__

# Names under which releases have passed the KV cache, newest first.
CACHE_NAMES: tuple[str, ...] = ("cache", "past_key_values", "past_key_value")


class CompatibilityWarning(UserWarning):
    """A fast path disagreed with the plain computation on this transformers release and was switched off."""


def warn_fallback(what: str, detail: str) -> None:
    """One line naming the installed transformers, what was switched off, and why."""
    warnings.warn(
        f"hereticlab: {what} disabled on transformers {TRANSFORMERS_VERSION} ({detail}); using the plain "
        f"path, results stay exact but slower. Install the locked versions (make setup) to get it back.",
        CompatibilityWarning,
        stacklevel=3,
    )


@functools.cache
def _cache_keyword_of(cls: type[Any]) -> str | None:
    params = inspect.signature(cls.forward).parameters
    return next((name for name in CACHE_NAMES if name in params), None)


@functools.cache
def _release_cache_keyword() -> str:
    """The name this release's own models use (read off Llama, which every release ships)."""
    from transformers.models.llama.modeling_llama import LlamaForCausalLM

    return _cache_keyword_of(LlamaForCausalLM) or "past_key_values"


def cache_keyword(model: nn.Module) -> str:
    """The keyword under which ``model``'s forward takes a KV cache on this release.

    Wrappers whose forward only has ``**kwargs`` (PEFT) get the name this release's own models use.
    """
    cls: type = type(model)  # (mypy does not see nn.Module classes as hashable keys of functools.cache)
    return _cache_keyword_of(cls) or _release_cache_keyword()


def cache_kwargs(model: nn.Module, cache: Cache | None) -> dict[str, Any]:
    """``{keyword: cache}`` for a call of ``model`` (empty for ``None``, so the model builds its own if asked)."""
    return {} if cache is None else {cache_keyword(model): cache}


def output_cache(output: Any) -> Cache | None:
    """The KV cache a forward returned (``output.cache`` or, before 5.25, ``output.past_key_values``).

    Read as a mapping entry, so no deprecation property is touched.
    """
    for name in CACHE_NAMES:
        if name in output:
            return output[name]
    return None


def cache_in_call(args: Sequence[Any], kwargs: dict[str, Any]) -> Cache | None:
    """The KV cache handed to a decoder layer's call: by keyword (any release's name) or positionally (GPT-2)."""
    for name in CACHE_NAMES:
        cache = kwargs.get(name)
        if cache is not None:
            return cache
    return next((a for a in args if isinstance(a, Cache)), None)


def cached_length(cache: Cache | None, layer: int) -> int:
    """Tokens already in ``cache`` for ``layer`` (0 without a cache)."""
    if cache is None or not hasattr(cache, "get_seq_length"):
        return 0
    try:
        return int(cache.get_seq_length(layer))
    except (TypeError, IndexError):  # caches whose length is not per layer
        return int(cache.get_seq_length())


def plain_layer_count(cache: Cache) -> int:
    """How many leading layers of ``cache`` are plain, unbounded key/value layers (replayable by one ``update``)."""
    layers = getattr(cache, "layers", None)
    if not isinstance(cache, DynamicCache) or layers is None:
        return 0
    return next((i for i, layer in enumerate(layers) if type(layer) is not DynamicLayer), len(layers))


def layer_keys_values(cache: Cache, count: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[(keys [B, heads, T, d_head], values …)]`` of the first ``count`` layers (all by default)."""
    layers = cache.layers if count is None else cache.layers[:count]
    # Callers pass count = plain_layer_count(cache): only DynamicLayer entries, whose keys/values are tensors.
    return [
        (cast(torch.Tensor, layer.keys), cast(torch.Tensor, layer.values)) for layer in cast(list[DynamicLayer], layers)
    ]


def cache_from_keys_values(kv: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A ``DynamicCache`` holding the given per-layer keys/values (no copy)."""
    return DynamicCache(ddp_cache_data=list(kv))


def keep_rows(cache: Cache, index: torch.Tensor) -> None:
    """Drop every batch row of ``cache`` not in ``index`` (in place)."""
    cache.batch_select_indices(index)


def write_layer(cache: Cache, keys: torch.Tensor, values: torch.Tensor, layer: int) -> None:
    """Append recorded keys/values for ``layer`` as if its attention had computed them."""
    cache.update(keys, values, layer)


def forward(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    *,
    cache: Cache | None = None,
    use_cache: bool = False,
    last: int | None = 1,
) -> tuple[torch.Tensor, Cache | None]:
    """One forward pass: ``(logits [B, last or T, V], cache or None)``.

    ``last``: compute logits only at the last ``last`` positions (``logits_to_keep``); ``None`` for every position.
    """
    extra = {} if last is None else {"logits_to_keep": last}
    out = model(**inputs, **cache_kwargs(model, cache), use_cache=use_cache or cache is not None, **extra)
    return out.logits, (output_cache(out) if use_cache or cache is not None else None)


def check_cache_offsets(model: nn.Module, blocks: nn.ModuleList | Sequence[nn.Module]) -> bool:
    """Can a block's forward pre-hook read how many tokens are already cached (``cached_length``)?

    Runs a 3-token prefill and one cached step; block 0 must see offsets 0 then 3. The answer is remembered on the
    model. Steering's position masks rely on it; when it fails they count tokens from the attention mask instead.
    """
    known = getattr(model, "_hereticlab_cache_offsets_ok", None)
    if known is not None:
        return known
    seen: list[int] = []
    handle = blocks[0].register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(cached_length(cache_in_call(args, kwargs), 0)), with_kwargs=True
    )
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            ids = torch.ones(1, 3, dtype=torch.long, device=device)
            _, cache = forward(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, use_cache=True)
            forward(
                model,
                {
                    "input_ids": ids[:, :1],
                    "attention_mask": torch.ones(1, 4, dtype=torch.long, device=device),
                    "position_ids": torch.tensor([[3]], device=device),
                },
                cache=cache,
            )
        ok = seen == [0, 3]
    except Exception as exc:  # a renamed internal can also make the probe itself fail
        seen.append(f"{type(exc).__name__}")  # type: ignore[arg-type]
        ok = False
    finally:
        handle.remove()
    if not ok:
        warn_fallback(
            "reading the KV-cache position inside blocks",
            f"block 0 saw offsets {seen}, expected [0, 3]; steering positions now follow the attention mask's length",
        )
    model._hereticlab_cache_offsets_ok = ok  # type: ignore[assignment]  # nn.Module's stub types only tensors/modules
    return ok
