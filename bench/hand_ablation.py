"""Issue-2 acceptance on the default model: baseline refusals on the evaluation prompts, a quick layer scan,
then one hand-chosen ablation measured on all held-out evaluation prompts.

    python bench/hand_ablation.py [--model default] [--scan-prompts 32] [--new-tokens 48]
"""

from __future__ import annotations

import argparse
import time

import hereticlab as hl
from hereticlab.evaluation import TrialEvaluator, scan_layers


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--scan-prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--kl-max", type=float, default=0.3)
    args = parser.parse_args()
    t0 = time.perf_counter()
    model, tok = hl.load_model(args.model)
    n_layers = hl.num_layers(model)
    train_h, eval_h = hl.load_prompts("harmful").split(train=200)
    train_g, eval_g = hl.load_prompts("harmless").split(train=200)
    dirs = hl.mean_difference(hl.capture_residuals(model, tok, train_h), hl.capture_residuals(model, tok, train_g), project=True)
    # The scan uses the first prompts of the evaluation split; the final numbers use all of it.
    evaluator = TrialEvaluator(model, tok, eval_h[: args.scan_prompts], eval_g[: args.scan_prompts])
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
    print(f"evaluation split: {len(eval_h)} harmful, {len(eval_g)} harmless; {args.new_tokens} greedy tokens")
    print(f"refusals {b}/{len(eval_h)} -> {a}/{len(eval_h)} ({(b - a) / max(b, 1):.0%} fewer); first-token KL {kl:.3f}")
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
