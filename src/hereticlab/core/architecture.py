"""Where each architecture keeps its decoder layers and the modules that write into the residual stream.

A *writer* is a parameter whose output is added to the residual stream: attention out-projections, MLP
down-projections, SSM out-projections, per-expert down-projections, and the token embedding. Support is
explicit: a registry of families (``ARCHITECTURES``, keyed by ``config.model_type``), then a table of known
relative names (``WRITER_NAMES``), then a structural fallback (a Linear/Conv1D whose output size is ``hidden_size``
and whose leaf name is a known writer name). ``verify_writers`` checks empirically, on the model at hand, that
injecting ``ε·u`` into a writer's output moves the stream by exactly ``ε·u`` (or reports how it differs: a scalar
multiplier, a per-token gate, or a norm after the writer as in Gemma 2/3's sandwich norms). A model that cannot be
handled raises an error listing the blocks and candidate parameters found.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

if TYPE_CHECKING:
    from .hooks import Site  # hooks.py imports this module at run time

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


@dataclass(frozen=True)
class ArchitectureSpec:
    """Where one family keeps its blocks and residual writers (names relative to a decoder block).

    ``writers``: component → relative module names; a block may lack some (hybrids: Jamba has attention *or*
    Mamba, dense MLP *or* MoE). ``expert`` names point at an experts container (fused 3-D tensors or a
    ``ModuleList`` of experts) or at a shared expert's down projection. ``post_norms``: writer name → the norm the
    block applies to that writer's output before adding it to the residual (sandwich norms). ``text``: for
    vision-language wrappers, take the writer names from the text model's family (``config.text_config``).
    """

    layers: tuple[str, ...]
    writers: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    post_norms: Mapping[str, str] = field(default_factory=dict)
    text: bool = False
    notes: str = ""


_DENSE = {"attn": ("self_attn.o_proj",), "mlp": ("mlp.down_proj",)}
_SANDWICH = {"self_attn.o_proj": "post_attention_layernorm", "mlp.down_proj": "post_feedforward_layernorm"}
_SANDWICH_NOTE = (
    "sandwich norms: o_proj/down_proj outputs pass through an RMSNorm before the residual add, so "
    "orthogonalizing the writer against Q does not remove the direction from the stream; plan_ablation "
    "orthogonalizes these writers against post_norm_basis (g ⊙ Q) instead, which does"
)

ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "llama": ArchitectureSpec(("model.layers",), _DENSE),
    "mistral": ArchitectureSpec(("model.layers",), _DENSE),
    "qwen2": ArchitectureSpec(("model.layers",), _DENSE),
    "qwen3": ArchitectureSpec(("model.layers",), _DENSE),
    "phi3": ArchitectureSpec(("model.layers",), _DENSE),
    "gemma": ArchitectureSpec(("model.layers",), _DENSE),
    "gemma2": ArchitectureSpec(("model.layers",), _DENSE, _SANDWICH, notes=_SANDWICH_NOTE),
    "gemma3_text": ArchitectureSpec(
        ("model.layers", "model.language_model.layers"), _DENSE, _SANDWICH, notes=_SANDWICH_NOTE
    ),
    "gpt2": ArchitectureSpec(
        ("transformer.h",),
        {"attn": ("attn.c_proj",), "mlp": ("mlp.c_proj",)},
        notes="Conv1D weights are stored (in, out): residual axis 1; learned position embedding",
    ),
    "gpt_neox": ArchitectureSpec(
        ("gpt_neox.layers",),
        {"attn": ("attention.dense",), "mlp": ("mlp.dense_4h_to_h",)},
        notes="parallel residual: attention and MLP both read the block input",
    ),
    "mixtral": ArchitectureSpec(
        ("model.layers",),
        {"attn": ("self_attn.o_proj",), "expert": ("mlp.experts",)},
        notes="fused experts: down_proj (E, d, inter)",
    ),
    "qwen2_moe": ArchitectureSpec(
        ("model.layers",),
        {
            "attn": ("self_attn.o_proj",),
            "mlp": ("mlp.down_proj",),
            "expert": ("mlp.experts", "mlp.shared_expert.down_proj"),
        },
        notes="fused experts + a shared expert scaled by a per-token sigmoid gate",
    ),
    "qwen3_moe": ArchitectureSpec(
        ("model.layers",), {"attn": ("self_attn.o_proj",), "mlp": ("mlp.down_proj",), "expert": ("mlp.experts",)}
    ),
    "gpt_oss": ArchitectureSpec(
        ("model.layers",),
        {"attn": ("self_attn.o_proj",), "expert": ("mlp.experts",)},
        notes="fused experts stored transposed, down_proj (E, inter, d), with down_proj_bias (E, d)",
    ),
    "mamba": ArchitectureSpec(("backbone.layers",), {"ssm": ("mixer.out_proj",)}),
    "mamba2": ArchitectureSpec(("backbone.layers",), {"ssm": ("mixer.out_proj",)}),
    "jamba": ArchitectureSpec(
        ("model.layers",),
        {
            "attn": ("self_attn.o_proj",),
            "ssm": ("mamba.out_proj",),
            "mlp": ("feed_forward.down_proj",),
            "expert": ("feed_forward.experts",),
        },
        notes="each block: attention or Mamba, then a dense MLP or an MoE",
    ),
    "falcon_h1": ArchitectureSpec(
        ("model.layers",),
        {"attn": ("self_attn.o_proj",), "ssm": ("mamba.out_proj",), "mlp": ("feed_forward.down_proj",)},
        notes="attention and Mamba run in parallel; outputs scaled by muP multipliers (scalars, so directions hold); "
        "embedding_multiplier is applied outside the embedding module",
    ),
    "llava": ArchitectureSpec(("model.language_model.layers", "language_model.model.layers"), text=True),
    "gemma3": ArchitectureSpec(("model.language_model.layers", "language_model.model.layers"), text=True),
}

# Leaf names a structural fallback accepts as residual writers (output size must also be hidden_size).
KNOWN_WRITER_LEAVES = ("o_proj", "out_proj", "down_proj", "c_proj", "dense", "dense_4h_to_h", "fc2", "w2", "wo")


class UnsupportedModelError(ValueError):
    """The model's layers or residual writers could not be found."""


@dataclass
class Writer:
    """One parameter that writes into the residual stream.

    ``residual_axis``: the axis of ``module.<param>`` whose size is ``hidden_size`` (0 for ``nn.Linear``,
    1 for GPT-2's ``Conv1D`` and for embeddings, the last or middle axis for fused expert tensors).
    ``layer``: block index, ``-1`` for the token embedding. ``source``: how it was found (``"registry"``,
    ``"table"``, ``"structural"``; structural finds deserve ``verify_writers``). ``post_norm``: a norm the block
    applies to this writer's output before the residual add (Gemma 2/3 sandwich norms), else ``None``.
    """

    name: str
    layer: int
    component: str
    module: nn.Module
    param: str = "weight"
    residual_axis: int = 0
    bias: str | None = None
    source: str = "registry"
    post_norm: nn.Module | None = None

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


def model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def architecture_spec(model: nn.Module) -> ArchitectureSpec | None:
    """The registry entry of ``model``'s family (for VLM wrappers: layer paths of the wrapper, writer names of the
    text model), or ``None`` for families the registry does not know."""
    spec = ARCHITECTURES.get(model_type(model) or "")
    if spec is None or not spec.text:
        return spec
    text_cfg = getattr(model.config, "text_config", None)
    text = ARCHITECTURES.get(getattr(text_cfg, "model_type", None) or "")
    if text is None:
        return ArchitectureSpec(spec.layers, {}, {}, notes=spec.notes)
    return ArchitectureSpec(spec.layers, text.writers, text.post_norms, notes=text.notes)


def _layers_and_prefix(model: nn.Module) -> tuple[nn.ModuleList, str]:
    spec = architecture_spec(model)
    paths = (spec.layers if spec else ()) + LAYER_LIST_PATHS
    for path in paths:
        layers = get_submodule(model, path)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return layers, path
    lists = [name for name, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    raise UnsupportedModelError(
        f"{type(model).__name__}: no decoder layer list at any known path ({', '.join(LAYER_LIST_PATHS)}); "
        f"ModuleLists found: {lists[:10]}. Add its path to hereticlab.core.architecture.LAYER_LIST_PATHS"
    )


def find_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder blocks."""
    return _layers_and_prefix(model)[0]


def find_embedding(model: nn.Module) -> nn.Module:
    for path in EMBEDDING_PATHS:
        module = get_submodule(model, path)
        if module is not None:
            return module
    # nn.Module's stub types an unknown attribute as ``Tensor | Module``; on a Hugging Face model it is this method
    return cast("Callable[[], nn.Module]", model.get_input_embeddings)()


def _residual_axis(module: nn.Module, param: str, d: int) -> int | None:
    weight = getattr(module, param, None)
    if not isinstance(weight, torch.Tensor):
        return None
    if isinstance(module, nn.Linear):
        return 0 if weight.shape[0] == d else None
    if type(module).__name__ == "Conv1D":  # transformers' GPT-2 Conv1D: weight (in, out)
        return 1 if weight.shape[1] == d else None
    if weight.ndim == 3:
        # Fused experts. transformers 5 stores them like a batch of nn.Linear weights, (experts, out=d, in), unless
        # the module says ``is_transposed`` (GPT-OSS: (experts, in, out=d)). Square (d == in) tensors are
        # ambiguous by shape alone, so the flag decides; only an unflagged (E, in, d) with in != d falls back to 2.
        if getattr(module, "is_transposed", False):
            return 2 if weight.shape[2] == d else None
        if weight.shape[1] == d:
            return 1
        if weight.shape[2] == d:
            return 2
    return None


def _make_writer(
    module: nn.Module,
    param: str,
    axis: int,
    name: str,
    layer: int,
    component: str,
    source: str,
    post_norm: nn.Module | None = None,
) -> Writer:
    bias = None
    for candidate in (f"{param}_bias", "bias") if param != "weight" else ("bias",):
        b = getattr(module, candidate, None)
        if isinstance(b, torch.Tensor) and b.shape[-1] == getattr(module, param).shape[axis]:
            bias = candidate
            break
    return Writer(name, layer, component, module, param, axis, bias, source, post_norm)


def _writers_at(
    block: nn.Module,
    rel: str,
    layer: int,
    d: int,
    prefix: str,
    component: str,
    source: str,
    post_norm: nn.Module | None = None,
) -> list[Writer]:
    """Writers at ``block.<rel>``: a Linear/Conv1D, a fused experts module, or a ModuleList of experts."""
    module = get_submodule(block, rel)
    if module is None:
        return []
    name = f"{prefix}.{layer}.{rel}"
    if isinstance(module, nn.ModuleList):  # one module per expert
        out = []
        for i, expert in enumerate(module):
            for leaf in ("down_proj", "w2", "fc2"):
                sub = getattr(expert, leaf, None)
                sub_axis = _residual_axis(sub, "weight", d) if sub is not None else None
                if sub is not None and sub_axis is not None:
                    out.append(
                        _make_writer(
                            sub,
                            "weight",
                            sub_axis,
                            f"{name}.{i}.{leaf}",
                            layer,
                            component,
                            source,
                        )
                    )
        return out
    axis = _residual_axis(module, "weight", d)
    if axis is not None:
        return [_make_writer(module, "weight", axis, name, layer, component, source, post_norm)]
    for pname in ("down_proj", "w2"):  # fused experts: 3-D parameters on the experts module
        weight = getattr(module, pname, None)
        if isinstance(weight, torch.Tensor) and weight.ndim == 3:
            axis = _residual_axis(module, pname, d)
            if axis is not None:
                return [_make_writer(module, pname, axis, f"{name}.{pname}", layer, component, source)]
    return []


def _expert_writers(block: nn.Module, layer: int, d: int, prefix: str) -> list[Writer]:
    """Per-expert down projections (ModuleList experts), fused 3-D expert tensors and shared experts."""
    writers = []
    for name, module in block.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if ".experts" in f".{name}" or "shared_expert" in name:
            if isinstance(module, nn.Linear) and leaf in ("down_proj", "w2", "fc2") and module.weight.shape[0] == d:
                writers.append(_make_writer(module, "weight", 0, f"{prefix}.{name}", layer, "expert", "table"))
            elif name.endswith("experts") and not isinstance(module, nn.ModuleList):
                writers.extend(_writers_at(block, name, layer, d, prefix, "expert", "table"))
    return writers


def _guess_component(rel: str) -> str:
    parent = rel.rsplit(".", 1)[0].lower() if "." in rel else ""
    leaf = rel.rsplit(".", 1)[-1]
    if "expert" in parent:
        return "expert"
    if any(k in parent for k in ("mamba", "mixer", "ssm")):
        return "ssm"
    if any(k in parent for k in ("attn", "attention")):
        return "attn"
    if any(k in parent for k in ("mlp", "ffn", "feed_forward", "ff")) or leaf in (
        "down_proj",
        "fc2",
        "w2",
        "dense_4h_to_h",
    ):
        return "mlp"
    return "attn"


def _structural_writers(block: nn.Module, layer: int, d: int, prefix: str) -> list[Writer]:
    """Fallback: Linear/Conv1D modules named like a writer whose output size is ``hidden_size``."""
    out = []
    for rel, module in block.named_modules():
        if rel.rsplit(".", 1)[-1] not in KNOWN_WRITER_LEAVES:
            continue
        if not (isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"):
            continue
        axis = _residual_axis(module, "weight", d)
        if axis is not None:
            out.append(
                _make_writer(
                    module, "weight", axis, f"{prefix}.{layer}.{rel}", layer, _guess_component(rel), "structural"
                )
            )
    return out


def find_writers(model: nn.Module, components: Iterable[str] = COMPONENTS) -> list[Writer]:
    """Every residual writer of ``model`` whose component is in ``components``, in layer order.

    Lookup order per block: the family's registry entry (``ARCHITECTURES``), then the generic name table
    (``WRITER_NAMES`` + expert scan), then the structural fallback (``source="structural"``: check those with
    ``verify_writers``). Raises ``UnsupportedModelError`` (listing blocks and candidate parameters) if a block has
    no writer.
    """
    components = set(components)
    unknown = components - set(COMPONENTS)
    if unknown:
        raise ValueError(f"unknown components {sorted(unknown)}; choose from {COMPONENTS}")
    d = hidden_size(model)
    layers, prefix = _layers_and_prefix(model)
    spec = architecture_spec(model)
    writers: list[Writer] = []
    if "embed" in components:
        emb = find_embedding(model)
        writers.append(Writer("embed_tokens", -1, "embed", emb, "weight", 1))
        for path in POSITION_EMBEDDING_PATHS:
            pos = get_submodule(model, path)
            if isinstance(pos, nn.Embedding) and pos.weight.shape[1] == d:
                writers.append(Writer(path, -1, "embed", pos, "weight", 1))
    for index, block in enumerate(layers):
        found: list[Writer] = []
        if spec is not None and spec.writers:
            for component, names in spec.writers.items():
                for rel in names:
                    norm = get_submodule(block, spec.post_norms[rel]) if rel in spec.post_norms else None
                    found.extend(_writers_at(block, rel, index, d, prefix, component, "registry", norm))
        if not found:
            for component, names in WRITER_NAMES.items():
                for rel in names:
                    module = get_submodule(block, rel)
                    if module is not None and _residual_axis(module, "weight", d) is not None:
                        found.extend(_writers_at(block, rel, index, d, prefix, component, "table"))
            found.extend(_expert_writers(block, index, d, prefix))
        if not found:
            found = _structural_writers(block, index, d, prefix)
        if not found:
            candidates = [
                f"{n} {tuple(m.weight.shape)}"
                for n, m in block.named_modules()
                if isinstance(getattr(m, "weight", None), torch.Tensor) and d in m.weight.shape
            ]
            raise UnsupportedModelError(
                f"{type(model).__name__}: block {index} ({type(block).__name__}) has no known residual writer; "
                f"parameters with a {d}-sized axis: {candidates}. "
                "Add its name to hereticlab.core.architecture.WRITER_NAMES"
            )
        writers.extend(w for w in found if w.component in components)
    return writers


def num_layers(model: nn.Module) -> int:
    return len(find_layers(model))


def block_output_tensor(output: torch.Tensor | tuple | list) -> torch.Tensor:
    """A decoder block returns a tensor or a tuple whose first item is the hidden state."""
    return output[0] if isinstance(output, (tuple, list)) else output


def replace_block_output(output: torch.Tensor | tuple | list, hidden: torch.Tensor) -> torch.Tensor | tuple | list:
    """``output`` with its hidden state (a tensor, or a tuple/list's first item) replaced by ``hidden``."""
    if isinstance(output, tuple):
        return (hidden,) + tuple(output[1:])
    if isinstance(output, list):
        return [hidden] + list(output[1:])
    return hidden


# ----------------------------------------------------------------------------------------------------------
# Sandwich norms and empirical verification
# ----------------------------------------------------------------------------------------------------------


def norm_gain(norm: nn.Module, d: int) -> torch.Tensor:
    """The per-coordinate gain ``g [d]`` of an RMSNorm-like module (``norm(x) = g ⊙ x / rms(x)``), read off by
    applying it to a vector of ones (float32); the overall scale does not matter to the callers."""
    p = next(norm.parameters(), None)
    ones = torch.ones(
        1, d, dtype=p.dtype if p is not None else torch.float32, device=p.device if p is not None else None
    )
    with torch.no_grad():
        return norm(ones)[0].float().cpu()


def _check_rms_like(writer: Writer, norm: nn.Module, g: torch.Tensor, d: int) -> None:
    """Raise unless ``norm`` (``writer.post_norm``) acts as ``x ↦ c(x) · g ⊙ x`` (an RMSNorm without bias or
    centring): only then does orthogonalizing the writer against ``g ⊙ Q`` remove ``Q`` from what reaches the
    residual exactly."""
    p = next(norm.parameters(), None)
    dtype = p.dtype if p is not None else torch.float32
    device = p.device if p is not None else None
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, d, generator=gen) + torch.tensor([[0.0], [3.0]])  # the second row has a large mean
    with torch.no_grad():
        y = norm(x.to(dtype=dtype, device=device)).float().cpu()
    gx = g[None, :] * x.to(dtype)
    c = (y * gx).sum(-1, keepdim=True) / (gx * gx).sum(-1, keepdim=True).clamp_min(1e-30)
    err = float(((y - c * gx).abs().amax(-1) / y.abs().amax(-1).clamp_min(1e-30)).max())
    tol = 1e-3 if torch.finfo(dtype).bits >= 32 else 3e-2
    if not err < tol:
        raise UnsupportedModelError(
            f"{writer.name}: its post-norm {type(norm).__name__} is not of the form g ⊙ x / rms(x) (relative deviation "
            f"{err:.3g}; a bias or mean subtraction?), so no weight edit of the writer removes the direction from the "
            f"residual stream exactly; edit without this writer (components=...) or use hook-based ablation"
        )


def post_norm_basis(writer: Writer, Q: torch.Tensor) -> torch.Tensor:
    """The basis to orthogonalize ``writer`` against so that what reaches the residual has no ``Q`` component.

    Without a post-norm this is ``Q``. With an RMSNorm ``y = g ⊙ x / rms(x)`` after the writer (Gemma 2/3
    sandwich norms), ``Qᵀ y = (g ⊙ Q)ᵀ x / rms(x)``, so orthogonalizing the writer against the orthonormalized
    columns of ``g ⊙ Q`` makes the post-norm output exactly orthogonal to ``Q``. ``Q [d, k]`` → ``[d, k']``
    (``k' < k`` only where zero gains make ``g ⊙ Q`` rank-deficient). Raises ``UnsupportedModelError`` if the
    post-norm is not of that form (e.g. a LayerNorm with bias or mean subtraction), where no exact correction exists.
    """
    if writer.post_norm is None:
        return Q
    g = norm_gain(writer.post_norm, Q.shape[0])
    _check_rms_like(writer, writer.post_norm, g, Q.shape[0])
    scaled = Q.double() * g.double()[:, None]  # [d, k]
    q, r = torch.linalg.qr(scaled)
    diag = torch.diagonal(r).abs()
    if bool((diag > 1e-9 * scaled.norm(dim=0).max().clamp_min(1e-300)).all()):
        signs = torch.sign(torch.diagonal(r))
        signs[signs == 0] = 1
        return (q * signs).to(Q.dtype)
    u, s, _ = torch.linalg.svd(scaled, full_matrices=False)  # rank-deficient: keep the column space only
    return u[:, s > 1e-9 * s.max().clamp_min(1e-300)].to(Q.dtype)


WRITER_KINDS = ("direct", "scaled", "gated", "normed", "inactive")


@dataclass
class WriterCheck:
    """Result of injecting ``ε·u`` into one writer's output (``verify_writers``).

    ``kind``: ``"direct"`` (the stream moved by exactly ``ε·u``), ``"scaled"`` (by ``c·ε·u``, one constant ``c``:
    muP multipliers), ``"gated"`` (by ``c_t·ε·u`` with a per-token ``c_t``: gated shared experts, routed experts),
    ``"normed"`` (not parallel to ``u``: a norm or nonlinearity sits between the writer and the residual, e.g.
    Gemma 2/3 sandwich norms), ``"inactive"`` (the stream did not move). ``gain``: median ``c_t``; ``off_axis``: max
    over tokens of ``|Δ_t − c_t ε u| / ε``. Weight orthogonalization removes the direction from the write exactly
    when ``additive`` (direct, scaled, gated).
    """

    writer: Writer
    kind: str
    gain: float
    gain_spread: float
    off_axis: float

    @property
    def additive(self) -> bool:
        return self.kind in ("direct", "scaled", "gated")

    def __repr__(self) -> str:
        return (
            f"WriterCheck({self.writer.name}: {self.kind}, gain={self.gain:.4g}, spread={self.gain_spread:.2g}, "
            f"off_axis={self.off_axis:.2g})"
        )


def _sublayer_name(block: nn.Module, module: nn.Module) -> str | None:
    """The name of ``block``'s direct child that contains ``module`` (``None`` if not inside ``block``)."""
    for name, child in block.named_children():
        if child is module or any(m is module for m in child.modules()):
            return name
    return None


def _vocab_size(model: nn.Module) -> int:
    for cfg in (model.config, getattr(model.config, "text_config", None)):
        size = getattr(cfg, "vocab_size", None)
        if isinstance(size, int):
            return size
    return 256


def _pin_points(layers: nn.ModuleList, writers: Sequence[Writer]) -> dict[int, dict[str | int, nn.Module]]:
    """Per block, the modules whose outputs a clean run records and a perturbed run pins: each writer's direct child
    of the block (keyed by its name) and each writer module itself (keyed by ``id``), for blocks that call into a
    sublayer's children without calling the sublayer module."""
    roots: dict[int, dict[str | int, nn.Module]] = {}
    modules: dict[int, dict[str | int, nn.Module]] = {}
    for w in writers:
        if w.layer >= 0:
            modules.setdefault(w.layer, {})[id(w.module)] = w.module
            name = _sublayer_name(layers[w.layer], w.module)
            if name is not None:
                roots.setdefault(w.layer, {})[name] = getattr(layers[w.layer], name)
    return {i: {**roots.get(i, {}), **modules.get(i, {})} for i in sorted(set(roots) | set(modules))}


def _is_injected(block: nn.Module, key: str | int, module: nn.Module, inject: Writer | None) -> bool:
    """Whether pin point ``module`` holds the injected writer (its sublayer, or the writer itself): left unpinned."""
    if inject is None:
        return False
    if isinstance(key, str):
        return module is getattr(block, _sublayer_name(block, inject.module) or "", None)
    return module is inject.module


@contextmanager
def _pinning(
    layers: nn.ModuleList,
    points: dict[int, dict[str | int, nn.Module]],
    blocks: Iterable[int],
    inject: Writer | None,
    pinned: dict[tuple[int, str | int], object] | None,
    record: dict[tuple[int, str | int], object],
) -> Iterator[None]:
    """Hook the pin points of ``blocks``: record their outputs (``pinned is None``) or replace them by ``pinned``."""
    from .hooks import hook_outputs  # hooks.py builds on this module

    def hook_for(key: tuple[int, str | int]) -> Callable[[object], object]:
        def hook(output: object) -> object:
            if pinned is None:
                record[key] = output
            elif key in pinned:
                return pinned[key]
            return None

        return hook

    targets = [
        (module, hook_for((index, key)))
        for index in blocks
        for key, module in points.get(index, {}).items()
        if not _is_injected(layers[index], key, module, inject)
    ]
    with hook_outputs(targets, raw=True):
        yield


@contextmanager
def _adding(writer: Writer, vector: torch.Tensor) -> Iterator[None]:
    """Add ``vector [d]`` to ``writer``'s output during the forwards in the block."""
    from .hooks import hook_outputs  # hooks.py builds on this module

    with hook_outputs([(writer.module, lambda hidden: hidden + vector.to(hidden.dtype))]):
        yield


def _writer_residual(writer: Writer) -> int:
    """The residual a writer writes: 0 for embeddings (block 0's input), ``b + 1`` for a writer in block ``b``."""
    return 0 if writer.layer < 0 else writer.layer + 1


def _probe_run(
    model: nn.Module,
    input_ids: torch.Tensor,
    points: dict[int, dict[str | int, nn.Module]],
    inject: Writer | None = None,
    vector: torch.Tensor | None = None,
    pinned: dict[tuple[int, str | int], object] | None = None,
) -> tuple[dict[int, torch.Tensor], dict[tuple[int, str | int], object]]:
    """One forward. Clean (``inject is None``): every residual ``[batch, seq, d]`` (float32) and every pin point's
    output. Perturbed: ``vector`` added to ``inject``'s output, the other pin points of its block set to ``pinned``,
    and only the residual it writes, the forward stopping there."""
    from .hooks import trace  # hooks.py builds on this module

    layers = find_layers(model)
    blocks: Sequence[int]
    if inject is None:
        sites, stop, blocks = list(range(len(layers) + 1)), None, range(len(layers))
    else:
        k = _writer_residual(inject)
        sites, stop, blocks = [k], k, ([] if inject.layer < 0 else [inject.layer])
    residuals: dict[int, torch.Tensor] = {}
    outputs: dict[tuple[int, str | int], object] = {}

    def on_read(site: Site, hidden: torch.Tensor) -> None:
        residuals[site.index] = hidden.float().clone()

    with ExitStack() as stack:
        stack.enter_context(_pinning(layers, points, blocks, inject, pinned, outputs))
        if inject is not None:
            if vector is None:
                raise ValueError("a perturbed forward (inject=...) needs the vector= to add")
            stack.enter_context(_adding(inject, vector))
        stack.enter_context(trace(model, read=sites, on_read=on_read, stop_after=stop))
        model(input_ids=input_ids, use_cache=False)
    return residuals, outputs


def _classify(writer: Writer, delta: torch.Tensor, u: torch.Tensor, tol: float) -> WriterCheck:
    """``delta [tokens, d]``: how the residual moved, divided by ``ε``; ``u [d]``: the injected unit vector."""
    gains = delta @ u
    perp = (delta - gains[:, None] * u).norm(dim=-1)
    moved = delta.norm(dim=-1) > tol
    if not bool(moved.any()):
        return WriterCheck(writer, "inactive", 0.0, 0.0, float(perp.max()))
    g = gains[moved]
    off = float(perp.max())
    spread = float(g.max() - g.min())
    median = float(g.median())
    if off > tol * max(1.0, abs(median)):
        kind = "normed"
    elif bool(moved.all()) and float((g - 1).abs().max()) < tol:
        kind = "direct"
    elif bool(moved.all()) and spread < tol * max(1.0, abs(median)):
        kind = "scaled"
    else:
        kind = "gated"
    return WriterCheck(writer, kind, median, spread, off)


@torch.no_grad()
def verify_writers(
    model: nn.Module,
    writers: Sequence[Writer] | None = None,
    *,
    input_ids: torch.Tensor | None = None,
    scale: float = 0.1,
    tol: float = 1e-3,
    seed: int = 0,
) -> list[WriterCheck]:
    """Check empirically that each writer's output is added straight into the residual stream.

    For each writer, one forward pass adds ``ε·u`` (``u`` a random unit vector, ``ε = scale ·`` the mean norm of
    the stream there) to the writer's output while every *other* writer-bearing sublayer of the same block (e.g.
    the MLP, when checking attention) is pinned to its unperturbed output, and records how the block output (for
    embeddings: the input of block 0) moved. Costs one forward per writer plus one; stops after the block.
    ``tol``: relative tolerance (to ``ε``) for "exactly". Returns one ``WriterCheck`` per writer.
    """
    layers = find_layers(model)
    all_writers = find_writers(model)
    writers = list(all_writers if writers is None else writers)
    device = next(model.parameters()).device
    if input_ids is None:
        gen = torch.Generator().manual_seed(seed)
        input_ids = torch.randint(0, min(_vocab_size(model), 256), (2, 8), generator=gen)
    input_ids = input_ids.to(device)
    d = hidden_size(model)
    u = torch.randn(d, generator=torch.Generator().manual_seed(seed + 1))
    u = (u / u.norm()).to(device)

    points = _pin_points(layers, all_writers)
    base, outputs = _probe_run(model, input_ids, points)
    eps = {k: scale * hidden.norm(dim=-1).mean().item() for k, hidden in base.items()}  # per residual index
    checks = []
    for w in writers:
        k = _writer_residual(w)
        pinned = {key: value for key, value in outputs.items() if key[0] == w.layer}
        moved, _ = _probe_run(model, input_ids, points, w, eps[k] * u, pinned)
        delta = (moved[k] - base[k]).reshape(-1, d) / eps[k]  # [tokens, d]
        checks.append(_classify(w, delta, u.float(), tol))
    return checks
