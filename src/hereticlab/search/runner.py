"""The main job as a library function: directions → baseline → Optuna search → choice → export → run record.

``run_search(RunConfig(...))`` does what ``hereticlab run`` does; a notebook can call it with its own settings and
get the study back. Everything expensive is written to the run directory as soon as it exists (directions,
baseline, each trial in the study storage), so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any, cast

import optuna
import pandas as pd
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..core.capture import capture_residuals
from ..core.models import load_model
from ..core.prompts import PromptSet, load_prompts, spread_system_prompts, system_prompt_variants
from ..directions.base import Directions
from ..directions.methods import DIRECTION_METHODS, compute_directions
from ..measure.behaviours import Behaviour, ContrastCheck, get_behaviour, measure_contrast
from ..measure.capability import OVER_REFUSAL_SET, AnswerNLLProxy
from ..measure.detectors import DetectionResult
from ..measure.metrics import first_token_logprobs, kl_divergence, refusal_rate
from .evaluator import TrialEvaluator, TrialResult, tune_batch_size
from .finalists import (
    ORIGINAL,
    FinalistJudges,
    FinalistResults,
    FinalistSets,
    FinalistSettings,
    choose_finalist,
    finalist_trials,
    finalist_violations,
    judge_finalists,
    system_prompt_table,
)
from .study import (
    OBJECTIVES,
    SearchError,
    SearchSpace,
    choose_trial,
    edits_from_params,
    finished_trials,
    make_storage,
    objective_values,
    open_study,
    pareto,
    plot_pareto,
    trial_params,
    trials_table,
)

# Settings that must match for a run directory to be resumed.
_IDENTITY_KEYS = (
    "model",
    "harmful",
    "harmless",
    "train_prompts",
    "search_prompts",
    "split_seed",
    "methods",
    "system_prompt",
    "decide_after",
    "max_new_tokens",
    "behaviour",
    "objectives",
    "system_prompt_variety",
)


@dataclass
class RunConfig:
    """Settings of one search run. Prompt counts are per class; the evaluation split is cut into a *search* part
    (what trials are scored on) and a *test* part (never seen by the search; used for the final report).

    ``behaviour``: a name from ``measure.behaviours`` (refusal by default). ``harmful`` / ``harmless`` /
    ``system_prompt`` / ``train_prompts`` / ``decide_after`` / ``max_new_tokens`` / ``final_new_tokens`` apply to a
    behaviour with ``run_settings`` (refusal); the style presets bring their own prompts, split and lengths (see
    ``run_behaviour``).
    """

    model: str = "default"
    harmful: str = "harmful"
    harmless: str = "harmless"
    out: str = "runs/default"
    storage: str | None = None
    study_name: str = "hereticlab"
    trials: int = 30
    startup_trials: int = 10
    seed: int = 0
    split_seed: int = 0
    train_prompts: int = 200
    search_prompts: int = 32
    methods: tuple[str, ...] = ("projected",)
    norms: tuple[str, ...] = ("none",)
    system_prompt: str | None = None
    decide_after: int = 16
    max_new_tokens: int = 100
    kl_ceiling: float | None = 1.0
    kl_floor: float = 0.01
    kl_max: float = 0.05
    choose: int | None = None
    batch_size: int | None = None
    final_new_tokens: int = 64
    export: bool = True
    behaviour: str = "refusal"
    dtype: str | None = None
    device: str | None = None
    # What the search minimizes: refusals and first-token KL, optionally the answer-NLL proxy ("nll").
    objectives: tuple[str, ...] = OBJECTIVES
    # A limit on the NLL proxy's increase (nats per token): TPE treats trials above it as infeasible and no
    # finalist is taken above it. The proxy is computed per trial only when this is set or objectives has "nll".
    max_nll_increase: float | None = None
    # Spread the harmless search prompts (KL, NLL proxy) across system prompts (core.prompts.system_prompt_variants)
    system_prompt_variety: bool = True
    # Tiered judging (refusal only): how many Pareto-front trials are re-judged on the test prompts (0: choose by
    # the search's own scores), with how many greedy tokens, and the capability retention a finalist must keep.
    finalists: int = 1
    judge_new_tokens: int = 128
    over_refusal_new_tokens: int = 64
    capability_new_tokens: int = 48
    min_retention: float = 0.97

    def identity(self) -> dict[str, Any]:
        data = asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in data.items() if k in _IDENTITY_KEYS}


@dataclass
class RunResult:
    study: optuna.Study
    out: Path
    chosen: optuna.trial.FrozenTrial | None = None
    record: dict[str, Any] = field(default_factory=dict)


def package_versions() -> dict[str, str]:
    names = ("hereticlab", "torch", "transformers", "optuna", "peft", "safetensors", "pandas", "numpy")
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def run_behaviour(config: RunConfig) -> Behaviour:
    """The behaviour a run searches for: ``config.behaviour`` from ``measure.behaviours`` (refusal by default).

    A behaviour with ``run_settings`` (refusal) takes the run's prompts and lengths: ``harmful`` / ``harmless``
    (with ``system_prompt``), ``train_prompts`` per class for directions (the rest is the evaluation part),
    ``decide_after``, ``max_new_tokens`` and ``final_new_tokens``. The others bring their own.
    """
    behaviour = get_behaviour(config.behaviour or "refusal")
    if not behaviour.run_settings:
        return behaviour
    chat = {"system_prompt": config.system_prompt} if config.system_prompt else {}
    bad = load_prompts(config.harmful, **chat)
    good = load_prompts(config.harmless, **chat)
    for s in (bad, good):
        if len(s) < config.train_prompts + 2:
            raise SearchError(
                f"{s.name} has {len(s)} prompts; need more than --train-prompts={config.train_prompts} "
                "plus an evaluation part; lower --train-prompts"
            )
    return behaviour.with_sets(
        bad,
        good,
        n_train=config.train_prompts,
        n_eval=None,
        decide_after=config.decide_after,
        max_new_tokens=config.max_new_tokens,
        final_new_tokens=config.final_new_tokens,
    )


def prompt_splits(config: RunConfig, behaviour: Behaviour | None = None) -> dict[str, PromptSet]:
    """train / search / test sets per class, disjoint and reproducible from ``split_seed``.

    ``behaviour``: default ``run_behaviour(config)``; its ``train_pair`` / ``eval_pair`` cut the sets.
    """
    behaviour = behaviour if behaviour is not None else run_behaviour(config)
    bad_train, good_train = behaviour.train_pair(config.split_seed)
    bad_eval, good_eval = behaviour.eval_pair(config.split_seed)
    n = min(config.search_prompts, len(bad_eval) - 1, len(good_eval) - 1)
    if n < 1:
        raise SearchError("the evaluation split is too small to hold a search part and a test part; add prompts")
    return {
        "bad_train": bad_train,
        "good_train": good_train,
        "bad_search": bad_eval[:n],
        "good_search": good_eval[:n],
        "bad_test": bad_eval[n:],
        "good_test": good_eval[n:],
    }


def _compute_directions(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    bad: PromptSet,
    good: PromptSet,
    methods: Sequence[str],
    batch_size: int | None = None,
) -> dict[str, Directions]:
    """Residuals of both training sets once, then ``directions.methods.compute_directions`` for each method.

    A method is ``name`` or ``name:k`` (rank ``k``), as ``--methods`` takes it.
    """
    res_bad = capture_residuals(model, tokenizer, bad, batch_size=batch_size, system_prompt=bad.system_prompt)
    res_good = capture_residuals(model, tokenizer, good, batch_size=batch_size, system_prompt=good.system_prompt)
    out = {}
    for method in methods:
        name, _, rank = method.partition(":")
        if name not in DIRECTION_METHODS:
            raise SearchError(
                f"unknown direction method {method!r}; known: {', '.join(DIRECTION_METHODS)} "
                "(append :k for a rank, e.g. svd:2)"
            )
        out[method] = compute_directions(name, res_bad, res_good, rank=int(rank or 1))
    return out


def _load_or_compute_directions(
    config: RunConfig,
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    splits: dict[str, PromptSet],
    out: Path,
) -> dict[str, Directions]:
    folder = out / "directions"
    paths = {m: folder / f"{m.replace(':', '_')}.safetensors" for m in config.methods}
    if all(p.exists() for p in paths.values()):
        return {m: Directions.load(p) for m, p in paths.items()}
    dirs = _compute_directions(
        model, tokenizer, splits["bad_train"], splits["good_train"], config.methods, config.batch_size
    )
    folder.mkdir(parents=True, exist_ok=True)
    for m, d in dirs.items():
        tmp = paths[m].with_suffix(f".tmp{os.getpid()}")
        d.save(tmp)
        tmp.replace(paths[m])
    return dirs


def _check_run_dir(config: RunConfig, out: Path, *, write: bool = True) -> None:
    """Stop when ``out`` holds a run with other settings; else (``write``) create it and write ``settings.json``.

    ``run_search`` checks first (``write=False``) and writes only once the pre-search checks passed, so a run that
    stops before searching leaves nothing a later run with other settings would trip on."""
    settings = out / "settings.json"
    if settings.exists():
        old = json.loads(settings.read_text())
        diff = {k: (old.get(k), v) for k, v in config.identity().items() if old.get(k) != v}
        if diff:
            first = next(iter(diff))
            raise SearchError(
                f"{out} holds a run with other settings ({first}: {diff[first][0]!r} there, "
                f"{diff[first][1]!r} now); use another --out or the same settings to resume"
            )
    elif write:
        out.mkdir(parents=True, exist_ok=True)
        _atomic_write(settings, json.dumps(config.identity(), indent=2))


def behaviour_check(
    config: RunConfig,
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    behaviour: Behaviour,
    *,
    enforce: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any] | None:
    """The pre-search check of a preset (``measure.behaviours.ContrastCheck``): does the model show the behaviour
    more on the bad (eliciting) training prompts than on the good ones? Raises ``SearchError`` with one line when
    it does not and ``enforce`` is True; returns the check as a dict for ``run.json`` (``enforced`` says whether it
    could stop the run). A behaviour with ``run_settings`` (refusal) is not checked: returns None.
    """
    if behaviour.run_settings:
        return None
    check: ContrastCheck = measure_contrast(
        model, tokenizer, behaviour, seed=config.split_seed, batch_size=config.batch_size
    )
    record = {**check.as_dict(), "enforced": enforce}
    if enforce:
        if not check.passed:
            raise SearchError(check.message)
        log(f"behaviour check passed: {check.summary}")
    else:
        outcome = "passed" if check.passed else "FAILED"
        log(f"WARNING: behaviour check NOT ENFORCED (--skip-behaviour-check); it {outcome}: {check.summary}")
    return record


def _rerun_interrupted(study: optuna.Study, numbers: Sequence[int] = (), *, killed: bool = True) -> int:
    """Enqueue the parameters of interrupted trials again, so that a resumed run evaluates each with its own
    parameters. Returns how many were enqueued.

    ``numbers``: trials this process started that failed because the run was interrupted (Optuna marks a trial
    FAIL when ``KeyboardInterrupt`` leaves the objective). ``killed``: also mark trials left RUNNING by a killed
    process as FAIL and enqueue them (only when no other worker can be running on this study).

    Optuna's ``enqueue_trial(skip_if_exists=True)`` cannot be used: it counts the FAIL trial itself as the
    existing copy and enqueues nothing. A trial is enqueued unless a waiting or complete trial already has its
    parameters (a second interruption before the requeued trial ran does not queue it twice).
    """
    done_or_waiting = [
        t.system_attrs.get("fixed_params", t.params)
        for t in study.get_trials(
            deepcopy=False, states=(optuna.trial.TrialState.WAITING, optuna.trial.TrialState.COMPLETE)
        )
    ]
    todo = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,)) if t.number in numbers]
    if killed:
        for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
            todo.append(trial)
    count = 0
    for trial in todo:
        if trial.params and trial.params not in done_or_waiting:
            study.enqueue_trial(dict(trial.params))
            done_or_waiting.append(trial.params)
            count += 1
    return count


class BehaviourDetector:
    """A ``Behaviour`` as a ``Detector`` (``measure.detectors``): ``detect`` gives its per-text decisions
    (``is_present``) and scores, ``decided(text)`` is ``True`` once the behaviour is present for good
    (``Behaviour.decided``), else ``None``. Calling it gives the decisions (``metrics.refusal_rate`` does).

    ``is_refusal`` and ``matched`` are the trial evaluator's names for ``detect`` / ``decided`` on one text (kept
    until ``search/evaluator.py`` calls the protocol); ``matched`` exists only when the behaviour says early
    stopping is safe for it (the evaluator stops a row on a positive decision only when it does).
    """

    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.name: str = behaviour.name
        self.early_stop_safe: bool = behaviour.early_stop_safe
        if behaviour.early_stop_safe:
            self.matched: Callable[[str], bool | None] = self.decided

    def detect(self, texts: Sequence[str], prompts: Sequence[str] | None = None) -> DetectionResult:
        """Per-text decisions and scores of the behaviour (``prompts`` is ignored)."""
        texts = list(texts)
        return DetectionResult(self.behaviour.is_present(texts), self.behaviour.score(texts))

    def decided(self, text: str) -> bool | None:
        """``True`` when no continuation of ``text`` can undo a positive decision, else ``None``."""
        return True if self.behaviour.decided([text])[0] else None

    def is_refusal(self, text: str) -> bool:
        """The decision on one text (the evaluator's name for it)."""
        return self.behaviour.is_present([text])[0]

    def __call__(self, texts: Sequence[str]) -> list[bool]:
        return self.behaviour.is_present(list(texts))


def get_detector(config: RunConfig, behaviour: Behaviour | None = None) -> BehaviourDetector:
    """The detector the search and the final report judge responses with: the run's behaviour as a Detector."""
    return BehaviourDetector(behaviour if behaviour is not None else run_behaviour(config))


def make_objective(
    evaluator: TrialEvaluator,
    model: torch.nn.Module,
    directions: dict[str, Directions],
    space: SearchSpace,
    kl_floor: float,
    extra_scorers: dict[str, Callable[[torch.nn.Module, PreTrainedTokenizerBase], float]] | None = None,
    measure: Callable[[list[str]], float] | None = None,
    worst: float | None = None,
    nll_proxy: AnswerNLLProxy | None = None,
    objectives: Sequence[str] = OBJECTIVES,
) -> Callable[[optuna.Trial], tuple[float, ...]]:
    """The Optuna objective: sample, edit in place, evaluate with prefix reuse, revert; store details as attrs.

    ``measure``: turns the responses into the first objective instead of counting decisions (a behaviour whose
    objective is a mean score, e.g. words); a pruned trial then scores ``worst``. The count of responses where the
    behaviour is present is kept as the ``present`` attribute. ``nll_proxy``: measured under every edit (attributes
    ``nll`` and ``nll_increase``, nats per token); ``objectives`` ending in ``"nll"`` make its increase (floored at
    0) a third objective.
    """
    if "nll" in objectives and nll_proxy is None:
        raise SearchError("the nll objective needs the answer-NLL proxy; it is built for the refusal behaviour only")
    from ..interventions.edits import apply_edits

    def objective(trial: optuna.Trial) -> tuple[float, ...]:
        t0 = time.perf_counter()
        params = space.suggest(trial)
        trial.set_user_attr("params", params)
        edits = edits_from_params(model, directions, params, space.components)
        result = evaluator.evaluate_edits(edits)
        value: float | None = result.refusals
        if measure is not None:
            trial.set_user_attr("present", result.refusals)
            value = None if result.pruned else round(float(measure(result.responses or [])), 4)
        trial.set_user_attr("kl", result.kl)
        trial.set_user_attr("refusals", value)
        trial.set_user_attr("pruned", result.pruned)
        trial.set_user_attr("decode_steps", result.decode_steps)
        scorers = dict(extra_scorers or {})
        if nll_proxy is not None:
            scorers["nll"] = nll_proxy
        for name, scorer in scorers.items():
            with apply_edits(model, edits, evaluator.backup):
                trial.set_user_attr(name, float(scorer(model, evaluator.tokenizer)))
        if nll_proxy is not None:
            trial.set_user_attr("nll_increase", trial.user_attrs["nll"] - nll_proxy.baseline)
        trial.set_user_attr("seconds", round(time.perf_counter() - t0, 2))  # the whole trial, NLL proxy included
        values = objective_values(value, result.kl, n_prompts=result.n_prompts, kl_floor=kl_floor, worst=worst)
        if "nll" in objectives:
            increase = trial.user_attrs["nll_increase"]
            return (*values, max(increase, 0.0) if math.isfinite(increase) else 1e6)
        return values

    return objective


def run_search(
    config: RunConfig,
    *,
    model: PreTrainedModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    space: SearchSpace | None = None,
    worker_trials: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    check_behaviour: bool = True,
) -> RunResult:
    """Run (or resume) a search and, unless ``config.export`` is False, choose a trial and export it.

    ``worker_trials``: run exactly this many trials in this process (several workers on one storage); otherwise
    run until the study holds ``config.trials`` finished trials.

    ``check_behaviour``: a preset (not refusal) is first checked on a few training prompts (``behaviour_check``);
    the run stops before anything is written when the model does not show the behaviour more when asked for it.
    False (``--skip-behaviour-check``) still measures and records the check but does not stop (tiny test models).
    """
    out = Path(config.out)
    _check_run_dir(config, out, write=False)
    behaviour = run_behaviour(config)
    if model is None:
        model, tokenizer = load_model(config.model, dtype=config.dtype, device=config.device)
    if tokenizer is None:
        raise SearchError("run_search got a model without its tokenizer; pass tokenizer= as well")
    splits = prompt_splits(config, behaviour)
    contrast = behaviour_check(config, model, tokenizer, behaviour, enforce=check_behaviour, log=log)
    _check_run_dir(config, out)
    storage = make_storage(config.storage, out)
    # A storage given explicitly (or a fixed trial count) means other workers may share the study: seed per trial.
    shared = config.storage is not None or worker_trials is not None
    study_options: dict[str, Any] = {
        "seed": config.seed,
        "n_startup_trials": config.startup_trials,
        "n_objectives": len(config.objectives),
        "max_nll_increase": config.max_nll_increase,
    }
    study = open_study(config.study_name, storage, shared=shared, **study_options)
    if not shared and study.get_trials(deepcopy=False):
        # A resumed study: a fresh TPESampler(seed) would replay the first run's random draws (its start-up trials
        # again, under new numbers); draw each trial from (seed, trial number) instead.
        study = open_study(config.study_name, storage, shared=True, **study_options)
    if config.storage is None:
        requeued = _rerun_interrupted(study)
        if requeued:
            log(f"resuming: {requeued} interrupted trial(s) will be run again")
    done_before = len(finished_trials(study))
    if done_before:
        log(f"resuming {out}: {done_before} finished trial(s) kept")
    t0 = time.perf_counter()
    directions = _load_or_compute_directions(config, model, tokenizer, splits, out)
    space = space or SearchSpace(methods=tuple(config.methods), norms=tuple(config.norms))
    detector = BehaviourDetector(behaviour)
    # (a PromptSet reads as a sequence of its prompts and carries its system prompt to the formatter)
    search_prompts = cast(Sequence[str], splits["bad_search"])
    batch = config.batch_size or tune_batch_size(model, tokenizer, search_prompts, candidates=(8, 16, 32, 64))
    # Each PromptSet carries its own system prompt (behaviours contrast two of them). For refusal the harmless
    # search prompts are spread across the system prompts the exported model will meet, so that the KL (and the
    # NLL proxy) the search minimizes holds under each of them, not only under the run's own.
    variants = _variants(config, tokenizer, behaviour)
    good_search = _spread(splits["good_search"], variants)
    evaluator = TrialEvaluator(
        model,
        tokenizer,
        splits["bad_search"],
        good_search,
        detector=detector,
        decide_after=behaviour.search_decide_after,
        max_new_tokens=behaviour.max_new_tokens,
        kl_ceiling=config.kl_ceiling,
        batch_size=batch,
        progress=progress,
        early_stop=behaviour.early_stop_safe,
    )
    baseline = evaluator.baseline()
    _atomic_write(
        out / "baseline.json",
        json.dumps(
            {"refusals": baseline.refusals, "n_prompts": baseline.n_prompts, "seconds": baseline.seconds}, indent=2
        ),
    )
    log(
        f"baseline: {baseline.refusals}/{baseline.n_prompts} {behaviour.counted} on the search prompts "
        f"(set-up {time.perf_counter() - t0:.0f} s, batch size {batch})"
    )
    # The per-trial NLL proxy costs a full prefill of prompts + answers (~10 s a trial on a 2-core CPU, as much as the
    # rest of the trial): it runs only when the search uses it. By default first-token KL is the capability signal
    # (it predicted retention better, notes/issue-16.md) and the finalists' NLL is measured on the test prompts.
    uses_nll = "nll" in config.objectives or config.max_nll_increase is not None
    nll_proxy = _load_or_build_proxy(model, tokenizer, good_search, out, batch) if uses_nll else None
    if nll_proxy is not None:
        log(f"NLL proxy: {nll_proxy.baseline:.3f} nats/token on the unedited model's own answers")
    measure = worst = None
    if behaviour.objective_is_mean:  # e.g. verbosity: minimize mean words, not a count
        measure, worst = behaviour.measure, behaviour.measure(baseline.responses or [])
        log(f"objective: mean {behaviour.unit.removeprefix('mean ')} per response (baseline {worst:.1f})")
    search_objective = make_objective(
        evaluator,
        model,
        directions,
        space,
        config.kl_floor,
        measure=measure,
        worst=worst,
        nll_proxy=nll_proxy,
        objectives=config.objectives,
    )
    started: list[int] = []  # trials this process started (an interrupted one is enqueued again)

    def objective(trial: optuna.Trial) -> tuple[float, ...]:
        started.append(trial.number)
        return search_objective(trial)

    todo = worker_trials if worker_trials is not None else max(0, config.trials - len(finished_trials(study)))
    interrupted = False
    if todo:
        bar = tqdm(total=todo, desc="trials", disable=not progress)

        def on_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            bar.update(1)
            r = trial.user_attrs.get("refusals")
            kl = trial.user_attrs.get("kl", float("nan"))
            bar.set_postfix_str(f"#{trial.number}: refusals={'pruned' if r is None else r} kl={kl:.3f}")

        callbacks = [on_trial]
        if worker_trials is None:
            callbacks.append(optuna.study.MaxTrialsCallback(config.trials, states=(optuna.trial.TrialState.COMPLETE,)))
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        try:
            study.optimize(objective, n_trials=todo, callbacks=callbacks, catch=())
        except KeyboardInterrupt:
            interrupted = True
            _rerun_interrupted(study, started[-1:], killed=False)
            log(
                f"\nstopped: {len(finished_trials(study))} finished trial(s) are kept in the study; "
                "run the same command again to resume"
            )
        finally:
            bar.close()
    write_tables(study, out, kl_max=config.kl_max)
    result = RunResult(study, out)
    if interrupted or not config.export:
        if interrupted:
            raise KeyboardInterrupt
        return result
    finalists = None
    if behaviour.run_settings and (config.finalists > 0 or config.choose is not None):
        finalists = _judge_finalists(config, model, tokenizer, study, directions, splits, behaviour, variants, log)
        if finalists.chosen is None:
            raise SearchError("tiered judging chose no trial")
        chosen = {t.number: t for t in finished_trials(study)}[finalists.chosen]
    else:
        chosen = choose_trial(study, kl_max=config.kl_max, trial=config.choose)
    result.chosen = chosen
    # Full-length generation of the final report is decode-bound: a larger batch amortizes each weight read.
    context = FinalContext(
        model=model,
        tokenizer=tokenizer,
        study=study,
        chosen=chosen,
        directions=directions,
        splits=splits,
        baseline=baseline,
        detector=detector,
        out=out,
        behaviour=behaviour,
        seconds=time.perf_counter() - t0,
        log=log,
        behaviour_check=contrast,
        finalists=finalists,
        variants=variants,
    )
    result.record = finalize(replace(config, batch_size=max(batch, 32)), context)
    write_tables(
        study, out, kl_max=config.kl_max, chosen=chosen.number, finalists=None if finalists is None else finalists.table
    )
    return result


def _variants(config: RunConfig, tokenizer: PreTrainedTokenizerBase, behaviour: Behaviour) -> dict[str, str | None]:
    """The system prompts the harmless search prompts are spread across: the run's own only, unless refusal with
    ``system_prompt_variety`` (``core.prompts.system_prompt_variants``)."""
    if behaviour.run_settings and config.system_prompt_variety:
        return system_prompt_variants(tokenizer, config.system_prompt)
    return {"own": config.system_prompt}


def _spread(prompts: PromptSet, variants: dict[str, str | None]) -> PromptSet | list[PromptSet]:
    """``prompts`` as they are with one variant (a preset's own system prompt stays), else dealt across them."""
    return prompts if len(variants) == 1 else spread_system_prompts(prompts, variants)


def _load_or_build_proxy(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: PromptSet | list[PromptSet],
    out: Path,
    batch_size: int,
) -> AnswerNLLProxy:
    """The search's NLL proxy; its reference answers are kept in ``nll_reference.json`` so a resumed run scores
    against the same answers (and recomputes the baseline NLL from them)."""
    path = out / "nll_reference.json"
    answers = json.loads(path.read_text())["answers"] if path.exists() else None
    proxy = AnswerNLLProxy.build(model, tokenizer, prompts, batch_size=batch_size, answers=answers)
    if answers is None:
        _atomic_write(path, json.dumps({"answers": list(proxy.answers), "baseline": proxy.baseline}, indent=2))
    return proxy


def _judge_finalists(
    config: RunConfig,
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    study: optuna.Study,
    directions: dict[str, Directions],
    splits: dict[str, PromptSet],
    behaviour: Behaviour,
    variants: dict[str, str | None],
    log: Callable[[str], None],
) -> FinalistResults:
    """Tiered judging (``search.finalists``): the best few trials (or ``--trial N`` alone), re-judged on the test
    prompts with both judges, capability and over-refusal; ``results.chosen`` is the trial to export."""
    from ..measure.capability import load_capability_items
    from ..measure.labelled import calibrated_semantic_detector

    if config.choose is not None:
        trials = [choose_trial(study, kl_max=config.kl_max, trial=config.choose)]
    else:
        trials = finalist_trials(
            study, n=config.finalists, kl_max=config.kl_max, max_nll_increase=config.max_nll_increase
        )
    log(f"finalists: trials {', '.join(str(t.number) for t in trials)}, re-judged on the held-out test prompts")
    own = splits["bad_test"].system_prompt
    sets = FinalistSets(
        harmful=splits["bad_test"],
        harmless=_as_list(_spread(splits["good_test"], variants)),
        over_refusal=load_prompts(OVER_REFUSAL_SET, **({"system_prompt": own} if own is not None else {})),
        items=load_capability_items(),
    )
    judges = FinalistJudges(markers=BehaviourDetector(behaviour), semantic=calibrated_semantic_detector())
    settings = FinalistSettings(
        new_tokens=config.judge_new_tokens,
        over_refusal_tokens=config.over_refusal_new_tokens,
        capability_tokens=config.capability_new_tokens,
        kl_max=config.kl_max,
        min_retention=config.min_retention,
        progress=True,
    )
    results = judge_finalists(
        model, tokenizer, trials, directions, sets, judges, settings, folder=Path(config.out) / "finalists", log=log
    )
    if config.choose is not None:
        results.violations = finalist_violations(results.table, settings)
        results.chosen = config.choose
    else:
        choose_finalist(results, settings, log=log)
    return results


def _as_list(prompts: PromptSet | list[PromptSet]) -> list[PromptSet]:
    return [prompts] if isinstance(prompts, PromptSet) else prompts


def write_tables(
    study: optuna.Study,
    out: Path,
    *,
    kl_max: float,
    chosen: int | None = None,
    finalists: pd.DataFrame | None = None,
) -> None:
    """``trials.csv``, ``pareto.csv`` and ``pareto.png``. ``finalists``: the tiered judging's table; its verdicts
    (refusals by markers / semantic judge / either, their disagreement, over-refusal, retention, held-out KL and
    NLL) join the Pareto table as ``final.*`` columns of the trials that were re-judged."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    table = trials_table(study)
    if table.empty:
        return
    table.to_csv(out / "trials.csv", index=False)
    front = pareto(study)
    if finalists is not None and len(finalists):
        judged = finalists[finalists["trial"].notna()].drop(columns=["arm"])
        judged = judged.assign(trial=judged["trial"].astype(int)).add_prefix("final.")
        front = front.merge(judged, left_on="trial", right_on="final.trial", how="left").drop(columns=["final.trial"])
    front.to_csv(out / "pareto.csv", index=False)
    fig = plot_pareto(study, kl_max=kl_max, chosen=chosen)
    fig.savefig(out / "pareto.png", dpi=120)
    plt.close(fig)


@dataclass
class FinalContext:
    """What ``finalize`` needs from the search that ran before it (the settings come from ``RunConfig``)."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    study: optuna.Study
    chosen: optuna.trial.FrozenTrial
    directions: dict[str, Directions]
    splits: dict[str, PromptSet]
    baseline: TrialResult  # the evaluator's baseline result (refusals, n_prompts, responses)
    detector: Callable[[Sequence[str]], list[bool]]  # judges the test responses (``BehaviourDetector``)
    out: Path
    behaviour: Behaviour | None = None  # None: run_behaviour(config)
    seconds: float = 0.0
    log: Callable[[str], None] = print
    behaviour_check: dict[str, Any] | None = None  # the pre-search check of a preset (None: refusal, not checked)
    finalists: FinalistResults | None = None  # tiered judging of the finalists (refusal), when it ran
    variants: dict[str, str | None] = field(default_factory=dict)  # system prompts the harmless sets were spread over


def finalize(config: RunConfig, context: FinalContext) -> dict[str, Any]:
    """Re-measure the chosen trial on the held-out test prompts, export it, and write ``run.json``."""
    from ..interventions.edits import apply_edits
    from ..interventions.export import DEFAULT_LORA_RANK, save_adapter, save_merged

    model, tokenizer, study, chosen = context.model, context.tokenizer, context.study, context.chosen
    directions, splits, baseline, detector = context.directions, context.splits, context.baseline, context.detector
    out, seconds, log = context.out, context.seconds, context.log
    behaviour = context.behaviour if context.behaviour is not None else run_behaviour(config)
    params = trial_params(chosen)
    edits = edits_from_params(model, directions, params)
    chat: dict = {}  # the PromptSets carry their own system prompts
    new_tokens = behaviour.report_new_tokens
    report: dict[str, Any] = {}
    robustness: list[dict[str, Any]] = []
    if context.finalists is not None:
        report = _finalist_report(context.finalists, chosen.number, config, out)
        log(
            f"held-out test ({report['n_prompts']} harmful prompts, {config.judge_new_tokens} new tokens): refusals "
            f"{report['refusals_either_before']} → {report['refusals_either_after']} by either judge (markers "
            f"{report['refusals_before']} → {report['refusals_after']}, semantic {report['refusals_semantic_before']}"
            f" → {report['refusals_semantic_after']}); over-refusal {report['over_refusals_before']} → "
            f"{report['over_refusals_after']} of {report['over_refusal_n']}; capability retention "
            f"{report['capability_retention']:.3f}; KL {report['kl']:.3f}; NLL {report['nll_before']:.3f} → "
            f"{report['nll_after']:.3f}"
        )
        robustness = system_prompt_table(
            model,
            tokenizer,
            splits["bad_test"],
            splits["good_test"],
            context.variants or {"own": splits["bad_test"].system_prompt},
            edits,
            detector=BehaviourDetector(behaviour),
            decide_after=behaviour.search_decide_after,
            max_new_tokens=behaviour.max_new_tokens,
            batch_size=config.batch_size,
        )
        for r in robustness:
            log(
                f"  system prompt {r['variant']}: refusals {r['refusals_before']} → {r['refusals_after']} of "
                f"{r['n_prompts']} (markers, early decisions), KL {r['kl']:.3f}"
            )
    elif len(splits["bad_test"]) and len(splits["good_test"]):
        base_lp = first_token_logprobs(model, tokenizer, splits["good_test"], batch_size=config.batch_size, **chat)
        before = refusal_rate(
            model,
            tokenizer,
            splits["bad_test"],
            detector=detector,
            max_new_tokens=new_tokens,
            batch_size=config.batch_size,
            **chat,
        )
        with apply_edits(model, edits):
            after = refusal_rate(
                model,
                tokenizer,
                splits["bad_test"],
                detector=detector,
                max_new_tokens=new_tokens,
                batch_size=config.batch_size,
                **chat,
            )
            kl = kl_divergence(
                model, tokenizer, splits["good_test"], baseline=base_lp, batch_size=config.batch_size, **chat
            )
        report = {
            "n_prompts": len(before),
            "refusals_before": before.attrs["refusals"],
            "refusals_after": after.attrs["refusals"],
            "kl": kl,
            "max_new_tokens": new_tokens,
        }
        # the behaviour's own objective (a count or a mean score) on the test prompts
        report["measure_before"] = behaviour.measure(list(before["response"]))
        report["measure_after"] = behaviour.measure(list(after["response"]))
        examples = before[["prompt"]].assign(
            response_before=before["response"],
            refused_before=before["refused"],
            response_after=after["response"],
            refused_after=after["refused"],
        )
        examples.to_csv(out / "test_responses.csv", index=False)
        log(
            f"held-out test ({len(before)} bad prompts, {new_tokens} new tokens): {behaviour.label} "
            f"{report['refusals_before']} → {report['refusals_after']}; "
            f"KL on {len(splits['good_test'])} harmless = {kl:.3f}"
        )
        if behaviour.objective_is_mean:
            log(f"held-out {behaviour.unit}: {report['measure_before']:.1f} → {report['measure_after']:.1f}")
    hashes: dict[str, str] = {}
    adapter: str | None = None
    adapter_errors: dict[str, float] = {}
    if config.export:
        hashes = save_merged(model, tokenizer, edits, out / "model")
        try:
            adapter = str(save_adapter(model, edits, out / "adapter", base_model=config.model, errors=adapter_errors))
        except Exception as exc:  # noqa: BLE001 - an adapter is a convenience; the merged model is the result
            log(f"adapter export skipped: {exc}")
        worst = max(adapter_errors.values(), default=0.0)
        if adapter and worst > 1e-6:
            log(
                f"adapter/ is a rank-{DEFAULT_LORA_RANK} approximation of this norm-preserving edit (largest "
                f"relative error of a module's weight change {worst:.2%}); model/ holds the exact edit"
            )
    record: dict[str, Any] = {
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()},
        "versions": package_versions(),
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "device": str(next(model.parameters()).device),
            "dtype": str(next(model.parameters()).dtype),
        },
        "directions": {m: f"directions/{m.replace(':', '_')}.safetensors" for m in directions},
        "baseline_search": {"refusals": baseline.refusals, "n_prompts": baseline.n_prompts},
        "chosen_trial": {
            "number": chosen.number,
            "params": params,
            "refusals": chosen.user_attrs.get("refusals"),
            "kl": chosen.user_attrs.get("kl"),
        },
        "test": report,
        "n_trials": len(finished_trials(study)),
        "seconds": round(seconds, 1),
        "model_dir": "model" if hashes else None,
        "adapter_dir": "adapter" if adapter else None,
        "adapter_max_relative_error": max(adapter_errors.values(), default=None),
        "weights_sha256": hashes,
    }
    if context.behaviour_check is not None:  # presets only: refusal's record keeps its keys
        record["behaviour_check"] = context.behaviour_check
    if "nll_increase" in chosen.user_attrs:
        record["chosen_trial"] = {**record["chosen_trial"], "nll_increase": chosen.user_attrs["nll_increase"]}
    if context.finalists is not None:
        record["finalists"] = {
            "table": json.loads(context.finalists.table.to_json(orient="records")),
            "violations": context.finalists.violations,
            "seconds": round(context.finalists.seconds, 1),
        }
        record["system_prompts"] = robustness
    if context.variants:
        record["harmless_system_prompts"] = context.variants
    from ..core.models import PACKAGED_MODELS

    packaged = PACKAGED_MODELS.get(config.model)
    record["base_model"] = packaged.description if packaged else str(getattr(model, "name_or_path", "") or config.model)
    _atomic_write(out / "run.json", json.dumps(record, indent=2, default=str))
    if hashes:
        from .card import model_card

        (out / "model" / "README.md").write_text(model_card(json.loads((out / "run.json").read_text())))
    return record


def _finalist_report(results: FinalistResults, chosen: int, config: RunConfig, out: Path) -> dict[str, Any]:
    """The held-out report of the chosen finalist against the original (from the finalists' table), and
    ``test_responses.csv``: per harmful and over-refusal prompt, both responses and each judge's verdict."""
    table = results.table
    before = table[table["arm"] == ORIGINAL].iloc[0]
    after = table[table["trial"] == chosen].iloc[0]
    report: dict[str, Any] = {
        "n_prompts": int(after["harmful_n"]),
        "max_new_tokens": config.judge_new_tokens,
        "refusals_before": int(before["harmful_markers"]),
        "refusals_after": int(after["harmful_markers"]),
        "refusals_semantic_before": int(before["harmful_semantic"]),
        "refusals_semantic_after": int(after["harmful_semantic"]),
        "refusals_either_before": int(before["harmful_either"]),
        "refusals_either_after": int(after["harmful_either"]),
        "refusals_either_after_ci": list(after["harmful_either_ci"]),
        "judges_disagree_before": int(before["harmful_judges_disagree"]),
        "judges_disagree_after": int(after["harmful_judges_disagree"]),
        "over_refusal_n": int(after["over_refusal_n"]),
        "over_refusal_new_tokens": config.over_refusal_new_tokens,
        "over_refusals_before": int(before["over_refusal_either"]),
        "over_refusals_after": int(after["over_refusal_either"]),
        "over_refusals_markers": [int(before["over_refusal_markers"]), int(after["over_refusal_markers"])],
        "over_refusals_semantic": [int(before["over_refusal_semantic"]), int(after["over_refusal_semantic"])],
        "capability_n": int(before["capability_n"]),
        "capability_correct_before": int(before["capability_correct"]),
        "capability_kept": int(after["capability_kept"]),
        "capability_retention": float(after["retention"]),
        "capability_retention_ci": list(after["retention_ci"]),
        "kl": float(after["kl"]),
        "nll_before": float(before["nll"]),
        "nll_after": float(after["nll"]),
    }
    report["measure_before"], report["measure_after"] = report["refusals_before"], report["refusals_after"]
    responses = results.responses
    frames = []
    for name in ("harmful", "over_refusal"):
        old = responses[(responses["arm"] == ORIGINAL) & (responses["set"] == name)].reset_index(drop=True)
        new = responses[(responses["arm"] == f"trial {chosen}") & (responses["set"] == name)].reset_index(drop=True)
        frames.append(
            pd.DataFrame(
                {
                    "set": name,
                    "prompt": old["prompt"],
                    "response_before": old["response"],
                    "markers_before": old["markers"].astype(bool),
                    "semantic_before": old["semantic"].astype(bool),
                    "response_after": new["response"],
                    "markers_after": new["markers"].astype(bool),
                    "semantic_after": new["semantic"].astype(bool),
                }
            ).assign(judges_disagree_after=lambda f: f["markers_after"] != f["semantic_after"])
        )
    pd.concat(frames, ignore_index=True).to_csv(out / "test_responses.csv", index=False)
    return report


def replay(
    record_path: str | Path,
    out: str | Path | None = None,
    *,
    model: PreTrainedModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> dict[str, str]:
    """Recreate a run's chosen edit on its base model and save it; returns the weight hashes (compare with run.json)."""
    from ..interventions.export import save_merged

    record_path = Path(record_path)
    if not record_path.is_file():
        raise SearchError(f"{record_path} does not exist; pass the run.json written by 'hereticlab run'")
    record = json.loads(record_path.read_text())
    settings = record["settings"]
    directions = {m: Directions.load(record_path.parent / p) for m, p in record["directions"].items()}
    if model is None:
        model, tokenizer = load_model(settings["model"], dtype=settings.get("dtype"), device=settings.get("device"))
    edits = edits_from_params(model, directions, record["chosen_trial"]["params"])
    return save_merged(model, tokenizer, edits, Path(out) if out else record_path.parent / "replay")
