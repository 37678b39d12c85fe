"""Arditi et al.'s direction selection: a cheap refusal metric and a scan over (position, layer) candidates.

* ``refusal_metric``: log-odds of the refusal-opening tokens at the last position, no generation:
  ``P_ref = Σ_{t∈R} p_t``, ``metric = log P_ref − log(1 − P_ref)``.
* ``score_candidates``: for each candidate ``r`` (mean difference at a post-instruction position and a residual
  index ``l``): ``bypass`` = mean metric on harmful prompts with ``r̂`` ablated everywhere (``ablation_hooks``),
  ``induce`` = mean metric on harmless prompts with raw ``r`` added at the input of block ``l``
  (``activation_addition``), ``kl`` = mean first-token ``KL(base ‖ ablated)`` on harmless prompts.
* ``choose_candidate``: the lowest ``bypass`` with ``induce > induce_min``, ``kl < kl_max``, ``l < max_layer_frac·L``.
* The per-seed protocol (notebook 05): ``seed_split`` → ``select_for_seed`` (training filter, directions,
  validation scores, ``filter_choices``: Arditi's choice and its fallbacks when no candidate passes, each with
  the filters it fails, ``SeedSelection.describe``) → test arms (``arm_interventions``, ``cached_outputs``,
  ``score_direction``).
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, cast

import pandas as pd
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..core.architecture import find_layers
from ..core.capture import capture_residuals
from ..core.prompts import PromptSet
from ..directions.base import Directions, mean_difference
from ..interventions.steering import ablation_hooks, activation_addition
from .judges import token_ids
from .metrics import Judge, first_token_logprobs, kl_from_logprobs, refusal_rate

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from .detectors import Detector

REFUSAL_WORDS = ("I", "I'm", "Sorry", "As", "Unfortunately")


def refusal_token_ids(tokenizer: PreTrainedTokenizerBase, words: Sequence[str] = REFUSAL_WORDS) -> list[int]:
    """Distinct first token ids of ``words`` (how refusals open; a response starts without a leading space)."""
    ids = token_ids(tokenizer, words)
    if not ids:
        raise ValueError(f"none of {list(words)} gives a token with this tokenizer; pass other words")
    return ids


def refusal_log_odds(logprobs: torch.Tensor, token_ids: Sequence[int]) -> torch.Tensor:
    """``log P_ref − log(1 − P_ref)`` per row of ``logprobs [n, vocab]``, ``P_ref = Σ_{t∈ids} p_t`` (stable)."""
    lp = logprobs.double()
    ids = torch.as_tensor(list(token_ids), dtype=torch.long, device=lp.device)
    log_p = torch.logsumexp(lp[:, ids], dim=-1)
    rest = lp.index_fill(1, ids, float("-inf"))
    log_rest = torch.logsumexp(rest, dim=-1)  # log(1 − P) summed directly: no cancellation when P ≈ 1
    return (log_p - log_rest).float()


@torch.no_grad()
def refusal_metric(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str] | PromptSet,
    *,
    token_ids: Sequence[int] | None = None,
    batch_size: int | None = None,
    progress: bool = False,
    share_prefix: bool = False,
    **chat_kwargs: Any,
) -> torch.Tensor:
    """The cheap refusal metric per prompt ``[n]`` (float32): log-odds of refusal-opening tokens at the first step.
    ``share_prefix``: see ``first_token_logprobs``."""
    ids = refusal_token_ids(tokenizer) if token_ids is None else list(token_ids)
    logprobs = first_token_logprobs(
        model, tokenizer, prompts, batch_size=batch_size, progress=progress, share_prefix=share_prefix, **chat_kwargs
    )
    return refusal_log_odds(logprobs, ids)


def training_filter_passes(
    metric_bad: torch.Tensor, metric_good: torch.Tensor, *, threshold: float = 0.0
) -> dict[str, torch.Tensor]:
    """Which training prompts pass Arditi et al.'s filter, before any fallback: ``{"harmful": [n_bad],
    "harmless": [n_good]}`` boolean masks (harmful refused: ``metric > threshold``; harmless answered: ``<``)."""
    return {"harmful": metric_bad > threshold, "harmless": metric_good < threshold}


def filter_training_prompts(
    metric_bad: torch.Tensor, metric_good: torch.Tensor, *, threshold: float = 0.0, min_keep: int = 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """Arditi et al.'s training filter: keep harmful prompts the model refuses (``metric > threshold``) and
    harmless prompts it answers (``metric < threshold``), judged by the cheap metric of the unedited model.

    Returns boolean masks ``([n_bad], [n_good])``. A side with fewer than ``min_keep`` survivors is kept whole
    (a weak refuser would otherwise leave too few prompts for a stable mean), with a warning naming the counts;
    ``SeedSelection.describe`` says it too.
    """
    masks = training_filter_passes(metric_bad, metric_good, threshold=threshold)
    for side, mask in masks.items():
        passed = int(mask.sum())
        if passed < min_keep:
            warnings.warn(
                f"training filter: only {passed} of {len(mask)} {side} training prompts pass (fewer than "
                f"min_keep={min_keep}), so that side is kept whole, unfiltered; lower min_keep to filter anyway",
                stacklevel=2,
            )
            masks[side] = torch.ones_like(mask)
    return masks["harmful"], masks["harmless"]


def post_instruction_positions(tokenizer: PreTrainedTokenizerBase, n: int | None = None) -> list[int]:
    """Negative positions of the chat-template tokens after the user's text (``<|im_end|>…assistant\\n``).

    Found by rendering a probe message; ``n`` caps how many (the last ones). At least ``[-1]``.
    """
    from ..core.prompts import format_chat

    marker = "XQZ"
    text = format_chat(tokenizer, [marker])[0]
    tail = text[text.rindex(marker) + len(marker) :]
    count = max(1, len(tokenizer.encode(tail, add_special_tokens=False)))
    count = count if n is None else min(count, n)
    return list(range(-count, 0))


def candidate_directions(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    harmful: Sequence[str] | PromptSet,
    harmless: Sequence[str] | PromptSet,
    *,
    positions: Sequence[int] | None = None,
    batch_size: int | None = None,
    progress: bool = False,
) -> dict[int, Directions]:
    """Mean-difference directions at each post-instruction ``position`` (default: all of them):
    ``{pos: Directions}``."""
    positions = list(positions) if positions is not None else post_instruction_positions(tokenizer)
    bad = capture_residuals(model, tokenizer, harmful, positions=positions, batch_size=batch_size, progress=progress)
    good = capture_residuals(model, tokenizer, harmless, positions=positions, batch_size=batch_size, progress=progress)
    return directions_per_position(bad, good, positions)


def directions_per_position(bad: torch.Tensor, good: torch.Tensor, positions: Sequence[int]) -> dict[int, Directions]:
    """``{position: mean-difference Directions}`` from residuals ``[n, len(positions), L+1, d]`` of each class."""
    out = {}
    for i, pos in enumerate(positions):
        dirs = mean_difference(bad[:, i], good[:, i])
        dirs.meta["position"] = pos
        out[pos] = dirs
    return out


def choose_candidate(
    frame: pd.DataFrame,
    *,
    n_layers: int,
    induce_min: float | None = 0.0,
    kl_max: float | None = 0.1,
    max_layer_frac: float | None = 0.8,
) -> int | None:
    """Index (label) of the row with the lowest ``bypass`` among rows with ``induce > induce_min``, ``kl < kl_max``
    and ``layer < max_layer_frac · n_layers``; ``None`` when no candidate passes. Pass ``None`` to drop a filter.
    """
    ok = pd.Series(True, index=frame.index)
    if induce_min is not None:
        ok &= frame["induce"] > induce_min
    if kl_max is not None:
        ok &= frame["kl"] < kl_max
    if max_layer_frac is not None:
        ok &= frame["layer"] < max_layer_frac * n_layers
    passing = frame[ok & frame["bypass"].notna()]
    if passing.empty:
        return None
    return passing["bypass"].idxmin()


@dataclass
class Selection:
    """Result of ``select_direction``: all candidates and the chosen one."""

    frame: pd.DataFrame  # position, layer, bypass, induce, kl, passes, chosen
    position: int | None
    layer: int | None
    direction: torch.Tensor | None  # raw r [d] of the choice
    directions: dict[int, Directions]
    baseline: dict = field(default_factory=dict)  # metric on harmful / harmless without intervention
    filters: dict = field(default_factory=dict)

    @property
    def chosen(self) -> pd.Series | None:
        rows = self.frame[self.frame["chosen"]]
        return None if rows.empty else rows.iloc[0]

    def __repr__(self) -> str:
        row = self.chosen
        if self.position is None or row is None:
            return f"Selection(no candidate passed {self.filters}; {len(self.frame)} scored)"
        return (
            f"Selection(position={self.position}, layer={self.layer}, bypass={row.bypass:.3f}, "
            f"induce={row.induce:.3f}, kl={row.kl:.4f}; {len(self.frame)} scored)"
        )


@torch.no_grad()
def score_candidates(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    directions: dict[int, Directions],
    harmful: Sequence[str] | PromptSet,
    harmless: Sequence[str] | PromptSet,
    *,
    layers: Sequence[int] | None = None,
    token_ids: Sequence[int] | None = None,
    batch_size: int | None = None,
    progress: bool = False,
) -> tuple[pd.DataFrame, dict]:
    """Score every ``(position, layer)`` candidate: ``bypass``, ``induce``, ``kl`` (see the module docstring).

    ``layers``: residual indices to try (default all blocks ``0..L-1``; ActAdd at index ``l`` adds at block ``l``'s
    input, so ``L`` itself is not a candidate). Cost: three forwards of the prompt sets per candidate, so keep the
    prompt sets small (Arditi et al.: 32) and the candidate set modest on a CPU. Both interventions act at every
    position, so each batch runs the chat prefix its prompts share once (``first_token_logprobs(share_prefix=True)``).
    Returns the frame and the baseline metrics (no intervention).
    """
    from tqdm.auto import tqdm

    n_blocks = len(find_layers(model))
    layers = list(range(n_blocks)) if layers is None else [i for i in layers if 0 <= i < n_blocks]
    ids = refusal_token_ids(tokenizer) if token_ids is None else list(token_ids)
    logprobs = partial(first_token_logprobs, model, tokenizer, batch_size=batch_size, progress=False, share_prefix=True)
    base_harmful = logprobs(harmful)
    base_harmless = logprobs(harmless)
    baseline = {
        "harmful": float(refusal_log_odds(base_harmful, ids).mean()),
        "harmless": float(refusal_log_odds(base_harmless, ids).mean()),
    }
    rows = []
    todo = [(pos, layer) for pos in directions for layer in layers]
    for pos, layer in tqdm(todo, desc="candidates", disable=not progress, leave=False):
        r = directions[pos].vectors[layer]
        with ablation_hooks(model, r):
            lp_harmful = logprobs(harmful)
            lp_harmless = logprobs(harmless)
        with activation_addition(model, r, resid=layer, alpha=1.0):  # the input of block ``layer``
            lp_induce = logprobs(harmless)
        rows.append(
            {
                "position": pos,
                "layer": layer,
                "norm": float(r.norm()),
                "bypass": float(refusal_log_odds(lp_harmful, ids).mean()),
                "induce": float(refusal_log_odds(lp_induce, ids).mean()),
                "kl": float(kl_from_logprobs(base_harmless, lp_harmless).mean()),
            }
        )
    return pd.DataFrame(rows), baseline


def select_direction(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    harmful_train: Sequence[str] | PromptSet,
    harmless_train: Sequence[str] | PromptSet,
    harmful_val: Sequence[str] | PromptSet,
    harmless_val: Sequence[str] | PromptSet,
    *,
    positions: Sequence[int] | None = None,
    layers: Sequence[int] | None = None,
    induce_min: float = 0.0,
    kl_max: float = 0.1,
    max_layer_frac: float = 0.8,
    token_ids: Sequence[int] | None = None,
    batch_size: int | None = None,
    progress: bool = False,
) -> Selection:
    """Arditi et al.'s selection: candidates from the train prompts, scored on the validation prompts.

    ``positions``: post-instruction positions (default all, see ``post_instruction_positions``); ``layers``: residual
    indices (default all blocks). Filters are parameters (``None`` disables one). The frame has every candidate,
    a ``passes`` column and a ``chosen`` column; ``Selection.position is None`` when nothing passes.
    """
    dirs = candidate_directions(
        model, tokenizer, harmful_train, harmless_train, positions=positions, batch_size=batch_size, progress=progress
    )
    frame, baseline = score_candidates(
        model,
        tokenizer,
        dirs,
        harmful_val,
        harmless_val,
        layers=layers,
        token_ids=token_ids,
        batch_size=batch_size,
        progress=progress,
    )
    n_layers = len(find_layers(model))
    return selection_from_frame(
        frame,
        dirs,
        n_layers=n_layers,
        baseline=baseline,
        induce_min=induce_min,
        kl_max=kl_max,
        max_layer_frac=max_layer_frac,
    )


def selection_from_frame(
    frame: pd.DataFrame,
    directions: dict[int, Directions],
    *,
    n_layers: int,
    baseline: dict | None = None,
    induce_min: float = 0.0,
    kl_max: float = 0.1,
    max_layer_frac: float = 0.8,
) -> Selection:
    """Apply the filters to an already scored frame (e.g. to try other thresholds without re-scoring)."""
    frame = frame.copy()
    passes = pd.Series(True, index=frame.index)
    if induce_min is not None:
        passes &= frame["induce"] > induce_min
    if kl_max is not None:
        passes &= frame["kl"] < kl_max
    if max_layer_frac is not None:
        passes &= frame["layer"] < max_layer_frac * n_layers
    frame["passes"] = passes
    best = choose_candidate(
        frame, n_layers=n_layers, induce_min=induce_min, kl_max=kl_max, max_layer_frac=max_layer_frac
    )
    frame["chosen"] = frame.index == best if best is not None else False
    filters = {"induce_min": induce_min, "kl_max": kl_max, "max_layer_frac": max_layer_frac, "n_layers": n_layers}
    if best is None:
        return Selection(frame, None, None, None, directions, baseline or {}, filters)
    pos, layer = int(frame.at[best, "position"]), int(frame.at[best, "layer"])
    return Selection(frame, pos, layer, directions[pos].vectors[layer].clone(), directions, baseline or {}, filters)


def plot_candidates(
    selection: Selection | pd.DataFrame,
    *,
    metrics: Sequence[str] = ("bypass", "induce", "kl"),
    axes: Sequence[Axes] | None = None,
) -> Figure:
    """Heat-maps (position × layer) of the candidate scores, the chosen cell boxed, failing cells hatched.

    Returns the matplotlib figure.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    frame = selection.frame if isinstance(selection, Selection) else selection
    if axes is None:
        _, axes_grid = plt.subplots(
            len(metrics),
            1,
            figsize=(
                min(14, 2 + 0.45 * frame["layer"].nunique()),
                1.6 + 1.4 * len(metrics) * max(1, frame["position"].nunique()) / 3,
            ),
            squeeze=False,
        )
        axes = list(axes_grid[:, 0])
    fig = cast("Figure", axes[0].figure)  # a SubFigure has no tight_layout; the axes are a figure's own
    cmaps = {"bypass": "viridis", "induce": "magma", "kl": "cividis"}
    for ax, metric in zip(axes, metrics):
        grid = frame.pivot(index="position", columns="layer", values=metric)
        im = ax.imshow(grid.values, aspect="auto", cmap=cmaps.get(metric, "viridis"))
        ax.set_yticks(range(len(grid.index)), [str(p) for p in grid.index])
        ax.set_xticks(range(len(grid.columns)), [str(c) for c in grid.columns], fontsize=7)
        ax.set_ylabel("position")
        ax.set_title(metric)
        fig.colorbar(im, ax=ax, fraction=0.025)
        if "passes" in frame:
            ok = frame.pivot(index="position", columns="layer", values="passes")
            for i, pos in enumerate(ok.index):
                for j, lay in enumerate(ok.columns):
                    passes = ok.at[pos, lay]
                    if pd.notna(passes) and not bool(passes):
                        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="//", lw=0, alpha=0.4))
        if "chosen" in frame and frame["chosen"].any():
            row = frame[frame["chosen"]].iloc[0]
            j = list(grid.columns).index(row["layer"])
            i = list(grid.index).index(row["position"])
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="red", lw=2))
    axes[-1].set_xlabel("layer (residual index)")
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------------------
# Evaluating a chosen direction (generation-based, with early stopping)
# ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def judge_refusals(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str] | PromptSet,
    *,
    max_new_tokens: int = 24,
    detector: Detector | Judge | None = None,
    batch_size: int | None = None,
    **chat_kwargs: Any,
) -> pd.DataFrame:
    """Greedy generation judged by markers, stopping a row as soon as a marker matches (more tokens cannot undo it).

    Same decisions as ``metrics.refusal_rate`` with a ``MarkerDetector`` (up to the cap), fewer decoding steps.
    Returns ``(prompt, response, refused)`` with ``attrs['refusal_rate']``.
    """
    return refusal_rate(
        model,
        tokenizer,
        prompts,
        detector=detector,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size or 16,
        early_stop=True,
        progress=False,
        **chat_kwargs,
    )


@torch.no_grad()
def evaluate_direction(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    direction: torch.Tensor | None,
    layer: int,
    harmful: Sequence[str] | PromptSet,
    harmless: Sequence[str] | PromptSet,
    *,
    baseline_harmless: torch.Tensor | None = None,
    add: bool = True,
    max_new_tokens: int = 24,
    detector: Detector | Judge | None = None,
    batch_size: int | None = None,
) -> dict[str, float]:
    """Refusal effects of one direction (``None`` = the unedited model, a control):

    ``refusal_ablated``: refusal rate on ``harmful`` with ``direction`` (``[d]`` or a basis ``[k, d]``) ablated by
    hooks at every layer; ``refusal_added``: refusal rate on ``harmless`` with the raw ``[d]`` direction added at
    block ``layer`` (``add=False`` or a basis skips it: NaN); ``kl``: first-token ``KL(base ‖ ablated)`` on
    ``harmless``; ``metric_*``: the cheap refusal metric (mean log-odds) in the same two settings.
    """
    ids = refusal_token_ids(tokenizer)
    judge = partial(
        judge_refusals, model, tokenizer, max_new_tokens=max_new_tokens, detector=detector, batch_size=batch_size
    )
    if baseline_harmless is None:
        baseline_harmless = first_token_logprobs(model, tokenizer, harmless, batch_size=batch_size, progress=False)
    out = {"norm": float("nan") if direction is None else float(direction.norm())}
    ablation: AbstractContextManager[object]
    addition: AbstractContextManager[object] | None
    if direction is None:
        ablation, addition = nullcontext(), nullcontext()
    else:
        ablation = ablation_hooks(model, direction)
        # the input of block ``layer`` (a negative ``layer`` counts blocks from the end)
        resid = layer if layer >= 0 else layer + len(find_layers(model))
        addition = activation_addition(model, direction, resid=resid) if add and direction.ndim == 1 else None
    with ablation:
        out["refusal_ablated"] = judge(harmful).attrs["refusal_rate"]
        out["metric_ablated"] = float(
            refusal_metric(model, tokenizer, harmful, token_ids=ids, batch_size=batch_size).mean()
        )
        lp = first_token_logprobs(model, tokenizer, harmless, batch_size=batch_size, progress=False)
        out["kl"] = float(kl_from_logprobs(baseline_harmless, lp).mean())
    if addition is None:
        out["refusal_added"] = out["metric_added"] = float("nan")
    else:
        with addition:
            out["refusal_added"] = judge(harmless).attrs["refusal_rate"]
            out["metric_added"] = float(
                refusal_metric(model, tokenizer, harmless, token_ids=ids, batch_size=batch_size).mean()
            )
    return out


# ----------------------------------------------------------------------------------------------------------
# The per-seed protocol of notebook 05: split → training filter → directions → validation selection → test
# ----------------------------------------------------------------------------------------------------------

# Which of Arditi et al.'s three filters each choice applies, in the order a fallback is tried.
FILTER_SETS: dict[str, tuple[str, ...]] = {
    "arditi": ("induce", "kl", "layer"),  # the paper's selection
    "kl_capped": ("kl", "layer"),  # induce dropped: the best candidate that keeps the KL cap
    "relaxed": ("induce", "layer"),  # KL cap dropped
    "layer_only": ("layer",),  # both dropped
}


def filter_masks(
    frame: pd.DataFrame,
    *,
    n_layers: int,
    induce_min: float = 0.0,
    kl_max: float = 0.1,
    max_layer_frac: float = 0.8,
) -> dict[str, pd.Series]:
    """Boolean masks ``{"induce", "kl", "layer"}`` over the rows of a scored frame: ``induce > induce_min``,
    ``kl < kl_max``, ``layer < max_layer_frac · n_layers`` (NaN scores fail)."""
    return {
        "induce": frame["induce"] > induce_min,
        "kl": frame["kl"] < kl_max,
        "layer": frame["layer"] < max_layer_frac * n_layers,
    }


def filter_choices(
    frame: pd.DataFrame,
    *,
    n_layers: int,
    induce_min: float = 0.0,
    kl_max: float = 0.1,
    max_layer_frac: float = 0.8,
) -> dict[str, int | None]:
    """The lowest-``bypass`` row (index label) under each filter set of ``FILTER_SETS``: ``"arditi"`` (all three),
    ``"kl_capped"`` (KL and layer), ``"relaxed"`` (induce and layer), ``"layer_only"``; ``None`` where no row
    passes. Pure: nothing is re-scored."""
    return {
        name: choose_candidate(
            frame,
            n_layers=n_layers,
            induce_min=induce_min if "induce" in used else None,
            kl_max=kl_max if "kl" in used else None,
            max_layer_frac=max_layer_frac if "layer" in used else None,
        )
        for name, used in FILTER_SETS.items()
    }


def primary_choice(choices: dict[str, int | None]) -> str | None:
    """The filter set whose choice a protocol evaluates as *the* chosen direction: Arditi's when a candidate passes
    all filters, else the relaxed one (KL cap dropped), else layer only; ``None`` when even that is empty."""
    for name in ("arditi", "relaxed", "layer_only"):
        if choices.get(name) is not None:
            return name
    return None


def failed_filters(
    row: pd.Series | dict[str, Any],
    *,
    n_layers: int,
    induce_min: float = 0.0,
    kl_max: float = 0.1,
    max_layer_frac: float = 0.8,
) -> list[str]:
    """The filters one candidate fails, as text with its value, e.g. ``["KL < 0.1 (0.703)"]`` (empty: passes)."""
    failed = []
    if not row["induce"] > induce_min:
        failed.append(f"induce > {induce_min:g} ({row['induce']:.3g})")
    if not row["kl"] < kl_max:
        failed.append(f"KL < {kl_max:g} ({row['kl']:.3g})")
    if not row["layer"] < max_layer_frac * n_layers:
        failed.append(f"layer < {max_layer_frac * n_layers:g} ({int(row['layer'])})")
    return failed


def seed_split(n: int, *, n_test: int, n_val: int, seed: int) -> tuple[list[int], list[int], list[int]]:
    """Disjoint ``(train, val, test)`` index lists over ``range(n)``: a seeded shuffle, the first ``n_test`` for
    test, the next ``n_val`` for validation, the rest for training."""
    if n_test + n_val >= n:
        raise ValueError(f"seed_split: {n_test} test + {n_val} validation leave no training item out of {n}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order[n_test + n_val :], order[n_test : n_test + n_val], order[:n_test]


@dataclass
class SeedSelection:
    """One seed of the protocol: its splits, its training filter, its directions, its scored candidates.

    ``splits[side] = (train, val, test)`` index lists into that side's prompt set (``side``: ``"harmful"`` /
    ``"harmless"``); ``kept[side]``: the training indices the filter kept; ``frame``: every candidate scored on the
    validation prompts (``passes`` = all three filters, ``chosen`` = the primary choice); ``choices``: the row
    under each filter set (``filter_choices``).
    """

    seed: int
    splits: dict[str, tuple[list[int], list[int], list[int]]]
    kept: dict[str, list[int]]
    directions: dict[int, Directions]
    frame: pd.DataFrame
    choices: dict[str, int | None]
    filters: dict[str, Any]
    baseline: dict[str, float] = field(default_factory=dict)

    @property
    def primary(self) -> str | None:
        """The filter set of the evaluated choice (``primary_choice``)."""
        return primary_choice(self.choices)

    def row(self, name: str) -> pd.Series | None:
        """The scored row chosen under filter set ``name`` (``None`` when nothing passes it)."""
        index = self.choices.get(name)
        return None if index is None else self.frame.loc[index]

    def vector(self, name: str) -> torch.Tensor:
        """The raw direction ``[d]`` chosen under filter set ``name``."""
        row = self.row(name)
        if row is None:
            raise KeyError(f"seed {self.seed}: no candidate passes filter set {name!r}")
        return self.directions[int(row["position"])].vectors[int(row["layer"])].clone()

    def arms(self) -> dict[str, str]:
        """Edited arms to evaluate on test, ``{arm: filter set}``: ``"chosen"`` (the primary choice) and, when no
        candidate passes all three filters, ``"KL-capped"`` (the best candidate under the KL cap) if there is one."""
        out: dict[str, str] = {}
        primary = self.primary
        if primary is not None:
            out["chosen"] = primary
        capped = self.choices.get("kl_capped")
        if primary != "arditi" and capped is not None and (primary is None or capped != self.choices[primary]):
            out["KL-capped"] = "kl_capped"
        return out

    def describe(self) -> str:
        """What the selection found, as computed text (markdown): how many candidates pass each filter, the choice
        under each filter set and which filters it fails."""
        f = self.filters
        kw = {k: f[k] for k in ("n_layers", "induce_min", "kl_max", "max_layer_frac")}
        masks = filter_masks(self.frame, **kw)
        n = len(self.frame)
        counts = ", ".join(
            f"{int(m.sum())}/{n} pass {label}"
            for m, label in (
                (masks["induce"], f"induce > {f['induce_min']:g}"),
                (masks["kl"], f"KL < {f['kl_max']:g}"),
                (masks["layer"], f"layer < {f['max_layer_frac'] * f['n_layers']:g}"),
            )
        )
        all_three = int((masks["induce"] & masks["kl"] & masks["layer"]).sum())
        passed = f.get("train_passed", {})
        train = {
            s: f"{len(self.kept[s])}/{len(self.splits[s][0])}"
            + (
                f" (**kept whole**: only {passed[s]} passed, fewer than min_keep={f['min_keep']})"
                if s in passed and passed[s] < len(self.kept[s])
                else ""
            )
            for s in self.kept
        }
        lines = [
            f"**seed {self.seed}** (training filter kept {train['harmful']} harmful, {train['harmless']} harmless; "
            f"{len(self.splits['harmful'][1])} + {len(self.splits['harmless'][1])} validation prompts): {counts}; "
            f"**{all_three}/{n} pass all three** (Arditi et al.'s filters)."
        ]
        labels = {
            "arditi": "Arditi's choice (all three filters)",
            "kl_capped": "best under the KL cap (induce filter dropped)",
            "relaxed": "relaxed choice (KL cap dropped)",
            "layer_only": "layer filter only",
        }
        evaluated = {arm: self.choices[fset] for arm, fset in self.arms().items()}
        for name, label in labels.items():
            row = self.row(name)
            if row is None:
                lines.append(f"  - {label}: none.")
                continue
            failed = failed_filters(row, **kw)
            arms = [arm for arm, index in evaluated.items() if index == self.choices[name]]
            tag = f" → evaluated on test as **{' = '.join(arms)}**" if arms else ""
            lines.append(
                f"  - {label}: position {int(row['position'])}, layer {int(row['layer'])} (bypass "
                f"{row['bypass']:.3g}, induce {row['induce']:.3g}, KL {row['kl']:.3g})"
                + (f"; fails {', '.join(failed)}" if failed else "; passes all three")
                + tag
                + "."
            )
        return "\n".join(lines)


def select_for_seed(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    residuals: dict[str, torch.Tensor],
    metrics: dict[str, torch.Tensor],
    prompts: dict[str, PromptSet],
    *,
    seed: int,
    n_test: int,
    n_val: int,
    positions: Sequence[int],
    layers: Sequence[int],
    induce_min: float = 0.0,
    kl_max: float = 0.1,
    max_layer_frac: float = 0.8,
    min_keep: int = 32,
    batch_size: int | None = None,
    progress: bool = False,
) -> SeedSelection:
    """Arditi et al.'s selection for one seed, on that seed's own splits.

    ``residuals[side]``: ``[n_side, len(positions), R, d]`` residuals of every prompt of ``prompts[side]`` at
    ``positions`` and residual indices ``0..R-1`` (``R > max(layers)``), captured once for all seeds;
    ``metrics[side]``: ``[n_side]`` the unedited model's cheap refusal metric of every prompt (``refusal_metric``).
    Steps: ``seed_split`` each side → Arditi's training filter on the training prompts (``filter_training_prompts``)
    → mean-difference directions per position from the kept training prompts → ``score_candidates`` on the
    validation prompts → ``filter_choices``. The test prompts are not touched.
    """
    sides = ("harmful", "harmless")
    splits = {s: seed_split(len(prompts[s]), n_test=n_test, n_val=n_val, seed=seed) for s in sides}
    train = {s: torch.as_tensor(splits[s][0]) for s in sides}
    train_metric = {s: metrics[s][train[s]] for s in sides}
    passes = training_filter_passes(train_metric["harmful"], train_metric["harmless"])
    passed = {side: int(mask.sum()) for side, mask in passes.items()}
    keep_bad, keep_good = filter_training_prompts(train_metric["harmful"], train_metric["harmless"], min_keep=min_keep)
    rows_bad, rows_good = train["harmful"][keep_bad], train["harmless"][keep_good]
    directions = directions_per_position(residuals["harmful"][rows_bad], residuals["harmless"][rows_good], positions)
    val = {s: [prompts[s][j] for j in splits[s][1]] for s in sides}
    frame, baseline = score_candidates(
        model,
        tokenizer,
        directions,
        val["harmful"],
        val["harmless"],
        layers=layers,
        batch_size=batch_size,
        progress=progress,
    )
    n_layers = len(find_layers(model))
    kw: dict[str, Any] = {
        "n_layers": n_layers,
        "induce_min": induce_min,
        "kl_max": kl_max,
        "max_layer_frac": max_layer_frac,
    }
    choices = filter_choices(frame, **kw)
    masks = filter_masks(frame, **kw)
    frame["passes"] = masks["induce"] & masks["kl"] & masks["layer"]
    primary = primary_choice(choices)
    frame["chosen"] = frame.index == choices[primary] if primary is not None else False
    frame.insert(0, "seed", seed)
    return SeedSelection(
        seed=seed,
        splits=splits,
        kept={"harmful": rows_bad.tolist(), "harmless": rows_good.tolist()},
        directions=directions,
        frame=frame,
        choices=choices,
        filters={**kw, "min_keep": min_keep, "train_passed": passed},
        baseline=baseline,
    )


def arm_interventions(
    model: nn.Module, vector: torch.Tensor | None, layer: int
) -> tuple[Callable[[], AbstractContextManager] | None, Callable[[], AbstractContextManager] | None]:
    """``(ablate, add)`` factories for one direction ``[d]``: hooks projecting ``r̂`` out everywhere, and ``r``
    added at the input of block ``layer`` (Arditi's ActAdd, α = 1). ``vector=None``: the unedited model."""
    if vector is None:
        return None, None
    return (lambda: ablation_hooks(model, vector)), (lambda: activation_addition(model, vector, resid=layer, alpha=1.0))


def cached_outputs(
    cache: dict[str, pd.DataFrame],
    key: str,
    produce: Callable[[list[str]], pd.DataFrame],
    prompts: Sequence[str],
) -> pd.DataFrame:
    """Rows for ``prompts`` under arm ``key``, producing (``produce(missing) → frame with a "prompt" column``) only
    the prompts not yet in ``cache[key]`` (greedy decoding is deterministic, so e.g. the unedited model's answer to
    a prompt in several seeds' test splits is generated once). Rows come back in the order of ``prompts``."""
    have = cache.get(key)
    seen = set() if have is None else set(have["prompt"])
    missing = list(dict.fromkeys(p for p in prompts if p not in seen))
    if missing:
        new = produce(missing)
        cache[key] = new if have is None else pd.concat([have, new], ignore_index=True)
    return cache[key].set_index("prompt").loc[list(prompts)].reset_index()


@torch.no_grad()
def score_direction(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    vector: torch.Tensor,
    layer: int,
    harmful: Sequence[str] | PromptSet,
    harmless: Sequence[str] | PromptSet,
    *,
    base_harmless: torch.Tensor | None = None,
    token_ids: Sequence[int] | None = None,
    batch_size: int | None = None,
) -> dict[str, float]:
    """The cheap scores of one direction (no generation): ``bypass``, ``induce``, ``kl`` as in ``score_candidates``.

    ``vector``: a raw direction ``[d]`` or an orthonormal basis ``[k, d]`` (ablated as a subspace; ``induce`` is
    NaN: a basis has no single vector to add). ``base_harmless``: the unedited first-token log-probs of
    ``harmless`` ``[n, vocab]`` when already computed. The shared chat prefix runs once per batch, as in
    ``score_candidates``.
    """
    ids = refusal_token_ids(tokenizer) if token_ids is None else list(token_ids)
    logprobs = partial(first_token_logprobs, model, tokenizer, batch_size=batch_size, progress=False, share_prefix=True)
    if base_harmless is None:
        base_harmless = logprobs(harmless)
    with ablation_hooks(model, vector):
        lp_harmful = logprobs(harmful)
        lp_harmless = logprobs(harmless)
    induce = float("nan")
    if vector.ndim == 1:
        with activation_addition(model, vector, resid=layer, alpha=1.0):
            induce = float(refusal_log_odds(logprobs(harmless), ids).mean())
    return {
        "bypass": float(refusal_log_odds(lp_harmful, ids).mean()),
        "induce": induce,
        "kl": float(kl_from_logprobs(base_harmless, lp_harmless).mean()),
    }
