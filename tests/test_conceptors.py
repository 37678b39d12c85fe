"""Conceptors: construction, Boolean algebra, steering hook."""

import pytest
import torch

import hereticlab as hl
from hereticlab import conceptors as cp

from conftest import PROMPTS


def logits(model, tok):
    batch = hl.encode(tok, hl.format_chat(tok, PROMPTS), torch.device("cpu"))
    with torch.no_grad():
        return model(**batch, use_cache=False).logits


def data(n=60, d=12, seed=0, rank=None):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, rank or d, generator=gen)
    mix = torch.randn(rank or d, d, generator=gen)
    return x @ mix


def test_conceptor_formula_and_eigenvalue_range():
    X = data()
    C = cp.compute_conceptor(X, aperture=2.0)
    R = X.double().T @ X.double() / X.shape[0]
    direct = R @ torch.linalg.inv(R + 2.0 ** -2 * torch.eye(12, dtype=torch.float64))
    assert torch.allclose(C.matrix, direct, atol=1e-10)
    assert (C.s >= 0).all() and (C.s < 1).all()
    singular = cp.compute_conceptor(data(n=5, rank=3), aperture=100.0)
    assert (singular.s >= 0).all() and (singular.s < 1).all()
    assert int((singular.s > 1e-6).sum()) == 3


def test_not_not_is_identity_and_and_with_identity():
    C = cp.compute_conceptor(data(), aperture=1.5)
    assert torch.allclose(cp.NOT(cp.NOT(C)).matrix, C.matrix, atol=1e-12)
    assert torch.allclose((~C).matrix, torch.eye(12, dtype=torch.float64) - C.matrix, atol=1e-12)
    I = cp.identity_conceptor(12)
    assert torch.allclose(cp.AND(C, I).matrix, C.matrix, atol=1e-10)
    assert torch.allclose(cp.AND(I, C).matrix, C.matrix, atol=1e-10)
    low = cp.compute_conceptor(data(n=4, rank=2), aperture=3.0)  # singular: AND restricted to its range
    assert torch.allclose(cp.AND(low, I).matrix, low.matrix, atol=1e-10)


def test_and_or_match_closed_forms_for_invertible_conceptors():
    C = cp.compute_conceptor(data(seed=1), aperture=1.0)
    B = cp.compute_conceptor(data(seed=2), aperture=0.7)
    eye = torch.eye(12, dtype=torch.float64)
    inv = torch.linalg.inv
    assert torch.allclose((C & B).matrix, inv(inv(C.matrix) + inv(B.matrix) - eye), atol=1e-9)
    or_direct = eye - inv(inv(eye - C.matrix) + inv(eye - B.matrix) - eye)
    assert torch.allclose((C | B).matrix, or_direct, atol=1e-9)
    # AND shrinks, OR grows (Loewner order): C∧B ⪯ C ⪯ C∨B
    assert torch.linalg.eigvalsh(C.matrix - (C & B).matrix).min() > -1e-9
    assert torch.linalg.eigvalsh((C | B).matrix - C.matrix).min() > -1e-9


def test_and_of_disjoint_subspaces_is_zero():
    e = torch.eye(6, dtype=torch.float64)
    A = cp.Conceptor(e, torch.tensor([0.9, 0.8, 0, 0, 0, 0], dtype=torch.float64))
    B = cp.Conceptor(e, torch.tensor([0, 0, 0.7, 0.5, 0, 0], dtype=torch.float64))
    assert torch.allclose((A & B).matrix, torch.zeros(6, 6, dtype=torch.float64))
    Bsame = cp.Conceptor(e, torch.tensor([0.5, 0, 0, 0, 0, 0], dtype=torch.float64))
    # on the shared axis: (1/0.9 + 1/0.5 − 1)⁻¹
    assert torch.allclose((A & Bsame).matrix[0, 0], torch.tensor(1 / (1 / 0.9 + 2 - 1), dtype=torch.float64))


def test_aperture_sweep_monotone_and_with_aperture():
    X = data()
    frame = cp.aperture_sweep(X, [0.1, 1.0, 10.0, 100.0])
    assert frame.quota.is_monotonic_increasing and frame.energy_kept.is_monotonic_increasing
    assert (frame.max_eig < 1).all()
    C = cp.compute_conceptor(X, 1.0)
    assert torch.allclose(C.with_aperture(10.0).matrix, cp.compute_conceptor(X, 10.0).matrix, atol=1e-12)


def test_apply_matches_matrix():
    X = data(d=12)
    C = cp.compute_conceptor(X, 2.0, center=True)
    h = torch.randn(3, 5, 12)
    expected = C.mean + 0.7 * (h.double() - C.mean) @ C.matrix.T
    assert torch.allclose(C.apply(h, 0.7).double(), expected, atol=1e-5)


def test_identity_conceptor_with_beta_one_is_exact(tiny_llama):
    model, tok = tiny_llama
    base = logits(model, tok)
    with cp.conceptor_steering(model, cp.identity_conceptor(64), layer=[1, 3], beta=1.0):
        assert torch.equal(logits(model, tok), base)


def test_conceptor_steering_changes_and_restores(tiny_llama):
    model, tok = tiny_llama
    base = logits(model, tok)
    acts = hl.capture_residuals(model, tok, PROMPTS, layers=[2], positions=[-1, -2, -3], progress=False)  # [5, 3, 1, 64]
    C = cp.compute_conceptor(acts[:, :, 0].reshape(-1, 64), aperture=1.0)
    with cp.conceptor_steering(model, {2: C}, beta=1.0):
        steered = logits(model, tok)
    assert (steered - base).abs().max() > 1e-4
    with cp.conceptor_steering(model, {-2: C}, beta=1.0):  # negative keys count from the end (4 blocks)
        assert torch.equal(logits(model, tok), steered)
    assert torch.equal(logits(model, tok), base)
    with cp.conceptor_steering(model, C, layer=2, beta=1.0, positions="response", prompt_length=base.shape[1] - 2):
        part = logits(model, tok)
    assert torch.equal(part[:, :-2], base[:, :-2])
