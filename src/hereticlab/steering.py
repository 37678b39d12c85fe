"""Inference-time interventions as reversible hooks: directional ablation and activation addition.

Everything here is a context manager: hooks are removed on exit (also on exceptions), so the model computes
exactly what it did before.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Sequence

import torch
from torch import nn

from .architecture import block_output_tensor, find_layers, find_writers, replace_block_output
from .directions import Directions, orthonormal_basis


def _remove_projection(x: torch.Tensor, q: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """``x − λ Q Qᵀ x`` along the last axis of ``x [..., d]``."""
    q = q.to(device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))
    xf = x.to(q.dtype)
    return (xf - strength * (xf @ q) @ q.T).to(x.dtype)


@contextmanager
def ablation_hooks(
    model: nn.Module,
    direction: torch.Tensor | Directions,
    *,
    layers: Sequence[int] | None = None,
    strength: float = 1.0,
    include_embedding: bool = True,
):
    """Project ``direction`` out of the residual stream at every position (Arditi et al.'s inference-time ablation).

    Implemented on the writers' outputs (embedding, attention, MLP, SSM, experts' parent module), which keeps
    the stream orthogonal to the direction everywhere it is read — the same as weight orthogonalization of all
    writers (exactly so for models without norms after a writer). ``layers``: blocks to hook (default all).
    ``direction``: ``[d]`` / ``[k, d]`` shared by all layers, or ``Directions`` (block ``l`` uses index ``l + 1``).
    """
    n = len(find_layers(model))
    chosen = set(range(n) if layers is None else layers)
    shared = None if isinstance(direction, Directions) else orthonormal_basis(direction.float())

    def basis_for(index: int) -> torch.Tensor:
        return shared if shared is not None else direction.basis(index)

    handles = []

    def make_hook(q):
        def hook(module, args, output):
            hidden = block_output_tensor(output)
            return replace_block_output(output, _remove_projection(hidden, q, strength))

        return hook

    try:
        writers = find_writers(model, ("embed", "attn", "mlp", "ssm"))
        hooked: set[int] = set()
        for writer in writers:
            if writer.component == "embed":
                if include_embedding and (layers is None or 0 in chosen or -1 in chosen):
                    handles.append(writer.module.register_forward_hook(make_hook(basis_for(0))))
                continue
            if writer.layer not in chosen or id(writer.module) in hooked:
                continue
            hooked.add(id(writer.module))
            handles.append(writer.module.register_forward_hook(make_hook(basis_for(writer.layer + 1))))
        # MoE blocks: hook the whole sparse MLP module's output rather than each expert.
        for index, block in enumerate(find_layers(model)):
            if index not in chosen:
                continue
            for name in ("mlp", "block_sparse_moe", "feed_forward"):
                module = getattr(block, name, None)
                if module is not None and any(".experts" in f".{n}" for n, _ in module.named_modules()):
                    handles.append(module.register_forward_hook(make_hook(basis_for(index + 1))))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def activation_addition(
    model: nn.Module,
    vector: torch.Tensor,
    *,
    layer: int | Sequence[int],
    alpha: float = 1.0,
    positions: str | slice = "all",
    prompt_length: int | None = None,
):
    """Add ``alpha · vector`` to the residual stream at the *input* of block(s) ``layer`` (ActAdd / CAA).

    ``vector``: raw (unnormalized) ``[d]``. ``positions``: ``"all"``, ``"prompt"`` / ``"response"`` (split at
    ``prompt_length`` tokens of the current sequence; during cached decoding every new token is response), or a slice.
    """
    blocks = find_layers(model)
    targets = [layer] if isinstance(layer, int) else list(layer)
    handles = []
    seen = {"tokens": 0}

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        add = (alpha * vector).to(device=hidden.device, dtype=hidden.dtype)
        seq = hidden.shape[1]
        if positions == "all":
            hidden = hidden + add
        else:
            start = seen["tokens"] if module is blocks[targets[0]] else seen["tokens"]
            if isinstance(positions, slice):
                mask = torch.zeros(seq, dtype=torch.bool, device=hidden.device)
                mask[positions] = True
            else:
                absolute = torch.arange(start, start + seq, device=hidden.device)
                boundary = prompt_length if prompt_length is not None else 0
                mask = absolute >= boundary if positions == "response" else absolute < boundary
            hidden = hidden + add * mask[None, :, None].to(hidden.dtype)
        if args:
            return (hidden,) + tuple(args[1:]), kwargs
        kwargs["hidden_states"] = hidden
        return args, kwargs

    def count(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        seen["tokens"] += hidden.shape[1]

    try:
        for index in targets:
            handles.append(blocks[index].register_forward_pre_hook(hook, with_kwargs=True))
        if positions in ("prompt", "response"):
            handles.append(blocks[targets[-1]].register_forward_hook(count, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
