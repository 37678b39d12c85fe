"""Where one notebook-style generation batch spends its time: the prompt prefill, the decode steps, and the
coherence pass (the unedited model's teacher-forced NLL of the outputs), with the chat prefix all prompts share.

It sizes the options for making the reproduction notebooks faster. The generation is timed plain and with
``share_prefix=True`` (the shared system turn run once per batch), with the count of responses that came out
identical. The coherence pass is timed plain and continuing prompts a ``depth.PromptCache`` already holds (what every
arm after the first pays when the arms share one cache, as the notebooks do), both in batches of
``steered_outputs``' default 8 rows; their NLLs must agree to 1e-4 before the ratio is printed. Rounds repeat the
whole measurement after a warm-up; the median is printed.

    python bench/generation_cost.py [--model default] [--prompts 64] [--tokens 64] [--rounds 2] [--nll-batch 8]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

import hereticlab as hl
from hereticlab.core import compat
from hereticlab.core.capture import common_prefix_length, encode
from hereticlab.measure.coherence import coherence_nll
from hereticlab.measure.depth import PromptCache


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--nll-batch", type=int, default=8)
    args = parser.parse_args()

    model, tok = hl.load_model(args.model)
    prompts = list(hl.load_prompts("harmful"))[: args.prompts]
    texts = hl.format_chat(tok, prompts)
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    batch = encode(tok, texts, model.device)
    shared = common_prefix_length(ids)
    print(
        f"{len(prompts)} prompts, padded to {batch['input_ids'].shape[1]} tokens; "
        f"{shared} of them the chat prefix every prompt shares"
    )

    def prefill():
        with torch.no_grad():
            compat.forward(model, batch, use_cache=True)

    def generation(share_prefix=False):
        return hl.generate(
            model,
            tok,
            prompts,
            max_new_tokens=args.tokens,
            batch_size=len(prompts),
            progress=False,
            share_prefix=share_prefix,
        )

    prefill()  # warm-up
    prompt_cache = PromptCache(model, tok)
    nll_kw = {"max_tokens": args.tokens, "batch_size": args.nll_batch}
    rows = []
    for _ in range(args.rounds):
        _, t_prefill = timed(prefill)
        outputs, t_generate = timed(generation)
        shared_outputs, t_shared = timed(lambda: generation(share_prefix=True))
        same = sum(a == b for a, b in zip(outputs, shared_outputs))
        plain, t_nll = timed(lambda outputs=outputs: coherence_nll(model, tok, prompts, outputs, **nll_kw))
        coherence_nll(model, tok, prompts, outputs, prompt_cache=prompt_cache, **nll_kw)  # the first arm fills it
        reused, t_cached = timed(
            lambda outputs=outputs: coherence_nll(model, tok, prompts, outputs, prompt_cache=prompt_cache, **nll_kw)
        )
        gap = float(np.nanmax(np.abs(plain - reused)))  # NaN rows (empty outputs) left out
        if gap > 1e-4:
            raise SystemExit(f"the cached coherence pass disagrees with the plain one by {gap:.2e} nats/token")
        rows.append((t_prefill, t_generate, t_nll, t_cached, t_shared))
    t_prefill, t_generate, t_nll, t_cached, t_shared = (statistics.median(column) for column in zip(*rows))
    new_tokens = sum(len(tok(o, add_special_tokens=False)["input_ids"]) for o in outputs)
    total = t_generate + t_nll
    print(f"prefill alone {t_prefill:.1f} s (inside the generation)")
    print(f"generation {t_generate:.1f} s for {new_tokens} new tokens ({new_tokens / t_generate:.0f} tokens/s)")
    decode = t_generate - t_prefill
    print(f"  of which decode steps {decode:.1f} s")
    print(
        f"generation running the shared prefix once per batch (share_prefix=True) {t_shared:.1f} s "
        f"({t_shared / t_generate:.2f}×); {same} of {len(outputs)} responses identical to the plain path's"
    )
    print(
        f"coherence pass {t_nll:.1f} s; continuing cached prompts {t_cached:.1f} s ({t_cached / t_nll:.2f}×, "
        f"NLLs agree to {gap:.1e})"
    )
    print(
        f"per output arm: {total:.1f} s; prefill {t_prefill / total:.0%}, decode {decode / total:.0%}, "
        f"coherence {t_nll / total:.0%}; with the prompt cache and the shared prefix {t_shared + t_cached:.1f} s"
    )


if __name__ == "__main__":
    main()
