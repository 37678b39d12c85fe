"""Conceptors: construction, Boolean algebra, steering hook."""

import torch
from conftest import PROMPTS

import hereticlab as hl
from hereticlab.interventions import conceptors as cp


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
    direct = R @ torch.linalg.inv(R + 2.0**-2 * torch.eye(12, dtype=torch.float64))
    assert torch.allclose(C.matrix, direct, atol=1e-10)
    assert (C.s >= 0).all() and (C.s < 1).all()
    singular = cp.compute_conceptor(data(n=5, rank=3), aperture=100.0)
    assert (singular.s >= 0).all() and (singular.s < 1).all()
    assert int((singular.s > 1e-6).sum()) == 3


def test_not_not_is_identity_and_and_with_identity():
    C = cp.compute_conceptor(data(), aperture=1.5)
    assert torch.allclose(cp.NOT(cp.NOT(C)).matrix, C.matrix, atol=1e-12)
    assert torch.allclose((~C).matrix, torch.eye(12, dtype=torch.float64) - C.matrix, atol=1e-12)
    eye = cp.identity_conceptor(12)
    assert torch.allclose(cp.AND(C, eye).matrix, C.matrix, atol=1e-10)
    assert torch.allclose(cp.AND(eye, C).matrix, C.matrix, atol=1e-10)
    low = cp.compute_conceptor(data(n=4, rank=2), aperture=3.0)  # singular: AND restricted to its range
    assert torch.allclose(cp.AND(low, eye).matrix, low.matrix, atol=1e-10)


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


def close(a, b, atol=1e-9):
    return torch.allclose(a.matrix, b.matrix, atol=atol)


def projector(V):
    """The hard conceptor (eigenvalues 0 and 1) projecting onto the span of the columns of ``V [d, k]``."""
    Q, _ = torch.linalg.qr(V.double())
    return cp.from_matrix(Q @ Q.T)


def singular(seed, rank, d=8, aperture=2.0):
    return cp.compute_conceptor(data(n=rank + 2, d=d, seed=seed, rank=rank), aperture=aperture)


def soft(seed, d=8, aperture=1.0):
    return cp.compute_conceptor(data(n=40, d=d, seed=seed), aperture=aperture)


def test_commutativity_and_associativity():
    triples = [
        (soft(1), soft(2), soft(3)),  # invertible
        (singular(4, 6), singular(5, 7), soft(6)),  # singular, ranges meeting in a subspace
        (singular(7, 5), soft(8), singular(9, 6)),
    ]
    for A, B, C in triples:
        assert close(A & B, B & A) and close(A | B, B | A)
        assert close((A & B) & C, A & (B & C), atol=1e-8)
        assert close((A | B) | C, A | (B | C), atol=1e-8)
    # for invertible conceptors the triple AND has the closed form (A⁻¹ + B⁻¹ + C⁻¹ − 2I)⁻¹
    A, B, C = triples[0]
    inv, eye = torch.linalg.inv, torch.eye(8, dtype=torch.float64)
    assert torch.allclose(((A & B) & C).matrix, inv(inv(A.matrix) + inv(B.matrix) + inv(C.matrix) - 2 * eye), atol=1e-8)


def test_de_morgan():
    inv, eye = torch.linalg.inv, torch.eye(8, dtype=torch.float64)
    for A, B in [(soft(1), soft(2)), (singular(3, 5), soft(4)), (singular(5, 6), singular(6, 6))]:
        assert close(~(A | B), ~A & ~B) and close(~(A & B), ~A | ~B)
    # checked against closed forms computed with plain inverses (invertible A, B and ¬A, ¬B)
    A, B = soft(1), soft(2)
    assert torch.allclose((~(A | B)).matrix, inv(inv(eye - A.matrix) + inv(eye - B.matrix) - eye), atol=1e-9)
    assert torch.allclose((~A | ~B).matrix, eye - inv(inv(A.matrix) + inv(B.matrix) - eye), atol=1e-9)


def test_absorption_holds_for_projectors_and_fails_for_soft_conceptors():
    gen = torch.Generator().manual_seed(3)
    shared = torch.randn(8, 1, generator=gen, dtype=torch.float64)
    A = projector(torch.cat([shared, torch.randn(8, 2, generator=gen, dtype=torch.float64)], 1))  # 3-D range
    B = projector(torch.cat([shared, torch.randn(8, 3, generator=gen, dtype=torch.float64)], 1))  # 4-D, meets A in 1-D
    assert close(A | (A & B), A, atol=1e-8) and close(A & (A | B), A, atol=1e-8)
    # A ∧ B projects onto range(A) ∩ range(B) = span(shared); A ∨ B onto range(A) + range(B) (6-D)
    u = shared[:, 0] / shared.norm()
    assert close(A & B, cp.from_matrix(torch.outer(u, u)), atol=1e-8)
    assert torch.allclose((A | B).s.sort().values, torch.tensor([0.0] * 2 + [1.0] * 6, dtype=torch.float64), atol=1e-8)
    # Soft conceptors are not a lattice: with commuting a = b = 0.5 I, a ∧ b = 1/3 and a ∨ (a ∧ b) = 0.6, not 0.5.
    half = cp.Conceptor(torch.eye(4, dtype=torch.float64), torch.full((4,), 0.5, dtype=torch.float64))
    assert torch.allclose((half & half).s, torch.full((4,), 1 / 3, dtype=torch.float64))
    assert torch.allclose((half | (half & half)).s, torch.full((4,), 0.6, dtype=torch.float64))


def test_and_of_singular_overlapping_conceptors():
    """Ranges of dimension 5 and 6 in R^8 meet in a 3-D subspace: C ∧ B = P (Pᵀ (C† + B† − I) P)⁻¹ Pᵀ there."""
    C, B = singular(11, 5), singular(12, 6)
    d = 8
    eye = torch.eye(d, dtype=torch.float64)

    def pinv(m, hermitian=True):  # eigenvalues below 1e-9 are round-off of exact zeros
        return torch.linalg.pinv(m, atol=1e-9, hermitian=hermitian)

    rc, rb = C.matrix, B.matrix
    # P: orthonormal basis of range(C) ∩ range(B) = null of the stacked null-space projectors, found by SVD
    null_proj = torch.cat([eye - rc @ pinv(rc, hermitian=True), eye - rb @ pinv(rb, hermitian=True)])
    _, sv, vh = torch.linalg.svd(null_proj)
    P = vh[(sv > 1e-6).sum() :].T
    assert P.shape == (d, 3)
    M = P.T @ (pinv(rc, hermitian=True) + pinv(rb, hermitian=True) - eye) @ P
    expected = P @ torch.linalg.inv(M) @ P.T
    got = (C & B).matrix
    assert torch.allclose(got, expected, atol=1e-8)
    assert torch.allclose(got @ (eye - P @ P.T), torch.zeros(d, d, dtype=torch.float64), atol=1e-9)  # no leak outside
    assert (C & B).s.min() > -1e-12 and (C & B).s.max() < 1  # still a conceptor
    assert torch.linalg.eigvalsh(C.matrix - got).min() > -1e-9  # C ∧ B ⪯ C


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
    with cp.conceptor_steering(model, cp.identity_conceptor(64), resid=[1, 3], beta=1.0):
        assert torch.equal(logits(model, tok), base)


def test_conceptor_steering_changes_and_restores(tiny_llama):
    model, tok = tiny_llama
    base = logits(model, tok)
    acts = hl.capture_residuals(
        model, tok, PROMPTS, layers=[2], positions=[-1, -2, -3], progress=False
    )  # [5, 3, 1, 64]
    C = cp.compute_conceptor(acts[:, :, 0].reshape(-1, 64), aperture=1.0)
    with cp.conceptor_steering(model, {2: C}, beta=1.0):
        steered = logits(model, tok)
    assert (steered - base).abs().max() > 1e-4
    with cp.conceptor_steering(model, {-3: C}, beta=1.0):  # keys are resid indices: -3 is 2 of 0..4 (4 blocks)
        assert torch.equal(logits(model, tok), steered)
    assert torch.equal(logits(model, tok), base)
    with cp.conceptor_steering(model, C, resid=2, beta=1.0, positions="response", prompt_length=base.shape[1] - 2):
        part = logits(model, tok)
    assert torch.equal(part[:, :-2], base[:, :-2])


def test_last_prompt_conceptor_steering_touches_only_that_position(tiny_llama):
    """Position masks through ``trace(with_call=True)`` at residual L (the last block's output)."""
    model, tok = tiny_llama
    base = logits(model, tok)
    k = base.shape[1] - 2
    with cp.conceptor_steering(
        model, cp.NOT(cp.identity_conceptor(64)), resid=-1, positions="last_prompt", prompt_length=k
    ):
        out = logits(model, tok)
    changed = (out - base).abs().amax(-1).amax(0) > 0  # [seq]
    assert changed.tolist() == [i == k - 1 for i in range(base.shape[1])]
