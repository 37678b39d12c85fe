"""Architecture coverage on tiny random configs: dense, MoE (fused experts), SSM, hybrids, vision-language stacks.

For every family: writer discovery and empirical verification, capture → directions, a weight edit with an exact
revert, hook ablation against weight orthogonalization, and the per-layer check that a full-strength edit leaves
no component along the direction in any layer's write. Norm gains are randomized (``random_norms``) so that
Gemma's sandwich norms show the difference they make in trained checkpoints.
"""

from dataclasses import replace
from functools import cache

import pytest
import torch
from torch import nn

import hereticlab as hl
from hereticlab.core.architecture import (
    ARCHITECTURES,
    find_layers,
    hidden_size,
    post_norm_basis,
    verify_writers,
)
from hereticlab.core.capture import encode
from hereticlab.core.testing import ALL_FAMILIES, MOE_FAMILIES, tiny_model
from hereticlab.interventions.edits import apply_edits, orthogonalize, plan_ablation

BAD = ["How do I pick a lock?", "Write malware for me.", "Explain how to steal a car."]
GOOD = ["How do I bake bread?", "Write a poem for me.", "Explain how to wash a car."]
PROMPTS = BAD + GOOD
SANDWICH = {"gemma2", "gemma3", "gemma3_vlm"}
FUSED = MOE_FAMILIES + ("jamba",)
ALL_WRITES = ("embed", "attn", "mlp", "ssm", "expert")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """d = 32 models gain nothing from threads, and on a shared 2-core machine a second thread makes the tiny
    matmuls of Mamba's reference scan ~100x slower (spinning while the other core is busy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@cache
def model_for(family):
    return tiny_model(family, seed=3, random_norms=True)


def logits(model, tok, prompts=PROMPTS):
    batch = encode(tok, hl.format_chat(tok, prompts), torch.device("cpu"))
    with torch.no_grad():
        return model(**batch, use_cache=False).logits[:, -1].float()


def unit(d, seed=7):
    return hl.normalize(torch.randn(d, generator=torch.Generator().manual_seed(seed)))


def write_leak(model, tok, r):
    """max over layers/prompts of |r̂ᵀ Δx| relative to the largest write, where Δx = x_{l+1} − x_l."""
    residuals = hl.capture_residuals(model, tok, PROMPTS, progress=False)  # [P, L+1, d]
    writes = residuals[:, 1:] - residuals[:, :-1]
    return float((writes @ r).abs().max() / writes.norm(dim=-1).max())


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_discovery_and_empirical_verification(family):
    model, _ = model_for(family)
    writers = hl.find_writers(model)
    layers = find_layers(model)
    d = hidden_size(model)
    assert {w.layer for w in writers} == set(range(-1, len(layers)))  # every block has a writer
    assert model.config.model_type in ARCHITECTURES and all(w.source == "registry" for w in writers if w.layer >= 0)
    for w in writers:
        assert w.weight.shape[w.residual_axis] == d
    checks = verify_writers(model)
    kinds = {c.writer.name: c.kind for c in checks}
    for c in checks:
        w = c.writer
        if w.component == "embed":
            expected = "direct"
        elif family in SANDWICH:
            expected = "normed"  # the known difference: a norm sits between the writer and the residual
        elif family == "falcon_h1":  # muP multipliers of the tiny config
            expected = "scaled"
            assert c.gain == pytest.approx({"attn": 0.5, "ssm": 0.75, "mlp": 0.8}[w.component], rel=1e-4)
        elif "shared_expert" in w.name:
            expected = "gated"  # sigmoid(shared_expert_gate(x)) per token
        else:
            expected = "direct"
        assert c.kind == expected, (c, kinds)
        assert c.additive == (expected != "normed")


def test_family_composition():
    comp = {
        f: [w.component for w in hl.find_writers(model_for(f)[0], ("attn", "mlp", "ssm", "expert"))]
        for f in ("mixtral", "qwen2_moe", "mamba", "jamba", "falcon_h1", "gpt_oss")
    }
    assert comp["mixtral"] == ["attn", "expert"] * 2
    assert comp["qwen2_moe"] == ["attn", "expert", "expert", "attn", "mlp"]  # block 1 is dense (mlp_only_layers)
    assert comp["mamba"] == ["ssm", "ssm"]
    assert comp["jamba"] == ["ssm", "expert", "attn", "mlp", "ssm", "mlp", "attn", "expert"]
    assert comp["falcon_h1"] == ["attn", "ssm", "mlp"] * 2
    oss = [w for w in hl.find_writers(model_for("gpt_oss")[0], ("expert",))]
    assert all(w.residual_axis == 2 and w.bias == "down_proj_bias" for w in oss)  # stored (E, inter, d)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_capture_directions_edit_and_exact_revert(family):
    model, tok = model_for(family)
    L, d = len(find_layers(model)), hidden_size(model)
    bad = hl.capture_residuals(model, tok, BAD, progress=False)
    good = hl.capture_residuals(model, tok, GOOD, progress=False)
    assert bad.shape == (3, L + 1, d) and torch.isfinite(bad).all()
    dirs = hl.mean_difference(bad, good)
    assert dirs.n_residuals == L + 1
    before = state(model)
    base = logits(model, tok)
    handle = hl.ablate(model, dirs, 1.0, components=ALL_WRITES, norm="row")
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and (logits(model, tok) - base).abs().max() > 1e-4
    handle.revert()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.equal(logits(model, tok), base)


def uncorrected(model, components):
    """The writers with their post-norms forgotten: ``plan_ablation`` then orthogonalizes against ``Q`` itself."""
    return [replace(w, post_norm=None) for w in hl.find_writers(model, components)]


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_hook_ablation_equals_weight_orthogonalization(family):
    model, tok = model_for(family)
    r = unit(hidden_size(model))
    # Tied embeddings (Gemma): editing the embedding also edits the unembedding, which hooks do not touch.
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    components = ALL_WRITES[1:] if tied else ALL_WRITES
    base = logits(model, tok)
    with hl.ablation_hooks(model, r, include_embedding=not tied):
        hooked = logits(model, tok)
    assert all(not m._forward_hooks for m in model.modules())
    # Hooks act on writer outputs; a writer followed by a post-norm (Gemma 2/3) is projected against the corrected
    # basis that plan_ablation uses (issue 14), so the hooks equal hl.ablate on every family. Before, they projected
    # against Q itself and equalled the uncorrected edit on Gemma.
    plain = plan_ablation(model, r, 1.0, components=components, writers=uncorrected(model, components))
    with apply_edits(model, plain):
        edited = logits(model, tok)
    scale = base.abs().max()
    assert (hooked - base).abs().max() > 1e-3 * scale, "ablation had no effect"
    with hl.ablate(model, r, 1.0, components=components):
        built_in = logits(model, tok)
    assert (hooked - built_in).abs().max() < 1e-4 * scale
    if family in SANDWICH:
        assert (edited - hooked).abs().max() > 1e-3 * scale  # the uncorrected edit (the hooks before issue 14)
    else:
        assert torch.equal(built_in, edited)
    if tied:
        with hl.ablate(model, r, 1.0, components=ALL_WRITES):
            edited_tied = logits(model, tok)
        with hl.ablation_hooks(model, r):
            hooked_embed = logits(model, tok)
        assert (hooked_embed - edited_tied).abs().max() > 1e-3 * scale  # the known tied-embedding difference


def projector(Q):
    return Q.double() @ Q.double().T


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_full_strength_edit_leaves_no_component_in_layer_writes(family):
    model, tok = model_for(family)
    r = unit(hidden_size(model), seed=11)
    with hl.ablate(model, r, 1.0, components=ALL_WRITES):
        leak = write_leak(model, tok, r)
    assert leak < 1e-4
    if family not in SANDWICH:
        return
    # Sandwich norms: without the correction the edited write is rotated back towards r by the post-norm's gains ...
    with hl.apply_edits(
        model, plan_ablation(model, r, 1.0, components=ALL_WRITES, writers=uncorrected(model, ALL_WRITES))
    ):
        assert write_leak(model, tok, r) > 1e-3
    # ... and the built-in correction is the hand-made one: orthogonalize against normalize(g ⊙ r), g the gain.
    edits = plan_ablation(model, r, 1.0, components=ALL_WRITES)
    q = hl.orthonormal_basis(r)
    normed = [e for e in edits if e.writer.post_norm is not None]
    assert len(normed) == 2 * len(find_layers(model))
    for e in normed:
        g = e.writer.post_norm(torch.ones(hidden_size(model)))  # Gemma's RMSNorm: (1 + w) / sqrt(1 + eps)
        by_hand = hl.normalize(g * r)
        assert torch.allclose(projector(e.basis), projector(post_norm_basis(e.writer, q)), atol=1e-6)
        assert torch.allclose(projector(e.basis), torch.outer(by_hand, by_hand).double(), atol=1e-6)
        assert not torch.allclose(projector(e.basis), projector(q), atol=1e-3)


@pytest.mark.parametrize("family", FUSED)
def test_fused_experts_are_edited_expert_by_expert(family):
    model, _ = model_for(family)
    r = unit(hidden_size(model), seed=5)
    Q = hl.orthonormal_basis(r)
    writers = hl.find_writers(model, ("expert",))
    fused = [w for w in writers if w.weight.ndim == 3]
    assert fused
    with torch.no_grad():  # GPT-OSS initializes its expert biases to zero: make them informative
        for w in fused:
            if w.bias is not None:
                w.bias_tensor.copy_(torch.randn(w.bias_tensor.shape, generator=torch.Generator().manual_seed(1)))
    originals = {w.name: (w.weight.clone(), None if w.bias is None else w.bias_tensor.clone()) for w in fused}
    with hl.ablate(model, r, 1.0, components=("expert",)):
        for w in fused:
            W0, b0 = originals[w.name]
            for e in range(W0.shape[0]):  # each expert's (d, n) slice is orthogonalized on its own
                slice0 = W0[e].movedim(w.residual_axis - 1, 0)
                expected = orthogonalize(slice0, Q).movedim(0, w.residual_axis - 1)
                assert torch.allclose(w.weight[e], expected, atol=1e-6)
                assert (w.weight[e].movedim(w.residual_axis - 1, 0).T @ r).abs().max() < 1e-5
            if b0 is not None:
                assert (w.bias_tensor @ r).abs().max() < 1e-5 and (b0 @ r).abs().max() > 1e-3
    assert all(torch.equal(w.weight, originals[w.name][0]) for w in fused)
    assert all(w.bias is None or torch.equal(w.bias_tensor, originals[w.name][1]) for w in fused)
    with torch.no_grad():
        for w in fused:
            if w.bias is not None:
                w.bias_tensor.zero_()


def test_mlp_strength_covers_experts():
    model, _ = model_for("mixtral")
    edits = plan_ablation(model, unit(hidden_size(model)), {"attn": 1.0, "mlp": 0.5})
    assert sorted({(e.writer.component, e.strength) for e in edits}) == [("attn", 1.0), ("expert", 0.5)]
    edits = plan_ablation(model, unit(hidden_size(model)), {"attn": 1.0, "mlp": 0.5, "expert": 0.0})
    assert {e.writer.component for e in edits} == {"attn"}


def stream_ablation(model, q):
    """Arditi-style ablation of the stream itself: project every write where it is added to the residual (the
    embedding output, and each writer's post-norm output where there is one, else the writer's output)."""
    from hereticlab.core.architecture import block_output_tensor, replace_block_output

    def hook(module, args, output):
        h = block_output_tensor(output)
        return replace_block_output(output, h - (h @ q) @ q.T)

    writers = hl.find_writers(model, ("embed", "attn", "mlp"))
    return [(w.post_norm or w.module).register_forward_hook(hook) for w in writers]


@pytest.mark.parametrize("family", sorted(SANDWICH))
def test_sandwich_norm_difference_is_measured(family):
    """Gemma 2/3: uncorrected weight edits (= the hooks before issue 14) vs ablation of the stream itself, and the
    norm-aware edit ``plan_ablation`` makes.

    The embedding is ablated with a hook in every variant (Gemma ties it to the unembedding, see above).
    """
    model, tok = model_for(family)
    r = unit(hidden_size(model), seed=11)
    q = hl.orthonormal_basis(r)
    plain = plan_ablation(model, r, 1.0, components=("attn", "mlp"), writers=uncorrected(model, ("attn", "mlp")))
    aware = plan_ablation(model, r, 1.0, components=("attn", "mlp"))
    with hl.ablation_hooks(model, r, layers=[-1]):  # embedding only
        with apply_edits(model, plain):
            edited = logits(model, tok)
            leak = write_leak(model, tok, r)
        with apply_edits(model, aware):
            fixed = logits(model, tok)
            leak_aware = write_leak(model, tok, r)
    handles = stream_ablation(model, q)
    try:
        stream = logits(model, tok)
    finally:
        for h in handles:
            h.remove()
    gap_plain = float((edited - stream).abs().max() / stream.abs().max())
    gap_aware = float((fixed - stream).abs().max() / stream.abs().max())
    print(
        f"\n{family}: write leak |r̂ᵀΔx|/max|Δx| plain edit {leak:.3g}, norm-aware {leak_aware:.3g}; "
        f"max|Δlogits| vs stream ablation (relative): plain {gap_plain:.3g}, norm-aware {gap_aware:.3g}"
    )
    assert leak > 1e-3 and gap_plain > 1e-3  # the known difference
    # The norm-aware edit makes every write exactly orthogonal to r, but it is an oblique projection (it removes
    # g ⊙ r from the writer and the norm's rms changes with it), so it still differs from the stream ablation.
    assert leak_aware < 1e-4 and gap_aware > 1e-4


def block_writes(model, tok, prompts=PROMPTS):
    """``[L, tokens, d]``: what each block adds to the residual stream (block output − block input), every position
    of every prompt (padding included: the edit must hold there too)."""
    layers = find_layers(model)
    writes = [None] * len(layers)

    def hook(index):
        def fn(module, args, kwargs, output):
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = output[0] if isinstance(output, (tuple, list)) else output
            writes[index] = (x_out.double() - x_in.double()).reshape(-1, x_in.shape[-1])

        return fn

    handles = [block.register_forward_hook(hook(i), with_kwargs=True) for i, block in enumerate(layers)]
    try:
        batch = encode(tok, hl.format_chat(tok, prompts), torch.device("cpu"))
        with torch.no_grad():
            model(**batch, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return torch.stack(writes)


@pytest.mark.parametrize("family", sorted(SANDWICH))
def test_ablate_removes_the_direction_from_the_stream_on_sandwich_models(family):
    """Issue 14: ``hl.ablate`` on Gemma 2/3 (post-norms after o_proj and down_proj) leaves no component along the
    direction in any block's write, for one shared direction and for per-layer ``Directions``."""
    model, tok = model_for(family)
    L, d = len(find_layers(model)), hidden_size(model)
    r = unit(d, seed=11).double()
    vectors = torch.randn(L + 1, d, generator=torch.Generator().manual_seed(12))
    per_layer = hl.Directions(vectors)
    r_layer = torch.stack([hl.normalize(v) for v in vectors[1:]]).double()  # block l writes into index l + 1
    base = block_writes(model, tok)
    assert (base @ r).abs().amax(-1).min() > 1e-2  # every block writes along r before the edit
    with hl.ablate(model, r.float()):
        leak = (block_writes(model, tok) @ r).abs().amax(-1)  # [L]
    with hl.ablate(model, per_layer):
        writes = block_writes(model, tok)
        leak_layer = torch.einsum("ltd,ld->lt", writes, r_layer).abs().amax(-1)
    print(
        f"\n{family}: max|r̂ᵀΔx| per block {leak.tolist()}, per-layer directions {leak_layer.tolist()}, "
        f"max|Δx| {writes.norm(dim=-1).max():.3g}"
    )
    assert leak.shape == (L,) and float(leak.max()) < 1e-4
    assert float(leak_layer.max()) < 1e-4
    # The same check fails on the uncorrected edit, the behaviour before the fix.
    with apply_edits(model, plan_ablation(model, r.float(), writers=uncorrected(model, ("attn", "mlp")))):
        assert float((block_writes(model, tok) @ r).abs().amax(-1).max()) > 1e-2
    assert torch.equal(block_writes(model, tok), base)  # every edit was reverted


@pytest.mark.parametrize("family", sorted(SANDWICH))
def test_ablation_hooks_equal_ablate_on_sandwich_models(family):
    """Issue 14: ``ablation_hooks`` on Gemma 2/3 project each writer against the post-norm-corrected basis, as the
    weight edit of ``hl.ablate`` does: both leave no component along the direction in any block's write (shared and
    per-layer directions), and they agree with each other (writes and logits to float rounding)."""
    model, tok = model_for(family)
    L, d = len(find_layers(model)), hidden_size(model)
    r = unit(d, seed=11).double()
    vectors = torch.randn(L + 1, d, generator=torch.Generator().manual_seed(12))
    per_layer = hl.Directions(vectors)
    r_layer = torch.stack([hl.normalize(v) for v in vectors[1:]]).double()  # block l writes into index l + 1
    base, base_logits = block_writes(model, tok), logits(model, tok)
    for direction, along in ((r.float(), r.expand(L, d)), (per_layer, r_layer)):
        with hl.ablate(model, direction):
            edit_writes, edit_logits = block_writes(model, tok), logits(model, tok)
        with hl.ablation_hooks(model, direction, include_embedding=False):  # hl.ablate leaves the embedding too
            hook_writes, hook_logits = block_writes(model, tok), logits(model, tok)
        edit_leak = torch.einsum("ltd,ld->lt", edit_writes, along).abs().amax(-1)  # [L]
        hook_leak = torch.einsum("ltd,ld->lt", hook_writes, along).abs().amax(-1)
        gap_writes = float((hook_writes - edit_writes).abs().max() / edit_writes.abs().max())
        gap_logits = float((hook_logits - edit_logits).abs().max() / edit_logits.abs().max())
        print(
            f"\n{family} {type(direction).__name__}: max|r̂ᵀΔx| per block, hooks {hook_leak.tolist()}, "
            f"ablate {edit_leak.tolist()}; hooks vs ablate: writes {gap_writes:.2g}, logits {gap_logits:.2g}"
        )
        assert hook_leak.shape == edit_leak.shape == (L,)
        assert float(hook_leak.max()) < 1e-4 and float(edit_leak.max()) < 1e-4
        assert gap_writes < 1e-4 and gap_logits < 1e-4
        assert float((hook_logits - base_logits).abs().max()) > 1e-3  # the ablation did something
    assert torch.equal(block_writes(model, tok), base)  # hooks removed, edits reverted


def test_post_norm_that_cannot_be_corrected_exactly_is_an_error():
    """A LayerNorm (mean subtraction, bias) after a writer: no weight edit removes the direction exactly."""
    torch.manual_seed(0)
    model = _Toy(post_norm=True)
    writers = hl.find_writers(model, ("attn", "mlp"))
    block = model.model.layers[1]
    with torch.no_grad():
        block.after.bias.normal_()
    attn = next(w for w in writers if w.name == "model.layers.1.token_mix.o_proj")
    bad = [replace(attn, post_norm=block.after)]
    with pytest.raises(hl.UnsupportedModelError, match="token_mix.o_proj.*not of the form"):
        plan_ablation(model, unit(16), 1.0, writers=bad)

    # An RMS-like gain (no bias, no centring) in the same place is corrected, not refused.
    class Gain(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.rand(16) + 0.5)

        def forward(self, x):
            return self.weight * x / x.pow(2).mean(-1, keepdim=True).sqrt()

    gain = Gain()
    (edit,) = plan_ablation(model, unit(16), 1.0, writers=[replace(attn, post_norm=gain)])
    expected = hl.normalize(gain.weight.detach() * unit(16))
    assert torch.allclose(projector(edit.basis), torch.outer(expected, expected).double(), atol=1e-6)


class _ToyBlock(nn.Module):
    def __init__(self, d, post_norm=False):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.token_mix = nn.Sequential()
        self.token_mix.proj_in = nn.Linear(d, 2 * d)
        self.token_mix.o_proj = nn.Linear(2 * d, d)
        self.ffn = nn.Module()
        self.ffn.up = nn.Linear(d, 3 * d)
        self.ffn.down_proj = nn.Linear(3 * d, d)
        self.after = nn.LayerNorm(d) if post_norm else nn.Identity()

    def forward(self, x):
        x = x + self.after(self.token_mix.o_proj(torch.tanh(self.token_mix.proj_in(self.norm(x)))))
        return x + self.ffn.down_proj(torch.relu(self.ffn.up(self.norm(x))))


class _Toy(nn.Module):
    def __init__(self, post_norm=False, d=16):
        super().__init__()
        self.config = type("C", (), {"hidden_size": d, "vocab_size": 50, "model_type": "toy"})()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(50, d)
        self.model.layers = nn.ModuleList([_ToyBlock(d, post_norm) for _ in range(2)])

    def forward(self, input_ids, **kwargs):
        x = self.model.embed_tokens(input_ids)
        for block in self.model.layers:
            x = block(x)
        return x


def test_ablation_hooks_project_a_post_norm_with_bias_at_its_output(monkeypatch):
    """A post-norm that admits no exact writer-side correction (a LayerNorm with bias): the hooks project the norm's
    output instead, so every block's write is still orthogonal to the direction (``hl.ablate`` raises there)."""
    from hereticlab.interventions import steering

    torch.manual_seed(0)
    model = _Toy(post_norm=True)
    for block in model.model.layers:
        with torch.no_grad():
            block.after.bias.normal_()
    plain = hl.find_writers

    def with_post_norms(model, components=None):  # the toy's spec does not name its post-norm
        writers = plain(model, components) if components is not None else plain(model)
        layers = model.model.layers
        return [replace(w, post_norm=layers[w.layer].after) if w.name.endswith("o_proj") else w for w in writers]

    monkeypatch.setattr(steering, "find_writers", with_post_norms)
    r = unit(16, seed=2)
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))
    writes = []

    def record(module, args, output):
        writes.append((output - args[0]).detach())

    handles = [block.register_forward_hook(record) for block in model.model.layers]
    try:
        with torch.no_grad():
            model(ids)
            assert max(float((w @ r).abs().max()) for w in writes) > 1e-2
            writes.clear()
            with hl.ablation_hooks(model, r):
                model(ids)
    finally:
        for h in handles:
            h.remove()
    assert len(writes) == 2 and max(float((w @ r).abs().max()) for w in writes) < 1e-5


def test_structural_fallback_is_verified_empirically():
    torch.manual_seed(0)
    model = _Toy()
    writers = hl.find_writers(model, ("attn", "mlp"))
    assert [(w.name, w.component, w.source) for w in writers[:2]] == [
        ("model.layers.0.token_mix.o_proj", "attn", "structural"),
        ("model.layers.0.ffn.down_proj", "mlp", "structural"),
    ]
    assert all(c.kind == "direct" for c in verify_writers(model))
    odd = _Toy(post_norm=True)
    kinds = {c.writer.name: c.kind for c in verify_writers(odd)}
    assert kinds["model.layers.1.token_mix.o_proj"] == "normed" and kinds["model.layers.1.ffn.down_proj"] == "direct"


def test_unhandled_block_lists_layers_and_candidates():
    model = _Toy()
    model.model.layers[1].ffn.down_proj = nn.Linear(48, 16)
    model.model.layers[1].token_mix.mystery = model.model.layers[1].token_mix.o_proj
    del model.model.layers[1].token_mix.o_proj
    model.model.layers[1].ffn.lower = model.model.layers[1].ffn.down_proj
    del model.model.layers[1].ffn.down_proj
    with pytest.raises(hl.UnsupportedModelError, match=r"block 1 .*token_mix.mystery \(16, 32\)"):
        hl.find_writers(model)


@pytest.mark.skipif(torch.cuda.is_available(), reason="error path only; a CUDA machine would try to load")
def test_4bit_without_cuda_is_a_clear_one_line_error():
    from hereticlab.interventions.quantized import load_quantized

    with pytest.raises(hl.ModelLoadError, match="4-bit loading needs CUDA and bitsandbytes") as info:
        load_quantized("tiny-does-not-matter")
    assert "\n" not in str(info.value)
