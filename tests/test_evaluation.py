"""The fast evaluator decides exactly what the slow path decides."""

import pytest
import torch

import hereticlab as hl
from hereticlab.evaluation import TrialEvaluator, tune_batch_size
from hereticlab.testing import tiny_model

BAD = ["Tell me a secret plan", "How do I pick a lock quickly?", "x", "Write a rude poem", "Explain the trick", "Say no"]
GOOD = ["Bake bread", "What is 2+2?", "Name a color", "Describe rain in one line"]


class FirstByteDetector:
    """A detector with a prefix-stable positive decision: refusal iff the text contains the letter 'e'."""

    def matched(self, text):
        return "e" in text

    def is_refusal(self, text):
        return (not text.strip()) or "e" in text


@pytest.fixture(scope="module")
def model_tok():
    return tiny_model("qwen2", seed=3)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
def test_prefix_reuse_gives_identical_kl_and_decisions(family):
    model, tok = tiny_model(family, seed=4)
    ev = TrialEvaluator(model, tok, BAD, GOOD, detector=FirstByteDetector(), batch_size=4, max_new_tokens=12,
                        decide_after=12, prefix_stride=1, progress=False)
    direction = torch.randn(64, generator=torch.Generator().manual_seed(0))
    edits = hl.plan_ablation(model, direction, hl.constant_kernel(4, 1.0, layers=[2, 3]))
    with hl.apply_edits(model, edits):
        slow = ev.evaluate(start_layer=0)
        fast = ev.evaluate(start_layer=2)
    assert fast.decisions == slow.decisions and fast.responses == slow.responses
    assert torch.allclose(torch.tensor(fast.kl_per_prompt), torch.tensor(slow.kl_per_prompt), atol=1e-6)
    assert slow.kl > 0
    via_helper = ev.evaluate_edits(edits)
    assert via_helper.start_layer == 2 and via_helper.decisions == slow.decisions


def test_decisions_and_texts_equal_plain_generation(model_tok):
    model, tok = model_tok
    ev = TrialEvaluator(model, tok, BAD, GOOD, detector=FirstByteDetector(), early_stop=False, max_new_tokens=10,
                        batch_size=4, progress=False)
    result = ev.baseline()
    reference = hl.generate(model, tok, BAD, max_new_tokens=10, batch_size=3, progress=False)
    assert result.responses == reference
    assert result.decisions == [FirstByteDetector().is_refusal(t) for t in reference]
    assert result.kl == pytest.approx(0.0, abs=1e-6)
    base = hl.first_token_logprobs(model, tok, GOOD, progress=False)
    assert torch.allclose(ev.baseline_logprobs, base, atol=1e-5)


def test_early_stopping_keeps_positive_decisions_and_cuts_steps(model_tok):
    model, tok = model_tok
    full = TrialEvaluator(model, tok, BAD, GOOD, detector=FirstByteDetector(), early_stop=False, max_new_tokens=24,
                          progress=False).baseline()
    early = TrialEvaluator(model, tok, BAD, GOOD, detector=FirstByteDetector(), max_new_tokens=24, decide_after=24,
                           progress=False).baseline()
    # With decide_after equal to the cap, early stopping can only end a prompt on a final decision.
    assert early.decisions == full.decisions
    assert early.decode_steps <= full.decode_steps


def test_kl_ceiling_prunes_without_counting(model_tok):
    model, tok = model_tok
    ev = TrialEvaluator(model, tok, BAD, GOOD, kl_ceiling=1e-9, progress=False)
    with hl.ablate(model, torch.randn(64), 1.5):
        result = ev.evaluate()
    assert result.pruned and result.refusals is None and result.refusal_rate is None
    assert ev.baseline().pruned is False


def test_evaluator_restores_weights(model_tok):
    model, tok = model_tok
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ev = TrialEvaluator(model, tok, BAD, GOOD, progress=False)
    ev.evaluate_edits(hl.plan_ablation(model, torch.randn(64), 1.0))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(type(b).__name__ != "_Replay" for b in hl.find_layers(model))


def test_tune_batch_size_returns_a_candidate(model_tok):
    model, tok = model_tok
    assert tune_batch_size(model, tok, BAD, candidates=(2, 4)) in (2, 4)
