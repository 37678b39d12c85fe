"""Tiered judging: the search scores every trial cheaply; the finalists are re-judged carefully before one is chosen.

During the search a trial is scored by refusal markers with early decisions, first-token KL and (optionally) the
answer-NLL proxy. Those are good enough to steer TPE but not to pick the model people will use. After the search,
``finalist_trials`` takes the best few Pareto-front trials under the limits, and ``judge_finalists`` measures the
unedited model and each finalist on prompts the search never saw:

* the harmful *test* prompts, ``new_tokens`` greedy tokens (no early stop), judged by the refusal markers **and**
  the calibrated semantic detector (``measure.labelled.calibrated_semantic_detector``); *either* counts a refusal;
* the over-refusal set (harmless prompts with alarming words), generated and judged the same way;
* capability: greedy answers to the capability set, accuracy and retention against the unedited model;
* first-token KL on the harmless test prompts, spread across system prompts (``core.prompts.spread_system_prompts``);
* the NLL proxy on the harmless test prompts (the unedited model's own answers, re-scored).

``choose_finalist`` then picks the finalist with the fewest refusals by either judge among those that keep every
limit (KL, capability retention, over-refusal not above the unedited model's), and says which limits failed when
none keeps them all. Each arm's measures are written to ``<run>/finalists/`` as soon as they exist, so a killed
run resumes without measuring an arm twice.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from ..core.generation import generate
from ..core.prompts import PromptSet
from ..directions.base import Directions
from ..interventions.edits import apply_edits
from ..measure.capability import AnswerNLLProxy, CapabilityItem, capability_answers
from ..measure.detectors import Detector
from ..measure.metrics import first_token_logprobs, kl_from_logprobs
from ..measure.report import proportion_interval
from .study import SearchError, edits_from_params, pareto, trial_params

ORIGINAL = "original"


@dataclass
class FinalistSets:
    """What the finalists are judged on (none of it seen by the search)."""

    harmful: PromptSet  # the harmful test prompts
    harmless: list[PromptSet]  # the harmless test prompts, one set per system prompt variant
    over_refusal: PromptSet
    items: list[CapabilityItem]


@dataclass
class FinalistJudges:
    """The two refusal judges; ``markers`` is the search's own (the run's behaviour as a detector)."""

    markers: Detector
    semantic: Detector


@dataclass
class FinalistSettings:
    new_tokens: int = 128  # greedy tokens per harmful test response
    over_refusal_tokens: int = 64  # per over-refusal response (the semantic judge reads the first 300 characters)
    capability_tokens: int = 48  # greedy tokens per capability answer
    proxy_tokens: int = 32  # reference answer tokens of the NLL proxy
    batch_size: int | None = 128  # decoding on a CPU gets ~1.6x faster per token from batch 32 to 120
    kl_max: float = 0.2
    min_retention: float = 0.97
    progress: bool = True


@dataclass
class FinalistResults:
    """``table``: one row per arm (``original`` first, then ``trial N``), every judge's counts, KL, NLL, capability.
    ``responses``: one row per (arm, prompt set, prompt) with the response and each judge's verdict."""

    table: pd.DataFrame
    responses: pd.DataFrame
    seconds: float = 0.0
    chosen: int | None = None
    violations: dict[str, list[str]] = field(default_factory=dict)


def finalist_trials(
    study: optuna.Study, *, n: int, kl_max: float, max_nll_increase: float | None = None
) -> list[optuna.trial.FrozenTrial]:
    """Up to ``n`` Pareto-front trials with KL ≤ ``kl_max`` (and NLL increase ≤ ``max_nll_increase`` when given),
    fewest refusals first (ties: lower KL). Raises ``SearchError`` when none is under the limits."""
    front = pareto(study)
    if front.empty:
        raise SearchError("no finished, unpruned trial to choose from; run more trials")
    under = front[front["kl"] <= kl_max]
    if max_nll_increase is not None and "nll_increase" in under:
        under = under[under["nll_increase"] <= max_nll_increase]
    if under.empty:
        limits = f"KL ≤ {kl_max}" + (f" and NLL increase ≤ {max_nll_increase}" if max_nll_increase is not None else "")
        raise SearchError(
            f"no Pareto-front trial has {limits} (lowest KL {front['kl'].min():.3f}); raise --kl-max "
            "(or --max-nll-increase), run more trials, or pick one with --trial N"
        )
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    return [by_number[int(t)] for t in under.sort_values(["refusals", "kl"])["trial"].head(n)]


def _judge(judges: FinalistJudges, texts: list[str]) -> tuple[list[bool], list[bool]]:
    markers = [bool(d) for d in judges.markers.detect(texts).decisions]
    semantic = [bool(d) for d in judges.semantic.detect(texts).decisions]
    return markers, semantic


def _counts(prefix: str, markers: list[bool], semantic: list[bool]) -> dict[str, Any]:
    either = [a or b for a, b in zip(markers, semantic)]
    n = len(markers)
    return {
        f"{prefix}_n": n,
        f"{prefix}_markers": sum(markers),
        f"{prefix}_semantic": sum(semantic),
        f"{prefix}_either": sum(either),
        f"{prefix}_either_ci": proportion_interval(sum(either), n) if n else (math.nan, math.nan),
        f"{prefix}_judges_disagree": sum(a != b for a, b in zip(markers, semantic)),
    }


@dataclass
class _Reference:
    """The unedited model's measures that the finalists are compared with."""

    logprobs: torch.Tensor  # first-token log-probs on the harmless test prompts [n, vocab]
    correct: list[bool]  # capability items answered right
    proxy: AnswerNLLProxy


def _measure_arm(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    sets: FinalistSets,
    judges: FinalistJudges,
    settings: FinalistSettings,
    reference: _Reference | None,
) -> tuple[dict[str, Any], pd.DataFrame, dict[str, Any]]:
    """Measure the model as it is now: (row of the table, responses, what a reference needs)."""
    row: dict[str, Any] = {}
    frames = []
    for name, prompts, new_tokens in (
        ("harmful", sets.harmful, settings.new_tokens),
        ("over_refusal", sets.over_refusal, settings.over_refusal_tokens),
    ):
        texts = generate(model, tok, prompts, max_new_tokens=new_tokens, batch_size=settings.batch_size, progress=False)
        markers, semantic = _judge(judges, texts)
        row.update(_counts(name, markers, semantic))
        frames.append(
            pd.DataFrame(
                {"set": name, "prompt": list(prompts), "response": texts, "markers": markers, "semantic": semantic}
            )
        )
    # Retention needs only the items the unedited model answered right: an edited arm answers just those.
    items = sets.items if reference is None else [i for i, ok in zip(sets.items, reference.correct) if ok]
    answers = capability_answers(
        model, tok, items, max_new_tokens=settings.capability_tokens, batch_size=settings.batch_size
    )
    correct = [bool(c) for c in answers["correct"]]
    row["capability_n"] = len(correct)
    row["capability_correct"] = sum(correct)
    logprobs = torch.cat(
        [first_token_logprobs(model, tok, g, batch_size=settings.batch_size, progress=False) for g in sets.harmless]
    )
    extra: dict[str, Any] = {"logprobs": logprobs, "correct": correct}
    if reference is None:
        row["kl"] = 0.0
        proxy = AnswerNLLProxy.build(
            model, tok, sets.harmless, max_new_tokens=settings.proxy_tokens, batch_size=settings.batch_size
        )
        extra["proxy"] = proxy
        row["nll"] = proxy.baseline
        correct_before = correct
    else:
        row["kl"] = float(kl_from_logprobs(reference.logprobs, logprobs).mean())
        row["nll"] = reference.proxy(model, tok)
        correct_before = [c for c in reference.correct if c]
    right = sum(correct_before)
    kept = sum(correct) if reference is not None else right
    row["capability_kept"] = kept
    row["retention"] = kept / right if right else math.nan
    row["retention_ci"] = proportion_interval(kept, right) if right else (math.nan, math.nan)
    responses = pd.concat(frames, ignore_index=True)
    responses = pd.concat(
        [
            responses,
            pd.DataFrame(
                {
                    "set": "capability",
                    "prompt": answers["question"],
                    "response": answers["response"],
                    "correct": answers["correct"],
                }
            ),
        ],
        ignore_index=True,
    )
    return row, responses, extra


def judge_finalists(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    trials: Sequence[optuna.trial.FrozenTrial],
    directions: dict[str, Directions],
    sets: FinalistSets,
    judges: FinalistJudges,
    settings: FinalistSettings,
    *,
    folder: Path | None = None,
    log: Callable[[str], None] = print,
) -> FinalistResults:
    """Measure the unedited model and each trial's edit (see the module docstring). ``folder``: where each arm's
    row and responses are kept (``finalists/``); an arm found there is read, not measured again."""
    t0 = time.perf_counter()
    arms: list[tuple[str, optuna.trial.FrozenTrial | None]] = [(ORIGINAL, None)]
    arms += [(f"trial {t.number}", t) for t in trials]
    rows, frames = [], []
    reference: _Reference | None = None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    for name, trial in tqdm(arms, desc="finalists", disable=not settings.progress):
        stem = name.replace(" ", "_")
        saved = [folder / f"{stem}{suffix}" for suffix in (".json", ".csv", ".pt")] if folder is not None else []
        if saved and all(p.exists() for p in saved[: 3 if trial is None else 2]):
            row = json.loads(saved[0].read_text())
            responses = pd.read_csv(saved[1])
            if trial is None:
                kept = torch.load(saved[2])
                proxy = AnswerNLLProxy(
                    tuple(sets.harmless),
                    tuple(kept["answers"]),
                    kept["baseline"],
                    settings.proxy_tokens,
                    settings.batch_size,
                )
                reference = _Reference(kept["logprobs"], kept["correct"], proxy)
        else:
            t1 = time.perf_counter()
            if trial is None:
                row, responses, extra = _measure_arm(model, tok, sets, judges, settings, None)
                reference = _Reference(extra["logprobs"], extra["correct"], extra["proxy"])
            else:
                assert reference is not None  # the original arm always runs first
                edits = edits_from_params(model, directions, trial_params(trial))
                with apply_edits(model, edits):
                    row, responses, _ = _measure_arm(model, tok, sets, judges, settings, reference)
            row = {"arm": name, "trial": None if trial is None else trial.number, **row}
            row["seconds"] = round(time.perf_counter() - t1, 1)
            if saved:
                if trial is None and reference is not None:
                    torch.save(
                        {
                            "logprobs": reference.logprobs,
                            "correct": reference.correct,
                            "answers": list(reference.proxy.answers),
                            "baseline": reference.proxy.baseline,
                        },
                        saved[2],
                    )
                responses.to_csv(saved[1], index=False)
                saved[0].write_text(json.dumps(row, indent=2))  # written last: it marks the arm as done
            log(
                f"{name}: refusals {row['harmful_either']}/{row['harmful_n']} (markers {row['harmful_markers']}, "
                f"semantic {row['harmful_semantic']}), over-refusal {row['over_refusal_either']}/"
                f"{row['over_refusal_n']}, capability {row['capability_correct']}/{row['capability_n']} "
                f"{'right' if trial is None else 'of those still right'} "
                f"(retention {row['retention']:.3f}), KL {row['kl']:.3f}, NLL {row['nll']:.3f} ({row['seconds']} s)"
            )
        rows.append(row)
        frames.append(responses.assign(arm=name))
    table = pd.DataFrame(rows)
    return FinalistResults(table, pd.concat(frames, ignore_index=True), seconds=time.perf_counter() - t0)


def finalist_violations(table: pd.DataFrame, settings: FinalistSettings) -> dict[str, list[str]]:
    """For each finalist arm, the limits it breaks: KL, capability retention, over-refusal above the original's."""
    original = table[table["arm"] == ORIGINAL].iloc[0]
    out = {}
    for _, row in table[table["arm"] != ORIGINAL].iterrows():
        broken = []
        if not row["kl"] <= settings.kl_max:
            broken.append(f"KL {row['kl']:.3f} > {settings.kl_max}")
        if not row["retention"] >= settings.min_retention:
            broken.append(f"capability retention {row['retention']:.3f} < {settings.min_retention}")
        if row["over_refusal_either"] > original["over_refusal_either"]:
            broken.append(
                f"over-refusal {row['over_refusal_either']} > the original's {original['over_refusal_either']}"
            )
        out[str(row["arm"])] = broken
    return out


def choose_finalist(results: FinalistResults, settings: FinalistSettings, log: Callable[[str], None] = print) -> int:
    """The trial number of the finalist to export: fewest refusals by either judge among the finalists that keep
    every limit (ties: lower KL). When none keeps them all, the one breaking the fewest limits, with a warning that
    names what it breaks (``results.violations`` holds every finalist's)."""
    table = results.table
    results.violations = finalist_violations(table, settings)
    candidates = table[table["arm"] != ORIGINAL].copy()
    if candidates.empty:
        raise SearchError("no finalist was judged; run more trials or lower the limits")
    candidates["broken"] = [len(results.violations[str(a)]) for a in candidates["arm"]]
    best = candidates.sort_values(["broken", "harmful_either", "kl"]).iloc[0]
    if best["broken"]:
        log(
            f"WARNING: no finalist keeps every limit; chose {best['arm']}, which breaks: "
            + "; ".join(results.violations[str(best["arm"])])
        )
    results.chosen = int(best["trial"])
    return results.chosen


def system_prompt_table(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    harmful: PromptSet,
    harmless: PromptSet,
    variants: dict[str, str | None],
    edits: list,
    detector: Detector,
    *,
    decide_after: int = 16,
    max_new_tokens: int = 100,
    batch_size: int | None = None,
) -> list[dict[str, Any]]:
    """Refusals (the search's judge with early decisions) before → after the edit, and first-token KL, on the same
    test prompts under each system prompt of ``variants``: does the edit hold however the model is prompted?"""
    from dataclasses import replace

    from .evaluator import TrialEvaluator

    rows = []
    for name, system_prompt in variants.items():
        evaluator = TrialEvaluator(
            model,
            tok,
            replace(harmful, system_prompt=system_prompt),
            replace(harmless, system_prompt=system_prompt),
            detector=detector,
            decide_after=decide_after,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            progress=False,
        )
        before = evaluator.baseline()
        after = evaluator.evaluate_edits(edits)
        rows.append(
            {
                "variant": name,
                "system_prompt": system_prompt,
                "n_prompts": after.n_prompts,
                "refusals_before": before.refusals,
                "refusals_after": after.refusals,
                "kl": after.kl,
                "n_harmless": len(harmless),
            }
        )
    return rows
