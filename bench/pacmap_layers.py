"""Issue-4 acceptance: aligned PaCMAP projections of all L+1 residual layers of the default model for 128 harmful +
128 harmless prompts; prints the fitting time (capture excluded and reported separately) and writes the figure.

    python bench/pacmap_layers.py [--model default] [--prompts 128] [--out outputs]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import hereticlab as hl
from hereticlab.measure import geometry
from hereticlab.ui import plots


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--out", default="outputs")
    args = parser.parse_args()
    model, tok = hl.load_model(args.model)
    harmful = hl.load_prompts("harmful").split(train=200)[0][: args.prompts]
    harmless = hl.load_prompts("harmless").split(train=200)[0][: args.prompts]
    t0 = time.perf_counter()
    bad, good = hl.capture_residuals(model, tok, harmful), hl.capture_residuals(model, tok, harmless)
    t_capture = time.perf_counter() - t0
    t0 = time.perf_counter()
    proj = geometry.project_layers(good, bad, prompts=list(harmless) + list(harmful))
    t_fit = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fig = plots.plot_layers(proj)
    fig.savefig(out / "pacmap_layers.png", dpi=80)
    print(f"capture of {len(harmful)} + {len(harmless)} prompts × {good.shape[1]} residuals: {t_capture:.1f} s")
    print(f"PaCMAP of all {good.shape[1]} layers ({len(harmful) + len(harmless)} points each), aligned: {t_fit:.1f} s")
    print(f"figure: {out / 'pacmap_layers.png'}")


if __name__ == "__main__":
    main()
