"""Time per search trial: hereticlab's evaluator vs a reference that does what Heretic does.

Reference (per trial; ``common.ReferenceEvaluator``): the edit applied through PEFT LoRA adapters (rank 1 per writer,
as Heretic does) attached to every attention and MLP writer of every block (the union of what any trial can edit;
modules a trial leaves alone get zero factors), first-token log-probs through ``generate(max_new_tokens=1,
output_scores=True, output_hidden_states=True)`` on the harmless prompts, and 100 greedy tokens through
``generate()`` for every harmful prompt, judged by markers on the full text.
hereticlab: in-place edit with exact revert, prefix reuse, last-position logits, early-stopping decoding.
Both see the same fixed list of parameter sets (``common.parameter_sets``), the same prompts and the same batch
size, one after the other. ``tests/test_bench_reference.py`` checks on a tiny model that both apply the same edit.

    python bench/trial_speed.py [--model default] [--trials 10] [--prompts 50] [--batch-size 50] [--decide-after 16]
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
from hereticlab.search import edits_from_params  # noqa: E402
from hereticlab.search.evaluator import TrialEvaluator  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--prompts", type=int, default=50, help="harmful and harmless evaluation prompts per trial")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--decide-after", type=int, default=16)
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

    # (a) hereticlab
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        fast = TrialEvaluator(
            model,
            tok,
            hev,
            gev,
            decide_after=args.decide_after,
            max_new_tokens=100,
            batch_size=args.batch_size,
            progress=False,
        )
        setup_fast = time.perf_counter() - t0
        fast_results = [fast.evaluate_edits(edits) for edits in plans]
    peak_fast = mem.peak
    del fast

    # (b) reference: adapters on every writer any trial can edit, each trial's exact factors
    setup_ref, ref_results = reference_trials(
        model, tok, hev, gev, dirs, params, batch_size=args.batch_size, max_new_tokens=100, space=benchmark_space()
    )

    print(
        f"\n{'trial':>5} {'ref s':>8} {'fast s':>8} {'ratio':>6} {'agree':>6} "
        f"{'ref refusals':>12} {'fast refusals':>13} "
        f"{'ref KL':>8} {'fast KL':>8} {'steps':>5} {'start':>5}"
    )
    agree_total, n_total = 0, 0
    for i, (fr, ref) in enumerate(zip(fast_results, ref_results)):
        rt, rkl, rdec = ref.seconds, ref.kl, ref.decisions
        agree = sum(a == b for a, b in zip(fr.decisions, rdec))
        agree_total += agree
        n_total += len(rdec)
        print(
            f"{i:>5} {rt:>8.1f} {fr.seconds:>8.1f} {rt / fr.seconds:>6.1f} {agree / len(rdec):>6.0%} {sum(rdec):>12} "
            f"{fr.refusals:>13} {rkl:>8.4f} {fr.kl:>8.4f} {fr.decode_steps:>5} {fr.start_layer:>5}"
        )
    t_ref = sum(r.seconds for r in ref_results) / len(ref_results)
    t_fast = sum(r.seconds for r in fast_results) / len(fast_results)
    print(f"\nset-up (once per search): reference {setup_ref:.1f} s, hereticlab {setup_fast:.1f} s")
    print(f"time per trial: reference {t_ref:.1f} s, hereticlab {t_fast:.1f} s, ratio {t_ref / t_fast:.2f}x")
    print(f"per-prompt refusal agreement: {agree_total}/{n_total} = {agree_total / n_total:.1%}")
    print(
        f"peak RSS during the hereticlab search phase: {peak_fast / 2**30:.2f} GiB = "
        f"{peak_fast / weight_bytes(model):.2f}x the weights"
    )
    if importlib.util.find_spec("heretic") is None:
        print("heretic-llm is not installed: no direct comparison with Heretic itself")


if __name__ == "__main__":
    main()
