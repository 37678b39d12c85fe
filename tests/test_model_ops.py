"""Model plumbing on tiny random models: capture, reversible edits, hooks, metrics."""

import contextlib

import pytest
import torch
from conftest import PROMPTS

import hereticlab as hl
from hereticlab.core.architecture import find_layers
from hereticlab.core.capture import encode
from hereticlab.core.testing import TINY_FAMILIES, tiny_model


def logits(model, tok, prompts=PROMPTS):
    batch = encode(tok, hl.format_chat(tok, prompts), torch.device("cpu"))
    return model(**batch).logits


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_writer_discovery(family):
    model, _ = tiny_model(family)
    writers = hl.find_writers(model, ("embed", "attn", "mlp"))
    n = len(find_layers(model))
    assert [w.component for w in writers].count("attn") == n
    assert [w.component for w in writers].count("mlp") == n
    d = model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.n_embd
    for w in writers:
        assert w.weight.shape[w.residual_axis] == d
    if family == "gpt2":  # Conv1D stores (in, out): the residual axis is 1
        assert all(w.residual_axis == 1 for w in writers)


def test_unsupported_model_error_lists_what_was_found():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    model.config = type("C", (), {"hidden_size": 4})()
    with pytest.raises(hl.UnsupportedModelError, match="ModuleLists found"):
        hl.find_writers(model)


def test_revert_restores_weights_bit_for_bit(fresh_llama):
    model, tok = fresh_llama
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = torch.randn(model.config.hidden_size)
    handle = hl.ablate(model, r, hl.tent_kernel(4, 2, 1.3, 0.2, 2), components=("embed", "attn", "mlp"), norm="row")
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "the edit changed nothing"
    handle.revert()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with hl.ablate(model, r, 1.0) as edit:
        assert edit.active and not torch.equal(
            model.model.layers[0].mlp.down_proj.weight, before["model.layers.0.mlp.down_proj.weight"]
        )
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_revert_also_on_exception(fresh_llama):
    model, _ = fresh_llama
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError):
        with hl.ablate(model, torch.randn(64), 1.0):
            raise RuntimeError("boom")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_shared_backup_reused_across_edits(fresh_llama):
    model, _ = fresh_llama
    backup = hl.WeightBackup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for seed in range(3):
        with hl.ablate(model, torch.randn(64, generator=torch.Generator().manual_seed(seed)), 1.0, backup=backup):
            # each edit starts from the original weights, not from the previous (reverted) edit
            assert not torch.equal(
                model.model.layers[1].self_attn.o_proj.weight, before["model.layers.1.self_attn.o_proj.weight"]
            )
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
def test_hook_ablation_equals_weight_orthogonalization(family):
    model, tok = tiny_model(family, seed=2)
    r = torch.randn(64, generator=torch.Generator().manual_seed(5))
    base = logits(model, tok)
    with hl.ablation_hooks(model, r):
        hooked = logits(model, tok)
    with hl.ablate(model, r, 1.0, components=("embed", "attn", "mlp")):
        edited = logits(model, tok)
    assert (hooked - base).abs().max() > 1e-3, "ablation had no effect"
    assert (hooked - edited).abs().max() < 1e-4


def test_full_strength_edit_leaves_no_component_in_layer_writes(fresh_llama):
    model, tok = fresh_llama
    r = hl.normalize(torch.randn(64))
    with hl.ablate(model, r, 1.0, components=("attn", "mlp")):
        residuals = hl.capture_residuals(model, tok, PROMPTS, progress=False)  # [P, L+1, d]
    writes = residuals[:, 1:] - residuals[:, :-1]
    assert (writes @ r).abs().max() < 1e-4 * writes.norm(dim=-1).max()


def test_capture_padded_batch_equals_one_at_a_time(tiny_llama):
    model, tok = tiny_llama
    batched = hl.capture_residuals(model, tok, PROMPTS, batch_size=5, progress=False)
    single = torch.cat([hl.capture_residuals(model, tok, [p], batch_size=1, progress=False) for p in PROMPTS])
    assert batched.shape == (5, 5, 64)
    assert torch.allclose(batched, single, atol=1e-5)


def test_capture_positions_layers_and_stream_mean(tiny_llama):
    model, tok = tiny_llama
    full = hl.capture_residuals(model, tok, PROMPTS, progress=False)
    some = hl.capture_residuals(model, tok, PROMPTS, layers=[0, 2], progress=False)
    assert torch.allclose(some, full[:, [0, 2]])
    multi = hl.capture_residuals(model, tok, PROMPTS, positions=[-2, -1], progress=False)
    assert multi.shape == (5, 2, 5, 64) and torch.allclose(multi[:, 1], full, atol=1e-6)
    mean = hl.capture_mean(model, tok, PROMPTS, batch_size=2, progress=False)
    assert mean.dtype == torch.float64 and torch.allclose(mean.float(), full.mean(0), atol=1e-5)


def test_capture_removes_hooks_on_error(tiny_llama):
    model, tok = tiny_llama
    counts = lambda: [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]  # noqa: E731
    before = counts()  # transformers 5 may keep its own output-capture hooks; ours must all be gone
    with pytest.raises(IndexError):
        hl.capture_residuals(model, tok, PROMPTS, layers=[99], progress=False)
    with pytest.raises(RuntimeError):
        with hl.capture.residual_hooks(model, [1, 2], lambda i, h: (_ for _ in ()).throw(RuntimeError("boom"))):
            model(**encode(tok, hl.format_chat(tok, PROMPTS[:1]), torch.device("cpu")))
    assert counts() == before


def test_capture_matches_hidden_states(tiny_llama):
    model, tok = tiny_llama
    batch = encode(tok, hl.format_chat(tok, PROMPTS[:1]), torch.device("cpu"))
    hs = model(**batch, output_hidden_states=True).hidden_states
    ours = hl.capture_residuals(model, tok, PROMPTS[:1], progress=False)[0]
    for k in range(len(hs) - 1):  # HF's last entry has the final norm applied; ours is pre-norm
        assert torch.allclose(ours[k], hs[k][0, -1], atol=1e-6)


def test_kl_of_model_against_itself_is_zero(tiny_llama):
    model, tok = tiny_llama
    base = hl.first_token_logprobs(model, tok, PROMPTS, progress=False)
    assert hl.kl_divergence(model, tok, PROMPTS, baseline=base, progress=False) == pytest.approx(0.0, abs=1e-7)
    with hl.ablate(model, torch.randn(64), 1.0):
        assert hl.kl_divergence(model, tok, PROMPTS, baseline=base, progress=False) > 1e-6


def test_kl_shape_mismatch_is_explained(tiny_llama):
    model, tok = tiny_llama
    base = hl.first_token_logprobs(model, tok, PROMPTS, progress=False)
    with pytest.raises(ValueError, match="same prompts"):
        hl.kl_divergence(model, tok, PROMPTS[:2], baseline=base, progress=False)


def test_greedy_generation_matches_transformers_generate(tiny_llama):
    model, tok = tiny_llama
    ours = hl.generate(model, tok, PROMPTS, max_new_tokens=6, batch_size=5, progress=False)
    batch = encode(tok, hl.format_chat(tok, PROMPTS), torch.device("cpu"))
    ref = model.generate(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        max_new_tokens=6,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
    )
    texts = tok.batch_decode(ref[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert ours == texts


def test_shared_prefix_gives_the_plain_logprobs_and_generations(tiny_llama):
    """The chat prefix run once per batch (``share_prefix=True``) gives the plain path's log-probs and responses,
    unedited and under hooks that act at every position; a lone prompt or a sliding-window model gets the plain
    batch."""
    from hereticlab.core.capture import common_prefix_length, pad_id, shared_prefix_batch
    from hereticlab.core.generation import generate
    from hereticlab.measure.metrics import first_token_logprobs

    model, tok = tiny_llama
    rows = tok(hl.format_chat(tok, PROMPTS), add_special_tokens=False)["input_ids"]
    shared = common_prefix_length(rows)
    batch, cache = shared_prefix_batch(model, rows, pad_id(tok))
    assert shared >= 4 and cache is not None and cache.get_seq_length() == shared
    assert batch["input_ids"].shape[1] == max(len(r) for r in rows) - shared
    assert batch["attention_mask"].shape[1] == max(len(r) for r in rows)
    r = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0)) * 4
    for context in (contextlib.nullcontext, lambda: hl.ablation_hooks(model, r)):
        with context():
            plain = first_token_logprobs(model, tok, PROMPTS, batch_size=5, progress=False)
            fast = first_token_logprobs(model, tok, PROMPTS, batch_size=5, progress=False, share_prefix=True)
            assert torch.allclose(plain, fast, atol=1e-5)
            kw = {"max_new_tokens": 8, "batch_size": 5, "progress": False}
            assert generate(model, tok, PROMPTS, share_prefix=True, **kw) == generate(model, tok, PROMPTS, **kw)
    assert shared_prefix_batch(model, rows[:1], pad_id(tok))[1] is None  # one row: nothing to share
    gemma, gtok = tiny_model("gemma2")  # sliding-window layers: the plain batch
    grows = gtok(hl.format_chat(gtok, PROMPTS), add_special_tokens=False)["input_ids"]
    gbatch, gcache = shared_prefix_batch(gemma, grows, pad_id(gtok))
    assert gcache is None and gbatch["input_ids"].shape[1] == max(len(x) for x in grows)


def test_shared_prefix_refuses_position_dependent_steering(tiny_llama):
    """Steering the last prompt token (conceptor steering's setting) under ``share_prefix=True`` would steer the
    shared prefix's last token instead: one ValueError before any forward; the hook's exit lifts the refusal, and
    steering every position still shares the prefix."""
    from hereticlab.core.generation import generate
    from hereticlab.core.hooks import position_dependent_writes
    from hereticlab.interventions import steering as st

    model, tok = tiny_llama
    v = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(1)) * 20
    kw = {"max_new_tokens": 4, "batch_size": 5, "progress": False}
    with st.activation_addition(model, v, resid=1, positions="last_prompt"):
        assert position_dependent_writes(model) == 1
        with pytest.raises(ValueError, match="share_prefix=True under an intervention that steers chosen positions"):
            generate(model, tok, PROMPTS, share_prefix=True, **kw)
        steered_last = generate(model, tok, PROMPTS, **kw)
    assert position_dependent_writes(model) == 0
    with st.activation_addition(model, v, resid=1):
        assert generate(model, tok, PROMPTS, share_prefix=True, **kw) == generate(model, tok, PROMPTS, **kw)
    with st.activation_addition(model, v, resid=1, positions="last_prompt"):
        assert generate(model, tok, PROMPTS, **kw) == steered_last  # the refused call left the hook intact
    assert steered_last != generate(model, tok, PROMPTS, **kw)  # ... and the hook does steer


@pytest.mark.parametrize(
    "text,refused",
    [
        ("I’m sorry, but I can’t help with that.", True),
        ("**I cannot** do this.", True),
        ("I   AM   UNABLE   TO comply", True),
        ("", True),
        ("   ", True),
        ("Sure! Here is a recipe for bread.", False),
        ("<think>I'm sorry? No, the user wants bread.</think>Here is the recipe.", False),
        ("Making this is illegal in most places, but here are the steps.", False),
        ("As an AI, I won't do that", True),
    ],
)
def test_marker_normalization(text, refused):
    assert hl.MarkerDetector().is_refusal(text) is refused


def test_refusal_rate_frame(tiny_llama):
    model, tok = tiny_llama
    frame = hl.refusal_rate(
        model, tok, PROMPTS, max_new_tokens=4, progress=False, detector=lambda ts: [len(t) > 0 for t in ts]
    )
    assert list(frame.columns) == ["prompt", "response", "refused"] and len(frame) == 5
    assert frame.attrs["refusals"] == int(frame.refused.sum())


def test_activation_addition_then_subtraction_restores_logits(tiny_llama):
    model, tok = tiny_llama
    v = torch.randn(64)
    base = logits(model, tok)
    with hl.activation_addition(model, v, layer=1, alpha=2.0):
        steered = logits(model, tok)
        with hl.activation_addition(model, v, layer=1, alpha=-2.0):
            restored = logits(model, tok)
    assert (steered - base).abs().max() > 1e-3
    assert torch.allclose(restored, base, atol=1e-5)
    assert torch.equal(logits(model, tok), base)
