"""Behaviour directions: one vector (or an orthonormal basis) per residual index.

Sign convention: a direction points from the *good* class (harmless, answered) to the *bad* class (harmful,
refused): ``r = mean(bad) − mean(good)``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, cast

import torch
from torch import nn


def normalize(v: torch.Tensor, dim: int = -1, eps: float = 1e-12) -> torch.Tensor:
    return v / v.norm(dim=dim, keepdim=True).clamp_min(eps)


def orthonormal_basis(vectors: torch.Tensor) -> torch.Tensor:
    """``vectors [k, d]`` (or ``[d]``) → ``Q [d, k]`` with orthonormal columns spanning them (float64 QR)."""
    vectors = vectors.reshape(-1, vectors.shape[-1]) if vectors.ndim == 1 else vectors
    q, r = torch.linalg.qr(vectors.double().T)
    # Fix signs so that each basis vector points like the input vector it came from.
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1
    return (q * signs).to(vectors.dtype if vectors.dtype.is_floating_point else torch.float32)


class Reversible(Protocol):
    """The shape of what ``Directions.ablate`` / ``.steer`` return: an ``interventions.Intervention`` (that layer is
    above this one, so its class is named here by its methods; mypy checks that the returned objects fit)."""

    active: bool

    def apply(self) -> Reversible: ...

    def revert(self) -> None: ...

    def __enter__(self) -> Reversible: ...

    def __exit__(self, *exc: object) -> None: ...


@dataclass
class Directions:
    """Per-residual-index behaviour directions.

    ``vectors``: ``[L+1, d]`` raw (unnormalized) directions, or ``[L+1, k, d]`` orthonormal bases for a rank-k
    subspace. ``good_mean`` / ``bad_mean``: ``[L+1, d]`` class means when known. ``meta``: method, settings.
    """

    vectors: torch.Tensor
    method: str = "mean_difference"
    good_mean: torch.Tensor | None = None
    bad_mean: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_residuals(self) -> int:
        return self.vectors.shape[0]

    @property
    def rank(self) -> int:
        return 1 if self.vectors.ndim == 2 else self.vectors.shape[1]

    @property
    def hidden_size(self) -> int:
        return self.vectors.shape[-1]

    def __len__(self) -> int:
        return self.n_residuals

    def __repr__(self) -> str:
        return f"Directions({self.method}, residuals={self.n_residuals}, rank={self.rank}, d={self.hidden_size})"

    def unit(self) -> torch.Tensor:
        """Unit vectors ``[L+1, d]`` (rank 1) or the bases ``[L+1, k, d]``."""
        return normalize(self.vectors) if self.rank == 1 else self.vectors

    def norms(self) -> torch.Tensor:
        return self.vectors.norm(dim=-1) if self.rank == 1 else torch.ones(self.n_residuals)

    def at(self, index: float) -> torch.Tensor:
        """The direction at a (possibly fractional) residual index.

        Rank 1: ``normalize(lerp(r̂_n, r̂_{n+1}, frac))`` of the unit vectors, exactly ``r̂_n`` at an integer.
        Rank k: the interpolated bases re-orthonormalized, ``[k, d]``.
        """
        n = self.n_residuals
        if not -n <= index <= n - 1:
            raise IndexError(f"direction index {index} is outside 0..{n - 1}")
        index = index + n if index < 0 else index
        low = int(index)
        frac = float(index) - low
        unit = self.unit()
        if frac == 0.0:
            return unit[low].clone()  # exact: the layer's own (unit) direction or basis
        vec = torch.lerp(unit[low].double(), unit[low + 1].double(), frac)
        if self.rank == 1:
            return normalize(vec).to(unit.dtype)
        return orthonormal_basis(vec).T.contiguous().to(unit.dtype)

    def layer(self, index: int) -> torch.Tensor:
        return self.at(index)

    def basis(self, index: float) -> torch.Tensor:
        """``Q [d, k]`` with orthonormal columns for the direction(s) at ``index``."""
        vec = self.at(index)
        return orthonormal_basis(vec)

    def ablate(
        self,
        model: nn.Module,
        strength: float | torch.Tensor | Mapping[str, float | torch.Tensor] = 1.0,
        *,
        at: float | None = None,
        hooks: bool = False,
        **kwargs: Any,
    ) -> Reversible:
        """A lazy ablation of these directions from ``model`` (an ``Intervention``: applied on ``with`` / ``.apply()``).

        ``at``: ablate the one direction ``self.at(at)`` everywhere (default: each residual its own direction).
        ``hooks=False``: weight orthogonalization, ``interventions.WeightAblation(model, d, strength, **kwargs)``
        (``components=``, ``norm=``, ``backup=``); ``hooks=True``: ``interventions.ablation_hooks(model, d,
        strength=strength, **kwargs)`` (``resid=`` / ``block=``, ``include_embedding=``). ``strength`` is the ablation
        kernel (a float; for weights also a ``kernels`` function), not a steering ``alpha``.
        """
        from ..interventions.edits import WeightAblation
        from ..interventions.steering import ablation_hooks

        direction = self if at is None else self.at(at)
        if hooks:
            return ablation_hooks(model, direction, strength=cast(float, strength), **kwargs)  # hooks: a float
        return WeightAblation(model, direction, strength, **kwargs)

    def steer(
        self,
        model: nn.Module,
        *,
        resid: int | Sequence[int] | None = None,
        block: int | Sequence[int] | None = None,
        alpha: float = 1.0,
        **kwargs: Any,
    ) -> Reversible:
        """A lazy activation addition ``h ← h + α r_k`` at ``resid=k`` (or ``block=b``'s output, ``k = b + 1``).

        Same as ``interventions.activation_addition(model, self, resid=, block=, alpha=, **kwargs)`` (``positions=``,
        ``prompt_length=``); residual ``k`` gets this object's raw vector ``vectors[k]`` (rank 1 only).
        """
        from ..interventions.steering import activation_addition

        return activation_addition(model, self, resid=resid, block=block, alpha=alpha, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "rank": self.rank, "n_residuals": self.n_residuals, **self.meta}

    def save(self, path: str | Path) -> Path:
        """Save with safetensors; metadata as JSON in the file header."""
        from safetensors.torch import save_file

        tensors = {"vectors": self.vectors.contiguous().float()}
        if self.good_mean is not None:
            tensors["good_mean"] = self.good_mean.contiguous().float()
        if self.bad_mean is not None:
            tensors["bad_mean"] = self.bad_mean.contiguous().float()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata={"method": self.method, "meta": json.dumps(self.meta, default=str)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> Directions:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return cls(
            tensors["vectors"],
            method=header.get("method", "unknown"),
            good_mean=tensors.get("good_mean"),
            bad_mean=tensors.get("bad_mean"),
            meta=json.loads(header.get("meta", "{}")),
        )

    def with_vectors(self, vectors: torch.Tensor, method: str, **meta: Any) -> Directions:
        return replace(self, vectors=vectors, method=method, meta={**self.meta, **meta})


def _check_pair(bad: torch.Tensor, good: torch.Tensor) -> None:
    if bad.ndim != 3 or good.ndim != 3:
        raise ValueError(f"expected residuals [prompt, layer, d]; got {tuple(bad.shape)} and {tuple(good.shape)}")
    if bad.shape[1:] != good.shape[1:]:
        raise ValueError(f"residual shapes differ beyond the prompt axis: {tuple(bad.shape)} vs {tuple(good.shape)}")


def project_out(vectors: torch.Tensor, against: torch.Tensor) -> torch.Tensor:
    """Remove from each ``vectors[i]`` its component along ``normalize(against[i])`` (both ``[n, d]``)."""
    a = normalize(against.double())
    v = vectors.double()
    return (v - (v * a).sum(-1, keepdim=True) * a).to(vectors.dtype)


def mean_difference(bad: torch.Tensor, good: torch.Tensor, *, project: bool = False) -> Directions:
    """Difference of class means per residual index: ``r_l = mean(bad_l) − mean(good_l)``.

    ``bad``, ``good``: ``[prompt, layer, d]``. ``project``: remove the component along the good (harmless) mean
    (Jim Lai's "projected" abliteration), since that part is confounded with general helpfulness.
    """
    _check_pair(bad, good)
    bad_mean = bad.double().mean(0)
    good_mean = good.double().mean(0)
    r = bad_mean - good_mean
    if project:
        r = project_out(r, good_mean)
    return Directions(
        r.float(),
        method="projected" if project else "mean_difference",
        good_mean=good_mean.float(),
        bad_mean=bad_mean.float(),
        meta={"n_bad": bad.shape[0], "n_good": good.shape[0]},
    )


def biprojected(directions: Directions, source: int) -> Directions:
    """The direction measured at residual ``source``, orthogonalized against each *target* layer's good mean."""
    if directions.good_mean is None:
        raise ValueError("biprojection needs the good-class means; build the directions with mean_difference")
    r = directions.vectors[source].expand_as(directions.good_mean)
    return directions.with_vectors(project_out(r, directions.good_mean), "biprojected", source=source)


def random_directions(like: Directions, seed: int = 0) -> Directions:
    """A control: random directions with the same shape and per-layer norms as ``like``."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(like.vectors.shape, generator=gen)
    if like.rank == 1:
        vectors = normalize(noise) * like.vectors.norm(dim=-1, keepdim=True)
    else:
        vectors = torch.stack([orthonormal_basis(n).T for n in noise])
    return like.with_vectors(vectors, f"random({like.method})", seed=seed)
