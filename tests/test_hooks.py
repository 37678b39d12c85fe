"""The one hook primitive (core/hooks.py): addressing, reads, writes, early stop, cleanup — exact, on tiny models."""

import pytest
import torch
from conftest import PROMPTS

import hereticlab as hl
from hereticlab.core.architecture import find_layers
from hereticlab.core.capture import encode
from hereticlab.core.generation import generate
from hereticlab.core.hooks import Call, Site, StopForward, hook_outputs, resolve_site, trace
from hereticlab.core.testing import tiny_model

FAMILIES = ("llama", "gpt2", "gemma2")


def batch_for(tok):
    return encode(tok, hl.format_chat(tok, PROMPTS), torch.device("cpu"))


OURS = ("_register.<locals>", "hook_outputs.<locals>", "_Offsets.register.<locals>")


def no_hooks(model):
    """No hook of ``trace`` / ``hook_outputs`` is left (transformers installs output-recording hooks of its own on a
    first forward)."""
    return not any(
        any(name in getattr(h, "__qualname__", "") for name in OURS)
        for m in model.modules()
        for hooks in (m._forward_hooks, m._forward_pre_hooks)
        for h in hooks.values()
    )


def test_no_hooks_sees_ours(tiny_llama):
    model, _ = tiny_llama
    with trace(model, read=[0]):
        assert not no_hooks(model)
    assert no_hooks(model)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_read_matches_hidden_states(family):
    model, tok = tiny_model(family)
    batch = batch_for(tok)
    L = len(find_layers(model))
    hidden = model(**batch, use_cache=False, output_hidden_states=True).hidden_states
    with trace(model, read=range(L + 1)) as t:
        out = model(**batch, use_cache=False)
    for k in range(L):  # HF's last entry is after the final norm; residual L is the raw last block output
        assert torch.equal(t.values[k], hidden[k]), k
    assert not torch.equal(t.values[L], hidden[L])
    final_norm = model.model.norm if hasattr(model, "model") else model.transformer.ln_f
    assert torch.equal(final_norm(t.values[L]), hidden[L])
    assert out.logits.shape[0] == len(PROMPTS)
    assert no_hooks(model)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_identity_write_changes_nothing(family):
    model, tok = tiny_model(family)
    batch = batch_for(tok)
    base = model(**batch, use_cache=False).logits
    seen = []

    def identity(site, hidden):
        seen.append(site)
        return hidden.clone()

    with trace(model, write=identity):
        out = model(**batch, use_cache=False).logits
    assert torch.equal(out, base)
    L = len(find_layers(model))
    assert seen == [Site("resid", k) for k in range(L + 1)]
    assert no_hooks(model)


@torch.no_grad()
def test_write_changes_downstream_and_is_read_back(tiny_llama):
    model, tok = tiny_llama
    batch = batch_for(tok)
    base = model(**batch, use_cache=False).logits
    with trace(model, read=[2], write=lambda site, h: h * 0, write_at=[Site.block(1)]) as t:
        out = model(**batch, use_cache=False).logits
    assert torch.count_nonzero(t.values[2]) == 0  # the read at the same site sees the written value
    assert not torch.equal(out, base)
    assert torch.equal(model(**batch, use_cache=False).logits, base)  # hooks gone


@torch.no_grad()
def test_stop_after_skips_later_blocks(tiny_llama):
    model, tok = tiny_llama
    blocks = find_layers(model)
    ran = []
    handles = [b.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, b in enumerate(blocks)]
    try:
        with trace(model, read=[1], stop_after=1) as t:
            model(**batch_for(tok), use_cache=False)
            pytest.fail("the forward should have stopped")
    finally:
        for h in handles:
            h.remove()
    assert ran == [0]
    assert t.stopped and set(t.values) == {1}
    with trace(model, stop_after=0) as t0:  # residual 0: no block runs at all
        model(**batch_for(tok), use_cache=False)
    assert t0.stopped
    assert no_hooks(model)


@torch.no_grad()
def test_negative_indices(tiny_llama):
    model, tok = tiny_llama
    L = len(find_layers(model))
    assert resolve_site(model, resid=-1) == Site("resid", L)
    assert resolve_site(model, resid=-(L + 1)) == Site("resid", 0)
    assert resolve_site(model, block=-1) == Site("block", L - 1)
    assert resolve_site(model, block=0).residual == 1
    assert resolve_site(model, site=Site.resid(-2)) == Site("resid", L - 1)
    batch = batch_for(tok)
    with trace(model, read=[-1, L, Site.block(-1)]) as t:
        model(**batch, use_cache=False)
    assert set(t.values) == {L}


def test_bad_indices_give_clear_errors(tiny_llama):
    model, _ = tiny_llama
    L = len(find_layers(model))
    with pytest.raises(ValueError, match=rf"resid={L + 1} is out of range .* 0\.\.{L}"):
        resolve_site(model, resid=L + 1)
    with pytest.raises(ValueError, match=rf"resid=-{L + 2} is out of range"):
        resolve_site(model, resid=-(L + 2))
    with pytest.raises(ValueError, match=rf"block={L} is out of range .* 0\.\.{L - 1}"):
        resolve_site(model, block=L)
    with pytest.raises(ValueError, match="exactly one"):
        resolve_site(model, resid=0, block=0)
    with pytest.raises(ValueError, match="out of range"):
        with trace(model, read=[L + 1]):
            pass
    with pytest.raises(ValueError, match="'resid' or 'block'"):
        Site("head", 0)
    assert no_hooks(model)


@torch.no_grad()
def test_hooks_removed_on_exception(tiny_llama):
    model, tok = tiny_llama

    def boom(site, hidden):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with trace(model, read=[0, 1], write=boom, write_at=[1]):
            model(**batch_for(tok), use_cache=False)
    assert no_hooks(model)
    with pytest.raises(KeyError):
        with trace(model, read=[0]):
            raise KeyError("x")
    assert no_hooks(model)


def test_stop_forward_is_public_and_escapes_without_trace(tiny_llama):
    model, tok = tiny_llama

    def stop(module, args, output):
        raise StopForward

    handle = find_layers(model)[0].register_forward_hook(stop)
    try:
        with pytest.raises(StopForward):
            model(**batch_for(tok), use_cache=False)
    finally:
        handle.remove()


def _calls_during_generation(model, tok, sites):
    """``(residual, call.block, call.offset, seq)`` for every write of a 3-token cached generation of two prompts."""
    seen = []

    def write(site, hidden, call):
        assert isinstance(call, Call)
        seen.append((site.index, call.block, call.offset, hidden.shape[1]))
        return hidden

    with trace(model, write=write, write_at=sites, with_call=True):
        out = generate(model, tok, PROMPTS[:2], max_new_tokens=3, progress=False)
    return seen, out


@pytest.mark.parametrize("family", FAMILIES)
def test_write_with_call_sees_the_block_call_and_cache_offset(family):
    """``with_call=True``: each write gets its block's call; ``offset`` = positions already cached (0 at the prefill,
    then the prefill width, + 1 per step), from the cache and, on releases that hide it, from the attention mask."""
    model, tok = tiny_model(family)
    L = len(find_layers(model))
    width = encode(tok, hl.format_chat(tok, PROMPTS[:2]), torch.device("cpu"))["input_ids"].shape[1]
    base = generate(model, tok, PROMPTS[:2], max_new_tokens=3, progress=False)
    from_cache, out = _calls_during_generation(model, tok, [0, 2, -1])
    assert out == base  # identity writes: the same text
    expected = [
        (k, max(k - 1, 0), offset, seq) for offset, seq in ((0, width), (width, 1), (width + 1, 1)) for k in (0, 2, L)
    ]
    assert from_cache == expected
    model._hereticlab_cache_offsets_ok = False  # the attention-mask count
    try:
        from_mask, _ = _calls_during_generation(model, tok, [0, 2, -1])
    finally:
        del model._hereticlab_cache_offsets_ok
    assert from_mask == expected
    assert no_hooks(model)


@torch.no_grad()
def test_write_with_call_gets_the_block_keywords(tiny_llama):
    model, tok = tiny_llama
    batch = batch_for(tok)
    calls = []

    def write(site, hidden, call):
        calls.append(call)
        return hidden

    with trace(model, write=write, write_at=[Site.block(1)], with_call=True):
        model(**batch, use_cache=False)
    [call] = calls
    assert call.block == 1 and call.offset == 0
    assert torch.equal(call.kwargs["position_ids"], batch["position_ids"])


@torch.no_grad()
def test_hook_outputs_writes_records_and_cleans_up(tiny_llama):
    model, tok = tiny_llama
    batch = batch_for(tok)
    base = model(**batch, use_cache=False).logits
    mlp = find_layers(model)[1].mlp
    with hook_outputs([(mlp, lambda hidden: hidden.clone())]):  # identity: bit for bit
        assert torch.equal(model(**batch, use_cache=False).logits, base)
    recorded = []
    with hook_outputs([(mlp, recorded.append), (mlp, lambda hidden: hidden * 0)]):
        zeroed = model(**batch, use_cache=False).logits
        assert not no_hooks(model)
    assert not torch.equal(zeroed, base) and len(recorded) == 1
    blocks = find_layers(model)
    raw = []
    with hook_outputs([(blocks[0], raw.append)], raw=True), trace(model, read=[1]) as t:
        model(**batch, use_cache=False)  # raw: the output object as the block returned it (tensor or tuple)
    assert len(raw) == 1 and torch.equal(raw[0][0] if isinstance(raw[0], tuple) else raw[0], t.values[1])
    with pytest.raises(KeyError):
        with hook_outputs([(mlp, lambda hidden: hidden * 0)]):
            raise KeyError("x")
    assert no_hooks(model)
    assert torch.equal(model(**batch, use_cache=False).logits, base)


@torch.no_grad()
def test_a_trace_without_stop_lets_a_foreign_stop_forward_pass(tiny_llama):
    """Only a trace with ``stop_after`` swallows ``StopForward``: a write-only trace (steering) must not hide one."""
    model, tok = tiny_llama

    def stop(hidden):
        raise StopForward

    with pytest.raises(StopForward):
        with trace(model, write=lambda site, h: h, write_at=[1]):
            with hook_outputs([(find_layers(model)[2], stop)]):
                model(**batch_for(tok), use_cache=False)
    assert no_hooks(model)
