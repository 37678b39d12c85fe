"""The benchmark's reference evaluator (bench/common.py) applies exactly each trial's edit, as TrialEvaluator does.

bench/trial_speed.py compares hereticlab's evaluator with a Heretic-style reference (PEFT LoRA adapters,
``generate()``). It used to attach adapters only to the writers trial 0 edits, and ``set_lora_factors`` silently
dropped the factors of every other writer, so trials editing other writers were measured with an incomplete edit.
These tests run the benchmark's own trial list (``parameter_sets``, same generator) on a tiny model.
"""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import hereticlab as hl
from hereticlab.core.testing import tiny_model
from hereticlab.interventions.export import ExportError, attach_lora, lora_factors, lora_template, set_lora_factors
from hereticlab.search import edits_from_params
from hereticlab.search.evaluator import TrialEvaluator

BAD = ["Tell me a secret plan", "x", "Write a rude poem", "Say no"]
GOOD = ["Bake bread", "What is 2+2?", "Describe rain in one line"]
N_TOKENS = 6  # decide_after == max_new_tokens: the evaluator's decisions are final, like the reference's
N_TRIALS = 10  # the benchmark's default --trials
# Refusal = the text contains "!" or "x": on this model it splits the responses (a detector that never fires would
# make "identical decisions" vacuous). Both are ASCII bytes, so a match stays a match in any longer text.
DETECTOR = hl.MarkerDetector(markers=("!", "x"))


def _bench_common():
    """bench/common.py, loaded by path (bench/ is not a package)."""
    name = "hereticlab_bench_common"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "bench" / "common.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _loud_tiny_llama():
    """Tiny llama with its block matrices ×8 and lm_head ×30: at init scale the writers barely reach the logits
    (first-token KL ~1e-4, every response the same byte); here edits move KL by 1e-3..1e-1 and responses differ."""
    model, tok = tiny_model("llama", seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and "embed" not in name and "lm_head" not in name:
                p.mul_(8)
        model.lm_head.weight.mul_(30)
    return model, tok


@pytest.fixture(scope="module")
def bench():
    common = _bench_common()
    model, tok = _loud_tiny_llama()
    dirs = hl.mean_difference(
        hl.capture_residuals(model, tok, BAD, progress=False),
        hl.capture_residuals(model, tok, GOOD, progress=False),
        project=True,
    )
    params = common.parameter_sets(N_TRIALS)
    plans = [edits_from_params(model, dirs, p) for p in params]
    fast = TrialEvaluator(
        model,
        tok,
        BAD,
        GOOD,
        detector=DETECTOR,
        decide_after=N_TOKENS,
        max_new_tokens=N_TOKENS,
        batch_size=len(BAD),
        progress=False,
    )
    fast_results = [fast.evaluate_edits(plan) for plan in plans]
    return {
        "common": common,
        "model": model,
        "tok": tok,
        "dirs": dirs,
        "params": params,
        "plans": plans,
        "fast": fast_results,
    }


def _modules(plan):
    return {id(e.writer.module) for e in plan}


def test_parameter_sets_are_the_benchmarks_seeded_draws():
    common = _bench_common()
    first, again = common.parameter_sets(4), common.parameter_sets(4)
    assert first == again and first != common.parameter_sets(4, seed=1)
    assert all(p["scope"] == "global" and p["norm"] == "none" for p in first)
    trial_speed = (Path(__file__).resolve().parents[1] / "bench" / "trial_speed.py").read_text()
    assert "params = parameter_sets(args.trials)" in trial_speed and "reference_trials(" in trial_speed


def test_reference_matches_trial_evaluator_on_every_benchmark_trial(bench):
    common, model, tok = bench["common"], bench["model"], bench["tok"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, ref = common.reference_trials(
        model,
        tok,
        BAD,
        GOOD,
        bench["dirs"],
        bench["params"],
        batch_size=len(BAD),
        max_new_tokens=N_TOKENS,
        detector=DETECTOR,
    )
    assert len(ref) == len(bench["fast"]) == N_TRIALS
    for i, (r, f) in enumerate(zip(ref, bench["fast"])):
        assert r.kl == pytest.approx(f.kl, abs=1e-5), f"trial {i}: reference KL {r.kl} vs evaluator {f.kl}"
        assert torch.allclose(torch.tensor(r.kl_per_prompt), torch.tensor(f.kl_per_prompt), atol=1e-5), f"trial {i}"
        assert r.decisions == f.decisions, f"trial {i}: {r.texts} vs {f.responses}"
        # A prompt the evaluator did not stop early ran to the cap (or EOS) exactly as generate() did.
        for text, response, refused in zip(r.texts, f.responses, f.decisions):
            if not refused:
                assert response == text
    decisions = [d for r in ref for d in r.decisions]
    assert any(decisions) and not all(decisions)  # the detector discriminates, so agreement means something
    assert max(r.kl for r in ref) > 1e-2  # the edits matter on this model
    # The reference unwrapped the model again and left its weights alone.
    assert all(type(m).__name__ == "Linear" for n, m in model.named_modules() if n.endswith(("o_proj", "down_proj")))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_adapters_on_trial_0s_writers_only_measure_a_different_edit(bench):
    """The old bug, reproduced: adapters on trial 0's writers, other factors dropped. set_lora_factors now refuses;
    dropping them by hand gives the wrong KL exactly on the trials that edit writers trial 0 does not."""
    common, model, tok, plans = bench["common"], bench["model"], bench["tok"], bench["plans"]
    extra = [i for i, plan in enumerate(plans) if _modules(plan) - _modules(plans[0])]
    assert extra, "no benchmark trial edits a writer trial 0 leaves alone: the old bug would go unseen"
    with common.ReferenceEvaluator(
        model,
        tok,
        BAD,
        GOOD,
        writers=[e.writer for e in plans[0]],
        batch_size=len(GOOD),
        max_new_tokens=N_TOKENS,
        detector=DETECTOR,
    ) as ref:
        adapted = set(lora_factors(model, plans[0]))
        gaps = {}
        for i in range(len(plans)):
            factors = lora_factors(model, plans[i])
            if i in extra:
                with pytest.raises(ValueError, match="matches no adapter module"):
                    set_lora_factors(ref.peft, factors)
            set_lora_factors(ref.peft, {k: v for k, v in factors.items() if k in adapted})  # what the old code did
            kl = float(hl.kl_from_logprobs(ref.baseline, ref.logprobs()).mean())
            gaps[i] = abs(kl - bench["fast"][i].kl)
    for i, gap in gaps.items():
        if i in extra:
            assert gap > 1e-3, f"trial {i} edits writers outside trial 0's set, yet the truncated edit gives its KL"
        else:
            assert gap < 1e-5, f"trial {i} edits only trial 0's writers: the reference must agree ({gap})"


def test_set_lora_factors_raises_on_a_factor_matching_no_module():
    model, _ = tiny_model("llama", seed=1)
    writers = [w for w in hl.find_writers(model, ["attn"]) if w.layer == 0]
    peft_model = attach_lora(model, lora_template(model, writers, rank=1))
    try:
        adapter = dict(peft_model.base_model.model.named_modules())["model.layers.0.self_attn.o_proj"]
        A, B = torch.ones(1, 64), torch.ones(64, 1)
        set_lora_factors(peft_model, {"model.layers.0.self_attn.o_proj": (A, B)})
        for name in ("model.layers.3.mlp.down_proj", "model.layers.0.self_attn.no_such_proj"):
            with pytest.raises(ValueError, match=name.replace(".", r"\.")):
                set_lora_factors(peft_model, {"model.layers.0.self_attn.o_proj": (2 * A, B), name: (A, B)})
        with pytest.raises(ExportError, match="rank 1"):
            set_lora_factors(peft_model, {"model.layers.0.self_attn.o_proj": (torch.ones(2, 64), torch.ones(64, 2))})
        # Nothing was written by the refused calls.
        assert torch.equal(adapter.lora_A["default"].weight, A)
    finally:
        peft_model.unload()
    # attach_lora goes through the same check (a target PEFT did not find cannot pass silently) and unwraps again.
    with pytest.raises(ValueError, match="no_such_proj"):
        attach_lora(model, {"model.layers.0.self_attn.o_proj": (A, B), "model.layers.0.self_attn.no_such_proj": (A, B)})
    assert not any("lora" in name for name, _ in model.named_modules())


def test_lora_factors_exact_refuses_a_truncated_edit():
    model, _ = tiny_model("llama", seed=1)
    direction = torch.randn(64, generator=torch.Generator().manual_seed(0))
    plain = hl.plan_ablation(model, direction, 1.0, components=["attn"])
    assert len(lora_factors(model, plain, exact=True)) == 4
    row = hl.plan_ablation(model, direction, 1.0, components=["attn"], norm="row")
    with pytest.raises(ExportError, match="not of rank"):
        lora_factors(model, row, rank=1, exact=True)
    assert len(lora_factors(model, row, rank=1)) == 4  # without exact=True the documented truncation stays
