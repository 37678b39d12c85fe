"""Residual capture (hooks, all L+1 layers, last position) vs plain forwards over the same prompts.

Baselines: a plain forward computing only the last position's logits (``logits_to_keep=1``), and the way Heretic
collects residuals (``output_hidden_states=True`` with full logits). Rounds alternate to share machine noise.

    python bench/capture_overhead.py [--model default] [--prompts 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import setup  # noqa: E402

import hereticlab as hl  # noqa: E402
from hereticlab.core.capture import batched, encode  # noqa: E402


@torch.no_grad()
def plain(model, tok, texts, batch_size, **kwargs):
    for chunk in batched(texts, batch_size):
        model(**encode(tok, chunk, torch.device("cpu")), use_cache=False, **kwargs)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    model, tok, htr, *_ = setup(args.model, n_train=args.prompts)
    texts = hl.format_chat(tok, htr)
    times = {"capture": 0.0, "plain (last logits)": 0.0, "hidden_states (full logits)": 0.0}
    for _ in range(args.rounds):
        t = time.perf_counter()
        hl.capture_residuals(model, tok, htr, batch_size=args.batch_size, progress=False)
        times["capture"] += time.perf_counter() - t
        t = time.perf_counter()
        plain(model, tok, texts, args.batch_size, logits_to_keep=1)
        times["plain (last logits)"] += time.perf_counter() - t
        t = time.perf_counter()
        plain(model, tok, texts, args.batch_size, output_hidden_states=True)
        times["hidden_states (full logits)"] += time.perf_counter() - t
    for name, total in times.items():
        print(f"{name:>28}: {total / args.rounds:.2f} s per pass over {len(texts)} prompts")
    print(f"capture / plain forward = {times['capture'] / times['plain (last logits)']:.3f}x")
    print(f"capture / hidden_states forward = {times['capture'] / times['hidden_states (full logits)']:.3f}x")


if __name__ == "__main__":
    main()
