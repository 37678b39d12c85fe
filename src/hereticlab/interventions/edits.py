"""Weight edits: pure orthogonalization math and its reversible application to a model.

Convention: a writer weight is viewed as ``W [..., d, n]`` with the residual axis second to last (an HF
``nn.Linear`` already is ``(out=d, in=n)``); other layouts (Conv1D, embeddings, fused experts) are moved there
and back. ``Q [d, k]`` has orthonormal columns.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from ..core.architecture import Writer, find_layers, find_writers, post_norm_basis
from ..directions.base import Directions, orthonormal_basis
from .base import Intervention

NORM_MODES = ("none", "row", "column")  # plain; Heretic's per-row MPOA; Jim Lai's per-column MPOA

Strength = float | torch.Tensor | Mapping[str, "float | torch.Tensor"]


# ----------------------------------------------------------------------------------------------------------
# Pure math
# ----------------------------------------------------------------------------------------------------------


def orthogonalize(W: torch.Tensor, Q: torch.Tensor, strength: float = 1.0, norm: str = "none") -> torch.Tensor:
    """``W − λ Q (Qᵀ W)`` for ``W [..., d, n]``, ``Q [d, k]`` orthonormal; computed in float32 or better.

    ``norm`` (which published method each mode reproduces):
      * ``"none"``: the plain rank-k edit (Arditi et al.'s weight orthogonalization).
      * ``"column"``: Jim Lai's norm-preserving ablation ("MPOA", the reference code's ``modify_tensor_norm_preserved``
        in llm-abliteration): each column ``W[:, j]`` (what input unit j writes into the residual) is split into norm
        and unit direction, the direction is ablated, and the column gets its original norm back. The reference
        code transposes the HF ``(out, in)`` weight and normalizes rows of the transpose ("row norms" in its
        comments), which are these columns. At ``λ = 1`` outputs stay exactly orthogonal to ``Q`` (rescaling a
        column keeps it orthogonal).
      * ``"row"``: Heretic's variant: each row ``W[i, :]`` (one residual coordinate) is normalized, ablated,
        renormalized to unit length and given back its original norm. Exact here (Heretic approximates it with a
        rank-3 randomized-SVD LoRA); some ``Q`` component returns even at ``λ = 1``.
    """
    if norm not in NORM_MODES:
        raise ValueError(f"unknown norm mode {norm!r}; choose from {NORM_MODES}")
    work = torch.promote_types(W.dtype, torch.float32)
    w = W.to(work)
    q = Q.to(device=W.device, dtype=work)
    if norm == "row":
        row_norms = w.norm(dim=-1, keepdim=True)
        unit = w / row_norms.clamp_min(1e-12)
        edited = unit - strength * q @ (q.T @ unit)
        edited = edited / edited.norm(dim=-1, keepdim=True).clamp_min(1e-12) * row_norms
    else:
        edited = w - strength * q @ (q.T @ w)
        if norm == "column":
            col_norms = w.norm(dim=-2, keepdim=True)
            edited = edited * (col_norms / edited.norm(dim=-2, keepdim=True).clamp_min(1e-12))
    return edited.to(W.dtype)


def project_vector(b: torch.Tensor, Q: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """``b − λ Q Qᵀ b`` for a bias ``b [d]`` (or ``[..., d]``: fused experts' per-expert biases ``[E, d]``)."""
    work = torch.promote_types(b.dtype, torch.float32)
    q = Q.to(device=b.device, dtype=work)
    if b.ndim > 1:
        bw = b.to(work)
        return (bw - strength * (bw @ q) @ q.T).to(b.dtype)
    return (b.to(work) - strength * q @ (q.T @ b.to(work))).to(b.dtype)


def edit_weight(
    weight: torch.Tensor, residual_axis: int, Q: torch.Tensor, strength: float, norm: str = "none"
) -> torch.Tensor:
    """Apply ``orthogonalize`` to a weight whose residual axis is ``residual_axis``."""
    edited = orthogonalize(weight.movedim(residual_axis, -2), Q, strength, norm)
    return edited.movedim(-2, residual_axis)


# ----------------------------------------------------------------------------------------------------------
# Plans
# ----------------------------------------------------------------------------------------------------------


@dataclass
class WriterEdit:
    """Project ``basis`` (``Q [d, k]``) out of one writer with strength ``strength``."""

    writer: Writer
    basis: torch.Tensor
    strength: float
    norm: str = "none"


def _as_basis(direction: torch.Tensor) -> torch.Tensor:
    """``[d]`` or ``[k, d]`` → ``Q [d, k]``."""
    return orthonormal_basis(direction.float())


# An MoE block *is* the layer's MLP: expert writers follow the "mlp" component unless "expert" is named explicitly.
COMPONENT_ALIASES = {"expert": "mlp"}


def _strength_for(strength: Strength, component: str, layer: int, n_layers: int) -> float:
    if isinstance(strength, Mapping):
        if component not in strength:
            component = COMPONENT_ALIASES.get(component, component)
        if component not in strength:
            return 0.0
        strength = strength[component]
    if isinstance(strength, torch.Tensor) and strength.ndim > 0:
        if strength.shape[0] != n_layers:
            raise ValueError(f"a per-layer strength needs {n_layers} values (one per block), got {strength.shape[0]}")
        return float(strength[max(layer, 0)])
    return float(strength)


def plan_ablation(
    model: nn.Module,
    direction: torch.Tensor | Directions,
    strength: Strength = 1.0,
    *,
    components: Sequence[str] = ("attn", "mlp"),
    norm: str = "none",
    writers: Sequence[Writer] | None = None,
) -> list[WriterEdit]:
    """The edits that ablate ``direction`` from the chosen writers.

    ``direction``: one vector ``[d]`` or basis rows ``[k, d]`` for every layer, or a ``Directions`` (per-layer
    scope: block ``l`` uses residual index ``l + 1``, the stream it writes into; the embedding uses index 0).
    ``strength``: a float, a per-block kernel ``Tensor[L]``, or a dict component → float/kernel
    (components missing from the dict are not edited). Writers with zero strength are skipped.
    ``"mlp"`` also covers MoE expert writers (fused or per-expert down projections, shared experts) unless
    ``"expert"`` is given its own entry; SSM mixers are the ``"ssm"`` component.

    Post-norms (Gemma 2/3 sandwich norms, ``Writer.post_norm``): an RMSNorm ``g ⊙ x / rms(x)`` between a writer and
    the residual rotates an orthogonalized write back towards the direction, so such a writer is orthogonalized
    against ``post_norm_basis`` (the orthonormalized ``g ⊙ Q``) instead of ``Q``; its ``WriterEdit.basis`` is that
    corrected basis. At ``λ = 1`` (``norm="none"`` or ``"column"``) what reaches the stream is then exactly
    orthogonal to ``Q``, as for writers without a post-norm. A post-norm that is not of that form (bias, mean
    subtraction) cannot be corrected exactly: ``UnsupportedModelError``. To reproduce the uncorrected edit, pass
    ``writers=[dataclasses.replace(w, post_norm=None) for w in find_writers(model)]``.
    """
    if isinstance(strength, Mapping):
        components = tuple(c for c in components if c in strength) or tuple(strength)
    components = tuple(components) + tuple(
        alias for alias, base in COMPONENT_ALIASES.items() if base in components and alias not in components
    )
    writers = list(writers) if writers is not None else find_writers(model, components)
    n_layers = len(find_layers(model))
    shared = None if isinstance(direction, Directions) else _as_basis(direction)
    bases: dict[int, torch.Tensor] = {}
    corrected: dict[tuple[int, int], torch.Tensor] = {}
    edits = []
    for writer in writers:
        if writer.component not in components:
            continue
        lam = _strength_for(strength, writer.component, writer.layer, n_layers)
        if lam == 0.0:
            continue
        if shared is not None:
            q = shared
        else:
            index = writer.layer + 1
            if index not in bases:
                bases[index] = cast(Directions, direction).basis(index)  # shared is None: a Directions
            q = bases[index]
        if writer.post_norm is not None:
            key = (id(writer.post_norm), id(q))
            if key not in corrected:
                corrected[key] = post_norm_basis(writer, q)
            q = corrected[key]
        edits.append(WriterEdit(writer, q, lam, norm))
    return edits


# ----------------------------------------------------------------------------------------------------------
# Reversible application
# ----------------------------------------------------------------------------------------------------------


class WeightBackup:
    """Original copies of parameters, taken once and reused across many edits (the search's hot loop)."""

    def __init__(self) -> None:
        self._originals: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def save(self, param: torch.Tensor) -> torch.Tensor:
        key = id(param)
        if key not in self._originals:
            self._originals[key] = (param, param.detach().clone())
        return self._originals[key][1]

    def original(self, param: torch.Tensor) -> torch.Tensor:
        return self._originals[id(param)][1]

    def restore(self, params: Iterable[torch.Tensor] | None = None) -> None:
        keys = self._originals.keys() if params is None else [id(p) for p in params]
        with torch.no_grad():
            for key in keys:
                param, original = self._originals[key]
                param.copy_(original)

    def nbytes(self) -> int:
        return sum(o.numel() * o.element_size() for _, o in self._originals.values())


class EditHandle(Intervention):
    """A weight edit (an ``Intervention``): ``apply()`` writes it, ``revert()`` restores every touched parameter bit
    for bit; ``with handle:`` applies on entry (if not applied yet) and reverts on exit.

    ``make_permanent()`` forgets the originals (the edit stays; ``revert`` is then impossible).
    """

    def __init__(self, model: nn.Module, edits: list[WriterEdit], backup: WeightBackup, own_backup: bool) -> None:
        super().__init__()
        self.model = model
        self.edits = edits
        self._backup = backup
        self._own_backup = own_backup
        self._params: list[torch.Tensor] = []
        self.active = False

    def _apply(self) -> None:
        touched: dict[int, torch.Tensor] = {}
        with torch.no_grad():
            for edit in self.edits:
                for p in (edit.writer.weight, edit.writer.bias_tensor):
                    if p is not None and id(p) not in touched:
                        self._backup.save(p)
                        touched[id(p)] = p
            # Every edit is computed from the *original* weight, so edits of one parameter never compound
            # unless the plan lists the same parameter twice (then they compose in plan order). Each parameter is
            # written as soon as its last edit is computed: at most one edited copy exists at a time (peak memory).
            steps: dict[int, list[Callable[[torch.Tensor], torch.Tensor]]] = {}
            for edit in self.edits:
                w, b = edit.writer.weight, edit.writer.bias_tensor
                steps.setdefault(id(w), []).append(
                    functools.partial(
                        edit_weight,
                        residual_axis=edit.writer.residual_axis,
                        Q=edit.basis,
                        strength=edit.strength,
                        norm=edit.norm,
                    )
                )
                if b is not None:
                    steps.setdefault(id(b), []).append(
                        functools.partial(project_vector, Q=edit.basis, strength=edit.strength)
                    )
            for key, chain in steps.items():
                value = self._backup.original(touched[key])
                for step in chain:
                    value = step(value)
                touched[key].copy_(value)
                del value
        self._params = list(touched.values())
        self.active = True

    def _revert(self) -> None:
        self._backup.restore(self._params)

    def make_permanent(self) -> None:
        self.active = False
        self._params = []
        if self._own_backup:
            self._backup = WeightBackup()

    def __repr__(self) -> str:
        return f"EditHandle({len(self.edits)} writer edits, active={self.active})"


def apply_edits(model: nn.Module, edits: list[WriterEdit], backup: WeightBackup | None = None) -> EditHandle:
    """Apply ``edits`` in place and return a handle that can revert them exactly.

    Pass a long-lived ``backup`` to avoid copying the original weights again on every call.
    """
    return EditHandle(model, edits, backup or WeightBackup(), own_backup=backup is None).apply()


class WeightAblation(EditHandle):
    """Lazy weight ablation: plans ``plan_ablation(model, direction, strength, ...)`` now (pure math, the model is
    untouched) and writes it on ``apply()`` / ``with``. ``strength`` is the ablation kernel (a float or a
    ``kernels`` function of the layer), not a steering coefficient."""

    def __init__(
        self,
        model: nn.Module,
        direction: torch.Tensor | Directions,
        strength: Strength = 1.0,
        *,
        components: Sequence[str] = ("attn", "mlp"),
        norm: str = "none",
        backup: WeightBackup | None = None,
    ) -> None:
        edits = plan_ablation(model, direction, strength, components=components, norm=norm)
        super().__init__(model, edits, backup or WeightBackup(), own_backup=backup is None)


def ablate(
    model: nn.Module,
    direction: torch.Tensor | Directions,
    strength: Strength = 1.0,
    *,
    components: Sequence[str] = ("attn", "mlp"),
    norm: str = "none",
    backup: WeightBackup | None = None,
) -> EditHandle:
    """Orthogonalize residual writers against ``direction`` in place (see ``plan_ablation``).

    ``with hl.ablate(model, dirs.at(14.3), strength=hl.tent_kernel(...)):`` — leaving the block restores the
    weights bit for bit. Applied at once (0.1 behaviour: ``handle = hl.ablate(...); ...; handle.revert()``); for a
    lazy object use ``WeightAblation(...)`` or ``Directions.ablate(model, ...)``.
    """
    return WeightAblation(model, direction, strength, components=components, norm=norm, backup=backup).apply()


def first_edited_layer(edits: Sequence[WriterEdit]) -> int:
    """The lowest block index an edit touches (``-1`` for the embedding), or a large number if none."""
    return min((e.writer.layer for e in edits), default=10**9)
