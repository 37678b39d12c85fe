"""Residual-stream capture with forward hooks.

Index convention (as HF ``hidden_states``): residual ``k`` is the stream after ``k`` blocks, ``k = 0`` the
embedding output, so a model with ``L`` blocks has ``L + 1`` residuals. Unlike HF's last hidden state, residual
``L`` is taken *before* the final norm. Only the requested positions are kept, and the forward pass stops after
the deepest requested layer (the rest of the network and the LM head never run).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from .architecture import block_output_tensor, find_embedding, find_layers
from .prompts import PromptSet, format_chat


class _StopForward(Exception):
    """Raised inside a hook once every requested layer has been seen."""


def model_device(model: nn.Module) -> torch.device:
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


def encode(tokenizer, texts: Sequence[str], device: torch.device) -> dict[str, torch.Tensor]:
    """Tokenize already-formatted texts with left padding; position ids follow the attention mask."""
    batch = tokenizer(list(texts), return_tensors="pt", padding=True, add_special_tokens=False)
    mask = batch["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return {
        "input_ids": batch["input_ids"].to(device),
        "attention_mask": mask.to(device),
        "position_ids": positions.to(device),
    }


def chat_texts(tokenizer, prompts: Sequence[str] | PromptSet, chat: bool = True, **chat_kwargs) -> list[str]:
    return format_chat(tokenizer, prompts, **chat_kwargs) if chat else list(prompts)


def batched(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _normalize_layers(model: nn.Module, layers: Sequence[int] | None) -> list[int]:
    n = len(find_layers(model))
    if layers is None:
        return list(range(n + 1))
    out = []
    for layer in layers:
        index = layer + n + 1 if layer < 0 else layer
        if not 0 <= index <= n:
            raise IndexError(f"residual index {layer} is out of range for a model with {n} blocks (0..{n})")
        out.append(index)
    return out


@contextmanager
def residual_hooks(
    model: nn.Module, layers: Sequence[int], on_residual: Callable[[int, torch.Tensor], None], stop_early: bool = True
):
    """Call ``on_residual(index, hidden[batch, seq, d])`` for each requested residual index during a forward.

    With ``stop_early`` the forward is aborted after the deepest requested index (catch ``_StopForward``).
    Hooks are removed on exit, also on exceptions.
    """
    blocks = find_layers(model)
    wanted = set(layers)
    deepest = max(wanted)
    handles = []

    def make_hook(index: int):
        def hook(module, args, output):
            on_residual(index, block_output_tensor(output))
            if stop_early and index == deepest:
                raise _StopForward

        return hook

    try:
        if 0 in wanted:
            handles.append(find_embedding(model).register_forward_hook(make_hook(0)))
        for i, block in enumerate(blocks):
            if i + 1 in wanted:
                handles.append(block.register_forward_hook(make_hook(i + 1)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _select_positions(hidden: torch.Tensor, positions: Sequence[int]) -> torch.Tensor:
    """hidden [batch, seq, d] → [batch, n_positions, d]; negative positions count from the (left-padded) end."""
    return hidden[:, list(positions), :]


def _forward_capture(model, batch, layers, positions, on_batch_values):
    store: dict[int, torch.Tensor] = {}

    def on_residual(index, hidden):
        store[index] = _select_positions(hidden, positions).float()

    with residual_hooks(model, layers, on_residual):
        try:
            model(**batch, use_cache=False)
        except _StopForward:
            pass
    # [batch, n_positions, n_layers, d]
    on_batch_values(torch.stack([store[i] for i in layers], dim=2))


@torch.no_grad()
def capture_residuals(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str] | PromptSet,
    *,
    layers: Sequence[int] | None = None,
    positions: int | Sequence[int] = -1,
    batch_size: int | None = None,
    chat: bool = True,
    progress: bool = True,
    **chat_kwargs,
) -> torch.Tensor:
    """Residuals of ``prompts`` at ``layers`` (default: all ``L + 1``) and ``positions`` (default: the last).

    Returns float32 on CPU: ``[prompt, layer, d]`` for an int position, ``[prompt, position, layer, d]`` for a list.
    ``chat_kwargs`` go to ``format_chat`` (``system_prompt``, ``response_prefix``, ``close_thinking``).
    """
    layers = _normalize_layers(model, layers)
    single = isinstance(positions, int)
    pos = [positions] if single else list(positions)
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
    tokenizer,
    prompts: Sequence[str] | PromptSet,
    *,
    layers: Sequence[int] | None = None,
    position: int = -1,
    batch_size: int | None = None,
    chat: bool = True,
    progress: bool = True,
    **chat_kwargs,
) -> torch.Tensor:
    """Streaming mean residual ``[layer, d]`` (float64), never holding more than one batch of residuals."""
    layers = _normalize_layers(model, layers)
    texts = chat_texts(tokenizer, prompts, chat, **chat_kwargs)
    batch_size = batch_size or auto_batch_size(model)
    device = model_device(model)
    total: torch.Tensor | None = None
    count = 0

    def accumulate(values):  # values [batch, 1, layer, d]
        nonlocal total, count
        summed = values[:, 0].double().sum(0).cpu()
        total = summed if total is None else total + summed
        count += values.shape[0]

    for texts_batch in tqdm(list(batched(texts, batch_size)), desc="capture mean", disable=not progress, leave=False):
        _forward_capture(model, encode(tokenizer, texts_batch, device), layers, [position], accumulate)
    return total / count
