"""Where each architecture keeps its decoder layers and the modules that write into the residual stream.

A *writer* is a parameter whose output is added to the residual stream: attention out-projections, MLP
down-projections, SSM out-projections, per-expert down-projections, and the token embedding. Support is
explicit: a table of known names, then a structural check (the parameter's residual axis has size
``hidden_size``). A model that cannot be handled raises an error listing what was found.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

# Dotted paths (from the top model) under which families keep their list of decoder blocks.
LAYER_LIST_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3, Mixtral, Qwen MoE, Jamba, Falcon-H1
    "model.language_model.layers",  # vision-language wrappers (Llava, Gemma 3 conditional generation)
    "language_model.model.layers",
    "model.decoder.layers",
    "transformer.h",  # GPT-2, GPT-J, Falcon
    "gpt_neox.layers",  # GPT-NeoX / Pythia
    "backbone.layers",  # Mamba, Mamba2
    "model.language_model.model.layers",
)

EMBEDDING_PATHS = (
    "model.embed_tokens",
    "model.language_model.embed_tokens",
    "language_model.model.embed_tokens",
    "model.decoder.embed_tokens",
    "transformer.wte",
    "gpt_neox.embed_in",
    "backbone.embeddings",
)

# Learned absolute position embeddings also write into the residual stream (GPT-2, OPT).
POSITION_EMBEDDING_PATHS = ("transformer.wpe", "model.decoder.embed_positions")

# Module names (relative to a decoder block) that write into the residual stream, by component.
WRITER_NAMES: dict[str, tuple[str, ...]] = {
    "attn": (
        "self_attn.o_proj",
        "attn.c_proj",  # GPT-2 (Conv1D: weight stored (in, out))
        "attention.dense",  # GPT-NeoX
        "self_attn.out_proj",
        "attn.out_proj",
        "linear_attn.out_proj",  # Qwen3-Next
    ),
    "mlp": (
        "mlp.down_proj",
        "mlp.c_proj",  # GPT-2
        "mlp.dense_4h_to_h",  # GPT-NeoX
        "mlp.fc2",
        "feed_forward.down_proj",  # Jamba dense MLP, Falcon-H1
        "feed_forward.w2",
    ),
    "ssm": (
        "mixer.out_proj",  # Mamba, Mamba2
        "mamba.out_proj",  # Jamba, Falcon-H1
    ),
}

COMPONENTS = ("embed", "attn", "mlp", "ssm", "expert")


class UnsupportedModelError(ValueError):
    """The model's layers or residual writers could not be found."""


@dataclass
class Writer:
    """One parameter that writes into the residual stream.

    ``residual_axis``: the axis of ``module.<param>`` whose size is ``hidden_size`` (0 for ``nn.Linear``,
    1 for GPT-2's ``Conv1D`` and for embeddings, the last or middle axis for fused expert tensors).
    ``layer``: block index, ``-1`` for the token embedding.
    """

    name: str
    layer: int
    component: str
    module: nn.Module
    param: str = "weight"
    residual_axis: int = 0
    bias: str | None = None

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.module, self.param)

    @property
    def bias_tensor(self) -> torch.Tensor | None:
        return getattr(self.module, self.bias) if self.bias else None

    def __repr__(self) -> str:
        return f"Writer({self.name}, layer={self.layer}, {self.component}, shape={tuple(self.weight.shape)})"


def get_submodule(root: nn.Module, path: str) -> nn.Module | None:
    module = root
    for part in path.split("."):
        if not hasattr(module, part):
            return None
        module = getattr(module, part)
    return module


def hidden_size(model: nn.Module) -> int:
    config = model.config
    for cfg in (config, getattr(config, "text_config", None)):
        if cfg is not None:
            for attr in ("hidden_size", "n_embd", "d_model"):
                if isinstance(getattr(cfg, attr, None), int):
                    return getattr(cfg, attr)
    raise UnsupportedModelError(f"cannot read the hidden size from {type(config).__name__}")


def find_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder blocks."""
    for path in LAYER_LIST_PATHS:
        layers = get_submodule(model, path)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return layers
    lists = [name for name, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    raise UnsupportedModelError(
        f"{type(model).__name__}: no decoder layer list at any known path ({', '.join(LAYER_LIST_PATHS)}); "
        f"ModuleLists found: {lists[:10]}. Add its path to hereticlab.architecture.LAYER_LIST_PATHS"
    )


def find_embedding(model: nn.Module) -> nn.Module:
    for path in EMBEDDING_PATHS:
        module = get_submodule(model, path)
        if module is not None:
            return module
    return model.get_input_embeddings()


def _residual_axis(module: nn.Module, param: str, d: int) -> int | None:
    weight = getattr(module, param, None)
    if not isinstance(weight, torch.Tensor):
        return None
    if isinstance(module, nn.Linear):
        return 0 if weight.shape[0] == d else None
    if type(module).__name__ == "Conv1D":  # transformers' GPT-2 Conv1D: weight (in, out)
        return 1 if weight.shape[1] == d else None
    if weight.ndim == 3:  # fused experts: (experts, d, in) or (experts, in, d)
        if weight.shape[1] == d and weight.shape[2] != d:
            return 1
        if weight.shape[2] == d:
            return 2
    return None


def _expert_writers(block: nn.Module, layer: int, d: int, prefix: str) -> list[Writer]:
    """Per-expert down projections (ModuleList experts), fused 3-D expert tensors and shared experts."""
    writers = []
    for name, module in block.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if ".experts" in f".{name}" or "shared_expert" in name:
            if isinstance(module, nn.Linear) and leaf in ("down_proj", "w2", "fc2") and module.weight.shape[0] == d:
                writers.append(Writer(f"{prefix}.{name}", layer, "expert", module, "weight", 0,
                                      "bias" if module.bias is not None else None))
            elif name.endswith("experts") and not isinstance(module, nn.ModuleList):
                for pname in ("down_proj", "w2"):
                    axis = _residual_axis(module, pname, d)
                    if axis is not None:
                        writers.append(Writer(f"{prefix}.{name}.{pname}", layer, "expert", module, pname, axis))
    return writers


def find_writers(model: nn.Module, components: Iterable[str] = COMPONENTS) -> list[Writer]:
    """Every residual writer of ``model`` whose component is in ``components``, in layer order.

    Raises ``UnsupportedModelError`` (listing blocks and candidate parameters) if a block has no writer.
    """
    components = set(components)
    unknown = components - set(COMPONENTS)
    if unknown:
        raise ValueError(f"unknown components {sorted(unknown)}; choose from {COMPONENTS}")
    d = hidden_size(model)
    layers = find_layers(model)
    prefix = next(p for p in LAYER_LIST_PATHS if get_submodule(model, p) is layers)
    writers: list[Writer] = []
    if "embed" in components:
        emb = find_embedding(model)
        writers.append(Writer("embed_tokens", -1, "embed", emb, "weight", 1))
        for path in POSITION_EMBEDDING_PATHS:
            pos = get_submodule(model, path)
            if isinstance(pos, nn.Embedding) and pos.weight.shape[1] == d:
                writers.append(Writer(path, -1, "embed", pos, "weight", 1))
    for index, block in enumerate(layers):
        found_any = False
        for component, names in WRITER_NAMES.items():
            for rel in names:
                module = get_submodule(block, rel)
                if module is None:
                    continue
                axis = _residual_axis(module, "weight", d)
                if axis is None:
                    continue
                found_any = True
                if component in components:
                    bias = "bias" if getattr(module, "bias", None) is not None else None
                    writers.append(Writer(f"{prefix}.{index}.{rel}", index, component, module, "weight", axis, bias))
        experts = _expert_writers(block, index, d, f"{prefix}.{index}")
        found_any = found_any or bool(experts)
        if "expert" in components:
            writers.extend(experts)
        if not found_any:
            candidates = [
                f"{n} {tuple(m.weight.shape)}"
                for n, m in block.named_modules()
                if isinstance(getattr(m, "weight", None), torch.Tensor) and d in m.weight.shape
            ]
            raise UnsupportedModelError(
                f"{type(model).__name__}: block {index} ({type(block).__name__}) has no known residual writer; "
                f"parameters with a {d}-sized axis: {candidates}. Add its name to hereticlab.architecture.WRITER_NAMES"
            )
    return writers


def num_layers(model: nn.Module) -> int:
    return len(find_layers(model))


def block_output_tensor(output) -> torch.Tensor:
    """A decoder block returns a tensor or a tuple whose first item is the hidden state."""
    return output[0] if isinstance(output, (tuple, list)) else output


def replace_block_output(output, hidden: torch.Tensor):
    if isinstance(output, tuple):
        return (hidden,) + tuple(output[1:])
    if isinstance(output, list):
        return [hidden] + list(output[1:])
    return hidden
