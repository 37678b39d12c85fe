"""Cross-entropy on fixed reference text (``depth.reference_nll`` / ``ce_shift``) and early-stopped prefill curves."""

import math

import pytest
import torch
from conftest import PROMPTS

import hereticlab as hl
from hereticlab.measure.depth import ce_shift, load_reference_text, prefill_refusal, reference_nll
from hereticlab.measure.metrics import MarkerDetector


def test_reference_text_is_packaged_prose():
    texts = load_reference_text()
    assert len(texts) == 46 and len(set(texts)) == len(texts)
    assert all(40 <= len(t.split()) <= 90 for t in texts)  # paragraphs, not prompts
    assert not any(t.startswith("#") for t in texts)  # the licence header is a comment


def test_reference_nll_matches_a_forward_by_hand(tiny_llama):
    model, tok = tiny_llama
    texts = ["The cat sat on the mat.", "Bread rises because yeast feeds on sugar and releases gas slowly."]
    sums, counts = reference_nll(model, tok, texts, batch_size=2)  # one left-padded batch
    assert sums.dtype == torch.float64 and counts.tolist() == [len(tok.encode(t)) - 1 for t in texts]
    for text, got in zip(texts, sums):
        ids = torch.tensor([tok.encode(text)])
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        expected = -lp.gather(-1, ids[0, 1:, None]).sum()
        assert float(got) == pytest.approx(float(expected), rel=1e-4)
    # An intervention changes it; no intervention twice gives the same numbers; max_tokens cuts every text.
    r = torch.randn(model.config.hidden_size)
    edited, _ = reference_nll(model, tok, texts, lambda: hl.ablation_hooks(model, r))
    assert not torch.allclose(edited, sums) and torch.allclose(reference_nll(model, tok, texts)[0], sums)
    assert reference_nll(model, tok, texts, max_tokens=5)[1].tolist() == [4, 4]
    with pytest.raises(ValueError, match="at least 2 tokens"):
        reference_nll(model, tok, texts, max_tokens=1)


def test_ce_shift_is_the_per_token_difference_with_a_text_bootstrap():
    base = torch.tensor([10.0, 20.0, 30.0, 40.0])
    counts = torch.tensor([5, 10, 10, 20])
    same = ce_shift(base, base, counts)
    assert same.value == 0.0 and same.low == same.high == 0.0
    shifted = ce_shift(base, base + counts * 0.5, counts)  # +0.5 nats on every token of every text
    assert (
        shifted.value == pytest.approx(0.5) and shifted.low == pytest.approx(0.5) and shifted.high == pytest.approx(0.5)
    )
    mixed = ce_shift(base, base + torch.tensor([0.0, 10.0, 0.0, 0.0]), counts)
    assert mixed.value == pytest.approx(10 / 45) and mixed.low < mixed.value < mixed.high
    assert "4 texts, 45 tokens" in mixed.detail
    with pytest.raises(ValueError, match="three"):
        ce_shift(base, base[:3], counts)
    assert math.isfinite(ce_shift([1.0, 2.0], [1.5, 2.0], [3, 4]).value)


def test_prefill_early_stop_keeps_the_decisions(tiny_llama):
    model, tok = tiny_llama
    first = hl.generate(model, tok, PROMPTS, max_new_tokens=6, progress=False)[0]
    detector = MarkerDetector(markers=[tok.decode(tok.encode(first, add_special_tokens=False)[:1])])
    kw = {"ks": (0, 1), "detector": detector, "max_new_tokens": 6}
    full = prefill_refusal(model, tok, PROMPTS, "Sure", **kw)
    early = prefill_refusal(model, tok, PROMPTS, "Sure", early_stop=True, **kw)
    assert early.refusal_rate.tolist() == full.refusal_rate.tolist() and full.refusal_rate.iloc[0] > 0
    for k in (0, 1):
        assert all(f.startswith(e) for f, e in zip(full.attrs["responses"][k], early.attrs["responses"][k]))


def test_response_nll_batches_of_short_sequences_next_to_a_long_response(tiny_llama):
    """A batch whose prompt + response is shorter than the call's longest response + 1 (here: a 2-token answer in a
    batch of its own, next to a 60-token one) must score its own tokens: each item equals its NLL computed alone,
    and by hand from one plain forward."""
    from hereticlab.measure.depth import per_position_kl, response_nll

    model, tok = tiny_llama
    prompts = ["Hi.", "Tell me a long story about a lighthouse keeper."]
    long = tok.decode(torch.randint(5, model.config.vocab_size, (60,), generator=torch.Generator().manual_seed(0)))
    responses = [tok.decode(tok.encode("ok then", add_special_tokens=False)), long]
    together = response_nll(model, tok, prompts, responses, max_tokens=64, batch_size=1)
    alone = torch.cat([response_nll(model, tok, [p], [r], max_tokens=64) for p, r in zip(prompts, responses)])
    assert torch.allclose(together, alone, atol=1e-5)
    text = hl.format_chat(tok, prompts[:1])[0]
    prompt_ids = tok.encode(text, add_special_tokens=False)
    answer_ids = tok.encode(responses[0], add_special_tokens=False)
    ids = torch.tensor([prompt_ids + answer_ids])
    assert ids.shape[1] < len(tok.encode(long, add_special_tokens=False)) + 1  # the case that used to fail
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    start = len(prompt_ids)
    by_hand = -lp[start - 1 : -1].gather(-1, ids[0, start:, None]).mean()
    assert float(together[0]) == pytest.approx(float(by_hand), rel=1e-4)
    r = torch.ones(model.config.hidden_size)
    kl = per_position_kl(model, tok, prompts, responses, lambda: hl.ablation_hooks(model, r), batch_size=1)
    assert kl["n"].iloc[0] == 2 and kl["n"].iloc[len(answer_ids)] == 1
