"""Per-layer strength profiles ("kernels"): one weight per decoder block, ``Tensor[L]``."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def tent_kernel(
    n_layers: int, peak: float, max_weight: float, min_weight: float = 0.0, reach: float = 1.0
) -> torch.Tensor:
    """Heretic's layer kernel: ``max_weight`` at ``peak``, falling linearly to ``min_weight`` at distance
    ``reach``, zero beyond. ``λ_l = w_max + (|l − peak| / reach)(w_min − w_max)`` for ``|l − peak| ≤ reach``.
    """
    if reach <= 0:
        raise ValueError(f"reach must be positive, got {reach}")
    layers = torch.arange(n_layers, dtype=torch.float64)
    dist = (layers - peak).abs()
    weights = max_weight + (dist / reach) * (min_weight - max_weight)
    return torch.where(dist <= reach, weights, torch.zeros_like(weights)).float()


def constant_kernel(n_layers: int, weight: float = 1.0, layers: Iterable[int] | None = None) -> torch.Tensor:
    """``weight`` on ``layers`` (default: every block), zero elsewhere."""
    out = torch.zeros(n_layers)
    index = slice(None) if layers is None else torch.as_tensor(list(layers), dtype=torch.long)
    out[index] = weight
    return out


def gaussian_kernel(n_layers: int, peak: float, max_weight: float, width: float, cutoff: float = 0.0) -> torch.Tensor:
    """A smooth bump ``max_weight · exp(−(l − peak)² / 2 width²)``; values below ``cutoff`` are set to zero."""
    layers = torch.arange(n_layers, dtype=torch.float64)
    weights = max_weight * torch.exp(-((layers - peak) ** 2) / (2 * width**2))
    return torch.where(weights.abs() >= cutoff, weights, torch.zeros_like(weights)).float()


KERNELS = {"tent": tent_kernel, "constant": constant_kernel, "gaussian": gaussian_kernel}
