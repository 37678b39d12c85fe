"""Shared set-up for the benchmarks: model, the canonical prompt splits, directions, a memory sampler, the
benchmark's trial parameters and the Heretic-style reference evaluator (imported by
``tests/test_bench_reference.py``)."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

import torch

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


# ----------------------------------------------------------------------------------------------------------
# The search trials the benchmarks evaluate, and a Heretic-style reference evaluator
# ----------------------------------------------------------------------------------------------------------


def benchmark_space():
    """The search space the benchmark draws from: hereticlab's default space with the global scope only."""
    from hereticlab.search import SearchSpace

    return SearchSpace(scopes=("global",))


def parameter_sets(n: int, seed: int = 0, space=None) -> list[dict]:
    """A fixed, seeded list: random draws of ``space`` (default ``benchmark_space()``), as a search's start-up
    phase makes. The benchmark and ``tests/test_bench_reference.py`` both take their trials from here."""
    import optuna

    space = space or benchmark_space()
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=seed))
    return [space.suggest(study.ask()) for _ in range(n)]


def editable_writers(model, components) -> list:
    """Every writer that an edit of ``components`` can touch, in any block (``plan_ablation``'s component rules:
    ``"mlp"`` also covers MoE experts). The reference attaches its adapters to all of them, whatever one trial edits."""
    from hereticlab.core.architecture import find_writers
    from hereticlab.interventions.edits import COMPONENT_ALIASES

    components = tuple(components)
    components += tuple(a for a, base in COMPONENT_ALIASES.items() if base in components and a not in components)
    return find_writers(model, components)


def plan_rank(edits) -> int:
    """The LoRA rank that carries ``edits`` exactly when they are plain (``norm="none"``): per module, the summed
    basis ranks of its edits; the maximum over modules (1 for an empty plan)."""
    per_module: dict[int, int] = {}
    for e in edits:
        per_module[id(e.writer.module)] = per_module.get(id(e.writer.module), 0) + e.basis.shape[1]
    return max(per_module.values(), default=1)


@dataclass
class ReferenceResult:
    seconds: float
    kl: float
    decisions: list[bool]
    texts: list[str]
    kl_per_prompt: list[float]


class ReferenceEvaluator:
    """What a Heretic trial costs: LoRA adapters in the forward pass, ``generate()`` for everything, 100 tokens.

    The adapters sit on every writer in ``writers`` (``editable_writers(model, space.components)``: the union of
    what any trial can edit) at rank ``rank``; each trial loads its exact factors (``lora_factors(exact=True)``) and
    every other adapter is zeroed, so each trial applies exactly its own edit. A factor outside ``writers`` raises.
    First-token log-probs come from ``generate(max_new_tokens=1, output_scores=True, output_hidden_states=True)``
    on ``good``; refusals from ``max_new_tokens`` greedy tokens for every ``bad`` prompt, judged by ``detector``
    (default ``MarkerDetector``) on the full text. ``close()`` (or leaving a ``with`` block) unwraps the model.
    """

    def __init__(
        self,
        model,
        tok,
        bad,
        good,
        *,
        writers,
        batch_size: int,
        max_new_tokens: int = 100,
        rank: int = 1,
        detector=None,
    ):
        from hereticlab.interventions.export import attach_lora, lora_template

        self.model, self.tok, self.batch_size, self.max_new_tokens = model, tok, batch_size, max_new_tokens
        self.bad, self.good = hl.format_chat(tok, bad), hl.format_chat(tok, good)
        self.detector = detector or hl.MarkerDetector()
        self.device = next(model.parameters()).device
        self.rank = rank
        self.peft = attach_lora(model, lora_template(model, writers, rank))  # all factors zero: the unedited model
        self.n_adapters = len(writers)
        self.baseline = self.logprobs()

    def close(self):
        if self.peft is not None:
            self.peft.unload()
            self.peft = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @torch.no_grad()
    def logprobs(self) -> torch.Tensor:
        from hereticlab.core.capture import batched, encode

        out = []
        for chunk in batched(self.good, self.batch_size):
            batch = encode(self.tok, chunk, self.device)
            gen = self.peft.generate(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                max_new_tokens=1,
                do_sample=False,
                output_scores=True,
                output_hidden_states=True,
                return_dict_in_generate=True,
                pad_token_id=self.tok.pad_token_id,
            )
            out.append(torch.log_softmax(gen.scores[0].float(), -1).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def refusals(self) -> tuple[list[bool], list[str]]:
        from hereticlab.core.capture import batched, encode

        decisions, texts = [], []
        for chunk in batched(self.bad, self.batch_size):
            batch = encode(self.tok, chunk, self.device)
            gen = self.peft.generate(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                pad_token_id=self.tok.pad_token_id,
            )
            new = self.tok.batch_decode(gen[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
            texts.extend(new)
            decisions.extend(bool(d) for d in self.detector(new))
        return decisions, texts

    def evaluate(self, edits) -> ReferenceResult:
        """Load ``edits`` into the adapters (exactly, or raise), then measure KL and refusals."""
        from hereticlab.interventions.export import lora_factors, set_lora_factors

        t0 = time.perf_counter()
        set_lora_factors(self.peft, lora_factors(self.model, edits, rank=self.rank, exact=True))
        kl_values = hl.kl_from_logprobs(self.baseline, self.logprobs())
        decisions, texts = self.refusals()
        return ReferenceResult(time.perf_counter() - t0, float(kl_values.mean()), decisions, texts, kl_values.tolist())


def reference_trials(
    model, tok, bad, good, directions, params, *, batch_size: int, max_new_tokens: int = 100, detector=None, space=None
) -> tuple[float, list[ReferenceResult]]:
    """Evaluate every parameter set of ``params`` (see ``parameter_sets``) the reference way, each with exactly its
    edit (``edits_from_params``). Adapters cover every writer of ``space.components``. Returns ``(set-up seconds,
    one ReferenceResult per parameter set)``; the model is unwrapped again afterwards."""
    from hereticlab.search import edits_from_params

    space = space or benchmark_space()
    plans = [edits_from_params(model, directions, p) for p in params]
    t0 = time.perf_counter()
    writers = editable_writers(model, space.components)
    with ReferenceEvaluator(
        model,
        tok,
        bad,
        good,
        writers=writers,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        rank=max(plan_rank(p) for p in plans),
        detector=detector,
    ) as ref:
        setup_seconds = time.perf_counter() - t0
        results = [ref.evaluate(plan) for plan in plans]
    return setup_seconds, results
