"""Time per search trial: hereticlab's evaluator vs a reference that does what Heretic does.

Reference (per trial; ``common.ReferenceEvaluator``): the edit applied through PEFT LoRA adapters (rank 1 per writer,
as Heretic does) attached to every attention and MLP writer of every block (the union of what any trial can edit;
modules a trial leaves alone get zero factors), first-token log-probs through ``generate(max_new_tokens=1,
output_scores=True, output_hidden_states=True)`` on the harmless prompts, and 100 greedy tokens through
``generate()`` for every harmful prompt, judged by markers on the full text.
hereticlab: in-place edit with exact revert, prefix reuse, last-position logits, early-stopping decoding.
Both see the same fixed list of parameter sets (``common.parameter_sets``), the same prompts and the same batch
size, one after the other. ``tests/test_bench_reference.py`` checks on a tiny model that both apply the same edit.

    python bench/trial_speed.py [--model default] [--trials 10] [--prompts 50] [--batch-size 50]
                                [--decide-after 16 32 ...]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PeakRSS, benchmark_space, parameter_sets, reference_trials, setup, weight_bytes  # noqa: E402

import hereticlab as hl  # noqa: E402
from hereticlab.measure.report import proportion_interval  # noqa: E402
from hereticlab.search import edits_from_params  # noqa: E402
from hereticlab.search.evaluator import TrialEvaluator  # noqa: E402


def fidelity_counts(fast_results, ref_results) -> dict[str, int]:
    """Per-prompt agreement of early decisions with the full-generation decisions, and the kind of each
    disagreement: ``missed`` (reference refused, early did not), ``extra`` (the reverse), ``diverged`` (the early
    response is not the start of the reference text, so the two decoded different tokens)."""
    counts = {"agree": 0, "n": 0, "missed": 0, "extra": 0, "diverged": 0}
    for fr, ref in zip(fast_results, ref_results):
        for early, full, early_text, full_text in zip(fr.decisions, ref.decisions, fr.responses, ref.texts):
            counts["n"] += 1
            if early == full:
                counts["agree"] += 1
                continue
            counts["missed" if full else "extra"] += 1
            counts["diverged"] += not full_text.strip().startswith(early_text.strip())
    return counts


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--prompts", type=int, default=50, help="harmful and harmless evaluation prompts per trial")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument(
        "--decide-after",
        type=int,
        nargs="+",
        default=[16],
        help="one or more early-decision windows to measure (the first is the one timed against the reference)",
    )
    args = parser.parse_args()

    model, tok, htr, gtr, hev, gev = setup(args.model, n_train=100, n_eval=args.prompts)
    print(
        f"model {args.model}: {weight_bytes(model) / 2**30:.2f} GiB of weights; {args.trials} trials; "
        f"{len(hev)} harmful + {len(gev)} harmless prompts; batch {args.batch_size}; "
        f"torch threads {torch.get_num_threads()}"
    )
    dirs = hl.mean_difference(
        hl.capture_residuals(model, tok, htr), hl.capture_residuals(model, tok, gtr), project=True
    )
    params = parameter_sets(args.trials)
    plans = [edits_from_params(model, dirs, p) for p in params]

    # (a) hereticlab, once per decide_after window; the first window's run is the timed one (and its peak RSS)
    runs: dict[int, tuple[float, list]] = {}
    peak_fast = 0
    for window in args.decide_after:
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            fast = TrialEvaluator(
                model,
                tok,
                hev,
                gev,
                decide_after=window,
                max_new_tokens=100,
                batch_size=args.batch_size,
                progress=False,
            )
            setup_seconds = time.perf_counter() - t0
            runs[window] = (setup_seconds, [fast.evaluate_edits(edits) for edits in plans])
        peak_fast = peak_fast or mem.peak
        del fast

    # (b) reference: adapters on every writer any trial can edit, each trial's exact factors, 100 greedy tokens
    setup_ref, ref_results = reference_trials(
        model, tok, hev, gev, dirs, params, batch_size=args.batch_size, max_new_tokens=100, space=benchmark_space()
    )

    window = args.decide_after[0]
    setup_fast, fast_results = runs[window]
    print(
        f"\ndecide_after = {window}\n{'trial':>5} {'ref s':>8} {'fast s':>8} {'ratio':>6} {'agree':>6} "
        f"{'ref refusals':>12} {'fast refusals':>13} "
        f"{'ref KL':>8} {'fast KL':>8} {'steps':>5} {'start':>5}"
    )
    for i, (fr, ref) in enumerate(zip(fast_results, ref_results)):
        agree = sum(a == b for a, b in zip(fr.decisions, ref.decisions))
        print(
            f"{i:>5} {ref.seconds:>8.1f} {fr.seconds:>8.1f} {ref.seconds / fr.seconds:>6.1f} "
            f"{agree / len(ref.decisions):>6.0%} {sum(ref.decisions):>12} "
            f"{fr.refusals:>13} {ref.kl:>8.4f} {fr.kl:>8.4f} {fr.decode_steps:>5} {fr.start_layer:>5}"
        )
    t_ref = sum(r.seconds for r in ref_results) / len(ref_results)
    t_fast = sum(r.seconds for r in fast_results) / len(fast_results)
    print(f"\nset-up (once per search): reference {setup_ref:.1f} s, hereticlab {setup_fast:.1f} s")
    print(f"time per trial: reference {t_ref:.1f} s, hereticlab {t_fast:.1f} s, ratio {t_ref / t_fast:.2f}x")
    kl_gap = max(abs(fr.kl - ref.kl) for fr, ref in zip(fast_results, ref_results))
    kl_gap_prompt = max(
        abs(a - b) for fr, ref in zip(fast_results, ref_results) for a, b in zip(fr.kl_per_prompt, ref.kl_per_prompt)
    )
    print(f"largest |KL difference|: {kl_gap:.2e} per trial mean, {kl_gap_prompt:.2e} per prompt (target 1e-4)")

    # fidelity of each window against the full 100-token generation, with an exact 95% interval
    print(
        f"\n{'decide_after':>12} {'agree':>9} {'rate':>7} {'95% interval':>17} {'missed':>6} {'extra':>5} "
        f"{'diverged':>8} {'s/trial':>8}"
    )
    for window, (_, results) in runs.items():
        counts = fidelity_counts(results, ref_results)
        low, high = proportion_interval(counts["agree"], counts["n"])
        seconds = sum(r.seconds for r in results) / len(results)
        print(
            f"{window:>12} {counts['agree']:>4}/{counts['n']:<4} {counts['agree'] / counts['n']:>7.1%} "
            f"{f'[{low:.1%}, {high:.1%}]':>17} {counts['missed']:>6} {counts['extra']:>5} {counts['diverged']:>8} "
            f"{seconds:>8.1f}"
        )
    print(
        "missed: the full response refuses, the early decision did not (a marker after the window); extra: the "
        "reverse;\ndiverged: of those, how many had a different greedy text before the decision (numerics of "
        "in-place vs LoRA edits, not the window)"
    )
    print(
        f"peak RSS during the hereticlab search phase: {peak_fast / 2**30:.2f} GiB = "
        f"{peak_fast / weight_bytes(model):.2f}x the weights"
    )
    if importlib.util.find_spec("heretic") is None:
        print("heretic-llm is not installed: no direct comparison with Heretic itself")


if __name__ == "__main__":
    main()
