"""Exporting an edit: merged weights (``save_pretrained``), a PEFT LoRA adapter, file hashes."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..core.architecture import Writer
from .edits import WeightBackup, WriterEdit, apply_edits, edit_weight

if TYPE_CHECKING:
    from peft import PeftModel


class ExportError(ValueError):
    """An edit cannot be exported in the requested form."""


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def weight_hashes(folder: str | Path) -> dict[str, str]:
    """SHA-256 of every weight file (``*.safetensors``) in ``folder``."""
    return {p.name: sha256_file(p) for p in sorted(Path(folder).glob("*.safetensors"))}


def save_merged(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    edits: Sequence[WriterEdit],
    folder: str | Path,
) -> dict[str, str]:
    """Save the edited model as a plain ``transformers`` folder (safetensors); the in-memory model is left unedited.

    Returns the SHA-256 of each written weight file.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with apply_edits(model, list(edits)):
        model.save_pretrained(folder, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return weight_hashes(folder)


def _module_name(model: nn.Module, module: nn.Module) -> str:
    for name, candidate in model.named_modules():
        if candidate is module:
            # Inside a PEFT-wrapped model the original Linear lives on as ``<name>.base_layer``.
            return name.removesuffix(".base_layer")
    raise ExportError("a writer module is not part of the model")


def _check_lora_writer(writer: Writer) -> None:
    """Raise ``ExportError`` unless a LoRA adapter on ``writer`` can carry its edit.

    That needs an ``nn.Linear`` weight and no bias."""
    if not isinstance(writer.module, nn.Linear) or writer.param != "weight":
        raise ExportError(
            f"{writer.name} is not an nn.Linear weight; LoRA export covers Linear writers (attention/MLP/SSM "
            "out-projections); export merged weights instead"
        )
    if writer.bias_tensor is not None:
        raise ExportError(f"{writer.name} has a bias, which a LoRA adapter cannot edit; export merged weights instead")


DEFAULT_LORA_RANK = 8  # rank of an adapter for an edit that is not low-rank (norm-preserving modes)


def lora_factors(
    model: nn.Module,
    edits: Sequence[WriterEdit],
    rank: int | None = None,
    *,
    exact: bool = False,
    errors: dict[str, float] | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Low-rank factors ``(A [r, in], B [out, r])`` with ``B @ A = W_edited − W`` for each edited ``nn.Linear``.

    Plain edits (``norm="none"``, one edit per module) are factorized exactly as ``B = −λ Q``, ``A = Qᵀ W``.
    Norm-preserving edits are not low-rank: their delta is truncated by SVD to ``rank``
    (default ``DEFAULT_LORA_RANK``).
    ``exact=True``: raise ``ExportError`` instead of truncating (a discarded singular value above ``1e-5`` of the
    largest), for callers that must apply exactly the planned edit (a reference evaluation).
    ``errors``: if given, receives per module the relative Frobenius error ``‖ΔW − BA‖ / ‖ΔW‖`` of the factors
    (0 for exact factorizations), so that a truncated adapter is reported rather than silent.
    """
    backup = WeightBackup()
    per_module: dict[int, list[WriterEdit]] = {}
    for edit in edits:
        _check_lora_writer(edit.writer)
        per_module.setdefault(id(edit.writer.module), []).append(edit)
    factors = {}
    for module_edits in per_module.values():
        module = module_edits[0].writer.module
        name = _module_name(model, module)
        W = module_edits[0].writer.weight.detach()  # module.weight (_check_lora_writer)
        if len(module_edits) == 1 and module_edits[0].norm == "none":
            e = module_edits[0]
            q = e.basis.to(device=W.device, dtype=torch.float32)
            B = -e.strength * q
            A = q.T @ W.float()
            error = 0.0
        else:
            edited = backup.save(module_edits[0].writer.weight).float()
            for e in module_edits:
                edited = edit_weight(edited, 0, e.basis, e.strength, e.norm)
            delta = edited - W.float()
            U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
            r = rank or DEFAULT_LORA_RANK
            if exact and S.numel() > r and float(S[r]) > 1e-5 * float(S[0]):
                raise ExportError(
                    f"the edit of {name} ({len(module_edits)} edit(s), norm {module_edits[0].norm!r}) is not of rank "
                    f"≤ {r} (singular value {r + 1} is {float(S[r]) / float(S[0]):.2g} of the largest); a rank-{r} "
                    "LoRA adapter would change it; apply the edit to the weights instead"
                )
            B, A = U[:, :r] * S[:r], Vh[:r]
            total = float(S.square().sum())
            error = (float(S[r:].square().sum()) / total) ** 0.5 if total > 0 else 0.0
        if errors is not None:
            errors[name] = error
        factors[name] = (A.to(W.dtype), B.to(W.dtype))
    return factors


def lora_template(
    model: nn.Module, writers: Sequence[Writer], rank: int = 1
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Zero factors of rank ``rank`` for every writer in ``writers`` (``architecture.Writer``; Linear, no bias).

    ``attach_lora(model, lora_template(model, find_writers(model, components)))`` puts an adapter (doing nothing
    yet) on every writer any edit of those components can touch; ``set_lora_factors`` then loads one edit at a time.
    """
    factors = {}
    for writer in writers:
        _check_lora_writer(writer)
        W = writer.weight  # module.weight (_check_lora_writer)
        factors[_module_name(model, writer.module)] = (W.new_zeros(rank, W.shape[1]), W.new_zeros(W.shape[0], rank))
    if not factors:
        raise ExportError("no writers given: a LoRA adapter needs at least one target module")
    return factors


def attach_lora(model: nn.Module, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> PeftModel:
    """Wrap ``model`` with PEFT LoRA layers carrying ``factors`` (scaling 1). Returns the ``PeftModel``.

    ``peft_model.unload()`` gives the original modules back.
    """
    from peft import LoraConfig, get_peft_model

    rank = max(A.shape[0] for A, _ in factors.values())
    config = LoraConfig(
        r=rank, lora_alpha=rank, target_modules=sorted(factors), lora_dropout=0.0, bias="none", init_lora_weights=False
    )
    peft_model = get_peft_model(model, config)
    try:
        set_lora_factors(peft_model, factors)  # raises if a factor's module got no adapter
    except Exception:
        peft_model.unload()
        raise
    return peft_model


def set_lora_factors(peft_model: PeftModel, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Load new factors into an attached adapter (zero-padded to the adapter's rank).

    Every adapter module that ``factors`` does not name is zeroed (it applies no edit). A factor whose name matches
    no adapter module, or whose shape does not fit its adapter, raises ``ExportError`` (a ``ValueError``) before
    anything is written: dropping it would silently apply an incomplete edit.
    """
    modules = dict(cast(nn.Module, peft_model.base_model.model).named_modules())
    adapters = {
        name: module
        for name, module in modules.items()
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {})
    }
    missing = sorted(set(factors) - set(adapters))
    if missing:
        hint = "it is not a module of the model" if missing[0] not in modules else "the module has no LoRA adapter"
        raise ExportError(
            f"LoRA factor {missing[0]!r} matches no adapter module ({hint}); {len(missing)} factor(s) unmatched "
            f"({', '.join(missing[:4])}{', …' if len(missing) > 4 else ''}); the adapter covers {len(adapters)} "
            "module(s): attach it to every module an edit can touch (lora_template)"
        )
    for name, (A, B) in factors.items():
        module = adapters[name]
        lora_A, lora_B = module.lora_A["default"].weight, module.lora_B["default"].weight
        if (
            A.shape[0] > lora_A.shape[0]
            or A.shape[1] != lora_A.shape[1]
            or B.shape[0] != lora_B.shape[0]
            or B.shape[1] != A.shape[0]
        ):
            raise ExportError(
                f"LoRA factor {name!r} has A {tuple(A.shape)}, B {tuple(B.shape)}; its adapter holds A "
                f"{tuple(lora_A.shape)}, B {tuple(lora_B.shape)} (rank {lora_A.shape[0]})"
            )
    with torch.no_grad():
        for name, module in adapters.items():
            lora_A, lora_B = module.lora_A["default"].weight, module.lora_B["default"].weight
            lora_A.zero_()
            lora_B.zero_()
            if name in factors:
                A, B = factors[name]
                lora_A[: A.shape[0]].copy_(A)
                lora_B[:, : B.shape[1]].copy_(B)


def save_adapter(
    model: nn.Module,
    edits: Sequence[WriterEdit],
    folder: str | Path,
    *,
    base_model: str | None = None,
    rank: int | None = None,
    errors: dict[str, float] | None = None,
) -> Path:
    """Save the edit as a PEFT LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).

    The model is unwrapped again afterwards, unchanged. ``errors``: see ``lora_factors`` (norm-preserving edits are
    truncated to ``rank``; the merged model is the exact edit).
    """
    factors = lora_factors(model, edits, rank, errors=errors)
    peft_model = attach_lora(model, factors)
    try:
        if base_model:
            peft_model.peft_config["default"].base_model_name_or_path = base_model
        peft_model.save_pretrained(str(folder))
    finally:
        peft_model.unload()
    return Path(folder)
