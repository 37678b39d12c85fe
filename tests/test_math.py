"""Exact tests of the pure math: orthogonalization, kernels, directions."""

import pytest
import torch

import hereticlab as hl
from hereticlab.directions import project_out
from hereticlab.interventions.edits import edit_weight


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_orthogonalize_full_strength_removes_component():
    W, r = rand(16, 7), rand(16, seed=1)
    Q = hl.orthonormal_basis(r)
    out = hl.orthogonalize(W, Q, 1.0)
    assert torch.allclose(Q.T @ out, torch.zeros(1, 7, dtype=torch.float64), atol=1e-12)
    # Leaves the orthogonal complement untouched.
    P = torch.eye(16, dtype=torch.float64) - Q @ Q.T
    assert torch.allclose(P @ out, P @ W, atol=1e-12)


def test_orthogonalize_strength_scales_component_linearly():
    W, Q = rand(16, 5), hl.orthonormal_basis(rand(16, seed=2))
    half = hl.orthogonalize(W, Q, 0.5)
    assert torch.allclose(Q.T @ half, 0.5 * (Q.T @ W), atol=1e-12)
    assert torch.equal(hl.orthogonalize(W, Q, 0.0), W)


def test_rank_k_projector_is_idempotent_and_order_free():
    W, V = rand(12, 9), rand(3, 12, seed=3)
    Q = hl.orthonormal_basis(V)
    assert torch.allclose(Q.T @ Q, torch.eye(3, dtype=torch.float64), atol=1e-12)
    once = hl.orthogonalize(W, Q)
    assert torch.allclose(hl.orthogonalize(once, Q), once, atol=1e-12)
    reordered = hl.orthonormal_basis(V[[2, 0, 1]])
    assert torch.allclose(hl.orthogonalize(W, reordered), once, atol=1e-12)
    assert torch.allclose(V @ once, torch.zeros(3, 9, dtype=torch.float64), atol=1e-10)


def test_column_norm_mode_keeps_column_norms_and_orthogonality():
    W, Q = rand(16, 6), hl.orthonormal_basis(rand(16, seed=4))
    out = hl.orthogonalize(W, Q, 1.0, norm="column")
    assert torch.allclose(out.norm(dim=0), W.norm(dim=0), atol=1e-12)
    assert torch.allclose(Q.T @ out, torch.zeros(1, 6, dtype=torch.float64), atol=1e-12)


def column_mode_by_hand(W, Q, lam):
    """Jim Lai's norm-preserving ablation, one column at a time: unit direction, ablate, renormalize, old norm."""
    out = torch.empty_like(W)
    for j in range(W.shape[1]):
        c = W[:, j]
        u = c / c.norm()
        u = u - lam * sum((Q[:, i] @ u) * Q[:, i] for i in range(Q.shape[1]))
        out[:, j] = c.norm() * u / u.norm()
    return out


def row_mode_by_hand(W, Q, lam):
    """Heretic's variant: normalize every row, ablate the matrix of unit rows, renormalize rows, old norms."""
    norms = [W[i].norm() for i in range(W.shape[0])]
    U = torch.stack([W[i] / norms[i] for i in range(W.shape[0])])
    E = U - lam * Q @ (Q.T @ U)
    return torch.stack([norms[i] * E[i] / E[i].norm() for i in range(W.shape[0])])


@pytest.mark.parametrize("lam", [0.25, 0.5, 0.8, 1.0, 1.5])
@pytest.mark.parametrize("k", [1, 2])
def test_norm_modes_match_independent_formulas_at_every_strength(lam, k):
    W, Q = rand(16, 6, seed=10), hl.orthonormal_basis(rand(k, 16, seed=11))
    col = hl.orthogonalize(W, Q, lam, norm="column")
    assert torch.allclose(col, column_mode_by_hand(W, Q, lam), atol=1e-12)
    assert torch.allclose(col.norm(dim=0), W.norm(dim=0), atol=1e-12)
    # Each column keeps its direction in the complement of Q and (1 − λ) of its Q part, up to the common rescale.
    unit = W / W.norm(dim=0)
    P = torch.eye(16, dtype=torch.float64) - Q @ Q.T
    ratio = (Q.T @ col) / (Q.T @ unit)
    assert torch.allclose(ratio, (1 - lam) * (P @ col).norm(dim=0) / (P @ unit).norm(dim=0), atol=1e-10)
    assert torch.allclose(hl.orthogonalize(W, Q, lam, norm="row"), row_mode_by_hand(W, Q, lam), atol=1e-12)
    if lam != 1.0:
        assert not torch.allclose(col, hl.orthogonalize(W, Q, lam), atol=1e-3)  # the rescale matters


def test_row_norm_mode_keeps_row_norms():
    W, Q = rand(16, 6), hl.orthonormal_basis(rand(16, seed=5))
    out = hl.orthogonalize(W, Q, 1.0, norm="row")
    assert torch.allclose(out.norm(dim=1), W.norm(dim=1), atol=1e-12)
    assert not torch.allclose(out, hl.orthogonalize(W, Q, 1.0))


def test_unknown_norm_mode_is_rejected():
    with pytest.raises(ValueError, match="norm mode"):
        hl.orthogonalize(rand(4, 4), hl.orthonormal_basis(rand(4)), norm="spectral")


@pytest.mark.parametrize("axis", [0, 1])
def test_edit_weight_respects_residual_axis(axis):
    W, Q = rand(10, 10), hl.orthonormal_basis(rand(10, seed=6))
    out = edit_weight(W, axis, Q, 1.0)
    expected = hl.orthogonalize(W, Q) if axis == 0 else hl.orthogonalize(W.T, Q).T
    assert torch.allclose(out, expected)


def test_edit_weight_on_fused_expert_tensor():
    W, Q = rand(3, 5, 10), hl.orthonormal_basis(rand(10, seed=7))  # (experts, in, d)
    out = edit_weight(W, 2, Q, 1.0)
    assert torch.allclose(out @ Q, torch.zeros(3, 5, 1, dtype=torch.float64), atol=1e-12)


def test_tent_kernel_matches_formula():
    k = hl.tent_kernel(10, peak=4.0, max_weight=1.2, min_weight=0.2, reach=2.0)
    expected = torch.tensor([0, 0, 0.2, 0.7, 1.2, 0.7, 0.2, 0, 0, 0])
    assert torch.allclose(k, expected, atol=1e-6)
    assert torch.equal(hl.constant_kernel(4, 0.5, layers=[1, 3]), torch.tensor([0, 0.5, 0, 0.5]))


def test_float_index_at_integer_equals_that_layer():
    dirs = hl.Directions(rand(6, 8).float())
    for i in range(6):
        assert torch.equal(dirs.at(float(i)), hl.normalize(dirs.vectors[i]))
    mid = dirs.at(2.5)
    assert torch.isclose(mid.norm(), torch.tensor(1.0))
    expected = hl.normalize(hl.normalize(dirs.vectors[2]) + hl.normalize(dirs.vectors[3]))
    assert torch.allclose(mid, expected, atol=1e-6)
    with pytest.raises(IndexError):
        dirs.at(6.5)


def test_mean_difference_and_projection():
    good = rand(20, 3, 8).float()
    bad = (good + torch.tensor([1.0] + [0.0] * 7)).flip(0)
    dirs = hl.mean_difference(bad, good)
    assert torch.allclose(dirs.vectors, torch.tensor([1.0] + [0.0] * 7).expand(3, 8), atol=1e-6)
    proj = hl.mean_difference(bad, good, project=True)
    assert torch.allclose((proj.vectors * hl.normalize(dirs.good_mean)).sum(-1), torch.zeros(3), atol=1e-6)


def test_biprojected_uses_source_layer_against_target_means():
    good, bad = rand(10, 4, 8).float(), rand(10, 4, 8, seed=9).float() + 1
    dirs = hl.mean_difference(bad, good)
    bi = hl.biprojected(dirs, source=2)
    for layer in range(4):
        assert abs(float(bi.vectors[layer] @ hl.normalize(dirs.good_mean[layer]))) < 1e-5
        assert torch.allclose(
            bi.vectors[layer], project_out(dirs.vectors[2:3], dirs.good_mean[layer : layer + 1])[0], atol=1e-6
        )


def test_directions_save_load_roundtrip(tmp_path):
    good, bad = rand(5, 3, 8).float(), rand(5, 3, 8, seed=1).float()
    dirs = hl.mean_difference(bad, good, project=True)
    dirs.meta["note"] = "x"
    loaded = hl.Directions.load(dirs.save(tmp_path / "d.safetensors"))
    assert torch.equal(loaded.vectors, dirs.vectors) and torch.equal(loaded.good_mean, dirs.good_mean)
    assert loaded.method == "projected" and loaded.meta["note"] == "x"


def test_random_directions_match_norms():
    dirs = hl.Directions(rand(4, 8).float())
    control = hl.random_directions(dirs, seed=3)
    assert torch.allclose(control.vectors.norm(dim=-1), dirs.vectors.norm(dim=-1), atol=1e-5)
    assert not torch.allclose(control.vectors, dirs.vectors)
