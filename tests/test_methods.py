"""Direction methods beyond the difference of means: exact math on synthetic data, registry, hooks."""

import warnings

import numpy as np
import pytest
import torch
from conftest import PROMPTS

import hereticlab as hl
from hereticlab.core.capture import encode
from hereticlab.directions.methods import (
    DIRECTION_METHODS,
    PoorClustersError,
    cluster_directions,
    compute_directions,
    geometric_median,
    geometric_median_batched,
    pca_pairs,
    probe_accuracy_frame,
    probe_direction,
    subspace_overlap,
    svd_subspace,
)

D, L1 = 32, 3  # hidden size, residual indices


def gen(seed):
    return torch.Generator().manual_seed(seed)


def planted(n_bad=120, n_good=100, rank=2, scale=6.0, noise=0.3, seed=0):
    """Residuals [n, L1, D]: good = noise around a mean; bad = good mean + signal in a planted rank-`rank` subspace."""
    g = gen(seed)
    basis = hl.orthonormal_basis(torch.randn(rank, D, generator=g, dtype=torch.float64)).T  # [rank, D]
    mu = torch.randn(D, generator=g, dtype=torch.float64) * 2
    good = mu + noise * torch.randn(n_good, L1, D, generator=g, dtype=torch.float64)
    coeff = scale * (1.0 + torch.rand(n_bad, L1, rank, generator=g, dtype=torch.float64))  # positive, varied
    bad = mu + coeff @ basis + noise * torch.randn(n_bad, L1, D, generator=g, dtype=torch.float64)
    return bad.float(), good.float(), basis


def test_projector_from_rank_k_directions_is_idempotent_and_orthogonal():
    bad, good, _ = planted(rank=3)
    dirs = svd_subspace(bad, good, rank=3)
    assert dirs.vectors.shape == (L1, 3, D) and dirs.rank == 3
    Q32 = dirs.basis(1)  # [D, 3], float32 like the stored vectors
    assert torch.allclose(Q32.T @ Q32, torch.eye(3), atol=1e-5)
    Q = hl.orthonormal_basis(dirs.at(1).double())  # exact in float64
    W = torch.randn(D, 7, generator=gen(1), dtype=torch.float64)
    once = hl.orthogonalize(W, Q)
    assert torch.allclose(hl.orthogonalize(once, Q), once, atol=1e-10)
    assert (Q.T @ once).abs().max() < 1e-10
    P = torch.eye(D, dtype=torch.float64) - Q @ Q.T
    assert torch.allclose(P @ P, P, atol=1e-10)


@pytest.mark.parametrize("rank", [1, 2, 4])
def test_svd_subspace_recovers_planted_signal(rank):
    bad, good, basis = planted(rank=rank)
    dirs = svd_subspace(bad, good, rank=rank)
    for layer in range(L1):
        found = dirs.at(layer).reshape(-1, D).double()
        assert subspace_overlap(found, basis) > 0.99
    if rank == 1:  # raw, pointing from good to bad, scaled like the mean difference
        r = bad.mean(0) - good.mean(0)
        assert dirs.vectors.shape == (L1, D)
        assert torch.allclose(hl.normalize(dirs.vectors), hl.normalize(r), atol=2e-3)
        assert torch.allclose(dirs.vectors.norm(dim=-1), r.norm(dim=-1), rtol=1e-2)


def test_centered_pca_needs_randomized_pairs():
    bad, good, basis = planted(rank=1, noise=1.0)
    dirs = pca_pairs(bad, good, rank=1)
    for layer in range(L1):
        assert subspace_overlap(hl.normalize(dirs.vectors[layer])[None].double(), basis) > 0.98
        assert float(dirs.vectors[layer] @ (bad.mean(0) - good.mean(0))[layer]) > 0  # oriented good → bad
    two = pca_pairs(bad, good, rank=2)
    assert two.vectors.shape == (L1, 2, D)
    assert torch.allclose(two.vectors[0] @ two.vectors[0].T, torch.eye(2), atol=1e-5)


def test_probe_reaches_full_accuracy_on_separable_data():
    bad, good, basis = planted(rank=1)
    dirs = probe_direction(bad, good)
    acc = probe_accuracy_frame(dirs)
    assert list(acc.columns) == ["layer", "accuracy", "train_accuracy", "cos_to_mean_difference"]
    assert (acc.accuracy >= 0.97).all()
    assert (acc.cos_to_mean_difference > 0).all()  # oriented towards the bad class
    with pytest.raises(ValueError, match="rank 1"):
        probe_direction(bad, good, rank=2)


def test_kmeans_directions_on_planted_clusters():
    g = gen(3)
    centers = hl.orthonormal_basis(torch.randn(3, D, generator=g)).T * 10  # three orthogonal cluster offsets
    labels = torch.arange(90) % 3
    good = 0.2 * torch.randn(60, L1, D, generator=g)
    bad = centers[labels][:, None, :] + 0.2 * torch.randn(90, L1, D, generator=g)
    dirs = cluster_directions(bad, good, rank=3, n_clusters=3, layer=1)
    assert dirs.meta["silhouette"] > 0.5 and sorted(dirs.meta["cluster_sizes"]) == [30, 30, 30]
    assert dirs.vectors.shape == (L1, 3, D)
    assert subspace_overlap(dirs.vectors[1].double(), centers.double()) > 0.99
    one = cluster_directions(bad, good, rank=1, n_clusters=3, layer=1)  # raw direction of one cluster
    cos = hl.normalize(one.vectors[1]) @ hl.normalize(centers).T
    assert cos.max() > 0.99 and one.vectors[1].norm() == pytest.approx(10, rel=0.05)


def test_cluster_refuses_poor_silhouette():
    g = gen(4)
    bad, good = torch.randn(80, L1, D, generator=g), torch.randn(40, L1, D, generator=g)  # one Gaussian blob
    with pytest.raises(PoorClustersError, match="silhouette"):
        cluster_directions(bad, good, rank=2, min_silhouette=0.2)
    with pytest.warns(UserWarning, match="silhouette"):
        dirs = cluster_directions(bad, good, rank=2, min_silhouette=0.2, on_poor="warn")
    assert dirs.meta["poor_silhouette"] is True


def test_geometric_median_resists_outliers():
    g = gen(5)
    inliers = torch.randn(95, D, generator=g, dtype=torch.float64)
    outliers = 1000.0 + torch.randn(5, D, generator=g, dtype=torch.float64)
    x = torch.cat([inliers, outliers])
    med = geometric_median(x)
    assert med.shape == (D,)
    assert med.norm() < 1.0 and x.mean(0).norm() > 200
    # Optimality: the gradient of Σ‖x_i − y‖ vanishes at the median.
    unit = (x - med) / (x - med).norm(dim=-1, keepdim=True)
    assert unit.sum(0).norm() < 1e-3
    batched = geometric_median_batched(torch.stack([x, x + 3.0], dim=1))
    assert torch.allclose(batched[0], med) and torch.allclose(batched[1], med + 3.0, atol=1e-8)
    pts = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0]])
    assert torch.allclose(geometric_median(torch.cat([pts, pts])), geometric_median(pts), atol=1e-5)


def mean_on_a_point(h):
    """Five points whose mean is the data point (0, 0). For h < 3√3 that point is not the median: the others
    pull it with force 2·3/√(9 + h²) > 1, and by symmetry the median is (−3 + h/√3, 0) (where the derivative
    −1 − 1 + 1 + 2t/√(t² + h²) of Σ‖x_i − y‖ along the axis vanishes, t = x + 3); for h ≥ 3√3 it is (0, 0)."""
    pts = torch.tensor([[0.0, 0.0], [9.0, 0.0], [-3.0, h], [-3.0, -h], [-3.0, 0.0]], dtype=torch.float64)
    median = torch.tensor([min(-3.0 + h / 3**0.5, 0.0), 0.0], dtype=torch.float64)
    return pts, median


@pytest.mark.parametrize("h", [1.0, 3.0, 4.5, 6.0])
def test_weiszfeld_escapes_a_data_point_it_lands_on(h):
    """The first Weiszfeld iterate (the mean) is exactly a data point: the update must not stay stuck there
    (a weight 1/max(0, eps) = 1/eps pins it) unless that point is the median."""
    pts, median = mean_on_a_point(h)
    assert torch.equal(pts.mean(0), pts[0])
    assert torch.allclose(geometric_median(pts, iters=2000), median, atol=1e-5)  # median_difference's median
    batched = geometric_median_batched(torch.stack([pts, pts + 1.0], dim=1), iters=2000)
    assert torch.allclose(batched, torch.stack([median, median + 1.0]), atol=1e-5)
    # the duplicate in geometry (geometry_table's starred centres, plots) behaves the same
    from hereticlab.measure.geometry import weiszfeld_median

    assert np.allclose(weiszfeld_median(pts.numpy(), iters=2000), median.numpy(), atol=1e-5)
    if h == 1.0:  # far from the data point: the default iteration count is enough
        assert torch.allclose(geometric_median(pts), median, atol=1e-5)
        assert np.allclose(weiszfeld_median(pts.numpy()), median.numpy(), atol=1e-5)


def test_weiszfeld_stays_on_a_data_point_that_is_the_median():
    pts = torch.tensor(
        [[0.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0], [0.5, 0.5], [-0.5, -0.5]], dtype=torch.float64
    )
    assert torch.equal(pts.mean(0), pts[0])
    assert torch.equal(geometric_median(pts), pts[0])
    same = torch.zeros(4, 3, dtype=torch.float64)  # all points coincide
    assert torch.equal(geometric_median(same), same[0])


def test_median_direction_is_robust():
    bad, good, basis = planted(rank=1)
    bad = bad.clone()
    bad[:4] += 500 * torch.randn(D, generator=gen(6))  # a few huge outliers in one direction
    median = compute_directions("median", bad, good)
    mean = compute_directions("mean_difference", bad, good)
    overlap = lambda d: subspace_overlap(hl.normalize(d.vectors[1])[None].double(), basis)  # noqa: E731
    assert overlap(median) > 0.98 > overlap(mean)


def test_registry_uniform_signature():
    bad, good, _ = planted(rank=2, n_bad=40, n_good=40)
    assert set(DIRECTION_METHODS) == {"mean_difference", "projected", "median", "svd", "pca_pairs", "probe", "cluster"}
    for name in DIRECTION_METHODS:
        kw = {"on_poor": "warn"} if name == "cluster" else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dirs = compute_directions(name, bad, good, rank=1, **kw)
        assert isinstance(dirs, hl.Directions) and dirs.vectors.shape == (L1, D), name
        assert float((dirs.vectors * (bad.mean(0) - good.mean(0))).sum(-1).min()) > 0, name
    for name in ("svd", "pca_pairs", "cluster"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dirs = compute_directions(name, bad, good, rank=2, **({"on_poor": "warn"} if name == "cluster" else {}))
        assert dirs.vectors.shape == (L1, 2, D) and dirs.basis(1).shape == (D, 2)
    with pytest.raises(ValueError, match="rank"):
        compute_directions("mean_difference", bad, good, rank=2)
    with pytest.raises(KeyError, match="choose from"):
        compute_directions("nope", bad, good)


def test_rank_k_directions_work_with_edits_and_hooks(fresh_llama):
    """A subspace from the registry ablates through the exact projector, and hooks agree with weight edits."""
    model, tok = fresh_llama
    res = hl.capture_residuals(model, tok, PROMPTS, progress=False)
    bad = res + 3 * torch.randn(2, 64, generator=gen(7)).sum(0)
    dirs = compute_directions("svd", bad, res, rank=2)
    batch = encode(tok, hl.format_chat(tok, PROMPTS), torch.device("cpu"))
    with hl.ablation_hooks(model, dirs):
        hooked = model(**batch).logits
    with hl.ablate(model, dirs, components=("embed", "attn", "mlp")):
        edited = model(**batch).logits
        inside = hl.capture_residuals(model, tok, PROMPTS, progress=False)
    assert (hooked - edited).abs().max() < 1e-4
    writes = inside[:, 1:] - inside[:, :-1]  # what each block wrote
    for layer in range(writes.shape[1]):
        Q = dirs.basis(layer + 1)
        assert (writes[:, layer] @ Q).abs().max() < 1e-4 * writes.norm(dim=-1).max()


def test_actadd_then_subtracting_restores_logits(tiny_llama):
    model, tok = tiny_llama
    bad, good, _ = planted()
    r = torch.randn(64, generator=gen(8)) * 3
    batch = encode(tok, hl.format_chat(tok, PROMPTS), torch.device("cpu"))
    base = model(**batch).logits
    with hl.activation_addition(model, r, layer=2, alpha=1.0):
        steered = model(**batch).logits
        with hl.activation_addition(model, r, layer=2, alpha=-1.0):
            restored = model(**batch).logits
    assert (steered - base).abs().max() > 1e-3
    assert torch.allclose(restored, base, atol=1e-5)
