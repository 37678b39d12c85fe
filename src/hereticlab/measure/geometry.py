"""Residual geometry per layer: class means and geometric medians, cosines, norms, separability, and
layer-by-layer PaCMAP projections aligned for animation.

Conventions: residuals are ``[prompt, layer, d]`` (as ``capture_residuals`` returns; a ``[prompt, d]`` array is
one layer). ``good`` = harmless (label 0), ``bad`` = harmful (label 1); ``r = b − g`` points from good to bad.
Starred quantities use geometric medians (Weiszfeld) instead of means: ``g*``, ``b*``, ``r* = b* − g*``.
Everything is computed in float64 (numpy) from torch tensors or numpy arrays.
"""

from __future__ import annotations

import hashlib
import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import torch

from ..directions.methods import fit_linear_probe, geometric_median_batched

if TYPE_CHECKING:  # imported by the functions that build tables
    import pandas as pd
    from pandas.io.formats.style import Styler

GOOD, BAD = 0, 1

# Columns of ``geometry_table`` in display order.
COSINE_COLUMNS = ["S(g,b)", "S(g*,b*)", "S(g,r)", "S(g*,r*)", "S(b,r)", "S(b*,r*)"]
NORM_COLUMNS = ["|g|", "|g*|", "|b|", "|b*|", "|r|", "|r*|"]
SEPARATION_COLUMNS = ["silhouette", "snr", "purity", "quality", "S(r,r_prev)", "S(r*,r*_prev)", "probe_acc"]
TABLE_COLUMNS = COSINE_COLUMNS + NORM_COLUMNS + SEPARATION_COLUMNS

# What the functions below accept: a torch tensor (any device/dtype) or anything numpy.asarray takes.
Array = torch.Tensor | npt.ArrayLike


# ----------------------------------------------------------------------------------------------------------
# Pure math
# ----------------------------------------------------------------------------------------------------------


def as_numpy(x: Array, dtype: npt.DTypeLike = np.float64) -> np.ndarray:
    """A torch tensor or array-like → numpy array of ``dtype`` (on CPU)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if str(x.dtype) in ("torch.bfloat16", "torch.float16"):
            x = x.float()
        x = x.numpy()
    return np.asarray(x, dtype=dtype)


def as_residuals(x: Array) -> np.ndarray:
    """``[prompt, layer, d]`` float64; a ``[prompt, d]`` input becomes one layer."""
    a = as_numpy(x)
    if a.ndim == 2:
        a = a[:, None, :]
    if a.ndim != 3:
        raise ValueError(f"expected residuals [prompt, layer, d] or [prompt, d]; got shape {a.shape}")
    return a


def weiszfeld_median(points: Array, iters: int = 100, eps: float = 1e-8, tol: float = 1e-10) -> np.ndarray:
    """Geometric median over the first axis, batched over any middle axes: ``points [n, ..., d]`` → ``[..., d]``
    (float64 numpy; numpy or torch in).

    An alias kept for one release: the computation is ``directions.methods.geometric_median_batched`` (Weiszfeld
    with Vardi & Zhang's step, started at the mean), run with ``eps = min(eps, tol)``: it stops once no entry moves
    by more than that fraction of the data scale.
    """
    x = as_numpy(points)
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"expected points [n, ..., d] with n ≥ 1; got shape {x.shape}")
    flat = torch.from_numpy(np.ascontiguousarray(x.reshape(x.shape[0], -1, x.shape[-1])))
    median = geometric_median_batched(flat, iters=iters, eps=min(eps, tol))
    return median.numpy().reshape(x.shape[1:])


def cosine(a: Array, b: Array, eps: float = 1e-12) -> np.ndarray:
    """Row-wise cosine similarity of ``a, b [..., d]`` → ``[...]``; NaN where either vector is (near) zero."""
    a, b = as_numpy(a), as_numpy(b)
    na, nb = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (a * b).sum(-1) / (na * nb)
    return np.where((na > eps) & (nb > eps), out, np.nan)


def separation_quality(g: Array, b: Array, eps: float = 1e-12) -> dict[str, np.ndarray]:
    """The layer-quality heuristic ``SNR · (1 − cos(g, b)) · purity`` from class centres ``g, b [..., d]``.

    ``SNR = ‖r‖ / max(‖g‖, ‖b‖)``, ``purity = ‖r_⊥‖ / ‖r‖`` with ``r = b − g`` and ``r_⊥`` = r minus its
    component along ``ĝ``. Returns ``{"snr", "purity", "quality"}`` arrays of shape ``[...]`` (NaN when undefined).
    """
    g, b = as_numpy(g), as_numpy(b)
    r = b - g
    nr = np.linalg.norm(r, axis=-1)
    ng, nb = np.linalg.norm(g, axis=-1), np.linalg.norm(b, axis=-1)
    g_hat = g / np.maximum(ng, eps)[..., None]
    r_perp = r - (r * g_hat).sum(-1, keepdims=True) * g_hat
    with np.errstate(invalid="ignore", divide="ignore"):
        snr = np.where(np.maximum(ng, nb) > eps, nr / np.maximum(ng, nb), np.nan)
        purity = np.where(nr > eps, np.linalg.norm(r_perp, axis=-1) / nr, np.nan)
    quality = snr * (1.0 - cosine(g, b)) * purity
    return {"snr": snr, "purity": purity, "quality": quality}


def silhouette_per_layer(good: Array, bad: Array) -> np.ndarray:
    """Silhouette score (scikit-learn, Euclidean) of the good/bad labels at each layer → ``[layer]``.

    Near 1: two tight, well separated clusters; near 0: overlapping; NaN when a class has no points. Layers where
    every point is identical (e.g. the embedding of a shared last token) score 0.
    """
    from sklearn.metrics import silhouette_score

    good, bad = as_residuals(good), as_residuals(bad)
    labels = np.r_[np.zeros(len(good), int), np.ones(len(bad), int)]
    out = np.full(good.shape[1], np.nan)
    if len(good) < 1 or len(bad) < 1 or len(labels) < 3:
        return out
    for layer in range(good.shape[1]):
        X = np.concatenate([good[:, layer], bad[:, layer]])
        if np.ptp(X, axis=0).max(initial=0.0) == 0.0:
            out[layer] = 0.0
            continue
        out[layer] = silhouette_score(X, labels)
    return out


def split_indices(labels: np.ndarray, test_fraction: float = 0.25, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A fixed, stratified train/test split of ``labels [n]`` → ``(train_idx, test_idx)`` (same for every layer)."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for value in np.unique(labels):
        idx = np.flatnonzero(labels == value)
        rng.shuffle(idx)
        n_test = int(round(test_fraction * len(idx)))
        n_test = min(max(n_test, 1), len(idx) - 1) if len(idx) >= 2 else 0
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def probe_accuracy(
    good: Array, bad: Array, *, test_fraction: float = 0.25, seed: int = 0, C: float = 1.0
) -> np.ndarray:
    """Held-out accuracy of a linear probe (standardize + LogisticRegression) per layer → ``[layer]``.

    One fixed stratified split (``split_indices``) for every layer. NaN when a class has fewer than 2 points.
    """
    good, bad = as_residuals(good), as_residuals(bad)
    labels = np.r_[np.zeros(len(good), int), np.ones(len(bad), int)]
    out = np.full(good.shape[1], np.nan)
    if len(good) < 2 or len(bad) < 2:
        return out
    train, test = split_indices(labels, test_fraction, seed)
    for layer in range(good.shape[1]):
        X = np.concatenate([good[:, layer], bad[:, layer]])
        if np.ptp(X[train], axis=0).max(initial=0.0) == 0.0:
            out[layer] = float(np.mean(labels[test] == np.bincount(labels[train]).argmax()))
            continue
        probe = fit_linear_probe(X[train], labels[train], C=C)
        out[layer] = float(probe.score(X[test], labels[test]))
    return out


def _pair(function: str, args: tuple, bad, good):
    """The keyword-only contrastive pair; positional residuals raise a TypeError naming the new call."""
    if args:
        raise TypeError(
            f"{function} takes the contrastive pair as keywords: {function}(bad=..., good=...); "
            f"it no longer takes positional residuals (the old order was ({function}(good, bad)); "
            "bad before good everywhere, see ARCHITECTURE.md)"
        )
    if bad is None or good is None:
        raise TypeError(f"{function} needs both bad= and good= residuals [prompt, layer, d]")
    return bad, good


def geometry_table(
    *args: Any,
    bad: Array | None = None,
    good: Array | None = None,
    layers: Sequence[int] | None = None,
    median_iters: int = 100,
    probe: bool = True,
    test_fraction: float = 0.25,
    seed: int = 0,
    threads: int | None = 1,
) -> pd.DataFrame:
    """One row per layer describing the good/bad residual geometry (a pandas DataFrame, index ``layer``).

    ``bad=``, ``good=`` (keyword-only): residuals ``[prompt, layer, d]``. ``layers``: labels for the layer axis.
    Columns (``TABLE_COLUMNS``): cosines ``S(g,b) S(g*,b*) S(g,r) S(g*,r*) S(b,r) S(b*,r*)``; norms
    ``|g| |g*| |b| |b*| |r| |r*|``; ``silhouette`` of the labels; ``snr``, ``purity``, ``quality`` (the heuristic
    ``SNR · (1 − S(g,b)) · purity`` on the means); ``S(r,r_prev)`` / ``S(r*,r*_prev)``: cosine between this
    layer's direction and the previous row's (NaN on the first row); ``probe_acc``: held-out accuracy of a
    linear probe (NaN if ``probe=False``). Undefined cosines (a zero vector) are NaN. ``threads``: BLAS/OpenMP
    threads for the scikit-learn parts (threadpoolctl; one is fastest for a few hundred points and avoids
    spinning worker threads on a shared machine; ``None`` leaves the setting alone).
    """
    from contextlib import nullcontext

    from threadpoolctl import threadpool_limits

    bad, good = _pair("geometry_table", args, bad, good)
    with threadpool_limits(limits=threads) if threads is not None else nullcontext():
        return _geometry_table(good, bad, layers, median_iters, probe, test_fraction, seed)


def _geometry_table(good, bad, layers, median_iters, probe, test_fraction, seed):
    import pandas as pd

    good, bad = as_residuals(good), as_residuals(bad)
    if good.shape[1:] != bad.shape[1:]:
        raise ValueError(f"good and bad residuals differ beyond the prompt axis: {good.shape} vs {bad.shape}")
    n_layers = good.shape[1]
    layers = list(range(n_layers)) if layers is None else list(layers)
    if len(layers) != n_layers:
        raise ValueError(f"{len(layers)} layer labels for {n_layers} layers")
    g, b = good.mean(0), bad.mean(0)
    gs, bs = weiszfeld_median(good, median_iters), weiszfeld_median(bad, median_iters)
    r, rs = b - g, bs - gs
    norm = lambda v: np.linalg.norm(v, axis=-1)  # noqa: E731
    prev = lambda v: np.r_[np.nan, cosine(v[1:], v[:-1])]  # noqa: E731
    quality = separation_quality(g, b)
    data = {
        "S(g,b)": cosine(g, b),
        "S(g*,b*)": cosine(gs, bs),
        "S(g,r)": cosine(g, r),
        "S(g*,r*)": cosine(gs, rs),
        "S(b,r)": cosine(b, r),
        "S(b*,r*)": cosine(bs, rs),
        "|g|": norm(g),
        "|g*|": norm(gs),
        "|b|": norm(b),
        "|b*|": norm(bs),
        "|r|": norm(r),
        "|r*|": norm(rs),
        "silhouette": silhouette_per_layer(good, bad),
        **quality,
        "S(r,r_prev)": prev(r),
        "S(r*,r*_prev)": prev(rs),
        "probe_acc": probe_accuracy(good, bad, test_fraction=test_fraction, seed=seed)
        if probe
        else np.full(n_layers, np.nan),
    }
    df = pd.DataFrame(data, index=pd.Index(layers, name="layer"))[TABLE_COLUMNS]
    df.attrs.update(n_good=len(good), n_bad=len(bad), hidden_size=good.shape[2])
    return df


def style_geometry_table(df: pd.DataFrame, precision: int = 3) -> Styler:
    """A pandas ``Styler`` for ``geometry_table`` output: diverging gradients on cosines (−1..1), sequential ones
    on separation columns, bars on norms, NaN shown as "–". The DataFrame's values are untouched."""
    cos_cols = [c for c in df.columns if c.startswith("S(")]
    norm_cols = [c for c in df.columns if c.startswith("|")]
    sep_cols = [c for c in ("silhouette", "quality", "probe_acc") if c in df.columns]
    fmt = {c: f"{{:.{precision}f}}" for c in df.columns}
    fmt.update({c: "{:.1f}" for c in norm_cols})
    styler = df.style.format(fmt, na_rep="–")
    if cos_cols:
        styler = styler.background_gradient(cmap="RdBu_r", vmin=-1, vmax=1, subset=cos_cols)
    for col in sep_cols:
        if df[col].notna().any():
            styler = styler.background_gradient(cmap="viridis", subset=[col])
    if norm_cols:
        styler = styler.bar(subset=norm_cols, color="#c7d7ec")
    return styler


# ----------------------------------------------------------------------------------------------------------
# Aligned 2-D projections
# ----------------------------------------------------------------------------------------------------------


def rotation_to_horizontal(good_2d: Array, bad_2d: Array) -> tuple[np.ndarray, np.ndarray]:
    """Rotation ``R [2, 2]`` and centre ``c [2]`` so that ``(x − c) @ R.T`` puts the good class's 2-D geometric
    median on the negative x-axis and the bad one's on the positive x-axis (the midpoint at the origin).

    Identity when the medians coincide."""
    mg, mb = weiszfeld_median(good_2d), weiszfeld_median(bad_2d)
    v = mb - mg
    centre = (mg + mb) / 2
    if np.linalg.norm(v) <= 1e-12 * (1 + np.abs(np.r_[mg, mb]).max()):
        return np.eye(2), centre
    angle = np.arctan2(v[1], v[0])
    c, s = np.cos(-angle), np.sin(-angle)
    return np.array([[c, -s], [s, c]]), centre


def align_embedding(coords: Array, labels: npt.ArrayLike, normalize: bool = True) -> np.ndarray:
    """Rotate/centre ``coords [n, 2]`` with ``rotation_to_horizontal`` (good = label 0 on the left); with
    ``normalize`` also scale to unit RMS distance from the centre (PaCMAP's scale is arbitrary)."""
    coords, labels = as_numpy(coords), np.asarray(labels)
    if not (labels == GOOD).any() or not (labels == BAD).any():
        out = coords - coords.mean(0)
    else:
        R, centre = rotation_to_horizontal(coords[labels == GOOD], coords[labels == BAD])
        out = (coords - centre) @ R.T
    if normalize:
        rms = np.sqrt((out**2).sum(1).mean())
        if rms > 1e-12:
            out = out / rms
    return out


def effective_neighbors(n: int, n_neighbors: int, MN_ratio: float = 0.5, FP_ratio: float = 2.0) -> int:
    """The largest ``k ≤ n_neighbors`` with ``k + round(k·MN) + round(k·FP) < n`` and at least one far pair
    (PaCMAP's requirement); 0 means the set is too small for PaCMAP (fall back to PCA)."""
    for k in range(min(n_neighbors, n - 1), 0, -1):
        n_fp = int(round(k * FP_ratio))
        if k + int(round(k * MN_ratio)) + n_fp < n and n_fp >= 1:
            return k
    return 0


def _pca_2d(X: np.ndarray) -> np.ndarray:
    Xc = X - X.mean(0)
    u, s, _ = np.linalg.svd(Xc, full_matrices=False)
    out = np.zeros((len(X), 2))
    k = min(2, len(s))
    out[:, :k] = u[:, :k] * s[:k]
    return out


def _set_numba_threads(n: int | None) -> int | None:
    """Set numba's thread count (clamped to what it was started with); returns the previous value."""
    if n is None:
        return None
    try:
        import numba

        previous = numba.get_num_threads()
        limit = numba.config.NUMBA_NUM_THREADS  # type: ignore[attr-defined]  # set when numba.config loads
        numba.set_num_threads(max(1, min(int(n), limit)))
        return previous
    except Exception:  # pragma: no cover - numba missing or too old
        return None


def _fit_layer(
    X: np.ndarray,
    init,
    *,
    n_neighbors: int,
    MN_ratio: float,
    FP_ratio: float,
    seed: int,
    num_iters,
    numba_threads: int | None = 1,
) -> np.ndarray:
    """One PaCMAP fit of ``X [n, d]`` → ``[n, 2]`` (PCA for sets too small for PaCMAP; zeros if all points coincide).

    ``numba_threads``: thread count for numba (PaCMAP's gradient loop is a ``prange``) and for BLAS/OpenMP
    (threadpoolctl; PaCMAP's TruncatedSVD, faiss) during the fit, restored afterwards. For a few hundred points
    one thread is far faster than several: spinning worker threads made one 100-point fit take 5–18 s on a
    busy 2-core machine instead of ~0.1 s. ``None`` leaves the thread settings alone.
    """
    n = len(X)
    if n == 0 or np.ptp(X, axis=0).max(initial=0.0) <= 1e-12 * (1 + np.abs(X).max(initial=0.0)):
        return np.zeros((n, 2))
    k = effective_neighbors(n, n_neighbors, MN_ratio, FP_ratio)
    if k < 1:
        return _pca_2d(X)
    import pacmap

    logger = logging.getLogger(pacmap.pacmap.__name__) if hasattr(pacmap, "pacmap") else logging.getLogger("pacmap")
    level = logger.level
    logger.setLevel(logging.ERROR)  # silence "random state is set" and pair-count warnings
    threads = _set_numba_threads(numba_threads)
    try:
        from contextlib import nullcontext

        from threadpoolctl import threadpool_limits

        limit = threadpool_limits(limits=numba_threads) if numba_threads is not None else nullcontext()
        with limit, warnings.catch_warnings():
            warnings.simplefilter(
                "ignore", RuntimeWarning
            )  # "mean of empty slice" when a tiny set has no mid-near pairs
            reducer = pacmap.PaCMAP(
                n_components=2,
                n_neighbors=k,
                MN_ratio=MN_ratio,
                FP_ratio=FP_ratio,
                random_state=seed,
                num_iters=num_iters,
            )
            Y = reducer.fit_transform(X.astype(np.float32), init=init)
    finally:
        logger.setLevel(level)
        _set_numba_threads(threads)
    Y = np.asarray(Y, dtype=np.float64)
    if not np.isfinite(Y).all():
        return _pca_2d(X)
    return Y


@dataclass
class Projection:
    """Aligned 2-D embeddings of both classes for every layer.

    ``coords [layer, n, 2]``: rows ``0..n_good−1`` are the good prompts, then the bad ones. ``labels [n]``: 0 good,
    1 bad. ``layers``: the layer labels. ``key``: hash of inputs and settings (the cache key). ``prompts``:
    optional texts for each point. ``seconds``: fitting time (0 when it came from the cache).
    """

    coords: np.ndarray
    labels: np.ndarray
    layers: list[int]
    key: str = ""
    prompts: list[str] | None = None
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def n_good(self) -> int:
        return int((self.labels == GOOD).sum())

    @property
    def n_bad(self) -> int:
        return int((self.labels == BAD).sum())

    def __len__(self) -> int:
        return len(self.layers)

    def __repr__(self) -> str:
        return f"Projection(layers={len(self.layers)}, good={self.n_good}, bad={self.n_bad}, key={self.key[:10]})"

    def index(self, layer: int) -> int:
        """Position of layer label ``layer`` on the layer axis."""
        return self.layers.index(layer)

    def at(self, layer: int) -> np.ndarray:
        """``[n, 2]`` coordinates at layer label ``layer``."""
        return self.coords[self.index(layer)]

    def centres(self, layer: int, kind: str = "median") -> np.ndarray:
        """2-D class centres ``[2 (good, bad), 2]`` at ``layer``: ``"median"`` (geometric) or ``"mean"``."""
        xy = self.at(layer)
        f = weiszfeld_median if kind == "median" else (lambda p: p.mean(0))
        return np.stack([f(xy[self.labels == GOOD]), f(xy[self.labels == BAD])])

    def nearest(self, layer: int, x: float, y: float, k: int = 5) -> np.ndarray:
        """Indices of the ``k`` points nearest to ``(x, y)`` at ``layer``, closest first."""
        d = np.linalg.norm(self.at(layer) - np.array([x, y]), axis=1)
        return np.argsort(d, kind="stable")[:k]

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, coords=self.coords, labels=self.labels, layers=np.asarray(self.layers), key=self.key)
        return path

    @classmethod
    def load(cls, path: str | Path, prompts: list[str] | None = None) -> Projection:
        with np.load(path) as f:
            return cls(f["coords"], f["labels"], [int(v) for v in f["layers"]], key=str(f["key"]), prompts=prompts)


_CACHE: dict[str, Projection] = {}


def clear_projection_cache() -> None:
    """Forget every in-memory projection."""
    _CACHE.clear()


def projection_key(good: np.ndarray, bad: np.ndarray, settings: dict, reference: Projection | None = None) -> str:
    """SHA-1 of both arrays (shape, dtype, bytes), the settings and the reference projection's key."""
    h = hashlib.sha1()
    for a in (good, bad):
        a = np.ascontiguousarray(a, dtype=np.float32)
        h.update(repr(a.shape).encode())
        h.update(a.tobytes())
    h.update(repr(sorted(settings.items())).encode())
    if reference is not None:
        h.update(reference.key.encode())
    try:
        from importlib.metadata import version

        h.update(version("pacmap").encode())
    except Exception:  # pragma: no cover - metadata missing
        pass
    return h.hexdigest()


def project_layers(
    *args: Any,
    bad: Array | None = None,
    good: Array | None = None,
    layers: Sequence[int] | None = None,
    prompts: Sequence[str] | None = None,
    n_neighbors: int = 10,
    MN_ratio: float = 0.5,
    FP_ratio: float = 2.0,
    num_iters: int | tuple[int, int, int] = (100, 100, 250),
    seed: int = 0,
    normalize: bool = True,
    reference: Projection | None = None,
    cache: bool = True,
    cache_dir: str | Path | None = None,
    progress: bool = False,
    numba_threads: int | None = 1,
) -> Projection:
    """PaCMAP embeddings of both classes for every layer, aligned for reading across layers.

    ``bad=``, ``good=`` (keyword-only): residuals ``[prompt, layer, d]``. The first layer starts from PaCMAP's PCA
    init, each later one from the previous layer's (aligned) embedding, so consecutive pictures stay similar. Each
    layer is then rotated so the line between the two classes' 2-D geometric medians is horizontal with the good
    (harmless) class on the left, centred, and (``normalize``) scaled to unit RMS radius. Layers whose points all
    coincide map to the origin; sets too small for PaCMAP (``effective_neighbors`` = 0) use PCA.

    ``reference``: another ``Projection`` of the *same prompts* (e.g. the unedited model's); each layer then starts
    from the reference's embedding of that layer, which keeps before/after pictures comparable point by point.
    ``layers``: labels for the layer axis. ``prompts``: texts for the points (good then bad), kept for widgets.
    Results are cached in memory by a hash of inputs and settings, and on disk under ``cache_dir`` if given.
    """
    bad, good = _pair("project_layers", args, bad, good)
    good, bad = as_residuals(good), as_residuals(bad)
    if good.shape[1:] != bad.shape[1:]:
        raise ValueError(f"good and bad residuals differ beyond the prompt axis: {good.shape} vs {bad.shape}")
    n_layers = good.shape[1]
    layers = list(range(n_layers)) if layers is None else [int(v) for v in layers]
    if len(layers) != n_layers:
        raise ValueError(f"{len(layers)} layer labels for {n_layers} layers")
    labels = np.r_[np.full(len(good), GOOD), np.full(len(bad), BAD)]
    if reference is not None and (len(reference.labels) != len(labels) or reference.coords.shape[0] != n_layers):
        raise ValueError("the reference projection must cover the same number of points and layers")
    prompts = list(prompts) if prompts is not None else None
    if prompts is not None and len(prompts) != len(labels):
        raise ValueError(f"{len(prompts)} prompts for {len(labels)} points (give good prompts, then bad ones)")
    settings = dict(
        n_neighbors=n_neighbors,
        MN_ratio=MN_ratio,
        FP_ratio=FP_ratio,
        num_iters=num_iters,
        seed=seed,
        normalize=normalize,
        layers=tuple(layers),
    )
    key = projection_key(good, bad, settings, reference)
    if cache and key in _CACHE:
        hit = _CACHE[key]
        return Projection(hit.coords, hit.labels, hit.layers, key, prompts or hit.prompts, hit.settings, 0.0)
    disk = Path(cache_dir) / f"projection-{key[:20]}.npz" if cache_dir is not None else None
    if cache and disk is not None and disk.exists():
        proj = Projection.load(disk, prompts)
        proj.settings = settings
        _CACHE[key] = proj
        return proj

    start = time.perf_counter()
    coords = np.zeros((n_layers, len(labels), 2))
    previous = None
    iterator = range(n_layers)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="pacmap", leave=False)
    for i in iterator:
        X = np.concatenate([good[:, i], bad[:, i]])
        init = reference.coords[i] if reference is not None else previous
        if init is None or np.ptp(init, axis=0).min() <= 1e-12:
            init = "pca"
        Y = _fit_layer(
            X,
            init,
            n_neighbors=n_neighbors,
            MN_ratio=MN_ratio,
            FP_ratio=FP_ratio,
            seed=seed,
            num_iters=num_iters,
            numba_threads=numba_threads,
        )
        coords[i] = align_embedding(Y, labels, normalize)
        previous = coords[i]
    proj = Projection(coords, labels, layers, key, prompts, settings, time.perf_counter() - start)
    if cache:
        _CACHE[key] = proj
        if disk is not None:
            proj.save(disk)
    return proj


def interpolate_frames(coords: Array, steps: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Transition frames between consecutive layers for an animation.

    ``coords [layer, n, 2]`` → ``(frames [F, n, 2], position [F])`` with ``steps`` frames per transition (linear
    interpolation with smoothstep easing), ``F = (layer − 1)·steps + 1``; ``position`` is the fractional layer
    index of each frame (integers land exactly on the layers' own embeddings).
    """
    coords = as_numpy(coords)
    steps = max(1, int(steps))
    frames, position = [], []
    for i in range(len(coords) - 1):
        for s in range(steps):
            t = s / steps
            e = t * t * (3 - 2 * t)
            frames.append((1 - e) * coords[i] + e * coords[i + 1])
            position.append(i + t)
    frames.append(coords[-1])
    position.append(float(len(coords) - 1))
    return np.stack(frames), np.asarray(position)
