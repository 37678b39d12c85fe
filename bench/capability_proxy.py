"""Which cheap per-trial measure predicts capability loss: first-token KL or the answer-NLL proxy?

For every finished trial of a search run (its ``study.journal``, directions and settings), the edit is re-applied
and measured three ways:

* ``kl``: the search's own first-token KL on the harmless search prompts (read from the trial);
* ``nll_increase``: the proxy the search can compute per trial (``measure.capability.AnswerNLLProxy``): mean
  per-token NLL, under the edit, of the unedited model's greedy answers to the same harmless search prompts, minus
  the unedited model's own;
* ``retention``: the expensive truth, on the capability set (``prompts/capability/items.tsv``, disjoint from every
  search prompt): of the items the unedited model answers right, the share the edited model still answers right
  (so only those items are answered under each edit).

It prints Spearman's rank correlation of each cheap measure with retention over the trials, with a percentile
bootstrap 95% interval (trials resampled whole), and the paired difference of the two |ρ|. Per-trial rows are
appended to ``--csv`` as they finish, so a killed run resumes where it stopped.

    python bench/capability_proxy.py --run runs/default [--csv capability_proxy.csv] [--max-new-tokens 48]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from hereticlab.core.models import load_model
from hereticlab.directions.base import Directions
from hereticlab.interventions.edits import apply_edits
from hereticlab.measure.capability import AnswerNLLProxy, capability_answers, load_capability_items
from hereticlab.measure.report import bootstrap_interval
from hereticlab.search.runner import RunConfig, prompt_splits
from hereticlab.search.study import edits_from_params, finished_trials, make_storage, open_study, trial_params


def rank_correlations(table: pd.DataFrame, n_resamples: int = 2000) -> pd.DataFrame:
    """Spearman ρ of each cheap measure with retention, with bootstrap intervals, and the paired |ρ| difference."""

    def rho(rows: np.ndarray) -> float:
        return float(spearmanr(rows[:, 0], rows[:, 1]).statistic)

    rows = []
    for column in ("nll_increase", "kl"):
        data = table[[column, "retention"]].to_numpy()
        estimate, low, high = bootstrap_interval(data, rho, n_resamples=n_resamples)
        rows.append({"measure": column, "spearman_rho": estimate, "ci_low": low, "ci_high": high})
    both = table[["nll_increase", "kl", "retention"]].to_numpy()

    def gap(r: np.ndarray) -> float:
        return abs(spearmanr(r[:, 0], r[:, 2]).statistic) - abs(spearmanr(r[:, 1], r[:, 2]).statistic)

    estimate, low, high = bootstrap_interval(both, gap, n_resamples=n_resamples)
    rows.append({"measure": "|rho nll| - |rho kl|", "spearman_rho": estimate, "ci_low": low, "ci_high": high})
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="run directory of 'hereticlab run' (settings.json, study)")
    parser.add_argument("--csv", default=None, help="per-trial rows (default: <run>/capability_proxy.csv)")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="greedy tokens per capability answer")
    parser.add_argument("--proxy-tokens", type=int, default=32, help="reference answer tokens of the NLL proxy")
    parser.add_argument(
        "--batch-size", type=int, default=128, help="large batches: decoding on CPU is faster per token"
    )
    args = parser.parse_args()

    run = Path(args.run)
    settings = json.loads((run / "settings.json").read_text())
    record = json.loads((run / "run.json").read_text()) if (run / "run.json").exists() else {}
    config = RunConfig(**{**settings, **{k: v for k, v in record.get("settings", {}).items() if k in settings}})
    config = RunConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in vars(config).items()})
    csv = Path(args.csv) if args.csv else run / "capability_proxy.csv"
    model, tok = load_model(config.model, dtype=config.dtype, device=config.device)
    splits = prompt_splits(config)
    directions = {m: Directions.load(run / "directions" / f"{m.replace(':', '_')}.safetensors") for m in config.methods}
    study = open_study(config.study_name, make_storage(None, run), seed=config.seed)
    trials = finished_trials(study)
    items = load_capability_items()

    t0 = time.perf_counter()
    proxy = AnswerNLLProxy.build(
        model, tok, splits["good_search"], max_new_tokens=args.proxy_tokens, batch_size=args.batch_size
    )
    unedited = csv.with_name(csv.stem + "_unedited.csv")  # kept, so a resumed run does not answer them again
    if unedited.exists():
        before = pd.read_csv(unedited)
    else:
        before = capability_answers(model, tok, items, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
        before.to_csv(unedited, index=False)
    right_items = [item for item, ok in zip(items, before["correct"]) if ok]
    print(
        f"unedited: capability accuracy {len(right_items)}/{len(before)}; proxy NLL {proxy.baseline:.4f} "
        f"nats/token on {len(proxy.answers)} harmless search prompts ({time.perf_counter() - t0:.0f} s)",
        flush=True,
    )
    done = pd.read_csv(csv) if csv.exists() else pd.DataFrame()
    seen = set(done["trial"]) if len(done) else set()
    # trial -1: the unedited model answering the same subset again (a control: batching differs from the full
    # set's, so this is how much retention moves with no edit at all); it is left out of the correlations.
    for trial in [None, *trials]:
        number = -1 if trial is None else trial.number
        if number in seen:
            continue
        t1 = time.perf_counter()
        edits = [] if trial is None else edits_from_params(model, directions, trial_params(trial))
        with apply_edits(model, edits):
            nll = proxy(model, tok)
            after = capability_answers(
                model, tok, right_items, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size
            )
        kept = int(after["correct"].sum())
        row = {
            "trial": number,
            "refusals": None if trial is None else trial.user_attrs.get("refusals"),
            "kl": 0.0 if trial is None else trial.user_attrs.get("kl"),
            "nll": nll,
            "nll_increase": nll - proxy.baseline,
            "kept": kept,
            "correct_before": len(right_items),
            "retention": kept / len(right_items),
            "seconds": round(time.perf_counter() - t1, 1),
        }
        pd.DataFrame([row]).to_csv(csv, mode="a", header=not csv.exists(), index=False)
        print(
            f"trial {number}: kl {row['kl']:.4f} nll +{row['nll_increase']:.4f} retention "
            f"{kept}/{row['correct_before']} ({row['seconds']} s)",
            flush=True,
        )
    table = pd.read_csv(csv)
    control = table[table["trial"] == -1]
    table = table[table["trial"] >= 0]
    if len(control):
        print(f"control (unedited, same subset): retention {control['retention'].iloc[0]:.3f}")
    print(f"\n{len(table)} trials of {run}; capability items {len(items)}, {args.max_new_tokens} greedy tokens each")
    print(rank_correlations(table).to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
