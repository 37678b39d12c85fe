"""Shared set-up for the benchmarks: model, the canonical prompt splits, directions, a memory sampler."""

from __future__ import annotations

import os
import threading
import time

import hereticlab as hl


def setup(model_name: str = "default", n_train: int = 100, n_eval: int = 50):
    model, tok = hl.load_model(model_name)
    htr, hev = hl.load_prompts("harmful").split(train=200)
    gtr, gev = hl.load_prompts("harmless").split(train=200)
    return model, tok, htr[:n_train], gtr[:n_train], hev[:n_eval], gev[:n_eval]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples the process's resident memory every 20 ms inside a ``with`` block."""

    def __enter__(self):
        self.peak, self._stop = rss_bytes(), threading.Event()

        def sample():
            while not self._stop.is_set():
                self.peak = max(self.peak, rss_bytes())
                time.sleep(0.02)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())
