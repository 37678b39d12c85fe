"""Activation addition, span capture, CAA / reading vectors, sweeps, and the chat comparison widget."""

import pytest
import torch
from conftest import PROMPTS

import hereticlab as hl
from hereticlab.core.generation import generate
from hereticlab.interventions import steering as st
from hereticlab.ui.chat import Variant, compare_chat, stream_generate


def logits(model, tok, prompts=PROMPTS):
    batch = hl.encode(tok, hl.format_chat(tok, prompts), torch.device("cpu"))
    with torch.no_grad():
        return model(**batch, use_cache=False).logits


@pytest.mark.parametrize("positions", ["all", "prompt", "response"])
def test_alpha_zero_is_identity(tiny_llama, positions):
    model, tok = tiny_llama
    base = logits(model, tok)
    with st.activation_addition(model, torch.randn(64), resid=[0, 2], alpha=0.0, positions=positions, prompt_length=30):
        assert torch.equal(logits(model, tok), base)


def test_context_manager_restores_logits_exactly(tiny_llama):
    model, tok = tiny_llama
    base = logits(model, tok)
    v = torch.randn(64) * 5
    with st.activation_addition(model, v, resid=1, alpha=2.0):
        assert (logits(model, tok) - base).abs().max() > 1e-3
    assert torch.equal(logits(model, tok), base)
    with pytest.raises(RuntimeError):
        with st.activation_addition(model, v, resid=1, alpha=2.0):
            raise RuntimeError("boom")
    assert torch.equal(logits(model, tok), base)


def test_directions_vector_per_layer_and_negative_layer(tiny_llama):
    model, tok = tiny_llama
    base = logits(model, tok)
    vecs = torch.zeros(5, 64)
    vecs[3] = torch.randn(64) * 5
    dirs = hl.Directions(vecs)
    with st.activation_addition(model, dirs, resid=[1, 2], alpha=3.0):  # zero vectors at residuals 1, 2
        assert torch.equal(logits(model, tok), base)
    with st.activation_addition(model, dirs, resid=-2, alpha=3.0):  # resid 3 (block 3 input) ← vectors[3]
        assert (logits(model, tok) - base).abs().max() > 1e-3


def test_response_positions_with_prompt_length_leave_earlier_tokens_exact(tiny_llama):
    model, tok = tiny_llama
    base = logits(model, tok)
    k = base.shape[1] - 4
    with st.activation_addition(model, torch.randn(64) * 5, resid=1, alpha=2.0, positions="response", prompt_length=k):
        out = logits(model, tok)
    assert torch.equal(out[:, :k], base[:, :k])
    assert (out[:, k:] - base[:, k:]).abs().max() > 1e-3


def test_position_masks():
    m = st.position_mask("prompt", batch=2, seq=3, offset=0, prompt_length=None)
    assert m.all() and m.shape == (2, 3)
    assert (~st.position_mask("response", batch=2, seq=3, offset=0, prompt_length=None)).all()
    assert st.position_mask("response", batch=2, seq=1, offset=7, prompt_length=None).all()
    per_row = st.position_mask("response", batch=2, seq=4, offset=0, prompt_length=[1, 3])
    assert per_row.tolist() == [[False, True, True, True], [False, False, False, True]]
    assert st.position_mask(slice(-1, None), batch=1, seq=4, offset=0, prompt_length=None).tolist() == [
        [False, False, False, True]
    ]
    assert st.position_mask(slice(2, 5), batch=1, seq=3, offset=3, prompt_length=None).tolist() == [[True, True, False]]
    assert st.position_mask("all", batch=1, seq=3, offset=0, prompt_length=None) is None
    assert st.position_mask("last_prompt", batch=1, seq=3, offset=0, prompt_length=None).tolist() == [
        [False, False, True]
    ]
    assert not st.position_mask("last_prompt", batch=1, seq=1, offset=3, prompt_length=None).any()
    assert st.position_mask("last_prompt", batch=2, seq=3, offset=0, prompt_length=[1, 3]).tolist() == [
        [True, False, False],
        [False, False, True],
    ]


def test_cached_decoding_splits_prompt_and_response(tiny_llama):
    model, tok = tiny_llama

    def record(index, hidden):
        return hidden + 1.0

    masks = []
    original = st.position_mask

    def spy(*args, **kwargs):
        mask = original(*args, **kwargs)
        masks.append((kwargs["offset"], kwargs["seq"], None if mask is None else bool(mask.any())))
        return mask

    st.position_mask = spy
    try:
        with st.residual_input_hooks(model, 1, record, positions="response"):
            generate(model, tok, PROMPTS[:2], max_new_tokens=3, progress=False)
    finally:
        st.position_mask = original
    assert masks[0][0] == 0 and masks[0][2] is False  # prefill: nothing steered
    assert all(offset > 0 and seq == 1 and any_ for offset, seq, any_ in masks[1:]) and len(masks) == 3


def test_capture_span_mean_matches_full_capture(tiny_llama):
    model, tok = tiny_llama
    prefix = hl.format_chat(tok, ["Tell me a joke."])[0]
    cont = "Why did the chicken cross?"
    n_pre = len(tok(prefix, add_special_tokens=False)["input_ids"])
    n_all = len(tok(prefix + cont, add_special_tokens=False)["input_ids"])
    full = hl.capture_residuals(
        model, tok, [prefix + cont], positions=list(range(n_pre, n_all)), chat=False, progress=False
    )
    span = st.capture_span_mean(model, tok, [prefix, "x" + prefix], [cont, "ab"], progress=False)  # padded batch
    assert span.shape == (2, 5, 64)
    assert torch.allclose(span[0], full[0].mean(0), atol=1e-5)
    first2 = st.capture_span_mean(model, tok, [prefix], [cont], start=0, stop=2, progress=False)
    assert torch.allclose(first2[0], full[0, :2].mean(0), atol=1e-5)
    empty = st.capture_span_mean(model, tok, [prefix], [""], progress=False)
    last = hl.capture_residuals(model, tok, [prefix], chat=False, progress=False)
    assert torch.allclose(empty[0], last[0], atol=1e-5)


def test_ab_pairs_differ_only_in_letter_and_caa_vector(tiny_llama):
    model, tok = tiny_llama
    items = [
        ("Is the sky green?", "Yes, certainly.", "No."),
        ("Is 2+2=5?", "Yes.", "No, it is 4."),
        ("Q3?", "agree", "disagree"),
    ]
    pos, neg = st.ab_pair_texts(tok, items, seed=1)
    for p, n in zip(pos, neg):
        assert p[:-1] == n[:-1] and {p[-1], n[-1]} == {"A", "B"}
        # the positive letter labels the matching answer
        choices = dict(line.split(") ", 1) for line in p.split("Choices:\n")[1].split("<")[0].strip().splitlines())
        matching = next(item for item in items if item[0] in p)[1]
        assert choices["(" + p[-1]].strip() == matching
    dirs = st.caa_vector(model, tok, items, seed=1, progress=False)
    assert dirs.vectors.shape == (5, 64) and dirs.method == "caa"

    # independent of the library's capture: one unpadded HF forward per text, hidden state at the letter token
    # (HF's last hidden state is after the final norm; residual L is the norm's input, read by a plain pre-hook)
    def letter_states(texts):
        rows, final = [], []
        handle = model.model.norm.register_forward_pre_hook(lambda module, args: final.append(args[0][0, -1]))
        try:
            with torch.no_grad():
                for text in texts:
                    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
                    assert tok.decode(ids[0, -1:]).strip().endswith(text[-1])  # the last token is the letter
                    hidden = model(ids, output_hidden_states=True).hidden_states
                    rows.append(torch.stack([h[0, -1] for h in hidden[:-1]] + [final[-1]]))
        finally:
            handle.remove()
        return torch.stack(rows).double()

    expected = letter_states(pos).mean(0) - letter_states(neg).mean(0)
    assert torch.allclose(dirs.vectors.double(), expected, atol=1e-4)
    assert expected[1:].norm(dim=-1).min() > 1e-3  # the letters differ, so the vector is not trivially zero


def test_reading_vector_recovers_planted_direction():
    gen = torch.Generator().manual_seed(0)
    d, n = 32, 40
    true = torch.nn.functional.normalize(torch.randn(d, generator=gen), dim=0)
    base = torch.randn(n, 2, d, generator=gen)
    pos = base + 3.0 * true + 0.1 * torch.randn(n, 2, d, generator=gen)
    neg = base + 0.1 * torch.randn(n, 2, d, generator=gen)
    dirs = st.reading_vector(pos, neg, seed=0)
    cos = torch.nn.functional.cosine_similarity(dirs.vectors, true.expand(2, d), dim=-1)
    assert (cos > 0.99).all()  # sign fixed towards the positives
    assert torch.allclose(dirs.vectors.norm(dim=-1), torch.full((2,), 3.0), atol=0.2)
    s_pos, s_neg = st.reading_score(pos, dirs, 1), st.reading_score(neg, dirs, 1)
    assert (s_pos > s_neg).all() and s_pos.mean() > 0 > s_neg.mean()  # paired stimuli: each pair ordered
    assert dirs.meta["explained"][0] > 0.5


def test_steering_sweep_frame(tiny_llama):
    model, tok = tiny_llama
    v = torch.randn(64)
    frame = st.steering_sweep(
        model, tok, PROMPTS[:2], v, alphas=[0.0, 4.0], layers=[1, 2], max_new_tokens=3, progress=False
    )
    assert len(frame) == 8 and {"layer", "alpha", "prompt", "response", "score"} <= set(frame.columns)
    summary = frame.attrs["summary"]
    assert len(summary) == 4
    base = generate(model, tok, PROMPTS[:2], max_new_tokens=3, progress=False)
    assert frame[frame.alpha == 0.0].response.tolist() == base * 2
    r = st.random_vector_like(v, seed=3)
    assert torch.isclose(r.norm(), v.norm()) and not torch.allclose(r, v)


# ----------------------------------------------------------------------------------------------------------
# Chat comparison widget (headless)
# ----------------------------------------------------------------------------------------------------------


def test_stream_generate_matches_batch_generate(tiny_llama):
    model, tok = tiny_llama
    parts = list(stream_generate(model, tok, PROMPTS[0], max_new_tokens=5))
    assert len(parts) <= 5 and parts[-1] == generate(model, tok, PROMPTS[:1], max_new_tokens=5, progress=False)[0]


def test_chat_comparison_headless_and_widget(tiny_llama):
    model, tok = tiny_llama
    base = logits(model, tok)
    r = torch.randn(64)
    v = torch.randn(64) * 5
    steer = [
        Variant(
            "CAA", lambda alpha: st.activation_addition(model, v, resid=1, alpha=alpha), {"alpha": (-8, 8, 0.5, 0.0)}
        ),
        Variant(
            "ablate-hooks",
            lambda strength: hl.ablation_hooks(model, r, strength=strength),
            {"strength": (0, 1, 0.1, 1.0)},
        ),
    ]
    cmp = compare_chat(model, tok, edit=lambda: hl.ablate(model, r), steer=steer, max_new_tokens=4)
    out = cmp.run(PROMPTS[0])
    plain = generate(model, tok, PROMPTS[:1], max_new_tokens=4, progress=False)[0]
    assert list(out) == ["original", "edited", "steered"]
    assert out["original"] == plain and out["steered"] == plain  # α = 0 default
    with hl.ablate(model, r):
        assert out["edited"] == generate(model, tok, PROMPTS[:1], max_new_tokens=4, progress=False)[0]
    assert torch.equal(logits(model, tok), base)

    ui = cmp.widget
    cmp.prompt_box.value = PROMPTS[1]
    cmp.dropdowns["steered"].value = "CAA"
    slider = cmp._slider_boxes["steered"].children[0]
    slider.value = 8.0
    streamed = []
    cmp.run(on_token=lambda title, text: streamed.append(title))  # headless driving with a callback
    cmp.button.click()  # the widget path
    assert cmp.param_values["steered"] == {"alpha": 8.0} and cmp.prompt == PROMPTS[1]
    with st.activation_addition(model, v, resid=1, alpha=8.0):
        steered = generate(model, tok, PROMPTS[1:2], max_new_tokens=4, progress=False)[0]
    assert cmp.responses["steered"] == steered
    assert "original" in streamed and ui is cmp.widget
    assert cmp._outputs["steered"].value.count("▌") == 0
    cmp.dropdowns["steered"].value = "ablate-hooks"
    assert [s.description for s in cmp._slider_boxes["steered"].children] == ["strength"]
    assert torch.equal(logits(model, tok), base)


def _decode_offsets(model, tok):
    """Offsets the steering hook saw during a 3-token cached generation of two prompts."""
    seen = []
    original = st.position_mask

    def spy(*args, **kwargs):
        seen.append(kwargs["offset"])
        return original(*args, **kwargs)

    st.position_mask = spy
    try:
        with st.residual_input_hooks(model, 1, lambda index, hidden: hidden + 1.0, positions="response"):
            out = generate(model, tok, PROMPTS[:2], max_new_tokens=3, progress=False)
    finally:
        st.position_mask = original
    return seen, out


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_blocks_can_read_the_cache_position_on_the_installed_transformers(family):
    from hereticlab.core import compat
    from hereticlab.core.testing import tiny_model

    model, _ = tiny_model(family, seed=0)
    assert compat.check_cache_offsets(model, hl.find_layers(model))


def test_position_bookkeeping_from_the_attention_mask_equals_the_cache_path(tiny_llama):
    """The fallback used when a release hides the cache from blocks counts the same absolute positions."""
    model, tok = tiny_llama
    width = hl.encode(tok, hl.format_chat(tok, PROMPTS[:2]), torch.device("cpu"))["input_ids"].shape[1]
    from_cache, texts_cache = _decode_offsets(model, tok)
    model._hereticlab_cache_offsets_ok = False
    try:
        from_mask, texts_mask = _decode_offsets(model, tok)
    finally:
        del model._hereticlab_cache_offsets_ok
    assert from_cache == from_mask == [0, width, width + 1]
    assert texts_cache == texts_mask


def test_gpt2_decoding_sees_the_cache_offset():
    """GPT-2 hands its blocks the cache positionally; the position masks count it too (they saw 0 at every step
    before the hooks moved to ``trace(with_call=True)``), so "response" steering reaches decoded tokens."""
    from hereticlab.core.testing import tiny_model

    model, tok = tiny_model("gpt2", seed=0)
    width = hl.encode(tok, hl.format_chat(tok, PROMPTS[:2]), torch.device("cpu"))["input_ids"].shape[1]
    seen, _ = _decode_offsets(model, tok)
    assert seen == [0, width, width + 1]


def _hand_hooked_addition(model, k, v, alpha, *, prompt_length=None):
    """The 0.1 mechanism as a reference: a pre-hook on block ``k`` adding ``α v`` at absolute positions
    ``≥ prompt_length`` (without it: to every token fed after the prefill), offset read from the cache."""
    from hereticlab.core import compat

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        offset = compat.cached_length(compat.cache_in_call(args, kwargs), k)
        absolute = torch.arange(offset, offset + hidden.shape[1])
        steered = absolute >= prompt_length if prompt_length is not None else torch.full_like(absolute, offset > 0)
        new = torch.where(steered.bool()[None, :, None], hidden + alpha * v.to(hidden.dtype), hidden)
        if args:
            return (new,) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": new}

    return hl.find_layers(model)[k].register_forward_pre_hook(hook, with_kwargs=True)


def test_steering_equals_the_hand_registered_block_input_hook(tiny_llama):
    """The hooks moved from block k's input (a pre-hook) to residual k of ``trace`` (block k−1's output): the model
    computes bit for bit what it did, with a prompt boundary and in cached decoding."""
    model, tok = tiny_llama
    v = torch.randn(64, generator=torch.Generator().manual_seed(5)) * 4
    k = logits(model, tok).shape[1] - 3
    handle = _hand_hooked_addition(model, 2, v, 1.5, prompt_length=k)
    try:
        reference = logits(model, tok)
    finally:
        handle.remove()
    with st.activation_addition(model, v, resid=2, alpha=1.5, positions="response", prompt_length=k):
        assert torch.equal(logits(model, tok), reference)
    handle = _hand_hooked_addition(model, 2, v, 1.5)
    try:
        reference_text = generate(model, tok, PROMPTS[:3], max_new_tokens=6, progress=False)
    finally:
        handle.remove()
    with st.activation_addition(model, v, resid=2, alpha=1.5, positions="response"):
        assert generate(model, tok, PROMPTS[:3], max_new_tokens=6, progress=False) == reference_text


def test_reading_vector_is_pca_pairs_on_paired_rows():
    """RepE has one implementation: ``reading_vector`` is ``pca_pairs(paired=True)`` — the same vectors, means and
    explained share, exactly — and it is the first PC of the sign-flipped pair differences."""
    from hereticlab.directions.methods import pca_pairs

    gen = torch.Generator().manual_seed(3)
    pos = torch.randn(7, 3, 6, generator=gen) + torch.randn(6, generator=gen)
    neg = torch.randn(7, 3, 6, generator=gen)
    rv = st.reading_vector(pos, neg, seed=4)
    pp = pca_pairs(pos, neg, seed=4, paired=True)
    assert torch.equal(rv.vectors, pp.vectors)
    assert torch.equal(rv.bad_mean, pp.bad_mean) and torch.equal(rv.good_mean, pp.good_mean)
    assert rv.meta["explained"] == [r[0] for r in pp.meta["explained_variance_ratio"]]
    assert rv.method == "reading_vector" and rv.meta["n_pairs"] == 7 and rv.meta["seed"] == 4
    signs = torch.randint(0, 2, (7,), generator=torch.Generator().manual_seed(4)).double() * 2 - 1
    diffs = (pos.double() - neg.double()) * signs[:, None, None]
    for layer in range(3):
        x = diffs[:, layer] - diffs[:, layer].mean(0)
        pc = torch.linalg.svd(x, full_matrices=False)[2][0]
        mean_diff = pos.double()[:, layer].mean(0) - neg.double()[:, layer].mean(0)
        assert torch.allclose(rv.vectors[layer].double(), pc * (pc @ mean_diff), atol=1e-6)
    unpaired = pca_pairs(pos, neg, seed=4)  # random bad/good pairing: other pairs, another vector
    assert not torch.equal(unpaired.vectors, rv.vectors)
    with pytest.raises(ValueError, match="paired"):
        pca_pairs(pos, neg[:5], paired=True)
