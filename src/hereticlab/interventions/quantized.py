"""4-bit (bitsandbytes NF4) loading, with edits computed on dequantized weights and applied as a LoRA adapter.

Quantized weights cannot be orthogonalized in place: rounding back to 4 bits would destroy the exact edit. So
``load_quantized`` loads the model in 4 bit, ``lora_ablation`` computes each writer's edit ``ΔW = −λ Q (Qᵀ W)``
on the *dequantized* weight and installs it as a rank-``k`` PEFT LoRA adapter (``B = −λ Q``, ``A = Qᵀ W``, scaling
1; exact for ``norm="none"``), and ``export_merged`` reloads the model in full precision, applies the same plan
with ``edits.apply_edits`` and saves it (never merge into 4-bit weights).

Needs CUDA and ``bitsandbytes``; without them every entry point raises ``ModelLoadError`` with one line saying
so. Only that error path is tested here (no GPU in CI).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..core.models import ModelLoadError, load_model, prepare_tokenizer, resolve_model_source
from .edits import WriterEdit

if TYPE_CHECKING:
    from peft import PeftModel

NEEDS = "4-bit loading needs CUDA and bitsandbytes (pip install bitsandbytes)"


def check_4bit_support() -> None:
    """Raise ``ModelLoadError`` (one line) unless a CUDA device and ``bitsandbytes`` are available."""
    if not torch.cuda.is_available():
        raise ModelLoadError(f"{NEEDS}; no CUDA device is available on this machine")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModelLoadError(f"{NEEDS}; bitsandbytes is not installed") from None


def load_quantized(
    name_or_path: str = "default",
    *,
    compute_dtype: torch.dtype = torch.bfloat16,
    quant_type: str = "nf4",
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """``(model, tokenizer)`` with linear layers in 4 bit (``load_model(..., load_in_4bit=True)`` semantics)."""
    check_4bit_support()
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    source = resolve_model_source(name_or_path)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_type=quant_type)
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code))
    model = AutoModelForCausalLM.from_pretrained(
        source, quantization_config=config, device_map={"": 0}, trust_remote_code=trust_remote_code
    )
    model.eval().requires_grad_(False)
    model.hereticlab_source = name_or_path  # type: ignore[assignment]  # a plain attribute
    return model, tokenizer


def dequantized(module: nn.Module, param: str = "weight") -> torch.Tensor:
    """The float32 value of ``module.<param>``, dequantizing a bitsandbytes ``Params4bit`` if needed."""
    weight = getattr(module, param)
    state = getattr(weight, "quant_state", None)
    if state is None:
        return weight.detach().float()
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(weight.data, state).float()


def lora_ablation(
    model: PreTrainedModel, edits: Sequence[WriterEdit], *, adapter_name: str = "hereticlab"
) -> PeftModel:
    """Install ``edits`` (``edits.plan_ablation`` output, ``norm="none"``) as an exact rank-k LoRA adapter.

    Linear writers only (4-bit quantizes ``nn.Linear``); fused expert tensors and embeddings stay in full
    precision, so edit those with ``edits.apply_edits``. Returns the ``PeftModel``.
    """
    check_4bit_support()
    from peft import LoraConfig, get_peft_model

    names, ranks = [], set()
    for edit in edits:
        if edit.norm != "none":
            raise ValueError(
                "a LoRA adapter represents norm='none' edits exactly; norm-preserving edits are not low rank"
            )
        if edit.writer.param != "weight" or edit.writer.residual_axis != 0:
            raise ValueError(f"{edit.writer.name}: only nn.Linear writers go through the adapter; use apply_edits")
        if getattr(edit.writer.module, "bias", None) is not None:
            raise ValueError(f"{edit.writer.name} has a bias, which a LoRA adapter cannot edit; use export_merged")
        names.append(edit.writer.name)
        ranks.add(edit.basis.shape[1])
    rank = max(ranks)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=names, lora_dropout=0.0, bias="none")
    peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    modules = dict(cast(nn.Module, peft_model.base_model.model).named_modules())
    with torch.no_grad():
        for edit in edits:
            layer = modules[edit.writer.name]
            W = dequantized(layer.base_layer)  # [d, n]
            Q = edit.basis.to(device=W.device, dtype=torch.float32)  # [d, k]
            k = Q.shape[1]
            A = torch.zeros(rank, W.shape[1], device=W.device)
            B = torch.zeros(W.shape[0], rank, device=W.device)
            A[:k] = Q.T @ W
            B[:, :k] = -edit.strength * Q
            layer.lora_A[adapter_name].weight.copy_(A)
            layer.lora_B[adapter_name].weight.copy_(B)
    return peft_model


def export_merged(
    name_or_path: str,
    plan_fn: Callable[[PreTrainedModel], list[WriterEdit]],
    destination: str | Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """Reload ``name_or_path`` in full precision, apply ``plan_fn(model)`` (→ a list of edits) and save it.

    Merging a LoRA into 4-bit weights would re-quantize the edit away; the full-precision reload is exact.
    """
    from .edits import apply_edits

    model, tokenizer = load_model(name_or_path, dtype=dtype, device="cpu")
    apply_edits(model, plan_fn(model)).make_permanent()
    destination = Path(destination)
    model.save_pretrained(destination)
    tokenizer.save_pretrained(destination)
    return destination
