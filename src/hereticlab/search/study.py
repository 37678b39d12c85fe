"""Automatic ablation search: an Optuna study over Heretic's parameter space (and more), resumable and shareable.

* ``SearchSpace`` turns an Optuna trial into parameters; ranges are fractions of the layer count so one space fits
  every model. Add dimensions (direction method, norm mode, kernel shape, subspace rank) or pin values.
* ``edits_from_params`` turns any parameter dict back into the exact edit (``WriterEdit`` list).
* ``open_study`` uses a journal file by default (an interrupted or killed run resumes with every finished trial)
  or any Optuna storage URL (SQLite, PostgreSQL) so several processes or machines share one study.
* ``pareto`` / ``trials_table`` return DataFrames; ``choose_trial`` picks the lowest-refusal trial under a KL cap.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import optuna
import pandas as pd
import torch
from torch import nn

from ..core.architecture import find_layers
from ..directions.base import Directions
from ..interventions.edits import WriterEdit, plan_ablation
from ..interventions.kernels import gaussian_kernel, tent_kernel

if TYPE_CHECKING:  # imported by the functions that draw
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

OBJECTIVES = ("refusals", "kl")
# What --objectives may name: the two above, in that order, optionally followed by the answer-NLL proxy.
KNOWN_OBJECTIVES = ("refusals", "kl", "nll")


class SearchError(ValueError):
    """A search could not start or a trial could not be found; the message says what to do."""


@dataclass
class SearchSpace:
    """Heretic's space, in fractions of ``L − 1`` (``L`` = number of blocks), plus optional extra dimensions.

    ``pinned``: parameter name → fixed value (the dimension is not searched). ``methods`` / ``norms`` /
    ``kernels``: searched as categoricals when they hold more than one choice.
    """

    components: tuple[str, ...] = ("attn", "mlp")
    direction_index: tuple[float, float] = (0.4, 0.9)
    scopes: tuple[str, ...] = ("global", "per_layer")
    max_weight: Mapping[str, tuple[float, float]] = field(
        default_factory=lambda: {"attn": (0.8, 1.5), "mlp": (-0.25, 1.5)}  # mlp below 0 clips to exactly 0 (off)
    )
    peak_position: tuple[float, float] = (0.6, 1.0)
    min_weight_fraction: tuple[float, float] = (0.0, 1.0)
    reach: tuple[float, float] = (0.0, 0.6)  # reach = max(1, fraction · (L − 1)) layers
    methods: tuple[str, ...] = ("projected",)
    norms: tuple[str, ...] = ("none",)
    kernels: tuple[str, ...] = ("tent",)
    pinned: dict[str, Any] = field(default_factory=dict)

    def pin(self, **values: Any) -> SearchSpace:
        return replace(self, pinned={**self.pinned, **values})

    def _choice(self, trial, name, choices):
        if name in self.pinned:
            return self.pinned[name]
        return choices[0] if len(choices) == 1 else trial.suggest_categorical(name, list(choices))

    def _float(self, trial, name, low, high):
        return self.pinned[name] if name in self.pinned else trial.suggest_float(name, low, high)

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """Sample one parameter set (fractions; ``edits_from_params`` converts them to layers)."""
        params: dict[str, Any] = {
            "method": self._choice(trial, "method", self.methods),
            "norm": self._choice(trial, "norm", self.norms),
            "kernel": self._choice(trial, "kernel", self.kernels),
            "scope": self._choice(trial, "scope", self.scopes),
        }
        if params["scope"] == "global" or "direction_index" in self.pinned:
            params["direction_index"] = self._float(trial, "direction_index", *self.direction_index)
        for comp in self.components:
            params[f"{comp}.max_weight"] = self._float(
                trial, f"{comp}.max_weight", *self.max_weight.get(comp, (0.8, 1.5))
            )
            params[f"{comp}.peak_position"] = self._float(trial, f"{comp}.peak_position", *self.peak_position)
            params[f"{comp}.min_weight_fraction"] = self._float(
                trial, f"{comp}.min_weight_fraction", *self.min_weight_fraction
            )
            params[f"{comp}.reach"] = self._float(trial, f"{comp}.reach", *self.reach)
        return params


def layer_kernel(params: Mapping[str, Any], component: str, n_layers: int) -> torch.Tensor:
    """The per-block strength of ``component`` described by ``params`` (fractions of ``n_layers − 1``)."""
    top = n_layers - 1
    w_max = max(0.0, float(params[f"{component}.max_weight"]))
    peak = float(params[f"{component}.peak_position"]) * top
    w_min = float(params[f"{component}.min_weight_fraction"]) * w_max
    reach = max(1.0, float(params[f"{component}.reach"]) * top)
    if w_max == 0.0:
        return torch.zeros(n_layers)
    if params.get("kernel", "tent") == "gaussian":
        # min_weight_fraction shapes only the tent; the gaussian is never cut off (cutoff 0).
        return gaussian_kernel(n_layers, peak, w_max, width=reach / 2)
    return tent_kernel(n_layers, peak, w_max, w_min, reach)


def edits_from_params(
    model: nn.Module,
    directions: Directions | Mapping[str, Directions],
    params: Mapping[str, Any],
    components: Sequence[str] | None = None,
) -> list[WriterEdit]:
    """The exact edit a parameter set describes. ``directions``: one ``Directions`` or a dict method → Directions."""
    if isinstance(directions, Mapping):
        method = params.get("method", next(iter(directions)))
        if method not in directions:
            raise SearchError(
                f"trial uses direction method {method!r}, which this run did not compute ({', '.join(directions)})"
            )
        directions = directions[method]
    n_layers = len(find_layers(model))
    components = tuple(components or sorted({k.split(".")[0] for k in params if k.endswith(".max_weight")}))
    strength = {c: layer_kernel(params, c, n_layers) for c in components}
    direction: torch.Tensor | Directions
    if params.get("scope", "global") == "global":
        direction = directions.at(float(params["direction_index"]) * (directions.n_residuals - 1))
    else:
        direction = directions
    return plan_ablation(model, direction, strength, components=components, norm=params.get("norm", "none"))


# ----------------------------------------------------------------------------------------------------------
# Storage and study
# ----------------------------------------------------------------------------------------------------------


def database_url(storage: str) -> str:
    """The SQLAlchemy URL for a storage URL. A bare ``postgresql://`` names SQLAlchemy's default driver, which is
    psycopg 3 from SQLAlchemy 2.1 on (psycopg2 before): when only psycopg2 is installed, name it explicitly
    (``postgresql+psycopg2://``). Every other URL is returned unchanged."""
    import importlib.util

    scheme, sep, rest = storage.partition("://")
    if (
        sep
        and scheme == "postgresql"
        and importlib.util.find_spec("psycopg") is None
        and importlib.util.find_spec("psycopg2") is not None
    ):
        return f"postgresql+psycopg2://{rest}"
    return storage


def make_storage(storage: str | None, run_dir: str | Path | None = None) -> optuna.storages.BaseStorage:
    """A journal file in ``run_dir`` by default; otherwise an Optuna storage URL (``sqlite:///…``, ``postgresql://…``).

    A path ending in ``.journal`` / ``.log`` is a journal file; RDB storages get a heartbeat so trials of a killed
    worker are marked failed.
    """
    from optuna.storages import JournalStorage, RDBStorage
    from optuna.storages.journal import JournalFileBackend

    if storage is None:
        if run_dir is None:
            raise SearchError("give a run directory or a storage URL")
        path = Path(run_dir) / "study.journal"
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    if storage.endswith((".journal", ".log")) and "://" not in storage:
        Path(storage).parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(storage))
    url = database_url(storage)
    for attempt in range(10):
        try:
            return RDBStorage(url, heartbeat_interval=30, grace_period=120)
        except Exception as exc:  # noqa: BLE001 - Optuna raises many kinds; the user needs one line
            # Workers starting together race to create the schema (PostgreSQL reports the loser's CREATE TABLE as
            # a ProgrammingError "relation ... already exists"): retry those database errors only.
            racing = type(exc).__name__ in ("IntegrityError", "OperationalError") or (
                type(exc).__name__ == "ProgrammingError" and "already exists" in str(exc)
            )
            if racing and attempt < 9:
                time.sleep(0.2 + 0.3 * attempt)
                continue
            raise SearchError(
                f"cannot open storage {storage!r} ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                "pass a valid URL such as sqlite:///study.db"
            ) from None
    raise AssertionError("unreachable")


class TrialSeededTPESampler(optuna.samplers.TPESampler):
    """TPE whose random state for trial ``n`` depends on ``(seed, n)`` only, not on what this process drew before.

    Workers sharing one study all start from the same ``--seed``; with one random stream per process each of them
    would replay the same start-up (random) trials. Reseeding from the trial number gives every trial its own
    draws, the same ones whichever worker runs it, and keeps a single-process run reproducible.
    """

    def __init__(self, *, seed: int | None = None, **kwargs: Any) -> None:
        super().__init__(seed=seed, **kwargs)
        self._trial_seed = seed

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        super().before_trial(study, trial)
        tpe_rng = getattr(self, "_rng", None)
        random_rng = getattr(getattr(self, "_random_sampler", None), "_rng", None)
        if self._trial_seed is None:
            return
        if tpe_rng is None or random_rng is None:  # never run a shared study with silently repeated start-up trials
            raise SearchError(
                f"optuna {optuna.__version__} moved the sampler's random state, so workers of a shared "
                "study would repeat each other's start-up trials; install the locked versions (make setup)"
            )
        tpe_seed, random_seed = np.random.SeedSequence([self._trial_seed % 2**64, trial.number]).generate_state(2)
        tpe_rng.rng.seed(int(tpe_seed))
        random_rng.rng.seed(int(random_seed))


def open_study(
    name: str,
    storage: str | optuna.storages.BaseStorage | None,
    *,
    seed: int = 0,
    n_startup_trials: int = 10,
    shared: bool = False,
    n_objectives: int = 2,
    max_nll_increase: float | None = None,
) -> optuna.Study:
    """Create or resume a study of ``n_objectives`` minimized objectives (refusals, KL[, NLL increase]) with
    multivariate TPE.

    ``shared``: other processes may work on this study at the same time; the sampler then draws each trial's random
    numbers from ``(seed, trial number)`` (``TrialSeededTPESampler``) so that workers do not repeat each other.
    ``max_nll_increase``: a constraint TPE learns from (a trial whose ``nll_increase`` attribute exceeds it is
    infeasible and ranks behind every feasible one).
    """
    sampler_class = TrialSeededTPESampler if shared else optuna.samplers.TPESampler
    constraints = None if max_nll_increase is None else NLLConstraint(max_nll_increase)
    sampler = sampler_class(
        seed=seed,
        multivariate=True,
        n_startup_trials=n_startup_trials,
        constant_liar=True,
        constraints_func=constraints,
    )
    for attempt in range(10):
        try:
            return optuna.create_study(
                study_name=name,
                storage=storage,
                directions=["minimize"] * n_objectives,
                sampler=sampler,
                load_if_exists=True,
            )
        except Exception:  # noqa: BLE001 - two workers creating one study at once race on the database
            if attempt == 9:
                raise
            time.sleep(0.2 + 0.3 * attempt)
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class NLLConstraint:
    """Optuna's constraint: ``nll_increase − limit`` (≤ 0 is feasible). A trial without the attribute (pruned
    before it was measured) counts as feasible by 0, so it is judged by its objectives alone."""

    limit: float

    def __call__(self, trial: optuna.trial.FrozenTrial) -> tuple[float]:
        value = trial.user_attrs.get("nll_increase")
        return (0.0 if value is None or not math.isfinite(value) else float(value) - self.limit,)


def finished_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    states = (optuna.trial.TrialState.COMPLETE,)
    return [t for t in study.get_trials(deepcopy=False, states=states)]


def requeue_interrupted(study: optuna.Study) -> int:
    """Mark trials left RUNNING by a killed process as failed and enqueue their parameters again. Returns how many.

    Use only when no other worker is running on this study (the default journal-file case).
    """
    count = 0
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
        if trial.params:
            study.enqueue_trial(trial.params, skip_if_exists=True)
        count += 1
    return count


# ----------------------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------------------


def trials_table(study: optuna.Study) -> pd.DataFrame:
    """Every finished trial: number, refusals (None when pruned by the KL ceiling), KL, seconds, parameters."""
    rows = []
    for t in finished_trials(study):
        pruned = bool(t.user_attrs.get("pruned", False))
        rows.append(
            {
                "trial": t.number,
                "refusals": None if pruned else t.user_attrs.get("refusals", t.values[0]),
                "kl": t.user_attrs.get("kl", t.values[1]),
                "pruned": pruned,
                **({"nll_increase": t.user_attrs["nll_increase"]} if "nll_increase" in t.user_attrs else {}),
                "seconds": t.user_attrs.get("seconds"),
                **{f"param.{k}": v for k, v in t.user_attrs.get("params", t.params).items()},
            }
        )
    frame = pd.DataFrame(rows)
    return frame.sort_values("trial").reset_index(drop=True) if len(frame) else frame


def pareto(study: optuna.Study) -> pd.DataFrame:
    """The Pareto front over unpruned finished trials, sorted by refusals then KL: of (refusals, KL), or of
    (refusals, KL, NLL increase) when the study optimizes the NLL proxy as a third objective."""
    table = trials_table(study)
    if table.empty:
        return table
    table = table[~table["pruned"]].copy()
    table["refusals"] = table["refusals"].astype(int)
    columns = ["refusals", "kl"] + (["nll_increase"] if len(study.directions) > 2 and "nll_increase" in table else [])
    values = table[columns].to_numpy(dtype=float)
    keep = []
    for position, i in enumerate(table.index):
        row = values[position]
        dominated = ((values <= row).all(axis=1) & (values < row).any(axis=1)).any()
        if not dominated:
            keep.append(i)
    return table.loc[keep].sort_values(["refusals", "kl"]).reset_index(drop=True)


def choose_trial(study: optuna.Study, *, kl_max: float = 0.2, trial: int | None = None) -> optuna.trial.FrozenTrial:
    """Trial ``trial`` if given, else the lowest-refusal finished trial with KL ≤ ``kl_max`` (ties: lower KL)."""
    done = {t.number: t for t in finished_trials(study)}
    if trial is not None:
        if trial not in done:
            raise SearchError(
                f"trial {trial} does not exist or did not finish; finished trials: "
                f"{min(done, default='none')}..{max(done, default='none')}"
            )
        return done[trial]
    table = pareto(study)
    under = table[table["kl"] <= kl_max] if len(table) else table
    if under.empty:
        best_kl = f"{table['kl'].min():.3f}" if len(table) else "n/a"
        raise SearchError(
            f"no finished trial has KL ≤ {kl_max} (lowest: {best_kl}); raise --kl-max or pick one with --trial N"
        )
    return done[int(under.iloc[0]["trial"])]


def trial_params(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """All parameters of a trial, pinned and categorical-with-one-choice included."""
    return dict(trial.user_attrs.get("params", trial.params))


def plot_pareto(
    study_or_table: optuna.Study | pd.DataFrame,
    *,
    ax: Axes | None = None,
    kl_max: float | None = None,
    chosen: int | None = None,
) -> Figure:
    """Scatter of every trial's (KL, refusals) with the Pareto front drawn as a step line. Returns the Figure."""
    import matplotlib.pyplot as plt

    table = trials_table(study_or_table) if isinstance(study_or_table, optuna.Study) else study_or_table
    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 4))
    else:
        fig = cast("Figure", ax.figure)  # (a SubFigure's axes are not supported)
    done = table[~table["pruned"]]
    ax.scatter(done["kl"], done["refusals"], s=18, alpha=0.5, label="trials")
    if isinstance(study_or_table, optuna.Study):
        front = pareto(study_or_table)
        ax.step(front["kl"], front["refusals"], where="post", color="C3", label="Pareto front")
        ax.scatter(front["kl"], front["refusals"], s=30, color="C3")
    if kl_max is not None:
        ax.axvline(kl_max, ls="--", color="grey", lw=1, label=f"KL cap {kl_max}")
    if chosen is not None and chosen in set(table["trial"]):
        row = table[table["trial"] == chosen].iloc[0]
        ax.scatter([row.kl], [row.refusals], s=120, facecolors="none", edgecolors="k", label=f"chosen #{chosen}")
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlabel("first-token KL on harmless prompts")
    ax.set_ylabel("refusals on harmful prompts")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def objective_values(
    refusals: float | None, kl: float, *, n_prompts: int, kl_floor: float = 0.01, worst: float | None = None
) -> tuple[float, float]:
    """What the optimizer sees. A pruned trial (``refusals=None``) counts as refusing everything (or ``worst``,
    for objectives that are not counts); KL below ``kl_floor`` counts as ``kl_floor``, so near-no-op trials (tiny
    KL, baseline refusals) cannot dominate the front by KL alone and TPE's attention goes to trials that remove
    refusals."""
    if refusals is None:
        refusals = n_prompts if worst is None else worst
    r = float(refusals)
    return r, max(float(kl), kl_floor) if math.isfinite(kl) else 1e6
