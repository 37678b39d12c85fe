"""Issue-2 acceptance on the default model: baseline refusals on the held-out prompts, a quick layer scan on
separate selection prompts, then one hand-chosen ablation measured on all held-out prompts.

Each prompt set (300 prompts) is shuffled once (seed 0) and cut into three disjoint parts: direction training
(``--train``, 168), layer selection (``--scan-prompts``, 32) and the reported held-out prompts (``--heldout``, 100).
With the defaults the held-out prompts are the same 100 as in ``split(train=200)``; the selection prompts are the
last 32 of that split's training part, so no prompt that chose the layer is counted in the reported numbers.

    python bench/hand_ablation.py [--model default] [--train 168] [--scan-prompts 32] [--heldout 100] [--new-tokens 48]
"""

from __future__ import annotations

import argparse
import time

import hereticlab as hl
from hereticlab.search.evaluator import TrialEvaluator, scan_layers


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--train", type=int, default=168, help="direction-training prompts per class")
    parser.add_argument("--scan-prompts", type=int, default=32, help="layer-selection prompts per class")
    parser.add_argument("--heldout", type=int, default=100, help="reported held-out prompts per class")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--kl-max", type=float, default=0.3)
    args = parser.parse_args()
    t0 = time.perf_counter()
    model, tok = hl.load_model(args.model)
    n_layers = hl.num_layers(model)
    parts = {}
    for name in ("harmful", "harmless"):
        train, rest = hl.load_prompts(name).split(train=args.train, eval=args.scan_prompts + args.heldout)
        parts[name] = train, rest[: args.scan_prompts], rest[args.scan_prompts :]
        sets = [set(p) for p in parts[name]]
        assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2]), f"{name}: the three parts overlap"
    (train_h, scan_h, eval_h), (train_g, scan_g, eval_g) = parts["harmful"], parts["harmless"]
    dirs = hl.mean_difference(
        hl.capture_residuals(model, tok, train_h), hl.capture_residuals(model, tok, train_g), project=True
    )
    # The layer is chosen on the selection prompts only; the reported numbers use the disjoint held-out prompts.
    evaluator = TrialEvaluator(model, tok, scan_h, scan_g)
    scan = scan_layers(evaluator, dirs, indices=range(n_layers // 3, n_layers, 2))
    print(scan.to_string(index=False))
    ok = scan[scan["kl"] <= args.kl_max]
    best = int((ok if len(ok) else scan).sort_values(["refusals", "kl"]).iloc[0]["index"])
    base_lp = hl.first_token_logprobs(model, tok, eval_g)
    before = hl.refusal_rate(model, tok, eval_h, max_new_tokens=args.new_tokens, batch_size=32)
    with hl.ablate(model, dirs.at(best), 1.0, components=("attn", "mlp")):
        after = hl.refusal_rate(model, tok, eval_h, max_new_tokens=args.new_tokens, batch_size=32)
        kl = hl.kl_divergence(model, tok, eval_g, baseline=base_lp)
    b, a = before.attrs["refusals"], after.attrs["refusals"]
    print(f"\nhand ablation: direction of residual {best}, strength 1 on every attention and MLP writer")
    print(
        f"prompts per class: {len(train_h)} training, {len(scan_h)} layer selection, {len(eval_h)} held-out "
        f"(disjoint); held-out: {len(eval_h)} harmful, {len(eval_g)} harmless; {args.new_tokens} greedy tokens"
    )
    print(f"refusals {b}/{len(eval_h)} -> {a}/{len(eval_h)} ({(b - a) / max(b, 1):.0%} fewer); first-token KL {kl:.3f}")
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
