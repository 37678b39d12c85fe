"""One intervention shape: lazy objects, exact apply / revert, nesting, sites, deprecated keywords, Directions forms."""

import pytest
import torch
from conftest import PROMPTS

import hereticlab as hl
from hereticlab.directions.base import Directions
from hereticlab.interventions import conceptors as cp
from hereticlab.interventions import steering as st
from hereticlab.interventions.base import Intervention
from hereticlab.interventions.edits import WeightAblation


def logits(model, tok, prompts=PROMPTS):
    batch = hl.encode(tok, hl.format_chat(tok, prompts), torch.device("cpu"))
    with torch.no_grad():
        return model(**batch, use_cache=False).logits


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(model, before):
    return all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def vector(seed=0):
    return torch.randn(64, generator=torch.Generator().manual_seed(seed)) * 4


def directions(seed=0, n=5):
    return Directions(torch.randn(n, 64, generator=torch.Generator().manual_seed(seed)), method="test")


def makers(model):
    """One of each kind, all lazy."""
    C = cp.compute_conceptor(torch.randn(40, 64, generator=torch.Generator().manual_seed(3)), aperture=1.0)
    return {
        "weights": WeightAblation(model, vector(1), 1.0, components=("embed", "attn", "mlp")),
        "ablation_hooks": st.ablation_hooks(model, vector(1)),
        "activation_addition": st.activation_addition(model, vector(2), resid=2, alpha=2.0),
        "conceptor_steering": cp.conceptor_steering(model, C, resid=2, beta=0.5),
    }


def test_construction_is_lazy_and_apply_revert_is_exact(tiny_llama):
    model, tok = tiny_llama
    before, base = state(model), logits(model, tok)
    for name, intervention in makers(model).items():
        assert isinstance(intervention, Intervention), name
        assert not intervention.active and same_state(model, before), name
        assert torch.equal(logits(model, tok), base), name  # constructing changed nothing
        intervention.apply()
        intervention.apply()  # idempotent
        changed = logits(model, tok)
        assert (changed - base).abs().max() > 1e-4, name
        intervention.revert()
        intervention.revert()  # idempotent
        assert same_state(model, before) and torch.equal(logits(model, tok), base), name
        with intervention as entered:  # re-enterable after a manual apply / revert
            assert entered is intervention and intervention.active
            assert torch.equal(logits(model, tok), changed), name
        assert not intervention.active and torch.equal(logits(model, tok), base), name


def test_nested_repeated_and_exception_exit(tiny_llama):
    model, tok = tiny_llama
    before, base = state(model), logits(model, tok)
    for name, intervention in makers(model).items():
        with intervention:
            changed = logits(model, tok)
            with intervention:  # nested entry: only the outermost applies and reverts
                assert torch.equal(logits(model, tok), changed), name
            assert intervention.active and torch.equal(logits(model, tok), changed), name
        assert torch.equal(logits(model, tok), base), name
        for _ in range(2):  # repeated entry
            with intervention:
                assert torch.equal(logits(model, tok), changed), name
        with pytest.raises(RuntimeError):
            with intervention:
                raise RuntimeError("boom")
        assert not intervention.active and same_state(model, before), name
        assert torch.equal(logits(model, tok), base), name


def test_eager_ablate_handle_still_reverts(tiny_llama):
    model, tok = tiny_llama
    before = state(model)
    handle = hl.ablate(model, vector(4), 1.0)  # 0.1: applied at once
    assert handle.active and not same_state(model, before)
    handle.revert()
    assert same_state(model, before)
    with hl.ablate(model, vector(4), 1.0) as edit:
        assert edit.active
    assert same_state(model, before)


def test_old_keywords_warn_and_match(tiny_llama):
    model, tok = tiny_llama
    v, n = vector(5), 4  # the tiny model has 4 blocks
    cases = [
        (
            lambda: st.activation_addition(model, v, layer=1, alpha=2.0),
            st.activation_addition(model, v, resid=1, alpha=2.0),
        ),
        (lambda: st.activation_addition(model, v, layer=-1), st.activation_addition(model, v, resid=n - 1)),
        (lambda: st.ablation_hooks(model, v, layers=[2]), st.ablation_hooks(model, v, resid=[3])),
        (lambda: st.ablation_hooks(model, v, layers=[0]), st.ablation_hooks(model, v, resid=[0, 1])),
        (lambda: st.ablation_hooks(model, v, layers=[-1]), st.ablation_hooks(model, v, resid=0)),
    ]
    C = cp.compute_conceptor(torch.randn(40, 64, generator=torch.Generator().manual_seed(3)), aperture=1.0)
    cases.append(
        (
            lambda: cp.conceptor_steering(model, C, layer=-2, beta=0.7),
            cp.conceptor_steering(model, C, resid=2, beta=0.7),
        )
    )
    for old, new in cases:
        with pytest.warns(DeprecationWarning, match="resid="):
            made = old()
        with made:
            got = logits(model, tok)
        with new:
            want = logits(model, tok)
        assert torch.equal(got, want)


def test_sites_resid_block_and_negative_indices(tiny_llama):
    model, tok = tiny_llama
    v = vector(6)

    def run(**site):
        with st.activation_addition(model, v, alpha=1.5, **site):
            return logits(model, tok)

    assert torch.equal(run(resid=-1), run(resid=4))  # resid -1 = L = the last block's output
    assert torch.equal(run(block=-1), run(resid=4))  # block b writes resid b + 1
    assert torch.equal(run(block=0), run(resid=1))
    assert torch.equal(run(resid=-5), run(resid=0))
    assert not torch.equal(run(resid=4), run(resid=3))
    with pytest.raises(ValueError, match="out of range"):
        st.activation_addition(model, v, resid=5)
    with pytest.raises(TypeError):
        st.activation_addition(model, v)
    with st.ablation_hooks(model, v, block=-1):
        a = logits(model, tok)
    with st.ablation_hooks(model, v, resid=-1):
        b = logits(model, tok)
    assert torch.equal(a, b)


def test_resid_L_steering_is_exact_at_alpha_zero(tiny_llama):
    model, tok = tiny_llama
    base = logits(model, tok)
    for positions in ("all", "prompt", "response"):
        with st.activation_addition(model, vector(7), resid=-1, alpha=0.0, positions=positions, prompt_length=3):
            assert torch.equal(logits(model, tok), base)


def test_directions_methods_equal_function_forms(tiny_llama):
    model, tok = tiny_llama
    dirs = directions(8)
    made = dirs.ablate(model, components=("embed", "attn", "mlp"))
    assert isinstance(made, WeightAblation) and not made.active  # lazy
    with made:
        a = logits(model, tok)
    with hl.ablate(model, dirs, components=("embed", "attn", "mlp")):
        b = logits(model, tok)
    assert torch.equal(a, b)
    with dirs.ablate(model, at=2, hooks=True, block=1):
        a = logits(model, tok)
    with st.ablation_hooks(model, dirs.at(2), resid=2):
        b = logits(model, tok)
    assert torch.equal(a, b)
    with dirs.steer(model, resid=2, alpha=3.0, positions="prompt", prompt_length=4):
        a = logits(model, tok)
    with st.activation_addition(model, dirs, resid=2, alpha=3.0, positions="prompt", prompt_length=4):
        b = logits(model, tok)
    assert torch.equal(a, b)
    assert not torch.equal(a, logits(model, tok))
