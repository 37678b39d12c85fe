"""More ways to find a behaviour direction than the difference of means — all returning ``Directions``.

Every method takes the residuals of the two classes, ``bad [n_bad, L+1, d]`` and ``good [n_good, L+1, d]`` (as from
``capture_residuals``), and returns a ``Directions`` that ``edits`` / ``steering`` accept:

* rank 1: ``vectors [L+1, d]``, *raw* (unnormalized) and pointing from good to bad (``r · (μ_bad − μ_good) > 0``);
  methods that only find a unit axis (SVD, PCA, probe) scale it by the mean difference projected on it, so
  activation addition with ``alpha = 1`` is comparable across methods;
* rank k: ``vectors [L+1, k, d]``, an orthonormal basis per residual index (ablate it with the exact projector,
  ``orthogonalize(W, Q)`` with ``Q = dirs.basis(i)`` ``[d, k]``; never sequential rank-1 projections).

``DIRECTION_METHODS`` maps a name to a function with the uniform signature ``(bad, good, *, rank=1, **kw)``, so a
search can pick the method and the rank by name (``compute_directions("svd", bad, good, rank=4)``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from .base import Directions, _check_pair, mean_difference, normalize, orthonormal_basis

if TYPE_CHECKING:  # scikit-learn is imported only when a probe is fitted
    from sklearn.pipeline import Pipeline

# ----------------------------------------------------------------------------------------------------------
# Pure math
# ----------------------------------------------------------------------------------------------------------


def geometric_median(points: torch.Tensor, iters: int = 100, eps: float = 1e-8) -> torch.Tensor:
    """Geometric median of ``points [n, d]`` → ``[d]`` (Weiszfeld, float64 inside, input dtype out).

    ``y ← Σ w_i x_i / Σ w_i`` with ``w_i = 1 / ‖x_i − y‖``, starting at the mean; stops early once ``y`` moves
    less than ``eps`` (relative to the data scale). When ``y`` lands on data points (within ``eps``), those are
    left out of the average and the step is Vardi & Zhang's: ``y`` stays there only if that point is the median.
    """
    if points.ndim != 2:
        raise ValueError(f"geometric_median expects points [n, d]; got shape {tuple(points.shape)}")
    return geometric_median_batched(points[:, None, :], iters=iters, eps=eps)[0]


def geometric_median_batched(points: torch.Tensor, iters: int = 100, eps: float = 1e-8) -> torch.Tensor:
    """Geometric medians of ``points [n, L, d]`` over the first axis, one per layer → ``[L, d]``.

    The layers are independent problems solved together (same Weiszfeld update as ``geometric_median``).
    """
    if points.ndim != 3:
        raise ValueError(f"geometric_median_batched expects points [n, L, d]; got shape {tuple(points.shape)}")
    x = points.double()
    y = x.mean(0)  # [L, d]
    scale = x.norm(dim=-1).mean(0).clamp_min(1.0)  # [L]
    for _ in range(iters):
        diff = x - y  # [n, L, d]
        dist = diff.norm(dim=-1)  # [n, L]
        on = dist <= eps  # y sits on these points
        w = torch.where(on, 0.0, 1.0 / dist.clamp_min(eps))
        plain = (w[..., None] * x).sum(0) / w.sum(0).clamp_min(1e-300)[:, None]  # Weiszfeld over the other points
        # Vardi & Zhang (2000): y on η points moves to (1 − γ) T + γ y, γ = min(1, η / ‖Σ_i w_i (x_i − y)‖); γ = 1
        # (stay) exactly when the pull of the other points is at most η, i.e. when y is the median.
        pull = (w[..., None] * diff).sum(0).norm(dim=-1)  # [L]
        gamma = (on.sum(0).double() / pull.clamp_min(1e-300)).clamp(max=1.0)  # 0 where y is on no point
        new = (1 - gamma)[:, None] * plain + gamma[:, None] * y
        moved = (new - y).norm(dim=-1) / scale
        y = new
        if bool((moved < eps).all()):
            break
    return y.to(points.dtype)


def top_singular_vectors(X: torch.Tensor, k: int, *, center: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` right singular vectors ``[k, d]`` (orthonormal rows) and singular values ``[k]`` of ``X [n, d]``.

    ``center``: subtract the column mean first (PCA); otherwise uncentered SVD. float64 inside.
    """
    x = X.double()
    if center:
        x = x - x.mean(0)
    if k > min(x.shape):
        raise ValueError(f"rank {k} is larger than the data allows ({x.shape[0]} rows, {x.shape[1]} columns)")
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    return vh[:k], s[:k]


def orient(basis: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Flip each row of ``basis [k, d]`` so that it has a non-negative dot product with ``reference [d]``."""
    signs = torch.sign(basis @ reference.to(basis.dtype))
    signs[signs == 0] = 1
    return basis * signs[:, None]


def subspace_overlap(A: torch.Tensor, B: torch.Tensor) -> float:
    """Mean squared cosine of the principal angles between the row spaces of ``A [k, d]`` and ``B [m, d]``.

    1 when one contains the other (for k ≤ m), 0 when orthogonal.
    """
    qa, qb = orthonormal_basis(A.double()), orthonormal_basis(B.double())
    s = torch.linalg.svdvals(qa.T @ qb)
    return float((s**2).sum() / min(qa.shape[1], qb.shape[1]))


def _raw_from_unit(unit: torch.Tensor, diff: torch.Tensor) -> torch.Tensor:
    """Scale unit rows ``[L, d]`` by the mean difference ``diff [L, d]`` projected on them (sign included)."""
    return unit * (unit * diff).sum(-1, keepdim=True)


def _as_directions(
    unit: torch.Tensor, bad_mean: torch.Tensor, good_mean: torch.Tensor, method: str, **meta
) -> Directions:
    """``unit [L, k, d]`` orthonormal rows → rank-1 raw ``[L, d]`` (k = 1) or rank-k bases ``[L, k, d]``."""
    diff = bad_mean - good_mean
    vectors = _raw_from_unit(unit[:, 0], diff) if unit.shape[1] == 1 else unit
    return Directions(vectors.float(), method=method, good_mean=good_mean.float(), bad_mean=bad_mean.float(), meta=meta)


def _orthonormal_rows(vectors: torch.Tensor) -> torch.Tensor:
    """``[L, k, d]`` → orthonormal rows per layer, each pointing like the vector it came from (QR, in order)."""
    return torch.stack([orthonormal_basis(v.double()).T for v in vectors])


# ----------------------------------------------------------------------------------------------------------
# Direction methods: (bad, good, *, rank=1, **kw) -> Directions
# ----------------------------------------------------------------------------------------------------------


def _rank_one_only(name: str, rank: int):
    if rank != 1:
        raise ValueError(
            f"{name} gives one direction per layer (rank 1); for rank {rank} use 'svd', 'pca_pairs' or 'cluster'"
        )


def mean_difference_method(bad: torch.Tensor, good: torch.Tensor, *, rank: int = 1, **kw: bool) -> Directions:
    """``r = mean(bad) − mean(good)`` (Arditi et al.). Rank 1 only."""
    _rank_one_only("mean_difference", rank)
    return mean_difference(bad, good, **kw)


def projected_method(bad: torch.Tensor, good: torch.Tensor, *, rank: int = 1, **kw: object) -> Directions:
    """Mean difference with the component along the good mean removed (Jim Lai). Rank 1 only."""
    _rank_one_only("projected", rank)
    return mean_difference(bad, good, project=True)


def median_difference(
    bad: torch.Tensor, good: torch.Tensor, *, rank: int = 1, iters: int = 100, eps: float = 1e-8
) -> Directions:
    """``r* = gmedian(bad) − gmedian(good)`` per layer: a difference of geometric medians, robust to outliers.

    ``good_mean`` / ``bad_mean`` keep the arithmetic means (for projection); the medians go to ``meta`` norms only.
    """
    _check_pair(bad, good)
    _rank_one_only("median", rank)
    bad_med = geometric_median_batched(bad, iters, eps).double()
    good_med = geometric_median_batched(good, iters, eps).double()
    r = bad_med - good_med
    mean_r = bad.double().mean(0) - good.double().mean(0)
    cos = (normalize(r) * normalize(mean_r)).sum(-1)
    return Directions(
        r.float(),
        method="median",
        good_mean=good.double().mean(0).float(),
        bad_mean=bad.double().mean(0).float(),
        meta={"n_bad": bad.shape[0], "n_good": good.shape[0], "cos_to_mean_difference": cos.tolist()},
    )


def svd_subspace(bad: torch.Tensor, good: torch.Tensor, *, rank: int = 1) -> Directions:
    """Top-``rank`` uncentered SVD of ``bad_i − mean(good)`` per layer (the first axis ≈ the mean difference).

    Rank 1: the top axis scaled by the mean difference projected on it; rank k: bases ``[L+1, k, d]``, each axis
    oriented towards the mean difference. ``meta['singular_values']``: ``[L+1][k]``.
    """
    _check_pair(bad, good)
    bad_mean, good_mean = bad.double().mean(0), good.double().mean(0)
    diffs = bad.double() - good_mean  # [n, L, d]
    units, values = [], []
    for layer in range(bad.shape[1]):
        vh, s = top_singular_vectors(diffs[:, layer], rank)
        units.append(orient(vh, bad_mean[layer] - good_mean[layer]))
        values.append(s.tolist())
    return _as_directions(
        torch.stack(units),
        bad_mean,
        good_mean,
        "svd",
        rank=rank,
        singular_values=values,
        n_bad=bad.shape[0],
        n_good=good.shape[0],
    )


def pca_pairs(
    bad: torch.Tensor, good: torch.Tensor, *, rank: int = 1, seed: int = 0, paired: bool = False
) -> Directions:
    """RepE reading vectors: centered PCA of pair differences ``±(bad_i − good_π(i))`` with random signs.

    Randomizing the order of each pair keeps the class axis as the top principal component (without it, centering
    removes the mean difference). Pairs: ``min(n_bad, n_good)`` random bad/good pairs, or with ``paired=True`` row
    ``i`` of ``bad`` with row ``i`` of ``good`` (stimuli recorded in pairs; equal row counts needed). Axes oriented
    towards the mean difference; rank 1 is scaled by the mean difference's projection on it (comparable with
    ``mean_difference``). ``meta['explained_variance_ratio']`` per layer. ``interventions.steering.reading_vector``
    is this with ``paired=True``.
    """
    _check_pair(bad, good)
    gen = torch.Generator().manual_seed(seed)
    if paired:
        if bad.shape[0] != good.shape[0]:
            raise ValueError(f"paired=True needs as many bad as good rows; got {bad.shape[0]} and {good.shape[0]}")
        n = bad.shape[0]
        bi = gi = torch.arange(n)
    else:
        n = min(bad.shape[0], good.shape[0])
        bi = torch.randperm(bad.shape[0], generator=gen)[:n]
        gi = torch.randperm(good.shape[0], generator=gen)[:n]
    signs = torch.randint(0, 2, (n,), generator=gen).double() * 2 - 1
    diffs = (bad.double()[bi] - good.double()[gi]) * signs[:, None, None]  # [n, L, d]
    bad_mean, good_mean = bad.double().mean(0), good.double().mean(0)
    units, ratios = [], []
    for layer in range(bad.shape[1]):
        x = diffs[:, layer]
        vh, s = top_singular_vectors(x, rank, center=True)
        total = (x - x.mean(0)).pow(2).sum().clamp_min(1e-30)
        units.append(orient(vh, bad_mean[layer] - good_mean[layer]))
        ratios.append((s**2 / total).tolist())
    return _as_directions(
        torch.stack(units),
        bad_mean,
        good_mean,
        "pca_pairs",
        rank=rank,
        seed=seed,
        explained_variance_ratio=ratios,
        n_pairs=n,
    )


def fit_linear_probe(x_train: np.ndarray, y_train: np.ndarray, *, C: float = 1.0) -> Pipeline:
    """The one linear-probe fit (standardize, then logistic regression) on ``x_train [n, d]``, labels ``[n]``.

    Returns the fitted scikit-learn pipeline (``.score(x, y)``); ``probe_weight(pipeline)`` gives its weight vector
    in residual coordinates. Used by ``probe_direction`` and ``measure.geometry.probe_accuracy``.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000)).fit(x_train, y_train)


def probe_weight(probe: Pipeline) -> np.ndarray:
    """The weight vector of a ``fit_linear_probe`` pipeline mapped back to residual coordinates (``w / σ``)."""
    scaler, clf = probe[0], probe[-1]
    return clf.coef_[0] / np.where(scaler.scale_ > 0, scaler.scale_, 1.0)


def probe_direction(
    bad: torch.Tensor,
    good: torch.Tensor,
    *,
    rank: int = 1,
    test_fraction: float = 0.25,
    C: float = 1.0,
    seed: int = 0,
    layers: list[int] | None = None,
) -> Directions:
    """Logistic-regression probe (bad = 1) per layer; the direction is the weight vector in residual coordinates.

    Features are standardized for fitting and the weights mapped back (``w / σ``). The unit weight vector is scaled
    by the mean difference projected on it. ``meta['probe_accuracy']``: held-out accuracy per layer (a stratified
    ``test_fraction`` split), ``meta['probe_train_accuracy']`` likewise; see ``probe_accuracy_frame``. ``layers``:
    fit only these residual indices (others get the normalized mean difference and accuracy NaN). Rank 1 only.

    Probes read well but intervene worse than the difference of means (they absorb the covariance, ≈ Σ⁻¹Δμ).
    """
    from sklearn.model_selection import train_test_split

    _check_pair(bad, good)
    _rank_one_only("probe", rank)
    n_res = bad.shape[1]
    chosen = list(range(n_res)) if layers is None else [i % n_res for i in layers]
    X = torch.cat([bad, good]).double().numpy()
    y = np.r_[np.ones(bad.shape[0]), np.zeros(good.shape[0])]
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=test_fraction, random_state=seed, stratify=y)
    bad_mean, good_mean = bad.double().mean(0), good.double().mean(0)
    diff = bad_mean - good_mean
    units = normalize(diff).clone()
    acc = [float("nan")] * n_res
    train_acc = [float("nan")] * n_res
    for layer in chosen:
        probe = fit_linear_probe(X[idx_train, layer], y[idx_train], C=C)
        units[layer] = normalize(torch.from_numpy(probe_weight(probe)))
        acc[layer] = float(probe.score(X[idx_test, layer], y[idx_test]))
        train_acc[layer] = float(probe.score(X[idx_train, layer], y[idx_train]))
    cos = (units * normalize(diff)).sum(-1)
    return Directions(
        _raw_from_unit(units, diff).float(),
        method="probe",
        good_mean=good_mean.float(),
        bad_mean=bad_mean.float(),
        meta={
            "probe_accuracy": acc,
            "probe_train_accuracy": train_acc,
            "C": C,
            "test_fraction": test_fraction,
            "seed": seed,
            "cos_to_mean_difference": cos.tolist(),
            "n_bad": bad.shape[0],
            "n_good": good.shape[0],
        },
    )


def probe_accuracy_frame(directions: Directions) -> pd.DataFrame:
    """``(layer, accuracy, train_accuracy, cos_to_mean_difference)`` from a ``probe_direction`` result."""
    meta = directions.meta
    if "probe_accuracy" not in meta:
        raise ValueError(f"{directions!r} has no probe accuracies; build it with probe_direction")
    n = len(meta["probe_accuracy"])
    return pd.DataFrame(
        {
            "layer": range(n),
            "accuracy": meta["probe_accuracy"],
            "train_accuracy": meta["probe_train_accuracy"],
            "cos_to_mean_difference": meta.get("cos_to_mean_difference", [float("nan")] * n),
        }
    )


class PoorClustersError(ValueError):
    """k-means found no real cluster structure (silhouette below the threshold); the message gives the numbers."""


def kmeans(X: torch.Tensor, k: int, *, seed: int = 0, n_init: int = 10) -> tuple[np.ndarray, float]:
    """k-means labels ``[n]`` of ``X [n, d]`` and their silhouette score (Euclidean)."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    x = X.double().numpy()
    if not 2 <= k < x.shape[0]:
        raise ValueError(f"k-means needs 2 ≤ k < n; got k={k} for {x.shape[0]} points")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "fewer distinct points than clusters" on degenerate data
        labels = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit_predict(x)
    if len(np.unique(labels)) < 2:  # all points (nearly) identical: no structure at all
        return labels, 0.0
    return labels, float(silhouette_score(x, labels))


def cluster_directions(
    bad: torch.Tensor,
    good: torch.Tensor,
    *,
    rank: int = 1,
    n_clusters: int | None = None,
    layer: int | None = None,
    min_silhouette: float = 0.1,
    on_poor: str = "raise",
    seed: int = 0,
) -> Directions:
    """Concept-cone directions: k-means on the bad residuals at residual index ``layer``, one direction per cluster.

    Cluster ``c``'s direction at every index ``l`` is ``mean(bad_l[c]) − mean(good_l)`` (the labels come from one
    layer, default ``round(0.6 L)``, and are kept for all layers). ``n_clusters`` defaults to ``max(rank, 2)``; the
    ``rank`` largest clusters are kept. Rank 1: that cluster's raw direction ``[L+1, d]``; rank k: an orthonormal
    basis of the k cluster directions (largest cluster first) ``[L+1, k, d]``.

    Poor clusters: when the silhouette is below ``min_silhouette`` the clusters are not real structure.
    ``on_poor="raise"`` (default) raises ``PoorClustersError``; ``"warn"`` returns the directions with
    ``meta['poor_silhouette'] = True`` and a ``UserWarning``. ``meta``: ``silhouette``, ``cluster_sizes``,
    ``cluster_layer``, ``cluster_cosines`` (pairwise cosines of the raw cluster directions at that layer).
    """
    _check_pair(bad, good)
    if on_poor not in ("raise", "warn"):
        raise ValueError(f"on_poor must be 'raise' or 'warn', not {on_poor!r}")
    k = n_clusters or max(rank, 2)
    if rank > k:
        raise ValueError(f"rank {rank} needs at least {rank} clusters; got n_clusters={k}")
    n_res = bad.shape[1]
    layer = round(0.6 * (n_res - 1)) if layer is None else layer % n_res
    labels, sil = kmeans(bad[:, layer], k, seed=seed)
    sizes = np.bincount(labels, minlength=k)
    order = np.argsort(-sizes, kind="stable")[:rank]
    good_mean, bad_mean = good.double().mean(0), bad.double().mean(0)
    raw = torch.stack(
        [bad.double()[torch.from_numpy(labels == c)].mean(0) - good_mean for c in order], dim=1
    )  # [L, rank, d]
    at = normalize(raw[layer])
    poor = sil < min_silhouette
    meta = {
        "silhouette": sil,
        "cluster_sizes": sizes[order].tolist(),
        "all_cluster_sizes": sizes.tolist(),
        "n_clusters": k,
        "cluster_layer": layer,
        "cluster_cosines": (at @ at.T).tolist(),
        "seed": seed,
        "poor_silhouette": bool(poor),
        "min_silhouette": min_silhouette,
    }
    if poor:
        message = (
            f"k-means with k={k} on the bad residuals at index {layer} has silhouette {sil:.3f} < {min_silhouette}: "
            "the clusters are not real structure, so per-cluster directions are not trustworthy. "
            "Try another layer or k, or pass on_poor='warn' to get them anyway (flagged in meta['poor_silhouette'])."
        )
        if on_poor == "raise":
            raise PoorClustersError(message)
        warnings.warn(message, UserWarning, stacklevel=2)
    vectors = raw[:, 0] if rank == 1 else _orthonormal_rows(raw)
    return Directions(
        vectors.float(), method="cluster", good_mean=good_mean.float(), bad_mean=bad_mean.float(), meta=meta
    )


DirectionMethod = Callable[..., Directions]

DIRECTION_METHODS: dict[str, DirectionMethod] = {
    "mean_difference": mean_difference_method,
    "projected": projected_method,
    "median": median_difference,
    "svd": svd_subspace,
    "pca_pairs": pca_pairs,
    "probe": probe_direction,
    "cluster": cluster_directions,
}


def compute_directions(
    method: str, bad: torch.Tensor, good: torch.Tensor, *, rank: int = 1, **kw: object
) -> Directions:
    """``DIRECTION_METHODS[method](bad, good, rank=rank, **kw)`` with a helpful error for unknown names."""
    if method not in DIRECTION_METHODS:
        raise KeyError(f"unknown direction method {method!r}; choose from {', '.join(DIRECTION_METHODS)}")
    return DIRECTION_METHODS[method](bad, good, rank=rank, **kw)
