"""Conceptors (Jaeger 2014; Postmus & Abreu 2024, arXiv 2410.16314): soft projection matrices for steering.

A conceptor of activations ``X [n, d]`` at one residual index is ``C = R (R + α⁻² I)⁻¹`` with the correlation
matrix ``R = Xᵀ X / n`` (the papers' ``X Xᵀ / n`` with samples as columns) and aperture ``α``. It shares
``R``'s eigenvectors; its eigenvalues are ``s = λ / (λ + α⁻²) ∈ [0, 1)``. Steering replaces the residual
``h ← β C h`` (``conceptor_steering``). Boolean algebra: ``¬C = I − C``; ``C ∧ B = (C⁻¹ + B⁻¹ − I)⁻¹`` with
pseudo-inverses, restricted to the intersection of the ranges (Jaeger's definition, which also covers
singular conceptors); ``C ∨ B = ¬(¬C ∧ ¬B)``.

Everything is kept in eigen form (``U [d, d]`` orthonormal columns, ``s [d]``) in float64, so NOT is exact
in the eigenbasis and AND/OR only need one symmetric inverse on a well-conditioned subspace.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from torch import nn

from ..core.hooks import resolve_site
from .base import HookIntervention
from .steering import Positions, _steering_residuals, residual_input_hooks

DEFAULT_TOL = 1e-9  # eigenvalues below this count as zero (null space) in AND / OR


@dataclass
class Conceptor:
    """``C = U diag(s) Uᵀ`` (float64). ``U [d, d]``: orthonormal eigenvectors (columns); ``s [d]``: eigenvalues.

    ``aperture``: the α it was computed with (``None`` for results of Boolean operations). ``mean``: the
    activations' mean ``[d]`` when the conceptor was built from centred data (``center=True``).
    """

    U: torch.Tensor
    s: torch.Tensor
    aperture: float | None = None
    mean: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return self.s.shape[0]

    @property
    def matrix(self) -> torch.Tensor:
        """``C [d, d]`` (float64)."""
        return (self.U * self.s) @ self.U.T

    @property
    def quota(self) -> float:
        """Mean eigenvalue: the share of the space the conceptor lets through (0 … 1)."""
        return float(self.s.mean())

    def __repr__(self) -> str:
        return f"Conceptor(d={self.dim}, aperture={self.aperture}, quota={self.quota:.3f})"

    def __invert__(self) -> Conceptor:
        return NOT(self)

    def __and__(self, other: Conceptor) -> Conceptor:
        return AND(self, other)

    def __or__(self, other: Conceptor) -> Conceptor:
        return OR(self, other)

    def apply(self, h: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
        """``β C h`` along the last axis of ``h [..., d]`` (with a mean: ``μ + β C (h − μ)``), in ``h``'s dtype."""
        work = torch.promote_types(h.dtype, torch.float32)
        u = self.U.to(device=h.device, dtype=work)
        s = self.s.to(device=h.device, dtype=work)
        x = h.to(work)
        if self.mean is not None:
            mu = self.mean.to(device=h.device, dtype=work)
            return (mu + beta * (((x - mu) @ u) * s) @ u.T).to(h.dtype)
        return (beta * ((x @ u) * s) @ u.T).to(h.dtype)

    def with_aperture(self, aperture: float) -> Conceptor:
        """The conceptor of the same correlation matrix at another aperture (needs ``meta['eigenvalues']``)."""
        lam = self.meta.get("eigenvalues")
        if lam is None:
            raise ValueError(
                "this conceptor does not carry its correlation eigenvalues; build it with compute_conceptor"
            )
        return Conceptor(self.U, eigen_to_conceptor(lam, aperture), aperture, self.mean, dict(self.meta))


def identity_conceptor(d: int) -> Conceptor:
    """``C = I`` (every eigenvalue 1)."""
    return Conceptor(torch.eye(d, dtype=torch.float64), torch.ones(d, dtype=torch.float64), float("inf"))


def from_matrix(matrix: torch.Tensor, **kwargs: Any) -> Conceptor:
    """Eigen form of a symmetric ``[d, d]`` matrix (symmetrized first)."""
    m = matrix.double()
    s, U = torch.linalg.eigh((m + m.T) / 2)
    return Conceptor(U, s, **kwargs)


def correlation_matrix(X: torch.Tensor) -> torch.Tensor:
    """``R = Xᵀ X / n`` for ``X [n, d]`` (float64)."""
    X = X.double()
    return X.T @ X / X.shape[0]


def eigen_to_conceptor(lam: torch.Tensor, aperture: float) -> torch.Tensor:
    """``s = λ / (λ + α⁻²)`` with negative round-off in ``λ`` clipped to 0."""
    lam = lam.double().clamp_min(0)
    return lam / (lam + aperture**-2)


def compute_conceptor(X: torch.Tensor, aperture: float = 10.0, *, center: bool = False) -> Conceptor:
    """Conceptor of activations ``X [n, d]``: ``C = R (R + α⁻² I)⁻¹`` via ``R``'s eigendecomposition.

    ``center``: subtract the mean first (steering then acts on the deviation from it; ``apply`` adds it back).
    """
    if X.ndim != 2:
        raise ValueError(f"expected activations [n, d] at one layer; got shape {tuple(X.shape)}")
    X = X.double()
    mean = X.mean(0) if center else None
    R = correlation_matrix(X if mean is None else X - mean)
    lam, U = torch.linalg.eigh(R)
    lam = lam.clamp_min(0)
    return Conceptor(
        U, eigen_to_conceptor(lam, aperture), aperture, mean, {"eigenvalues": lam, "n": X.shape[0], "centered": center}
    )


def NOT(c: Conceptor) -> Conceptor:
    """``¬C = I − C``: same eigenvectors, eigenvalues ``1 − s``."""
    return Conceptor(c.U, 1.0 - c.s, None, c.mean, {"op": "not"})


def _range_basis(c: Conceptor, tol: float) -> tuple[torch.Tensor, torch.Tensor]:
    keep = c.s > tol
    return c.U[:, keep], c.s[keep]


def _null_basis(c: Conceptor, tol: float) -> torch.Tensor:
    return c.U[:, c.s <= tol]


def AND(c: Conceptor, b: Conceptor, *, tol: float = DEFAULT_TOL) -> Conceptor:
    """``C ∧ B = P (Pᵀ (C† + B† − I) P)⁻¹ Pᵀ`` with ``P`` an orthonormal basis of ``range(C) ∩ range(B)``.

    For invertible ``C``, ``B`` this is ``(C⁻¹ + B⁻¹ − I)⁻¹``. ``range(C) ∩ range(B)`` is the orthogonal
    complement of ``null(C) + null(B)`` (eigenvalues ``≤ tol`` count as null). The pseudo-inverses are taken
    in each conceptor's own eigenbasis (``U diag(1/s) Uᵀ`` on its range), never by inverting a near-singular
    matrix, and the only inverse left is that of the symmetric, ``≥ I``-bounded ``Pᵀ(C† + B† − I)P``.
    """
    d = c.dim
    if b.dim != d:
        raise ValueError(f"conceptors of different sizes: {d} and {b.dim}")
    nulls = torch.cat([_null_basis(c, tol), _null_basis(b, tol)], dim=1)
    if nulls.shape[1] == 0:
        P = torch.eye(d, dtype=torch.float64)
    else:
        u, sv, _ = torch.linalg.svd(nulls, full_matrices=True)
        rank = int((sv > 1e-10).sum())
        P = u[:, rank:]
    if P.shape[1] == 0:
        return Conceptor(
            torch.eye(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64), None, None, {"op": "and"}
        )
    Uc, sc = _range_basis(c, tol)
    Ub, sb = _range_basis(b, tol)
    Pc, Pb = P.T @ Uc, P.T @ Ub  # coordinates of the eigenvectors in the subspace
    M = (Pc / sc) @ Pc.T + (Pb / sb) @ Pb.T - torch.eye(P.shape[1], dtype=torch.float64)
    m_vals, m_vecs = torch.linalg.eigh((M + M.T) / 2)
    # Pᵀ(C† + B† − I)P ⪰ I on the intersection, so its eigenvalues are ≥ 1 up to round-off.
    inv_vals = 1.0 / m_vals.clamp_min(1e-12)
    U_in = P @ m_vecs  # eigenvectors of the result inside the intersection
    # Complete the basis with the orthogonal complement (eigenvalue 0).
    if P.shape[1] < d:
        u, _, _ = torch.linalg.svd(P, full_matrices=True)
        U = torch.cat([U_in, u[:, P.shape[1] :]], dim=1)
        s = torch.cat([inv_vals, torch.zeros(d - P.shape[1], dtype=torch.float64)])
    else:
        U, s = U_in, inv_vals
    return Conceptor(U, s, None, None, {"op": "and"})


def OR(c: Conceptor, b: Conceptor, *, tol: float = DEFAULT_TOL) -> Conceptor:
    """``C ∨ B = ¬(¬C ∧ ¬B)`` (De Morgan)."""
    result = NOT(AND(NOT(c), NOT(b), tol=tol))
    result.meta = {"op": "or"}
    return result


def aperture_sweep(X: torch.Tensor, apertures: Sequence[float], *, center: bool = False) -> pd.DataFrame:
    """Conceptor statistics over apertures from one eigendecomposition: quota, largest / median eigenvalue,
    effective rank ``Σ s``, and the fraction of ``X``'s energy that ``C`` keeps (``‖C X‖² / ‖X‖²``)."""
    base = compute_conceptor(X, 1.0, center=center)
    lam = base.meta["eigenvalues"]
    Xc = X.double() if base.mean is None else X.double() - base.mean  # base.mean is set exactly when center
    coords = Xc @ base.U  # [n, d] in the eigenbasis
    energy = (coords**2).sum()
    rows = []
    for a in apertures:
        s = eigen_to_conceptor(lam, a)
        rows.append(
            {
                "aperture": float(a),
                "quota": float(s.mean()),
                "max_eig": float(s.max()),
                "median_eig": float(s.median()),
                "effective_rank": float(s.sum()),
                "energy_kept": float(((coords * s) ** 2).sum() / energy.clamp_min(1e-30)),
            }
        )
    return pd.DataFrame(rows)


class ConceptorSteering(HookIntervention):
    """Lazy conceptor steering (see ``conceptor_steering``): ``h ← β C_k h`` at residual ``k`` for each ``k`` of
    ``table``."""

    def __init__(
        self,
        model: nn.Module,
        table: dict[int, Conceptor],
        *,
        beta: float = 1.0,
        positions: Positions = "all",
        prompt_length: int | Sequence[int] | torch.Tensor | None = None,
    ) -> None:
        self.model, self.table, self.beta = model, dict(table), beta
        self.positions, self.prompt_length = positions, prompt_length

        def transform(index: int, hidden: torch.Tensor) -> torch.Tensor:
            return self.table[index].apply(hidden, beta)

        super().__init__(
            lambda: residual_input_hooks(
                model, sorted(self.table), transform, positions=positions, prompt_length=prompt_length
            )
        )


def conceptor_steering(
    model: nn.Module,
    conceptor: Conceptor | dict[int, Conceptor],
    *,
    resid: int | Sequence[int] | None = None,
    block: int | Sequence[int] | None = None,
    beta: float = 1.0,
    positions: Positions = "all",
    prompt_length: int | Sequence[int] | torch.Tensor | None = None,
    layer: int | Sequence[int] | None = None,
) -> ConceptorSteering:
    """``h ← β C h`` at site(s) ``resid=`` / ``block=`` (``block=b`` is block ``b``'s output, ``resid=b + 1``).

    ``conceptor``: one ``Conceptor`` (used at every site) or ``{k: Conceptor}`` keyed by residual index (``resid``
    rule: ``0..L``, ``-1`` = ``L``; then no site keyword is needed). ``beta`` scales the conceptor's output (not a
    steering ``alpha``; the aperture is set on the conceptor, ``with_aperture``). ``positions`` / ``prompt_length``
    as in ``activation_addition``. With ``C = I`` and ``β = 1`` every activation is unchanged. Lazy: returns a
    ``ConceptorSteering`` applied on ``with`` / ``.apply()``.

    ``layer=l`` (0.1, deprecated): the input of block ``l`` = ``resid=l``; ``layer=-1`` is ``resid=L - 1``.
    """
    if isinstance(conceptor, dict):
        if resid is not None or block is not None or layer is not None:
            raise TypeError("a {residual: Conceptor} table carries its own sites; pass no resid=/block=/layer=")
        table = {resolve_site(model, resid=k).index: c for k, c in conceptor.items()}
    else:
        residuals = _steering_residuals(model, "conceptor_steering", resid, block, layer)
        table = {k: conceptor for k in residuals}
    return ConceptorSteering(model, table, beta=beta, positions=positions, prompt_length=prompt_length)
