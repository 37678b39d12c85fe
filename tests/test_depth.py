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


PC_PROMPTS = ["Tell me a joke.", "How do I bake bread at home without yeast, please?", "Hi", "Why is the sky blue?"]
PC_RESPONSES = ["Why did the chicken cross the road?", "", "Hello there, friend. How are you today?", "Light."]


def test_prompt_cache_gives_the_plain_nll_and_runs_each_prompt_once(tiny_llama):
    from hereticlab.measure.depth import PromptCache, response_nll

    model, tok = tiny_llama
    cache = PromptCache(model, tok)
    plain = response_nll(model, tok, PC_PROMPTS, PC_RESPONSES, max_tokens=12, batch_size=3)
    first = response_nll(model, tok, PC_PROMPTS, PC_RESPONSES, max_tokens=12, batch_size=3, prompt_cache=cache)
    assert torch.allclose(first, plain, atol=1e-5) and cache.computed == 4 and len(cache) == 4
    # another arm: other responses to the same prompts, other batches; no prompt runs again
    other = PC_RESPONSES[::-1]
    again = response_nll(model, tok, PC_PROMPTS, other, max_tokens=12, batch_size=2, prompt_cache=cache)
    assert torch.allclose(again, response_nll(model, tok, PC_PROMPTS, other, max_tokens=12, batch_size=2), atol=1e-5)
    assert cache.computed == 4
    response_nll(model, tok, ["A new prompt."], ["Yes."], prompt_cache=cache)
    assert cache.computed == 5


def test_prompt_cache_recomputes_after_an_in_place_edit_and_evicts_within_its_bound(tiny_llama):
    from hereticlab.measure.depth import PromptCache, response_nll

    model, tok = tiny_llama
    cache = PromptCache(model, tok)
    response_nll(model, tok, PC_PROMPTS, PC_RESPONSES, max_tokens=12, prompt_cache=cache)
    r = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with hl.ablate(model, r):  # weights edited in place: the cached prompts are stale
        edited = response_nll(model, tok, PC_PROMPTS, PC_RESPONSES, max_tokens=12)
        cached = response_nll(model, tok, PC_PROMPTS, PC_RESPONSES, max_tokens=12, prompt_cache=cache)
    assert torch.allclose(cached, edited, atol=1e-5) and cache.computed == 8
    unedited = response_nll(model, tok, PC_PROMPTS, PC_RESPONSES, max_tokens=12)
    assert not torch.allclose(edited, unedited, atol=1e-3)  # the edit changed what is scored
    again = response_nll(model, tok, PC_PROMPTS, PC_RESPONSES, max_tokens=12, prompt_cache=cache)
    assert torch.allclose(again, unedited, atol=1e-5) and cache.computed == 12  # the edit undone: recomputed
    response_nll(model, tok, PC_PROMPTS, PC_RESPONSES, max_tokens=12, prompt_cache=cache)
    assert cache.computed == 12  # nothing changed: reused
    weight = model.get_input_embeddings().weight
    with torch.no_grad():
        weight[5, 3] += 0.5  # one number of one parameter: still a different model
    try:
        response_nll(model, tok, PC_PROMPTS, PC_RESPONSES, max_tokens=12, prompt_cache=cache)
        assert cache.computed == 16
    finally:
        with torch.no_grad():
            weight[5, 3] -= 0.5
    small = PromptCache(model, tok, max_bytes=1)  # room for one prompt: results stay exact
    got = response_nll(model, tok, PC_PROMPTS, PC_RESPONSES, max_tokens=12, batch_size=4, prompt_cache=small)
    assert torch.allclose(got, unedited, atol=1e-5) and len(small) == 1


def test_prompt_cache_refuses_an_intervention_and_falls_back_on_sliding_windows(tiny_llama):
    from hereticlab.core.compat import CompatibilityWarning
    from hereticlab.core.testing import tiny_model
    from hereticlab.measure.depth import PromptCache, response_nll

    model, tok = tiny_llama
    r = torch.ones(model.config.hidden_size)
    with pytest.raises(ValueError, match="drop the prompt_cache or the intervention"):
        response_nll(
            model,
            tok,
            PC_PROMPTS,
            PC_RESPONSES,
            lambda: hl.ablation_hooks(model, r),
            prompt_cache=PromptCache(model, tok),
        )
    gemma, gtok = tiny_model("gemma2")  # sliding-window layers: not plain keys/values
    cache = PromptCache(gemma, gtok)
    with pytest.warns(CompatibilityWarning, match="reusing prompt keys/values"):
        got = response_nll(gemma, gtok, PC_PROMPTS, PC_RESPONSES, max_tokens=12, prompt_cache=cache)
    assert not cache.usable
    assert torch.allclose(got, response_nll(gemma, gtok, PC_PROMPTS, PC_RESPONSES, max_tokens=12), atol=1e-6)
