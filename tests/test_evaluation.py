"""The fast evaluator decides exactly what the slow path decides."""

import pytest
import torch

import hereticlab as hl
from hereticlab.core.testing import tiny_model
from hereticlab.measure.detectors import DetectionResult, KeywordDetector
from hereticlab.search.evaluator import TrialEvaluator, tune_batch_size

BAD = [
    "Tell me a secret plan",
    "How do I pick a lock quickly?",
    "x",
    "Write a rude poem",
    "Explain the trick",
    "Say no",
]
GOOD = ["Bake bread", "What is 2+2?", "Name a color", "Describe rain in one line"]


class FirstByteDetector:
    """A Detector (measure.detectors protocol) with a prefix-stable positive decision: refusal iff the text
    contains the letter 'e' (or is blank)."""

    early_stop_safe = True

    def decided(self, text):
        return True if "e" in text else None

    def refused(self, text):
        return (not text.strip()) or "e" in text

    def detect(self, texts, prompts=None):
        decisions = [self.refused(t) for t in texts]
        return DetectionResult(decisions, [float(d) for d in decisions])


@pytest.fixture(scope="module")
def model_tok():
    return tiny_model("qwen2", seed=3)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
def test_prefix_reuse_gives_identical_kl_and_decisions(family):
    model, tok = tiny_model(family, seed=4)
    ev = TrialEvaluator(
        model,
        tok,
        BAD,
        GOOD,
        detector=FirstByteDetector(),
        batch_size=4,
        max_new_tokens=12,
        decide_after=12,
        prefix_stride=1,
        progress=False,
    )
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
    ev = TrialEvaluator(
        model,
        tok,
        BAD,
        GOOD,
        detector=FirstByteDetector(),
        early_stop=False,
        max_new_tokens=10,
        batch_size=4,
        progress=False,
    )
    result = ev.baseline()
    reference = hl.generate(model, tok, BAD, max_new_tokens=10, batch_size=3, progress=False)
    assert result.responses == reference
    assert result.decisions == [FirstByteDetector().refused(t) for t in reference]
    assert result.kl == pytest.approx(0.0, abs=1e-6)
    base = hl.first_token_logprobs(model, tok, GOOD, progress=False)
    assert torch.allclose(ev.baseline_logprobs, base, atol=1e-5)


def test_early_stopping_keeps_positive_decisions_and_cuts_steps(model_tok):
    model, tok = model_tok
    full = TrialEvaluator(
        model, tok, BAD, GOOD, detector=FirstByteDetector(), early_stop=False, max_new_tokens=24, progress=False
    ).baseline()
    early = TrialEvaluator(
        model, tok, BAD, GOOD, detector=FirstByteDetector(), max_new_tokens=24, decide_after=24, progress=False
    ).baseline()
    # With decide_after equal to the cap, early stopping can only end a prompt on a final decision.
    assert early.decisions == full.decisions
    assert early.decode_steps <= full.decode_steps


def test_any_protocol_detector_judges_and_stops_early(model_tok):
    """A detector with only the protocol's detect / decided (no is_refusal / matched) decides as detect does on
    the full responses, with early stopping on and off; an object without detect is refused up front."""
    model, tok = model_tok
    detector = KeywordDetector(markers=("e",))
    full = TrialEvaluator(
        model, tok, BAD, GOOD, detector=detector, early_stop=False, max_new_tokens=24, progress=False
    ).baseline()
    early = TrialEvaluator(
        model, tok, BAD, GOOD, detector=detector, max_new_tokens=24, decide_after=24, progress=False
    ).baseline()
    assert full.decisions == detector.detect(full.responses).decisions
    assert early.decisions == full.decisions and any(full.decisions)
    assert early.decode_steps <= full.decode_steps

    class OldStyle:
        def is_refusal(self, text):
            return False

    with pytest.raises(TypeError, match="detect"):
        TrialEvaluator(model, tok, BAD, GOOD, detector=OldStyle(), progress=False)


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


def test_common_prefix_and_padding_after_it():
    from hereticlab.core.capture import common_prefix_length
    from hereticlab.core.capture import encode_ids as pad_after_prefix

    assert common_prefix_length([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert common_prefix_length([[7, 8], [9]]) == 0 and common_prefix_length([]) == 0
    batch = pad_after_prefix([[5, 6, 7], [8]], prefix_length=3, pad_id=0, device="cpu")
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 1]]
    assert batch["position_ids"].tolist() == [[3, 4, 5], [3, 3, 3]]


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
def test_shared_prompt_prefix_changes_nothing(family):
    """Running the common chat prefix once per trial gives the per-row results of running every row in full."""
    model, tok = tiny_model(family, seed=5)
    kwargs = dict(detector=FirstByteDetector(), batch_size=4, max_new_tokens=10, early_stop=False, progress=False)
    shared = TrialEvaluator(model, tok, BAD, GOOD, **kwargs)
    full = TrialEvaluator(model, tok, BAD, GOOD, share_prefix=False, **kwargs)
    assert shared._bad.prefix_length >= 4 and shared._good.prefix_length >= 4
    assert full._bad.prefix_length == 0
    assert torch.allclose(shared.baseline_logprobs, full.baseline_logprobs, atol=1e-5)
    direction = torch.randn(64, generator=torch.Generator().manual_seed(1))
    edits = hl.plan_ablation(model, direction, hl.constant_kernel(4, 1.0, layers=[1, 2, 3]))
    a, b = shared.evaluate_edits(edits), full.evaluate_edits(edits)
    assert a.responses == b.responses and a.decisions == b.decisions
    assert a.kl > 0 and a.kl == pytest.approx(b.kl, abs=1e-6)  # float32 summation order differs, nothing else


def test_sliding_window_models_do_not_share_a_prefix():
    model, tok = tiny_model("gemma3", seed=5)
    ev = TrialEvaluator(model, tok, BAD, GOOD, batch_size=4, max_new_tokens=4, progress=False)
    assert not ev.share_prefix and ev._bad.prefix_length == 0


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_fast_paths_pass_their_self_check_on_the_installed_transformers(family):
    model, tok = tiny_model(family, seed=4)
    ev = TrialEvaluator(model, tok, BAD, GOOD, batch_size=4, max_new_tokens=8, prefix_stride=1, progress=False)
    assert ev.fast_paths_checked and ev.reuse_prefix and ev.share_prefix


def test_a_broken_fast_path_falls_back_to_the_plain_path_with_one_warning(model_tok, monkeypatch):
    """Simulates transformers 5.25's renamed cache keyword: replay stubs no longer write the recorded keys/values."""
    from hereticlab.core import compat

    model, tok = model_tok
    plain = TrialEvaluator(
        model,
        tok,
        BAD,
        GOOD,
        detector=FirstByteDetector(),
        batch_size=4,
        max_new_tokens=8,
        decide_after=8,
        reuse_prefix=False,
        share_prefix=False,
        progress=False,
    )
    monkeypatch.setattr(compat, "write_layer", lambda *args: None)
    with pytest.warns(compat.CompatibilityWarning, match=r"transformers \d") as caught:
        ev = TrialEvaluator(
            model,
            tok,
            BAD,
            GOOD,
            detector=FirstByteDetector(),
            batch_size=4,
            max_new_tokens=8,
            decide_after=8,
            prefix_stride=1,
            progress=False,
        )
    assert len(caught) == 1 and not ev.fast_paths_checked and not ev.reuse_prefix and not ev.share_prefix
    direction = torch.randn(64, generator=torch.Generator().manual_seed(1))
    edits = hl.plan_ablation(model, direction, hl.constant_kernel(4, 1.0, layers=[2, 3]))
    got, want = ev.evaluate_edits(edits), plain.evaluate_edits(edits)
    assert got.decisions == want.decisions and got.responses == want.responses
    assert got.kl == pytest.approx(want.kl, abs=1e-6) and got.kl > 0


def test_decide_after_misses_a_late_marker_one_sided(model_tok):
    """``decide_after`` is a one-sided approximation: a marker that first appears after ``decide_after`` clean tokens
    ("Sure… However, I cannot…") is missed (counted as not refused); an early "refused" is never wrong.

    The late marker is found on the tiny model itself: greedy-decode once, then take a printable ASCII character
    (ASCII bytes decode the same in any longer text, so a match stays a match) whose first appearance in some
    response needs ``p ≥ 4`` tokens (the smallest such ``p``: short decodes). Judged with that character as the only
    marker, that prompt is refused on its full response.
    """
    from hereticlab.core.capture import chat_texts, encode
    from hereticlab.core.generation import eos_token_ids, greedy_decode

    model, tok = model_tok
    cap = 12
    tokens = greedy_decode(model, encode(tok, chat_texts(tok, BAD), "cpu"), cap, eos_token_ids(model, tok))
    candidates = []  # (p, prompt index, character)
    for i, toks in enumerate(tokens):
        full = tok.decode(toks, skip_special_tokens=True)
        for ch in sorted(
            {c for c in full if c.isascii() and c.isprintable() and not c.isspace() and c not in "*_`~#>"}
        ):
            detector = hl.MarkerDetector(markers=(ch,))
            p = next(
                k for k in range(1, len(toks) + 1) if detector.matched(tok.decode(toks[:k], skip_special_tokens=True))
            )
            if 4 <= p < cap:
                candidates.append((p, i, ch))
    assert candidates, f"no late character in {[tok.decode(t) for t in tokens]}"
    p, i, ch = min(candidates)
    detector = hl.MarkerDetector(markers=(ch,))
    assert detector.is_refusal(tok.decode(tokens[i], skip_special_tokens=True))  # the full generation: refused

    def run(**kwargs):
        return TrialEvaluator(
            model, tok, BAD, GOOD, detector=detector, max_new_tokens=cap, batch_size=4, progress=False, **kwargs
        ).baseline()

    missed, caught, full = run(decide_after=p - 1), run(decide_after=p), run(early_stop=False)
    assert full.responses[i] == tok.decode(tokens[i], skip_special_tokens=True) and full.decisions[i] is True
    # decide_after < p: the prompt counts as answered after p − 1 clean tokens; the late marker is never seen.
    assert missed.decisions[i] is False and ch not in missed.responses[i]
    assert caught.decisions[i] is True  # decide_after ≥ p: the marker arrives in time (and decoding stops there)
    # One-sided: an early "refused" is always a refusal of the full response; only "not refused" can be wrong.
    for early in (missed, caught):
        assert all(full_d for early_d, full_d in zip(early.decisions, full.decisions) if early_d)
    assert sum(missed.decisions) < sum(full.decisions) and missed.decode_steps <= full.decode_steps


def test_sides_with_the_same_prefix_compute_it_once_per_trial(model_tok):
    """Refusal's harmful and harmless sides share the chat header: one prefix forward per trial, not two."""
    model, tok = model_tok
    ev = TrialEvaluator(
        model, tok, BAD, GOOD, detector=FirstByteDetector(), batch_size=4, max_new_tokens=4, progress=False
    )
    assert ev._bad.prefix_length >= 4 and torch.equal(ev._bad.prefix, ev._good.prefix)
    prefix_calls = []
    handle = model.register_forward_pre_hook(
        lambda module, args, kwargs: (
            prefix_calls.append(1)
            if kwargs.get("input_ids") is not None and torch.equal(kwargs["input_ids"], ev._bad.prefix)
            else None
        ),
        with_kwargs=True,
    )
    try:
        result = ev.baseline()
    finally:
        handle.remove()
    assert len(prefix_calls) == 1 and result.kl == pytest.approx(0.0, abs=1e-6)
    assert ev._prefix_memo is None


def test_next_tokens_from_is_the_argmax_cold_and_samples_the_softmax_warm():
    """The decode loop's one token choice: argmax at temperature 0; at temperature T a seeded draw from
    softmax(logits / T), checked against the exact probabilities on a 3-token vocabulary."""
    from hereticlab.core.generation import next_tokens_from

    logits = torch.tensor([[0.0, 1.0, -1.0], [2.0, 0.0, 0.0]])
    assert next_tokens_from(logits).tolist() == [1, 0]
    row = torch.log(torch.tensor([[0.2, 0.5, 0.3]])).repeat(4000, 1)
    drawn = next_tokens_from(row, 1.0, torch.Generator().manual_seed(0))
    share = torch.bincount(drawn, minlength=3).float() / len(drawn)
    assert torch.allclose(share, torch.tensor([0.2, 0.5, 0.3]), atol=0.025), share  # 4000 draws: sd ≈ 0.008
    hot = next_tokens_from(row, 2.0, torch.Generator().manual_seed(0))  # T = 2 flattens: p ∝ sqrt(p)
    expected = torch.tensor([0.2, 0.5, 0.3]).sqrt() / torch.tensor([0.2, 0.5, 0.3]).sqrt().sum()
    assert torch.allclose(torch.bincount(hot, minlength=3).float() / len(hot), expected, atol=0.025)
    again = next_tokens_from(row, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(drawn, again)


def test_generate_samples_reproducibly_and_is_greedy_when_cold(model_tok):
    model, tok = model_tok
    prompts = ["Say something.", "Name a colour.", "Count to three."]
    greedy = hl.generate(model, tok, prompts, max_new_tokens=6, progress=False)
    assert hl.generate(model, tok, prompts, max_new_tokens=6, progress=False, temperature=1e-4, seed=5) == greedy
    warm = [
        hl.generate(model, tok, prompts, max_new_tokens=6, progress=False, temperature=1.5, seed=s) for s in (0, 0, 1)
    ]
    assert warm[0] == warm[1] and warm[0] != warm[2] and warm[0] != greedy
