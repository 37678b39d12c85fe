"""Coherence of generated text, so that broken output cannot count as a behaviour change.

* ``distinct_n`` / ``repetition_rate``: pure functions of a token sequence (or a string, split into words and
  punctuation): the share of distinct n-grams, and the share of the text caught in a trailing loop
  ("the the the …", "TheTheThe…").
* ``coherence_nll``: the *unsteered* model's mean per-token NLL of each output (teacher-forced, via
  ``depth.response_nll``): fluent text the model could have written scores low, gibberish high.
* ``steered_outputs``: steer, generate, judge (several refusal detectors) and measure coherence, one row per
  prompt.
* ``coherent_choice``: pick a strength on validation rows at matched coherence (the best-scoring setting whose
  coherence stays within fixed margins of the unsteered model's).
(``report.clustered_estimate`` pools a rate over seeds with a bootstrap that resamples questions.)
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Hashable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np
import pandas as pd
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..core.generation import generate
from .depth import PromptCache, response_nll
from .detectors import Detector, detect_with

_WORDS = re.compile(r"\w+|[^\w\s]")


def text_tokens(text: str) -> list[str]:
    """Words and single punctuation marks of ``text``, lower-cased: ``"Hi, hi!"`` → ``["hi", ",", "hi", "!"]``."""
    return [t.lower() for t in _WORDS.findall(text)]


def _tokens(tokens: Sequence[Hashable] | str) -> list[Hashable]:
    return list(text_tokens(tokens)) if isinstance(tokens, str) else list(tokens)


def distinct_n(tokens: Sequence[Hashable] | str, n: int = 2) -> float:
    """Distinct n-grams / all n-grams of one text (1.0 = no n-gram repeats; loops drive it towards 0).

    ``tokens``: token ids or any hashables, or a string (split by ``text_tokens``). NaN when the text has fewer than
    ``n`` tokens (no n-gram to judge).
    """
    if n < 1:
        raise ValueError(f"distinct_n needs n >= 1, got {n}")
    seq = _tokens(tokens)
    grams = [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]
    return len(set(grams)) / len(grams) if grams else math.nan


def repetition_rate(tokens: Sequence[Hashable] | str, max_period: int = 8) -> float:
    """Share of the text inside its trailing loop: the longest suffix that repeats a unit of ``p ≤ max_period``
    tokens at least twice in a row, divided by the text's length (0.0 when the text does not end in a loop).

    ``"a b c b c b c"`` ends in ``(b c)×3``: 6 of 7 tokens → 6/7. Greedy decoding that breaks down ends in such a
    loop; fluent text almost never does. NaN for an empty text.
    """
    seq = _tokens(tokens)
    n = len(seq)
    if n == 0:
        return math.nan
    longest = 0
    for p in range(1, min(max_period, n // 2) + 1):
        length = p  # the last unit; extend backwards while a token equals the one p later
        while length < n and seq[n - 1 - length] == seq[n - 1 - length + p]:
            length += 1
        if length >= 2 * p:
            longest = max(longest, length)
    return longest / n


def coherence_nll(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    max_tokens: int = 64,
    batch_size: int | None = None,
    prompt_cache: PromptCache | None = None,
    **chat_kwargs: Any,
) -> np.ndarray:
    """Mean NLL per response token ``[n]`` under the model as it is now (call it *outside* any steering context).

    Teacher forcing is ``depth.response_nll`` (first ``max_tokens`` tokens of each response). An empty response
    has no token to score: NaN (not 0, which would read as perfectly fluent). ``prompt_cache``: a
    ``depth.PromptCache`` shared by the calls that score responses to the same prompts (each arm of an experiment),
    so that each prompt runs through the model once.
    """
    nll = response_nll(
        model,
        tokenizer,
        list(prompts),
        list(responses),
        max_tokens=max_tokens,
        batch_size=batch_size,
        prompt_cache=prompt_cache,
        **chat_kwargs,
    )
    out = nll.double().numpy().copy()
    empty = [not tokenizer.encode(r, add_special_tokens=False) for r in responses]
    out[np.array(empty, dtype=bool)] = math.nan
    return out


def steered_outputs(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    make: Callable[[], AbstractContextManager] | None,
    *,
    detectors: Mapping[str, Detector],
    max_new_tokens: int = 64,
    batch_size: int | None = None,
    nll_batch_size: int = 8,
    prompt_cache: PromptCache | None = None,
    share_prefix: bool = False,
    progress: bool = False,
    **chat_kwargs: Any,
) -> pd.DataFrame:
    """Generate under ``make()`` (``None``: unsteered), judge every response, measure its coherence.

    Returns one row per prompt: ``prompt``, ``response``, one bool column per detector (``True`` = refusal),
    ``nll`` (the unsteered model's mean per-token NLL of the response, ``coherence_nll``), ``distinct_2`` and
    ``repetition`` (on the tokenizer's ids), ``n_tokens``. Greedy decoding, so the rows depend only on the
    intervention and the prompts. ``batch_size``: rows per generation batch (large batches decode faster on CPU);
    ``nll_batch_size``: rows per teacher-forced batch (each holds ``max_new_tokens × vocab`` logits).
    ``prompt_cache``: a ``depth.PromptCache`` of this model shared by every arm, so that the coherence pass runs each
    prompt through the unsteered model once (``coherence_nll``). ``share_prefix``: generate running the chat prefix
    once per batch (``core.generation.generate``), only for interventions that act alike at every position.
    """
    with make() if make is not None else nullcontext():
        responses = generate(
            model,
            tokenizer,
            list(prompts),
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            progress=progress,
            share_prefix=share_prefix,
            **chat_kwargs,
        )
    frame = pd.DataFrame({"prompt": list(prompts), "response": responses})
    for name, detector in detectors.items():
        frame[name] = detect_with(detector, responses, list(prompts)).decisions
    frame["nll"] = coherence_nll(
        model,
        tokenizer,
        prompts,
        responses,
        max_tokens=max_new_tokens,
        batch_size=nll_batch_size,
        prompt_cache=prompt_cache,
        **chat_kwargs,
    )
    ids = [tokenizer.encode(r, add_special_tokens=False) for r in responses]
    frame["distinct_2"] = [distinct_n(t, 2) for t in ids]
    frame["repetition"] = [repetition_rate(t) for t in ids]
    frame["n_tokens"] = [len(t) for t in ids]
    return frame


def coherent_choice(
    summary: pd.DataFrame,
    *,
    base_nll: float,
    base_distinct: float,
    nll_margin: float,
    distinct_margin: float,
    score: str = "refusal",
    strength: str = "strength",
) -> pd.Series | None:
    """The best setting at matched coherence: among the rows of ``summary`` (one per setting, validation means)
    whose ``nll <= base_nll + nll_margin`` and ``distinct_2 >= base_distinct - distinct_margin``, the one with
    the highest ``score``; ties go to the smaller ``strength`` (the gentler intervention). ``None`` when no
    setting is coherent. Adds a boolean column ``coherent`` to ``summary`` (in place) so the choice can be shown.
    """
    summary["coherent"] = (summary["nll"] <= base_nll + nll_margin) & (
        summary["distinct_2"] >= base_distinct - distinct_margin
    )
    candidates = summary[summary["coherent"]]
    if candidates.empty:
        return None
    ranked = candidates.sort_values([score, strength], ascending=[False, True], kind="stable")
    return ranked.iloc[0]


__all__ = [
    "coherence_nll",
    "coherent_choice",
    "distinct_n",
    "repetition_rate",
    "steered_outputs",
    "text_tokens",
]
