"""Inference-time interventions as reversible hooks: directional ablation, activation addition (ActAdd / CAA),
plus contrastive and RepE reading vectors, a token-span capture helper and sweeps.

Everything here is a context manager: hooks are removed on exit (also on exceptions), so the model computes
exactly what it did before.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, cast

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from ..core.architecture import UnsupportedModelError, Writer, find_layers, find_writers, post_norm_basis
from ..core.capture import auto_batch_size, batched, capture_residuals, encode_ids, model_device
from ..core.generation import generate
from ..core.hooks import Call, OutputHook, Site, hook_outputs, resolve_site, resolve_sites, trace
from ..core.prompts import format_chat
from ..directions.base import Directions, mean_difference, orthonormal_basis
from ..directions.methods import pca_pairs
from .base import HookIntervention, resolve_residuals, warn_layer_keyword


def _remove_projection(x: torch.Tensor, q: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """``x − λ Q Qᵀ x`` along the last axis of ``x [..., d]``."""
    q = q.to(device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))
    xf = x.to(q.dtype)
    return (xf - strength * (xf @ q) @ q.T).to(x.dtype)


class AblationHooks(HookIntervention):
    """Lazy inference-time directional ablation (see ``ablation_hooks``); ``residuals``: the residual indices whose
    writers are hooked (``None``: all)."""

    def __init__(
        self,
        model: nn.Module,
        direction: torch.Tensor | Directions,
        *,
        residuals: Sequence[int] | None = None,
        strength: float = 1.0,
        include_embedding: bool = True,
    ) -> None:
        self.model, self.direction, self.residuals, self.strength = model, direction, residuals, strength
        self.include_embedding = include_embedding
        super().__init__(
            lambda: hook_outputs(
                _ablation_targets(
                    model, direction, residuals=residuals, strength=strength, include_embedding=include_embedding
                )
            )
        )


def ablation_hooks(
    model: nn.Module,
    direction: torch.Tensor | Directions,
    *,
    resid: int | Sequence[int] | None = None,
    block: int | Sequence[int] | None = None,
    strength: float = 1.0,
    include_embedding: bool = True,
    layers: Sequence[int] | None = None,
) -> AblationHooks:
    """Project ``direction`` out of the residual stream at every position (Arditi et al.'s inference-time ablation).

    Implemented on the writers' outputs (embedding, attention, MLP, SSM, experts' parent module), which keeps
    the stream orthogonal to the direction everywhere it is read — the same as weight orthogonalization of all
    writers (``hl.ablate``). A writer followed by a post-norm (Gemma 2/3 sandwich norms) is projected against the
    norm-corrected basis ``post_norm_basis`` as ``plan_ablation`` does, so what reaches the stream has no component
    along the direction and the hooks still equal ``hl.ablate``; a post-norm that admits no exact correction (bias,
    mean subtraction) is projected at its own output instead. Sites (default: every writer): ``resid=k``
    hooks the writers of residual ``k`` (``0``: the embedding; ``k ≥ 1``: block ``k - 1``), ``block=b`` hooks block
    ``b``'s writers (= ``resid=b + 1``). ``strength``: fraction of the projection removed (ablation kernel, not a
    steering ``alpha``). ``direction``: ``[d]`` / ``[k, d]`` shared by all layers, or ``Directions`` (residual ``k``
    uses index ``k``). Lazy: returns an ``AblationHooks`` applied on ``with`` / ``.apply()``.

    ``layers=`` (0.1, deprecated): block indices, where ``0`` or ``-1`` also hooked the embedding.
    """
    residuals = None
    if layers is not None:
        if resid is not None or block is not None:
            raise TypeError("pass resid=/block= or the deprecated layers=, not both")
        chosen = set(layers)
        residuals = sorted(
            {0 for x in chosen if x in (0, -1) and include_embedding} | {x + 1 for x in chosen if x >= 0}
        )
        warn_layer_keyword("ablation_hooks", "layers", list(layers), f"resid={residuals}")
    elif resid is not None or block is not None:
        residuals = resolve_residuals(model, resid=resid, block=block)
    return AblationHooks(model, direction, residuals=residuals, strength=strength, include_embedding=include_embedding)


def _ablation_targets(
    model: nn.Module,
    direction: torch.Tensor | Directions,
    *,
    residuals: Sequence[int] | None,
    strength: float,
    include_embedding: bool,
) -> list[tuple[nn.Module, OutputHook]]:
    """The ``(module, fn)`` pairs for ``hook_outputs`` that ablate ``direction`` from the writers of ``residuals``."""
    n = len(find_layers(model))
    chosen = set(range(n + 1) if residuals is None else residuals)  # residual indices
    shared = None if isinstance(direction, Directions) else orthonormal_basis(direction.float())
    bases: dict[int, torch.Tensor] = {}

    def basis_for(index: int) -> torch.Tensor:
        if shared is not None:
            return shared
        if index not in bases:
            bases[index] = cast(Directions, direction).basis(index)  # ``shared`` is None only for Directions
        return bases[index]

    def project(q: torch.Tensor) -> OutputHook:
        return lambda hidden: _remove_projection(hidden, q, strength)

    targets: list[tuple[nn.Module, OutputHook]] = []
    hooked: set[int] = set()
    corrected: dict[tuple[int, int], torch.Tensor | None] = {}  # None: no exact correction for that post-norm

    def add(writer: Writer, module: nn.Module, q: torch.Tensor) -> None:
        """Hook ``module`` (the writer, or the sublayer holding it) so that what reaches the stream loses ``q``."""
        if writer.post_norm is not None:  # sandwich norm: the writer's output is normed before the residual add
            key = (id(writer.post_norm), id(q))
            if key not in corrected:
                try:
                    corrected[key] = post_norm_basis(writer, q)
                except UnsupportedModelError:
                    corrected[key] = None
            basis = corrected[key]
            if basis is None:  # no exact writer-side correction (bias, centring): project the norm's output
                module = writer.post_norm
            else:
                q = basis
        if id(module) in hooked:
            return
        hooked.add(id(module))
        targets.append((module, project(q)))

    for writer in find_writers(model, ("embed", "attn", "mlp", "ssm")):
        if writer.component == "embed":
            if include_embedding and 0 in chosen:
                targets.append((writer.module, project(basis_for(0))))
            continue
        if writer.layer + 1 in chosen:
            add(writer, writer.module, basis_for(writer.layer + 1))
    # MoE blocks: hook the output of the block's sublayer that holds the experts (routed experts, their biases and
    # any gated shared expert all sum there), found from the expert writers whatever it is named.
    blocks = find_layers(model)
    for writer in find_writers(model, ("expert",)):
        if writer.layer + 1 not in chosen:
            continue
        block = blocks[writer.layer]
        name = next(
            (n for n, child in block.named_children() if any(m is writer.module for m in child.modules())), None
        )
        add(writer, getattr(block, name) if name is not None else writer.module, basis_for(writer.layer + 1))
    return targets


# ----------------------------------------------------------------------------------------------------------
# Position masks and residual hooks at block inputs
# ----------------------------------------------------------------------------------------------------------

Positions = str | slice | Callable[[int, int, torch.device | None], torch.Tensor]


def position_mask(
    positions: Positions,
    *,
    batch: int,
    seq: int,
    offset: int,
    prompt_length: int | Sequence[int] | torch.Tensor | None,
    device: torch.device | None = None,
) -> torch.Tensor | None:
    """Which tokens of a forward call are steered: ``[batch, seq]`` bool, or ``None`` for every token.

    ``offset``: absolute index of the call's first token (tokens already cached). ``positions``:

    - ``"all"``: every token;
    - ``"prompt"`` / ``"response"``: split at ``prompt_length`` (an int, or one boundary per row, counted in the
      padded sequence). Without ``prompt_length`` the split follows the cache: tokens of a call that starts the
      sequence (``offset == 0``, the prefill) are prompt, tokens fed later (cached decoding) are response;
    - ``"last_prompt"``: only the prompt's last token (position ``prompt_length − 1``; without it, the last token
      of the prefill call) — where the next-token decision is read, as in function-vector / conceptor steering;
    - a ``slice`` of absolute positions (``slice(-1, None)``: the last token of each call);
    - a callable ``(offset, seq, device) → bool [seq] or [batch, seq]``.
    """
    if isinstance(positions, str):
        if positions == "all":
            return None
        if positions not in ("prompt", "response", "last_prompt"):
            raise ValueError(
                "positions must be 'all', 'prompt', 'response', 'last_prompt', a slice or a callable; "
                f"got {positions!r}"
            )
        absolute = torch.arange(offset, offset + seq, device=device)
        if positions == "last_prompt":
            if prompt_length is None:
                mask = torch.zeros(seq, dtype=torch.bool, device=device)
                if offset == 0:
                    mask[-1] = True
                return mask[None].expand(batch, seq)
            boundary = torch.as_tensor(prompt_length, device=device).reshape(-1, 1)
            return (absolute[None] == boundary - 1).expand(batch, seq)
        if prompt_length is None:
            is_prompt = torch.full((seq,), offset == 0, dtype=torch.bool, device=device)
            mask = is_prompt if positions == "prompt" else ~is_prompt
            return mask[None].expand(batch, seq)
        boundary = torch.as_tensor(prompt_length, device=device).reshape(-1, 1)
        mask = absolute[None] < boundary if positions == "prompt" else absolute[None] >= boundary
        return mask.expand(batch, seq)
    if isinstance(positions, slice):
        if positions.start is not None and positions.start < 0 or positions.stop is not None and positions.stop < 0:
            mask = torch.zeros(seq, dtype=torch.bool, device=device)  # negative: relative to this call's tokens
            mask[positions] = True
        else:
            absolute = torch.arange(offset, offset + seq)
            mask = torch.zeros(offset + seq, dtype=torch.bool)
            mask[positions] = True
            mask = mask[absolute].to(device)
        return mask[None].expand(batch, seq)
    if callable(positions):
        mask = torch.as_tensor(positions(offset, seq, device), dtype=torch.bool, device=device)
        return (mask[None] if mask.ndim == 1 else mask).expand(batch, seq)
    raise ValueError(f"positions must be 'all', 'prompt', 'response', a slice or a callable; got {positions!r}")


@contextmanager
def residual_input_hooks(
    model: nn.Module,
    layers: int | Sequence[int],
    transform: Callable[[int, torch.Tensor], torch.Tensor],
    *,
    positions: Positions = "all",
    prompt_length: int | Sequence[int] | torch.Tensor | None = None,
) -> Iterator[None]:
    """Replace the residual stream at residual index(es) ``layers`` by ``transform(index, hidden)``.

    ``hidden [batch, seq, d]`` is residual index ``index`` (the stream after ``index`` blocks, ``0..L``): the input of
    block ``index``, or for ``index = L`` the last block's output. Only the tokens selected by ``positions`` (see
    ``position_mask``) change; the others keep their exact values. Negative indices count from ``L`` blocks here
    (the 0.1 rule: ``-1`` is block ``L - 1``'s input); the public interventions resolve ``resid=`` / ``block=``
    sites with ``core.hooks.resolve_site`` and pass non-negative indices. Hooks are removed on exit, also on
    exceptions.

    A thin form of ``core.hooks.trace`` (``write_at`` these residuals). A position mask needs the absolute index of
    each call's first token: ``trace(..., with_call=True)`` hands it over as ``Call.offset``.
    """
    n = len(find_layers(model))
    targets = [layers] if isinstance(layers, int) else list(layers)
    targets = [t + n if t < 0 else t for t in targets]

    def steer(site: Site, hidden: torch.Tensor, call: Call | None = None) -> torch.Tensor:
        batch, seq = hidden.shape[:2]
        offset = 0 if call is None else call.offset
        mask = position_mask(
            positions, batch=batch, seq=seq, offset=offset, prompt_length=prompt_length, device=hidden.device
        )
        new = transform(site.index, hidden)
        return new if mask is None else torch.where(mask[..., None], new, hidden)

    # "all" never looks at the offset: no call bookkeeping (and no cache self-check) is needed.
    with trace(model, write=steer, write_at=targets, with_call=positions != "all"):
        yield


def _vector_for(vector: torch.Tensor | Directions, layer: int) -> torch.Tensor:
    """``[d]`` shared vector, or the raw vector of ``Directions`` at residual index ``layer`` (a block's input)."""
    if isinstance(vector, Directions):
        if vector.rank != 1:
            raise ValueError("activation addition needs rank-1 directions")
        return vector.vectors[layer]
    return vector


def _old_layer_residuals(model: nn.Module, layer: int | Sequence[int]) -> list[int]:
    """0.1's ``layer=`` of steering (block input = residual ``layer``; negatives from the number of blocks)."""
    n = len(find_layers(model))
    return [x + n if x < 0 else x for x in ([layer] if isinstance(layer, int) else list(layer))]


def _steering_residuals(model, function, resid, block, layer) -> list[int]:
    if layer is not None:
        if resid is not None or block is not None:
            raise TypeError(f"pass resid=/block= or the deprecated layer= to {function}, not both")
        residuals = _old_layer_residuals(model, layer)
        for k in residuals:
            resolve_site(model, resid=k)  # range check
        shown = residuals[0] if isinstance(layer, int) else residuals
        warn_layer_keyword(function, "layer", layer, f"resid={shown} (the input of block {shown})")
        return residuals
    if resid is None and block is None:
        raise TypeError(f"{function} needs a site: resid=k (stream after k blocks) or block=b (block b's output)")
    return resolve_residuals(model, resid=resid, block=block)


class ActivationAddition(HookIntervention):
    """Lazy activation addition (see ``activation_addition``): ``h ← h + α v`` at residual indices ``residuals``."""

    def __init__(
        self,
        model: nn.Module,
        vector: torch.Tensor | Directions,
        *,
        residuals: Sequence[int],
        alpha: float = 1.0,
        positions: Positions = "all",
        prompt_length: int | Sequence[int] | torch.Tensor | None = None,
    ) -> None:
        self.model, self.vector, self.residuals, self.alpha = model, vector, list(residuals), alpha
        self.positions, self.prompt_length = positions, prompt_length

        def add(index: int, hidden: torch.Tensor) -> torch.Tensor:
            v = _vector_for(vector, index).to(device=hidden.device, dtype=hidden.dtype)
            return hidden + alpha * v

        super().__init__(
            lambda: residual_input_hooks(model, self.residuals, add, positions=positions, prompt_length=prompt_length)
        )


def activation_addition(
    model: nn.Module,
    vector: torch.Tensor | Directions,
    *,
    resid: int | Sequence[int] | None = None,
    block: int | Sequence[int] | None = None,
    alpha: float = 1.0,
    positions: Positions = "all",
    prompt_length: int | Sequence[int] | torch.Tensor | None = None,
    layer: int | Sequence[int] | None = None,
) -> ActivationAddition:
    """Add ``alpha · vector`` to the residual stream at site(s) ``resid=`` / ``block=`` (ActAdd / CAA).

    ``resid=k``: the stream after ``k`` blocks (``0..L``, ``-1`` = ``L``); ``block=b``: block ``b``'s output
    (``= resid=b + 1``). ``vector``: raw (unnormalized) ``[d]``, or ``Directions`` (residual ``k`` gets
    ``vectors[k]``). ``positions``: ``"all"``, ``"prompt"`` / ``"response"`` (split at ``prompt_length``; without
    it, the prefill is prompt and every cached decoding step is response), ``"last_prompt"``, a slice of absolute
    positions, or a callable; see ``position_mask``. ``alpha = 0`` leaves every activation bit for bit unchanged.
    Lazy: returns an ``ActivationAddition`` applied on ``with`` / ``.apply()``.

    ``layer=l`` (0.1, deprecated): the input of block ``l`` = ``resid=l`` for ``l ≥ 0``; ``layer=-1`` is block
    ``L - 1``'s input, ``resid=L - 1`` (not ``resid=-1``, which is ``L``).
    """
    residuals = _steering_residuals(model, "activation_addition", resid, block, layer)
    return ActivationAddition(
        model, vector, residuals=residuals, alpha=alpha, positions=positions, prompt_length=prompt_length
    )


steer = activation_addition  # the short name used in notebooks


# ----------------------------------------------------------------------------------------------------------
# Contrastive vectors: CAA (A/B pairs), mean over a token range, RepE reading vectors
# ----------------------------------------------------------------------------------------------------------


@dataclass
class ABItem:
    """A two-choice question: ``matching`` shows the behaviour, ``other`` does not."""

    question: str
    matching: str
    other: str


def ab_pair_texts(
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[ABItem | tuple[str, str, str]],
    *,
    system_prompt: str | None = None,
    seed: int = 0,
    letter_prefix: str = "(",
) -> tuple[list[str], list[str]]:
    """CAA prompts (Rimsky et al. 2024): ``(positive_texts, negative_texts)`` that differ only in the answer letter.

    Each question lists both answers as ``(A)`` / ``(B)`` in a random order (``seed``) so that the letter is not
    confounded with the behaviour; the assistant turn ends with ``"(A"`` or ``"(B"``. Capture at position ``-1``
    (the letter token) with ``capture_residuals(..., chat=False)``.
    """
    rng = random.Random(seed)
    positive, negative = [], []
    for item in items:
        item = item if isinstance(item, ABItem) else ABItem(*item)
        first_is_matching = rng.random() < 0.5
        a, b = (item.matching, item.other) if first_is_matching else (item.other, item.matching)
        question = f"{item.question}\n\nChoices:\n(A) {a}\n(B) {b}"
        [text] = format_chat(tokenizer, [question], system_prompt=system_prompt)
        yes, no = ("A", "B") if first_is_matching else ("B", "A")
        positive.append(text + letter_prefix + yes)
        negative.append(text + letter_prefix + no)
    return positive, negative


@torch.no_grad()
def capture_span_mean(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prefixes: Sequence[str],
    continuations: Sequence[str],
    *,
    layers: Sequence[int] | None = None,
    start: int = 0,
    stop: int | None = None,
    batch_size: int | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Residuals averaged over continuation tokens ``[start:stop)``: ``[n, layer, d]`` float32 on CPU.

    ``prefixes``: already formatted texts (e.g. ``format_chat`` output: the prompt up to the assistant turn);
    ``continuations``: the text after them (e.g. the response). Both are tokenized separately and
    concatenated, so the span is exact. An empty span falls back to the prefix's last token.
    """
    if len(prefixes) != len(continuations):
        raise ValueError(f"{len(prefixes)} prefixes but {len(continuations)} continuations")
    sites = resolve_sites(model, range(len(find_layers(model)) + 1) if layers is None else layers)
    device = model_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batch_size = batch_size or auto_batch_size(model)
    rows = []
    for p, c in zip(prefixes, continuations):
        pre = tokenizer(p, add_special_tokens=False)["input_ids"]
        cont = tokenizer(c, add_special_tokens=False)["input_ids"] if c else []
        lo, hi = slice(start, stop).indices(len(cont))[:2]
        rows.append((pre + cont, len(pre) + lo, len(pre) + max(hi, lo)))
    out = []
    for chunk in tqdm(list(batched(rows, batch_size)), desc="capture span", disable=not progress, leave=False):
        batch = encode_ids([ids for ids, _, _ in chunk], pad, device)
        width = batch["input_ids"].shape[1]
        weights = torch.zeros((len(chunk), width))
        for i, (row, lo, hi) in enumerate(chunk):
            shift = width - len(row)
            if hi > lo:
                weights[i, shift + lo : shift + hi] = 1.0 / (hi - lo)
            else:
                weights[i, shift + lo - 1] = 1.0  # empty span: the prefix's last token
        store: dict[int, torch.Tensor] = {}
        w = weights.to(device)

        def on_read(site: Site, hidden: torch.Tensor, store: dict = store, w: torch.Tensor = w) -> None:
            store[site.index] = torch.einsum("bs,bsd->bd", w, hidden.float())

        with trace(model, read=sites, on_read=on_read, stop_after=max(s.index for s in sites)):
            model(**batch, use_cache=False)
        out.append(torch.stack([store[s.index] for s in sites], dim=1).cpu())
    return torch.cat(out)


def contrastive_vector(
    positive: torch.Tensor, negative: torch.Tensor, *, method: str = "contrastive", **meta: object
) -> Directions:
    """``r = mean(positive) − mean(negative)`` per residual (positive = shows the behaviour = the "bad" side).

    ``positive``, ``negative``: ``[n, layer, d]`` activations (e.g. at the A/B letter, or span means).
    """
    directions = mean_difference(positive, negative)
    return replace(directions, method=method, meta={**directions.meta, **meta})


def caa_vector(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[ABItem | tuple[str, str, str]],
    *,
    layers: Sequence[int] | None = None,
    system_prompt: str | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    progress: bool = True,
) -> Directions:
    """CAA steering vectors from A/B items: mean difference at the answer-letter token, per residual index."""
    pos, neg = ab_pair_texts(tokenizer, items, system_prompt=system_prompt, seed=seed)
    capture = partial(
        capture_residuals,
        model,
        tokenizer,
        layers=layers,
        positions=-1,
        chat=False,
        batch_size=batch_size,
        progress=progress,
    )
    return contrastive_vector(capture(pos), capture(neg), method="caa")


def reading_vector(positive: torch.Tensor, negative: torch.Tensor, *, seed: int = 0) -> Directions:
    """RepE reading vectors (Zou et al. 2023): first principal component of randomly ordered pair differences.

    ``positive``, ``negative``: paired activations ``[n, layer, d]`` (row ``i`` of each from the same stimulus).
    Each pair's difference gets a random sign (``seed``), the first PC of the differences is taken per layer
    and its sign chosen so that positives read higher. ``vectors`` are unit PCs scaled by the mean
    difference's projection on them (so ``α`` is comparable with CAA); ``good_mean`` / ``bad_mean`` are the
    class means, and ``reading_score`` centres on their midpoint. ``meta["explained"]``: PC1's variance share.

    The one implementation is ``directions.methods.pca_pairs``; this is ``pca_pairs(positive, negative,
    paired=True, seed=seed)`` under the method name ``"reading_vector"``.
    """
    directions = pca_pairs(positive, negative, rank=1, seed=seed, paired=True)
    explained = [ratios[0] for ratios in directions.meta["explained_variance_ratio"]]
    return replace(
        directions,
        method="reading_vector",
        meta={"n_pairs": directions.meta["n_pairs"], "seed": seed, "explained": explained},
    )


def reading_score(
    activations: torch.Tensor, directions: Directions, layer: int, *, center: torch.Tensor | None = None
) -> torch.Tensor:
    """``(h − μ) · v̂`` at residual ``layer``; ``activations`` ``[n, d]`` (already at that layer) or ``[n, layer, d]``.

    ``μ``: ``center`` if given, else the midpoint of the directions' class means (zero if unknown).
    """
    h = activations[:, layer] if activations.ndim == 3 else activations
    v = directions.unit()[layer].double()
    if center is None and directions.good_mean is not None and directions.bad_mean is not None:
        center = (directions.good_mean[layer].double() + directions.bad_mean[layer].double()) / 2
    mu = torch.zeros_like(v) if center is None else center.double()
    return ((h.double() - mu) @ v).float()


# ----------------------------------------------------------------------------------------------------------
# Sweeps
# ----------------------------------------------------------------------------------------------------------


def intervention_sweep(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    make: Callable[..., AbstractContextManager],
    grid: Sequence[dict] | dict[str, Sequence],
    *,
    scorer: Callable[[str], float] | None = None,
    max_new_tokens: int = 48,
    batch_size: int | None = None,
    progress: bool = True,
    **chat_kwargs: Any,
) -> pd.DataFrame:
    """Generate under ``make(**params)`` for each ``params`` of ``grid`` and score each response.

    ``grid``: a list of keyword dicts, or ``{name: values}`` (its product). ``scorer(text) → float`` per
    response (default: length in characters). Returns one row per (params, prompt): the params' columns,
    ``prompt``, ``response``, ``score``; ``frame.attrs["summary"]`` holds the mean score per params.
    """
    if isinstance(grid, dict):
        names = list(grid)
        grid = [dict(zip(names, values)) for values in itertools.product(*(grid[n] for n in names))]
    scorer = scorer or (lambda text: float(len(text)))
    rows = []
    for params in tqdm(list(grid), desc="sweep", disable=not progress, leave=False):
        with make(**params):
            responses = generate(
                model,
                tokenizer,
                prompts,
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
                progress=False,
                **chat_kwargs,
            )
        for prompt, response in zip(prompts, responses):
            rows.append({**params, "prompt": prompt, "response": response, "score": float(scorer(response))})
    frame = pd.DataFrame(rows)
    keys = list(grid[0]) if grid else []
    frame.attrs["summary"] = frame.groupby(keys, sort=False)["score"].mean().reset_index() if keys else frame
    return frame


def steering_sweep(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    vector: torch.Tensor | Directions,
    *,
    alphas: Sequence[float],
    layers: Sequence[int],
    scorer: Callable[[str], float] | None = None,
    positions: Positions = "all",
    max_new_tokens: int = 48,
    batch_size: int | None = None,
    progress: bool = True,
    **chat_kwargs: Any,
) -> pd.DataFrame:
    """``intervention_sweep`` of ``activation_addition`` over ``alphas × layers`` (columns ``layer``, ``alpha``)."""

    def make(layer: int, alpha: float) -> ActivationAddition:
        # ``layers``: block inputs (0.1 rule: negatives from the number of blocks)
        [k] = _old_layer_residuals(model, layer)
        return activation_addition(model, vector, resid=k, alpha=alpha, positions=positions)

    return intervention_sweep(
        model,
        tokenizer,
        prompts,
        make,
        {"layer": list(layers), "alpha": list(alphas)},
        scorer=scorer,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        progress=progress,
        **chat_kwargs,
    )


def random_vector_like(vector: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A control: a random ``[d]`` vector with the same norm as ``vector``."""
    noise = torch.randn(vector.shape[-1], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (noise / noise.norm() * vector.double().norm()).to(vector.dtype)
