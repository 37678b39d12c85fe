"""The ``hereticlab`` command: ``run`` (search + export, the main job), ``replay``, ``evaluate``.

Every failure the user can fix prints one line, ``hereticlab: error: <problem>; <fix>``, and exits non-zero:
2 when the command line is wrong, 1 when this machine cannot serve it (see ``hereticlab.validation``). Every
argument is checked before a model is loaded or anything is written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from typing import NoReturn


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _print_error(problem_and_fix: str) -> None:
    print(f"hereticlab: error: {_one_line(problem_and_fix)}", file=sys.stderr)


class _ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one ``hereticlab: error: …`` line (no usage block) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        _print_error(f"{message}; see '{self.prog} --help'")
        raise SystemExit(2)


def _run_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="search for the best ablation, then export it (the main job)")
    p.add_argument(
        "--model",
        default="default",
        help="'default' (embedded Qwen2.5-Coder-0.5B-Instruct), a folder, or a cached hub id",
    )
    p.add_argument("--harmful", default="harmful", help="named prompt set or file of prompts to stop refusing")
    p.add_argument(
        "--harmless", default="harmless", help="named prompt set or file of prompts whose behaviour must not change"
    )
    p.add_argument("--behaviour", default="refusal", help="refusal (default) or a preset from hereticlab.behaviours")
    p.add_argument(
        "--skip-behaviour-check",
        action="store_true",
        help="a preset's pre-search check (does the model show the behaviour more when asked?) is measured and "
        "recorded but does not stop the run (for test models)",
    )
    p.add_argument(
        "--trials", type=int, default=30, help="finished trials the study should hold (resume continues to it)"
    )
    p.add_argument("--startup-trials", type=int, default=10, help="random trials before TPE takes over")
    p.add_argument(
        "--worker-trials", type=int, default=None, help="run exactly N trials in this process (extra workers)"
    )
    p.add_argument("--out", default="runs/default", help="run directory (resumed when it exists)")
    p.add_argument(
        "--storage", default=None, help="Optuna storage URL (sqlite:///x.db, postgresql://…) or a .journal file"
    )
    p.add_argument("--study-name", default="hereticlab")
    p.add_argument("--seed", type=int, default=0, help="sampler seed")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the train/evaluation prompt split")
    p.add_argument("--train-prompts", type=int, default=200, help="prompts per class for computing directions")
    p.add_argument(
        "--search-prompts", type=int, default=32, help="evaluation prompts per class that trials are scored on"
    )
    p.add_argument(
        "--methods",
        default="projected",
        help="comma-separated direction methods searched over (e.g. projected,mean_difference,svd:2)",
    )
    p.add_argument("--norms", default="none", help="comma-separated norm modes searched over (none,row,column)")
    p.add_argument("--system-prompt", default=None)
    p.add_argument(
        "--decide-after", type=int, default=16, help="clean tokens after which a response counts as answered"
    )
    p.add_argument(
        "--kl-ceiling",
        type=float,
        default=1.0,
        help="skip refusal counting above this KL (trial marked pruned); <0 disables",
    )
    p.add_argument(
        "--kl-max", type=float, default=0.05, help="finalists and the choice keep first-token KL at most this"
    )
    p.add_argument(
        "--objectives",
        default="refusals,kl",
        help="what the search minimizes: refusals,kl (default) or refusals,kl,nll (adds the answer-NLL proxy)",
    )
    p.add_argument(
        "--max-nll-increase",
        type=float,
        default=None,
        help="limit on the NLL proxy's rise (nats/token): infeasible for TPE and never a finalist above it",
    )
    p.add_argument(
        "--finalists",
        type=int,
        default=1,
        help="Pareto-front trials re-judged on the test prompts (both judges, capability, over-refusal); 0: off",
    )
    p.add_argument("--judge-new-tokens", type=int, default=128, help="greedy tokens per finalist test response")
    p.add_argument(
        "--over-refusal-new-tokens", type=int, default=64, help="greedy tokens per finalist over-refusal response"
    )
    p.add_argument("--capability-new-tokens", type=int, default=48, help="greedy tokens per finalist capability answer")
    p.add_argument("--min-retention", type=float, default=0.97, help="capability retention a finalist must keep (0..1)")
    p.add_argument(
        "--no-system-prompt-variety",
        action="store_true",
        help="score KL on the run's system prompt only (default: harmless prompts spread across system prompts)",
    )
    p.add_argument("--trial", type=int, default=None, help="export this trial number instead")
    p.add_argument("--batch-size", type=int, default=None, help="default: tuned on this machine")
    p.add_argument("--no-export", action="store_true", help="search only")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--device", default=None)


def _cmd_run(args: argparse.Namespace) -> int:
    from .validation import validate_run

    checked = validate_run(args)  # before the model is loaded or --out is touched
    from .runner import RunConfig, run_search

    config = RunConfig(
        model=args.model,
        harmful=args.harmful,
        harmless=args.harmless,
        out=args.out,
        storage=args.storage,
        study_name=args.study_name,
        trials=args.trials,
        startup_trials=args.startup_trials,
        seed=args.seed,
        split_seed=args.split_seed,
        train_prompts=args.train_prompts,
        search_prompts=args.search_prompts,
        methods=checked.methods,
        norms=checked.norms,
        system_prompt=args.system_prompt,
        decide_after=args.decide_after,
        kl_ceiling=None if args.kl_ceiling < 0 else args.kl_ceiling,
        kl_max=args.kl_max,
        objectives=checked.objectives,
        max_nll_increase=args.max_nll_increase,
        finalists=args.finalists,
        judge_new_tokens=args.judge_new_tokens,
        over_refusal_new_tokens=args.over_refusal_new_tokens,
        capability_new_tokens=args.capability_new_tokens,
        min_retention=args.min_retention,
        system_prompt_variety=not args.no_system_prompt_variety,
        choose=args.trial,
        batch_size=args.batch_size,
        export=not args.no_export,
        # Every behaviour runs the same way (search.runner.run_behaviour); an alias of refusal ("Refusal",
        # "refusals") is recorded as "refusal" in settings.json / run.json, other names as typed.
        behaviour="refusal" if checked.behaviour == "refusal" else args.behaviour,
        dtype=args.dtype,
        device=args.device,
    )
    result = run_search(config, worker_trials=args.worker_trials, check_behaviour=not args.skip_behaviour_check)
    if result.chosen is not None:
        import pandas as pd

        front = pd.read_csv(result.out / "pareto.csv")
        shown = [
            c
            for c in ("trial", "refusals", "kl", "nll_increase", "final.harmful_either", "final.kl", "final.retention")
            if c in front
        ]
        with pd.option_context("display.width", 200, "display.max_columns", 12):
            print("\nPareto front (search prompts; final.*: re-judged on the test prompts):")
            print(front[shown].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        c = result.record["chosen_trial"]
        print(
            f"\nchosen trial #{c['number']}: refusals {c['refusals']}/{result.record['baseline_search']['n_prompts']} "
            f"(baseline {result.record['baseline_search']['refusals']}), KL {c['kl']:.3f}"
        )
        print(
            f"wrote {result.out}/: trials.csv pareto.csv pareto.png test_responses.csv model/ (with README.md) "
            "adapter/ run.json"
        )
    return 0


def _cmd_replay(args: argparse.Namespace) -> int:
    from .validation import validate_replay

    record = validate_replay(args)
    from .runner import replay

    hashes = replay(args.record, args.out)
    expected = (record or {}).get("weights_sha256", {})
    same = hashes == expected if expected else None
    print(json.dumps({"weights_sha256": hashes, "matches_run_json": same}, indent=2))
    return 0 if same in (True, None) else 1


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from ..core.models import load_model
    from ..core.prompts import load_prompts
    from ..measure.metrics import first_token_logprobs, kl_divergence, refusal_rate
    from .validation import validate_evaluate

    validate_evaluate(args)
    harmful, harmless = load_prompts(args.harmful), load_prompts(args.harmless)
    if args.split:
        harmful = harmful.split(train=args.train_prompts, seed=args.split_seed)[1]
        harmless = harmless.split(train=args.train_prompts, seed=args.split_seed)[1]
    harmful, harmless = harmful[: args.limit], harmless[: args.limit]
    base, tok = load_model(args.baseline)
    base_lp = first_token_logprobs(base, tok, harmless)
    base_ref = refusal_rate(base, tok, harmful, max_new_tokens=args.max_new_tokens)
    del base
    model, tok = load_model(args.model)
    ref = refusal_rate(model, tok, harmful, max_new_tokens=args.max_new_tokens)
    kl = kl_divergence(model, tok, harmless, baseline=base_lp)
    print(
        json.dumps(
            {
                "model": args.model,
                "baseline": args.baseline,
                "n_harmful": len(harmful),
                "refusals_baseline": base_ref.attrs["refusals"],
                "refusals": ref.attrs["refusals"],
                "kl": round(kl, 4),
                "n_harmless": len(harmless),
            },
            indent=2,
        )
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(prog="hereticlab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _run_parser(sub)
    p = sub.add_parser("replay", help="recreate a run's chosen edit from its run.json and check the weights' SHA-256")
    p.add_argument("record", help="path to run.json")
    p.add_argument("--out", default=None, help="folder for the replayed model (default: next to run.json)")
    p = sub.add_parser("evaluate", help="refusals and KL of a model against a baseline model")
    p.add_argument("model", help="model folder (e.g. runs/default/model) or 'default'")
    p.add_argument("--baseline", default="default")
    p.add_argument("--harmful", default="harmful")
    p.add_argument("--harmless", default="harmless")
    p.add_argument("--split", action=argparse.BooleanOptionalAction, default=True, help="use the evaluation split only")
    p.add_argument("--train-prompts", type=int, default=200)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--max-new-tokens", type=int, default=64)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit code (0 ok, 1 runtime error, 2 usage error, 130 interrupted)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error, already printed as one line (2)
        return exc.code if isinstance(exc.code, int) else 2
    from optuna.exceptions import ExperimentalWarning

    from ..core.models import ModelLoadError
    from ..core.prompts import PromptError
    from .study import SearchError
    from .validation import InputError

    handlers = {"run": _cmd_run, "replay": _cmd_replay, "evaluate": _cmd_evaluate}
    try:
        with warnings.catch_warnings():  # e.g. Optuna's ExperimentalWarning for RDB heartbeats: not the user's problem
            warnings.simplefilter("ignore", ExperimentalWarning)
            return handlers[args.command](args)
    except KeyboardInterrupt:
        return 130
    except InputError as exc:
        _print_error(str(exc))
        return exc.exit_code
    except (ModelLoadError, PromptError, SearchError, ValueError, FileNotFoundError) as exc:
        _print_error(str(exc))
        return 2


if __name__ == "__main__":
    sys.exit(main())
