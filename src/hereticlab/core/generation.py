"""Decoding: the one decode loop (KV cache, last-position logits, finished rows leave the batch), greedy by default,
temperature sampling from a seeded generator when asked."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase
from transformers.cache_utils import Cache

from . import compat
from .capture import auto_batch_size, batched, chat_texts, encode, model_device, pad_id, shared_prefix_batch
from .prompts import PromptSet


def eos_token_ids(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Every EOS id the model's generation config, config and tokenizer name."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        eos = getattr(source, "eos_token_id", None) if source is not None else None
        if eos is not None:
            ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def next_tokens_from(
    logits: torch.Tensor, temperature: float = 0.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Next tokens ``[B]`` from last-position logits ``[B, V]``: the argmax at ``temperature <= 0``, else one draw
    from ``softmax(logits / temperature)``. Draws happen on the CPU with ``generator`` (a ``torch.Generator`` on
    the CPU), so a seed gives the same tokens on any device."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1).to(logits.device)


@torch.no_grad()
def iter_greedy(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    max_new_tokens: int,
    eos_ids: set[int],
    *,
    stop: Callable[[int, list[int]], bool] | None = None,
    cache: Cache | None = None,
    first_logits: torch.Tensor | None = None,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> Iterator[dict[int, int]]:
    """The one decode loop, one step at a time: greedy decoding with a KV cache, logits only at the last position,
    finished rows leaving the batch.

    ``batch``: a left-padded batch (``capture.encode``): ``input_ids``, ``attention_mask``, ``position_ids`` ``[B, T]``.
    Yields ``{row: token}`` for the rows that produced a (non-EOS) token at each step, before the next forward runs
    (so a consumer that stops iterating saves the rest). A row ends at EOS (not yielded), at ``max_new_tokens``, or
    when ``stop(row, tokens so far)`` returns True. ``cache`` / ``first_logits``: a prefill already done by the caller
    (``[B, V]`` next-token logits). ``temperature > 0`` samples each token instead (``next_tokens_from``) from
    ``generator``; the default is greedy, as the name says.
    """
    n = batch["input_ids"].shape[0]
    generated: list[list[int]] = [[] for _ in range(n)]
    if max_new_tokens <= 0:
        return
    if first_logits is None:
        logits, cache = compat.forward(model, batch, use_cache=True)
        first_logits = logits[:, -1]
    next_tokens = next_tokens_from(first_logits, temperature, generator)
    rows = list(range(n))
    mask = batch["attention_mask"]
    positions = batch["position_ids"][:, -1:]
    for _ in range(max_new_tokens):
        keep = []
        step: dict[int, int] = {}
        for i, row in enumerate(rows):
            token = int(next_tokens[i])
            if token in eos_ids:
                continue
            generated[row].append(token)
            step[row] = token
            if len(generated[row]) >= max_new_tokens or (stop is not None and stop(row, generated[row])):
                continue
            keep.append(i)
        if step:
            yield step
        if not keep:
            break
        if cache is None:  # the next step would see one token without its context
            raise ValueError("iter_greedy: no KV cache to continue from; pass the prefill's cache with first_logits")
        if len(keep) < len(rows):
            index = torch.tensor(keep, device=mask.device)
            compat.keep_rows(cache, index)
            mask, positions, next_tokens = mask[index], positions[index], next_tokens[index]
            rows = [rows[i] for i in keep]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        positions = positions + 1
        logits, cache = compat.forward(
            model, {"input_ids": next_tokens[:, None], "attention_mask": mask, "position_ids": positions}, cache=cache
        )
        next_tokens = next_tokens_from(logits[:, -1], temperature, generator)


def greedy_decode(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    max_new_tokens: int,
    eos_ids: set[int],
    *,
    stop: Callable[[int, list[int]], bool] | None = None,
    cache: Cache | None = None,
    first_logits: torch.Tensor | None = None,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Greedy decoding of a whole batch (``iter_greedy`` run to the end).

    ``stop(row, tokens)`` returns True once row ``row`` is decided (its generation ends there).
    ``cache`` / ``first_logits``: a prefill already done by the caller (``[B, V]`` next-token logits).
    ``temperature`` / ``generator``: sample instead of taking the argmax (see ``iter_greedy``).
    Returns the generated token ids per row (EOS excluded).
    """
    generated: list[list[int]] = [[] for _ in range(batch["input_ids"].shape[0])]
    steps = iter_greedy(
        model,
        batch,
        max_new_tokens,
        eos_ids,
        stop=stop,
        cache=cache,
        first_logits=first_logits,
        temperature=temperature,
        generator=generator,
    )
    for step in steps:
        for row, token in step.items():
            generated[row].append(token)
    return generated


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str] | PromptSet,
    *,
    max_new_tokens: int = 64,
    batch_size: int | None = None,
    chat: bool = True,
    progress: bool = True,
    temperature: float = 0.0,
    seed: int = 0,
    share_prefix: bool = False,
    **chat_kwargs: Any,
) -> list[str]:
    """Responses to ``prompts`` (chat template applied), batched with left padding: greedy by default; with
    ``temperature > 0`` every token is sampled from one CPU generator seeded with ``seed``, so the same call (same
    prompts, order and batch size) gives the same responses. For several samples per prompt, repeat the prompt.

    ``share_prefix``: run the tokens every prompt of a batch begins with (the chat template's system turn) once per
    batch instead of once per row (``capture.shared_prefix_batch``): the same responses up to float rounding, a
    shorter prefill. Only under interventions that act alike at every position (see there)."""
    texts = chat_texts(tokenizer, prompts, chat, **chat_kwargs)
    device = model_device(model)
    eos = eos_token_ids(model, tokenizer)
    generator = torch.Generator().manual_seed(seed) if temperature > 0 else None
    responses: list[str] = []
    for chunk in tqdm(
        list(batched(texts, batch_size or auto_batch_size(model))), desc="generate", disable=not progress, leave=False
    ):
        cache: Cache | None = None
        first_logits = None
        if share_prefix:
            rows = tokenizer(list(chunk), add_special_tokens=False)["input_ids"]
            batch, prefix = shared_prefix_batch(model, rows, pad_id(tokenizer))
            if prefix is not None:  # the rows' own tokens, continuing the shared prefix
                logits, cache = compat.forward(model, batch, cache=prefix, use_cache=True)
                first_logits = logits[:, -1]
        else:
            batch = encode(tokenizer, chunk, device)
        tokens = greedy_decode(
            model,
            batch,
            max_new_tokens,
            eos,
            cache=cache,
            first_logits=first_logits,
            temperature=temperature,
            generator=generator,
        )
        responses.extend(cast(str, tokenizer.decode(t, skip_special_tokens=True)) for t in tokens)  # one row: a str
    return responses
