"""Residual-stream capture with forward hooks.

Index convention (as HF ``hidden_states``): residual ``k`` is the stream after ``k`` blocks, ``k = 0`` the
embedding output, so a model with ``L`` blocks has ``L + 1`` residuals. Unlike HF's last hidden state, residual
``L`` is taken *before* the final norm. Only the requested positions are kept, and the forward pass stops after
the deepest requested layer (the rest of the network and the LM head never run).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar, cast

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase
from transformers.cache_utils import DynamicCache

from . import compat
from .architecture import find_layers
from .hooks import Site, position_dependent_writes, resolve_site, trace
from .prompts import PromptSet, format_chat

T = TypeVar("T")


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter."""
    return next(model.parameters()).device


def auto_batch_size(model: nn.Module, *, tokens_per_prompt: int = 64) -> int:
    """A batch size that keeps activations comfortably inside memory.

    CPU: 16 (larger batches do not speed up a 2–16 core machine much). CUDA: scaled by free memory and width.
    """
    device = model_device(model)
    if device.type != "cuda":
        return 16
    free, _ = torch.cuda.mem_get_info(device)
    d = getattr(model.config, "hidden_size", 4096)
    vocab = getattr(model.config, "vocab_size", 50_000)
    per_prompt = tokens_per_prompt * (d * 64 + vocab * 4)  # rough activation + logits bytes
    return int(max(1, min(256, free * 0.3 // max(per_prompt, 1))))


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id used for padding: the tokenizer's pad token, else its EOS token, else 0."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0


def encode_ids(
    rows: Sequence[Sequence[int]], pad_id: int, device: torch.device | str, *, prefix_length: int = 0
) -> dict[str, torch.Tensor]:
    """The one batch builder: left-pad token lists into ``input_ids [B, T]`` (``T`` = longest row).

    ``prefix_length = P > 0``: the rows follow a shared, already cached prefix of ``P`` tokens, so
    ``attention_mask`` is ``[B, P + T]`` (prefix ones, padding zeros, own tokens ones) and ``position_ids [B, T]``
    continue from ``P``. With ``P = 0`` (plain batches) the mask is ``[B, T]`` and positions start at 0 at each
    row's first token. Padding positions repeat the first real position (``P``), as HF does.
    """
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    own = torch.zeros((len(rows), width), dtype=torch.long)
    for row, tokens in enumerate(rows):
        if len(tokens):
            ids[row, width - len(tokens) :] = torch.as_tensor(list(tokens), dtype=torch.long)
            own[row, width - len(tokens) :] = 1
    positions = (prefix_length + own.cumsum(-1) - 1).clamp(min=prefix_length)
    mask = torch.cat([torch.ones(len(rows), prefix_length, dtype=torch.long), own], dim=1)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": positions.to(device)}


def encode(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], device: torch.device | str
) -> dict[str, torch.Tensor]:
    """Tokenize already-formatted texts (no special tokens added) into a left-padded batch (``encode_ids``)."""
    rows = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return encode_ids(rows, pad_id(tokenizer), device)


def common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix shared by every sequence."""
    if not sequences:
        return 0
    first = sequences[0]
    n = min(len(s) for s in sequences)
    for s in sequences[1:]:
        i = 0
        while i < n and s[i] == first[i]:
            i += 1
        n = i
    return n


@torch.no_grad()
def prefix_keys_values(model: nn.Module, prefix: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Per layer ``(keys [1, kv_heads, P, d_head], values …)`` of ``prefix [1, P]`` under the model as it runs now
    (hooks included); None when its cache is not one plain key/value layer per block (SSM state, sliding windows)."""
    _, cache = compat.forward(model, {"input_ids": prefix}, use_cache=True)
    n_layers = len(getattr(cache, "layers", ()))
    if cache is None or n_layers != len(find_layers(model)) or compat.plain_layer_count(cache) != n_layers:
        return None
    return compat.layer_keys_values(cache)


def expanded_cache(kv: Sequence[tuple[torch.Tensor, torch.Tensor]], rows: int) -> DynamicCache:
    """One row's keys/values seen by ``rows`` rows (views, no copy); a forward appends to new tensors."""
    return compat.cache_from_keys_values([(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)) for k, v in kv])


def shared_prefix_batch(
    model: nn.Module, rows: Sequence[Sequence[int]], pad_id: int, *, min_shared: int = 4
) -> tuple[dict[str, torch.Tensor], DynamicCache | None]:
    """A batch of token rows whose common prefix has run once, as one row: ``(batch, cache)``.

    ``batch`` is ``encode_ids(rows minus the prefix, prefix_length=P)`` and ``cache`` the prefix's keys/values
    expanded to every row, to be passed with it to the next forward. Every row keeps at least one own token (its
    last position gives the next-token logits). With fewer than ``min_shared`` common tokens, one row, or a cache
    that cannot be shared: ``(encode_ids(rows), None)``, the plain batch. The prefix runs under the hooks active now,
    as a forward of its own: only for interventions that act alike at every position (ablation, addition at every
    position); under one that singles out positions (``hooks.position_dependent_writes``), such as the last prompt
    token, it raises ``ValueError`` before any forward.
    """
    if position_dependent_writes(model):
        raise ValueError(
            "share_prefix=True under an intervention that steers chosen positions (positions='last_prompt', "
            "'prompt', a slice, ...): the shared prefix would run as a call of its own and be steered at the wrong "
            "positions; drop share_prefix or steer positions='all'"
        )
    device = model_device(model)
    shared = min(common_prefix_length(rows), min(len(r) for r in rows) - 1) if len(rows) > 1 else 0
    if shared >= max(1, min_shared):
        kv = prefix_keys_values(model, torch.tensor([list(rows[0][:shared])], dtype=torch.long, device=device))
        if kv is not None:
            rest = [r[shared:] for r in rows]
            return encode_ids(rest, pad_id, device, prefix_length=shared), expanded_cache(kv, len(rows))
    return encode_ids(rows, pad_id, device), None


def chat_texts(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str] | PromptSet, chat: bool = True, **chat_kwargs: Any
) -> list[str]:
    """``prompts`` formatted with the chat template (``chat=True``) or as they are."""
    return format_chat(tokenizer, prompts, **chat_kwargs) if chat else list(prompts)


def batched(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    """Consecutive slices of ``items`` of at most ``size``."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _normalize_layers(model: nn.Module, layers: Sequence[int] | None) -> list[int]:
    """Residual indices (negatives from ``L``) → ``0..L`` via ``hooks.resolve_site``; ``None`` → all ``L + 1``."""
    if layers is None:
        return list(range(len(find_layers(model)) + 1))
    return [resolve_site(model, resid=layer).index for layer in layers]


@contextmanager
def residual_hooks(
    model: nn.Module, layers: Sequence[int], on_residual: Callable[[int, torch.Tensor], None], stop_early: bool = True
) -> Iterator[None]:
    """Call ``on_residual(index, hidden[batch, seq, d])`` for each requested residual index during a forward.

    A thin form of ``hooks.trace`` (prefer that). With ``stop_early`` the forward is aborted after the deepest
    requested index by ``hooks.StopForward`` (swallowed on exit if the caller does not catch it first). Hooks are
    removed on exit, also on exceptions.
    """
    resolved = _normalize_layers(model, layers)

    def on_read(site: Site, hidden: torch.Tensor) -> None:
        on_residual(site.index, hidden)

    with trace(model, read=resolved, on_read=on_read, stop_after=max(resolved) if stop_early else None):
        yield


def _select_positions(hidden: torch.Tensor, positions: Sequence[int]) -> torch.Tensor:
    """hidden [batch, seq, d] → [batch, n_positions, d]; negative positions count from the (left-padded) end."""
    return hidden[:, list(positions), :]


def _forward_capture(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    layers: list[int],
    positions: Sequence[int],
    on_batch_values: Callable[[torch.Tensor], None],
) -> None:
    store: dict[int, torch.Tensor] = {}

    def on_read(site: Site, hidden: torch.Tensor) -> None:
        store[site.index] = _select_positions(hidden, positions).float()

    with trace(model, read=layers, on_read=on_read, stop_after=max(layers)):
        model(**batch, use_cache=False)
    # [batch, n_positions, n_layers, d]
    on_batch_values(torch.stack([store[i] for i in layers], dim=2))


@torch.no_grad()
def capture_residuals(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str] | PromptSet,
    *,
    layers: Sequence[int] | None = None,
    positions: int | Sequence[int] = -1,
    batch_size: int | None = None,
    chat: bool = True,
    progress: bool = True,
    **chat_kwargs: Any,
) -> torch.Tensor:
    """Residuals of ``prompts`` at ``layers`` (default: all ``L + 1``) and ``positions`` (default: the last).

    Returns float32 on CPU: ``[prompt, layer, d]`` for an int position, ``[prompt, position, layer, d]`` for a list.
    ``chat_kwargs`` go to ``format_chat`` (``system_prompt``, ``response_prefix``, ``close_thinking``).
    """
    layers = _normalize_layers(model, layers)
    single = isinstance(positions, int)
    pos = [positions] if isinstance(positions, int) else list(positions)
    texts = chat_texts(tokenizer, prompts, chat, **chat_kwargs)
    batch_size = batch_size or auto_batch_size(model)
    device = model_device(model)
    chunks: list[torch.Tensor] = []
    for texts_batch in tqdm(list(batched(texts, batch_size)), desc="capture", disable=not progress, leave=False):
        _forward_capture(model, encode(tokenizer, texts_batch, device), layers, pos, lambda v: chunks.append(v.cpu()))
    out = torch.cat(chunks)
    return out[:, 0] if single else out


@torch.no_grad()
def capture_mean(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str] | PromptSet,
    *,
    layers: Sequence[int] | None = None,
    position: int = -1,
    batch_size: int | None = None,
    chat: bool = True,
    progress: bool = True,
    **chat_kwargs: Any,
) -> torch.Tensor:
    """Streaming mean residual ``[layer, d]`` (float64), never holding more than one batch of residuals."""
    layers = _normalize_layers(model, layers)
    texts = chat_texts(tokenizer, prompts, chat, **chat_kwargs)
    batch_size = batch_size or auto_batch_size(model)
    device = model_device(model)
    total: torch.Tensor | None = None
    count = 0

    def accumulate(values: torch.Tensor) -> None:  # values [batch, 1, layer, d]
        nonlocal total, count
        summed = values[:, 0].double().sum(0).cpu()
        total = summed if total is None else total + summed
        count += values.shape[0]

    for texts_batch in tqdm(list(batched(texts, batch_size)), desc="capture mean", disable=not progress, leave=False):
        _forward_capture(model, encode(tokenizer, texts_batch, device), layers, [position], accumulate)
    return cast(torch.Tensor, total) / count  # None only for an empty prompt list (then a TypeError)
