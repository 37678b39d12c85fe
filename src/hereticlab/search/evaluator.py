"""Fast trial evaluation: refusal counts and first-token KL for one edit, as cheaply as the decisions allow.

What makes a trial cheap (each is measured against a Heretic-style reference in ``bench/trial_speed.py``):

* **Prefix reuse.** A weight edit of blocks ``≥ s`` cannot change the residual stream below block ``s``. The
  evaluator records, once, the unedited stream at the input of every ``stride``-th block and the unedited
  key/value cache of every block; a trial swaps blocks ``< s`` for replay stubs that hand back those tensors,
  so only blocks ``≥ s`` run during the prefill.
* **Shared prompt prefix.** Chat-formatted prompts start with the same tokens (template header, system prompt).
  Those are run once per trial as a one-row batch; every batch then prefills only its prompts' own tokens on top
  of that cache, laid out as ``[shared prefix | left padding | prompt]`` with the padding masked out and position
  ids continuing after the prefix (so each row computes exactly what it would alone).
* **Early decisions.** Decoding stops for a prompt as soon as its refusal decision cannot change (the detector's
  ``decided(text)`` is True, e.g. a marker matched, which stays matched in any longer text), or after
  ``decide_after`` clean tokens; finished
  prompts leave the batch (their KV-cache rows are dropped).
* **Last-position logits only** (``logits_to_keep=1``), no hidden states materialised, no ``generate()``.
* **In-place weight edits** with a shared backup: no adapter layers in the hot loop, exact revert.
* **KL ceiling (optional).** A trial whose KL already exceeds ``kl_ceiling`` is marked *pruned*; its refusals
  are not counted (never reported as zero).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase
from transformers.cache_utils import DynamicCache

from ..core import compat
from ..core.architecture import block_output_tensor, find_layers
from ..core.capture import (
    batched,
    chat_texts,
    common_prefix_length,
    encode,
    encode_ids,
    expanded_cache,
    model_device,
    pad_id,
    prefix_keys_values,
)
from ..core.generation import eos_token_ids, greedy_decode
from ..core.hooks import hook_outputs
from ..core.prompts import PromptSet
from ..directions.base import Directions
from ..interventions.edits import Strength, WeightBackup, WriterEdit, apply_edits, first_edited_layer
from ..measure.metrics import MarkerDetector, kl_from_logprobs

if TYPE_CHECKING:  # imported by the functions that draw or tabulate
    import pandas as pd
    from matplotlib.figure import Figure
    from transformers import PretrainedConfig

    from ..measure.detectors import Detector


@dataclass
class TrialResult:
    """The outcome of one evaluated edit.

    ``refusals`` is ``None`` when the trial was pruned by the KL ceiling. ``decisions`` / ``responses`` are per
    harmful prompt, in the order given to the evaluator.
    """

    kl: float
    refusals: int | None
    n_prompts: int
    decisions: list[bool] | None = None
    responses: list[str] | None = None
    pruned: bool = False
    seconds: float = 0.0
    decode_steps: int = 0
    start_layer: int = 0
    kl_per_prompt: list[float] = field(default_factory=list)

    @property
    def refusal_rate(self) -> float | None:
        return None if self.refusals is None else self.refusals / self.n_prompts


class _Replay(nn.Module):
    """Stands in for an unedited block: writes its recorded keys/values and returns the recorded output."""

    def __init__(
        self,
        index: int,
        output: torch.Tensor | None,
        kv: tuple[torch.Tensor, torch.Tensor] | None,
        as_tuple: bool,
        original: nn.Module,
    ):
        super().__init__()
        self.index, self.output, self.kv, self.as_tuple = index, output, kv, as_tuple
        self.attention_type = getattr(original, "attention_type", None)

    def forward(self, hidden_states, *args, **kwargs):
        cache = compat.cache_in_call(args, kwargs)
        if self.kv is not None and cache is not None:
            compat.write_layer(cache, self.kv[0], self.kv[1], self.index)
        out = self.output if self.output is not None else hidden_states
        return (out,) if self.as_tuple else out


@dataclass
class _Batch:
    inputs: dict[
        str, torch.Tensor
    ]  # input_ids [B, T] (after the shared prefix), attention_mask [B, P + T], position_ids [B, T]
    order: list[int]  # indices into the prompt list
    block_inputs: dict[int, torch.Tensor] = field(default_factory=dict)  # s -> input of block s [B, T, d]
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per block, unedited keys/values of the T own tokens


class _NotShareable(Exception):
    """The model's cache cannot hold a shared prefix for a batch."""


@dataclass
class _PromptSet:
    """Tokenized prompts of one side: the prefix all of them share (``[1, P]``, maybe empty) and the batches."""

    prefix: torch.Tensor
    batches: list[_Batch]

    @property
    def prefix_length(self) -> int:
        return self.prefix.shape[1]


def _prompt_groups(prompts: Sequence[str] | PromptSet | Sequence[PromptSet]) -> list[Sequence[str] | PromptSet]:
    """One prompt set, or several ``PromptSet`` (each formatted with its own system prompt), as a list of groups."""
    if isinstance(prompts, PromptSet) or not prompts or not all(isinstance(p, PromptSet) for p in prompts):
        return [cast("Sequence[str] | PromptSet", prompts)]
    return list(cast("Sequence[PromptSet]", prompts))


class TrialEvaluator:
    """Evaluate many edits of one model on fixed prompt sets.

    ``bad``: prompts whose refusals are counted (harmful). ``good``: prompts for first-token KL (harmless): one set,
    or several ``PromptSet`` with their own system prompts (``core.prompts.spread_system_prompts``), measured as one.
    ``detector``: a ``Detector`` (``measure.detectors``; default ``MarkerDetector()``): ``detect`` judges each
    finished response, ``decided(text)`` stops a row on a positive decision early (unless the detector's
    ``early_stop_safe`` is False). ``decide_after``: clean tokens after which a prompt counts as
    answered. ``max_new_tokens``: hard cap (also when ``early_stop=False``). ``reuse_prefix`` / ``prefix_stride``:
    replay unedited blocks from tensors recorded at every ``prefix_stride``-th block. ``share_prefix``: run the
    token prefix common to all prompts of a side once per trial (used when it is at least ``min_shared_prefix``
    tokens and the model's cache is one plain key/value layer per block; otherwise every row runs in full).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        bad: Sequence[str] | PromptSet,
        good: Sequence[str] | PromptSet | Sequence[PromptSet],
        *,
        detector: Detector | None = None,
        decide_after: int = 16,
        max_new_tokens: int = 100,
        early_stop: bool = True,
        kl_ceiling: float | None = None,
        batch_size: int | None = None,
        reuse_prefix: bool = True,
        prefix_stride: int = 2,
        share_prefix: bool = True,
        min_shared_prefix: int = 4,
        chat_kwargs: dict | None = None,
        progress: bool = True,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        if detector is not None and not callable(getattr(detector, "detect", None)):
            raise TypeError(
                f"detector {type(detector).__name__} has no detect(texts); the evaluator takes a Detector "
                "(measure.detectors: detect(texts) -> DetectionResult, decided(text) -> True | None); "
                "is_refusal / matched are no longer used"
            )
        self.detector: Detector = detector or MarkerDetector()
        self.decide_after, self.max_new_tokens, self.early_stop = decide_after, max_new_tokens, early_stop
        self.kl_ceiling = kl_ceiling
        self.reuse_prefix, self.prefix_stride = reuse_prefix, max(1, prefix_stride)
        self.share_prefix, self.min_shared_prefix = share_prefix and self._cache_is_shareable(model), min_shared_prefix
        good_groups = _prompt_groups(good)
        self.bad_prompts, self.good_prompts = list(bad), [p for g in good_groups for p in g]
        chat_kwargs = chat_kwargs or {}
        self.n_blocks = len(find_layers(model))
        self.batch_size = batch_size or 32
        self.eos = eos_token_ids(model, tokenizer)
        self.backup = WeightBackup()
        self._progress = progress
        # Within one evaluate() the weights are fixed, so sides that share the same prefix tokens (the chat header
        # and system prompt, for refusal) share one prefix cache: {prefix tokens: keys/values}; None outside.
        self._prefix_memo: dict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] | None = None
        self._kv_replayable = self.n_blocks
        self._texts = {"bad": chat_texts(tokenizer, bad, **chat_kwargs)}
        # One good group per system prompt: each shares its own prefix (header + system prompt) within a trial.
        self._good_texts = [chat_texts(tokenizer, g, **chat_kwargs) for g in good_groups]
        self._texts["good"] = self._good_texts[0]  # the fast-path check probes the first group
        self._prepare_sides()
        self.fast_paths_checked = self._check_fast_paths()
        self.baseline_logprobs = self._first_token_logprobs(start_layer=0)

    # -- set-up ---------------------------------------------------------------------------------------------

    def _checkpoints(self) -> list[int]:
        return list(range(self.prefix_stride, self.n_blocks, self.prefix_stride)) if self.reuse_prefix else []

    @staticmethod
    def _cache_is_shareable(model: nn.Module) -> bool:
        """A cached prefix can be shared only by plain per-layer key/value caches (no sliding windows, no SSM state)."""
        model_config = cast("PretrainedConfig", model.config)  # nn.Module's stub says Tensor | Module
        config = (
            model_config.get_text_config(decoder=True) if hasattr(model_config, "get_text_config") else model_config
        )
        layer_types = getattr(config, "layer_types", None) or ["full_attention"]
        return all(t == "full_attention" for t in layer_types) and not getattr(config, "is_encoder_decoder", False)

    @torch.no_grad()
    def _prefix_kv(self, side: _PromptSet) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Keys/values of the shared prefix under the current weights (one row, all blocks), or None without one."""
        if not side.prefix_length:
            return None
        key = tuple(side.prefix[0].tolist())
        if self._prefix_memo is not None and key in self._prefix_memo:
            return self._prefix_memo[key]
        kv = prefix_keys_values(self.model, side.prefix)
        if kv is None:
            raise _NotShareable
        if self._prefix_memo is not None:
            self._prefix_memo[key] = kv
        return kv

    @staticmethod
    def _expanded(prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None, rows: int) -> DynamicCache | None:
        return None if prefix_kv is None else expanded_cache(prefix_kv, rows)

    def _tokenize(self, texts: list[str]) -> tuple[list[list[int]], int]:
        """Token ids per text and the length of the prefix they share (0 when sharing is off or too short)."""
        ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        shared = 0
        if self.share_prefix and len(ids) > 1:
            # Every prompt keeps at least one own token: its last position gives the next-token logits.
            shared = min(common_prefix_length(ids), min(len(x) for x in ids) - 1)
            if shared < self.min_shared_prefix:
                shared = 0
        return ids, shared

    def _prepare_sides(self) -> None:
        self._bad = self._prepare(self._texts["bad"], with_kv=True)
        self._good_groups = [self._prepare(texts, with_kv=False) for texts in self._good_texts]
        self._good = self._good_groups[0]

    def _prepare(self, texts: list[str], with_kv: bool) -> _PromptSet:
        """Tokenize once, find the shared prefix, sort by length (less padding), record the unedited prefix tensors."""
        ids, shared = self._tokenize(texts)
        return self._record(ids, shared, with_kv)

    @torch.no_grad()
    def _record(self, ids: list[list[int]], shared: int, with_kv: bool) -> _PromptSet:
        device = model_device(self.model)
        side = _PromptSet(torch.tensor([ids[0][:shared]], dtype=torch.long, device=device), [])
        try:
            prefix_kv = self._prefix_kv(side)
        except _NotShareable:  # not one plain key/value layer per block (SSM state, windows): no sharing
            side.prefix, prefix_kv, self.share_prefix = side.prefix[:, :0], None, False
        shared = side.prefix_length
        pad = pad_id(self.tokenizer)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        blocks = find_layers(self.model)
        checkpoints = set(self._checkpoints())
        self._block_returns_tuple = False
        for chunk in tqdm(
            list(batched(order, self.batch_size)), desc="record prefix", disable=not self._progress, leave=False
        ):
            batch = _Batch(encode_ids([ids[i][shared:] for i in chunk], pad, device, prefix_length=shared), list(chunk))
            if checkpoints:

                def make_hook(index: int, batch: _Batch = batch) -> Callable[[Any], None]:
                    def hook(output: Any) -> None:  # the block's raw output: a tensor or a tuple
                        self._block_returns_tuple = isinstance(output, tuple)
                        if index + 1 in checkpoints:
                            batch.block_inputs[index + 1] = block_output_tensor(output).detach().clone()

                    return hook

                with hook_outputs([(b, make_hook(i)) for i, b in enumerate(blocks)], raw=True):
                    _, cache = compat.forward(
                        self.model,
                        batch.inputs,
                        cache=self._expanded(prefix_kv, len(chunk)),
                        use_cache=with_kv or bool(shared),
                    )
                if with_kv:
                    # Only plain full-attention cache layers can be replayed by a single update(); sliding-window
                    # layers keep a truncated window with their own bookkeeping, so replay stops before them.
                    # No cache returned at all: nothing to replay (as for a cache with no plain layers).
                    self._kv_replayable = compat.plain_layer_count(cache) if cache is not None else 0
                    # Only the batch's own tokens: the shared prefix is recomputed (once) by every trial.
                    batch.kv = (
                        []
                        if cache is None
                        else [
                            (k[:, :, shared:].clone(), v[:, :, shared:].clone())
                            for k, v in compat.layer_keys_values(cache, self._kv_replayable)
                        ]
                    )
            side.batches.append(batch)
        return side

    @torch.no_grad()
    def _check_fast_paths(self, steps: int = 8) -> bool:
        """Do prefix replay and the shared prefix reproduce a plain forward on this transformers release?

        For the first prompt of each side, recorded alone with the same shared prefix, the fast path replaying as
        many blocks as possible must give the plain forward's first-token log-probs (to 1e-4 in fp32; 0.05 in half
        precision, where splitting a prefill legitimately rounds differently) and the same greedy tokens. On a
        mismatch both fast paths are switched off with one warning: slower, never wrong.
        """
        if not (self.reuse_prefix or self.share_prefix):
            return True
        device = model_device(self.model)
        exact = next(self.model.parameters()).dtype in (torch.float32, torch.float64)
        tolerance, n_tokens = (1e-4, steps) if exact else (5e-2, 1)
        start = max(self._checkpoints(), default=0)
        problem = None
        for name, decode in (("good", False), ("bad", True)):
            ids, shared = self._tokenize(self._texts[name])
            plain = {"input_ids": torch.tensor([ids[0]], device=device)}
            plain["attention_mask"] = torch.ones_like(plain["input_ids"])
            plain["position_ids"] = torch.arange(len(ids[0]), device=device)[None]
            reference = torch.log_softmax(compat.forward(self.model, plain)[0][:, -1].float(), dim=-1).cpu()
            try:
                probe = self._record([ids[0]], shared if len(ids) > 1 else 0, with_kv=True)
                fast = self._first_token_logprobs(start, probe)
                fast_tokens = self._probe_tokens(probe, start, n_tokens) if decode else None
            except Exception as exc:  # a renamed internal can also crash the fast path instead of skewing it
                problem = f"the fast path raised {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                break
            gap = float((fast - reference).abs().max())
            if not gap <= tolerance:
                problem = f"first-token log-probs differ by {gap:.2g} on a {name} prompt"
                break
            if decode:
                plain_tokens = greedy_decode(self.model, plain, n_tokens, set())[0]
                if fast_tokens != plain_tokens:
                    problem = f"greedy tokens differ on a bad prompt ({fast_tokens} vs {plain_tokens})"
                    break
        if problem is None:
            return True
        compat.warn_fallback("prefix replay and shared prompt prefix", problem)
        self.reuse_prefix = self.share_prefix = False
        self._kv_replayable = self.n_blocks
        self._prepare_sides()
        return False

    def _probe_tokens(self, probe: _PromptSet, start: int, n_tokens: int) -> list[int]:
        """Greedy tokens of the one-prompt ``probe`` through the fast path (replay from ``start``), no early stop."""
        batch = probe.batches[0]
        prefix = self._expanded(self._prefix_kv(probe), 1)  # computed before the replay stubs go in
        with self._replayed(batch, self._usable_start(min(start, self._kv_replayable)), with_kv=True):
            logits, cache = compat.forward(self.model, batch.inputs, cache=prefix, use_cache=True)
        return greedy_decode(self.model, batch.inputs, n_tokens, set(), cache=cache, first_logits=logits[:, -1])[0]

    # -- replay ---------------------------------------------------------------------------------------------

    def _usable_start(self, start_layer: int) -> int:
        """The deepest recorded checkpoint at or below ``start_layer`` (0 = run everything)."""
        usable = [s for s in self._checkpoints() if s <= start_layer]
        return max(usable, default=0)

    @contextmanager
    def _replayed(self, batch: _Batch, start: int, with_kv: bool):
        if start <= 0:
            yield
            return
        blocks = find_layers(self.model)
        originals = [blocks[i] for i in range(start)]
        try:
            for i in range(start):
                kv = batch.kv[i] if (with_kv and batch.kv is not None) else None
                output = batch.block_inputs[start] if i == start - 1 else None
                blocks[i] = _Replay(i, output, kv, self._block_returns_tuple, originals[i])
            yield
        finally:
            for i, original in enumerate(originals):
                blocks[i] = original

    # -- measurements ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def _first_token_logprobs(self, start_layer: int, side: _PromptSet | None = None) -> torch.Tensor:
        """First-token log-probs ``[n, vocab]`` of ``side`` (default: every good group, in the order given)."""
        if side is None:
            return torch.cat([self._first_token_logprobs(start_layer, group) for group in self._good_groups])
        start = self._usable_start(start_layer)
        rows, values = [], []
        prefix_kv = self._prefix_kv(side)
        for batch in side.batches:
            cache = self._expanded(prefix_kv, len(batch.order))
            with self._replayed(batch, start, with_kv=False):
                logits = compat.forward(self.model, batch.inputs, cache=cache)[0][:, -1]
            values.append(torch.log_softmax(logits.float(), dim=-1).cpu())
            rows.extend(batch.order)
        out = torch.empty(len(rows), values[0].shape[-1])
        out[torch.tensor(rows)] = torch.cat(values)
        return out

    def kl(self, start_layer: int = 0) -> torch.Tensor:
        """Per-prompt first-token ``KL(baseline ‖ current model)`` on the good prompts."""
        return kl_from_logprobs(self.baseline_logprobs, self._first_token_logprobs(start_layer))

    @torch.no_grad()
    def decide(self, start_layer: int = 0, side: _PromptSet | None = None) -> tuple[list[bool], list[str], int]:
        """Refusal decision and response text per bad prompt, plus the number of decode steps run."""
        side = side or self._bad
        n = sum(len(b.order) for b in side.batches)
        start = self._usable_start(min(start_layer, self._kv_replayable))
        decisions: list[bool | None] = [None] * n
        responses = [""] * n
        steps = 0
        detector = self.detector
        # decided(text) is True once no longer text can undo a positive decision; None while undecided
        decided: Callable[[str], bool | None] | None = (
            getattr(detector, "decided", None) if getattr(detector, "early_stop_safe", True) else None
        )
        can_stop_positive = self.early_stop and decided is not None
        prefix_kv = self._prefix_kv(side)
        for batch in side.batches:
            early: dict[int, bool] = {}

            def stop(row: int, tokens: list[int], early: dict[int, bool] = early) -> bool:
                if not self.early_stop:
                    return False
                text = cast(str, self.tokenizer.decode(tokens, skip_special_tokens=True))  # one row: a str
                if can_stop_positive and decided is not None and decided(text):
                    early[row] = True
                    return True
                if len(tokens) >= self.decide_after:
                    early[row] = False
                    return True
                return False

            with self._replayed(batch, start, with_kv=True):
                logits, cache = compat.forward(
                    self.model, batch.inputs, cache=self._expanded(prefix_kv, len(batch.order)), use_cache=True
                )
            tokens = greedy_decode(
                self.model,
                batch.inputs,
                self.max_new_tokens,
                self.eos,
                stop=stop,
                cache=cache,
                first_logits=logits[:, -1],
            )
            steps += max((len(t) for t in tokens), default=0)
            for row, (index, toks) in enumerate(zip(batch.order, tokens)):
                text = cast(str, self.tokenizer.decode(toks, skip_special_tokens=True))  # one row: a str
                responses[index] = text
                decisions[index] = early[row] if row in early else bool(detector.detect([text]).decisions[0])
        return [bool(d) for d in decisions], responses, steps

    def evaluate(self, start_layer: int = 0) -> TrialResult:
        """Measure the model as it is now (apply your edit first); ``start_layer``: the first block it changed."""
        self._prefix_memo = {}
        try:
            return self._evaluate(start_layer)
        finally:
            self._prefix_memo = None

    def _evaluate(self, start_layer: int) -> TrialResult:
        t0 = time.perf_counter()
        kl_values = self.kl(start_layer)
        kl = float(kl_values.mean())
        if self.kl_ceiling is not None and kl > self.kl_ceiling:
            return TrialResult(
                kl,
                None,
                len(self.bad_prompts),
                pruned=True,
                seconds=time.perf_counter() - t0,
                start_layer=start_layer,
                kl_per_prompt=kl_values.tolist(),
            )
        decisions, responses, steps = self.decide(start_layer)
        return TrialResult(
            kl,
            sum(decisions),
            len(decisions),
            decisions,
            responses,
            False,
            time.perf_counter() - t0,
            steps,
            start_layer,
            kl_values.tolist(),
        )

    def evaluate_edits(self, edits: list[WriterEdit]) -> TrialResult:
        """Apply ``edits`` in place, evaluate with prefix reuse below the first edited block, revert exactly."""
        start = max(first_edited_layer(edits), 0) if edits else self.n_blocks
        if any(e.writer.layer < 0 for e in edits):
            start = 0
        with apply_edits(self.model, edits, self.backup):
            return self.evaluate(min(start, self.n_blocks))

    def baseline(self) -> TrialResult:
        return self.evaluate(self.n_blocks)


def tune_batch_size(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    candidates: Sequence[int] = (8, 16, 32, 64, 128),
    chat_kwargs: dict | None = None,
) -> int:
    """Pick the batch size with the best prompts/second for a prefill plus a few decode steps on this machine.

    Stops growing at the first size that is slower than the best so far or runs out of memory.
    """
    texts = chat_texts(tokenizer, prompts, **(chat_kwargs or {}))
    device = model_device(model)
    eos = eos_token_ids(model, tokenizer)
    best, best_rate = candidates[0], 0.0
    for size in candidates:
        if size > len(texts) and size != candidates[0]:
            break  # batches larger than the prompt set are never used
        chunk = (texts * (size // max(len(texts), 1) + 1))[:size]
        try:
            t0 = time.perf_counter()
            greedy_decode(model, encode(tokenizer, chunk, device), 4, eos)
            if device.type == "cuda":
                torch.cuda.synchronize()
            rate = size / (time.perf_counter() - t0)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            break
        if rate < best_rate * 1.05:
            break
        best, best_rate = size, rate
    return best


def scan_layers(
    evaluator: TrialEvaluator,
    directions: Directions,
    *,
    indices: Sequence[int] | None = None,
    strength: Strength = 1.0,
    components: Sequence[str] = ("attn", "mlp"),
    norm: str = "none",
    progress: bool = True,
) -> pd.DataFrame:
    """Ablate the direction taken at each residual index in turn (applied to every block, or per ``strength``)
    and measure refusals and KL. Returns a DataFrame ``(index, refusals, refusal_rate, kl, seconds)``."""
    import pandas as pd

    from ..interventions.edits import plan_ablation

    indices = list(indices if indices is not None else range(1, directions.n_residuals))
    rows = []
    for index in tqdm(indices, desc="layer scan", disable=not progress):
        edits = plan_ablation(evaluator.model, directions.at(index), strength, components=components, norm=norm)
        r = evaluator.evaluate_edits(edits)
        rows.append(
            {
                "index": index,
                "refusals": r.refusals,
                "refusal_rate": r.refusal_rate,
                "kl": r.kl,
                "pruned": r.pruned,
                "seconds": round(r.seconds, 2),
            }
        )
    return pd.DataFrame(rows)


def plot_layer_scan(
    scan: pd.DataFrame, *, baseline_refusals: int | None = None, n_prompts: int | None = None
) -> Figure:
    """Refusals and KL against the residual index of the ablated direction (two y-axes). Returns the Figure."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(scan["index"], scan["refusals"], "o-", color="C0", label="refusals")
    if baseline_refusals is not None:
        ax.axhline(baseline_refusals, color="C0", ls=":", lw=1, label="baseline refusals")
    ax.set_xlabel("residual index of the ablated direction")
    ax.set_ylabel("refusals" + (f" / {n_prompts}" if n_prompts else ""), color="C0")
    twin = ax.twinx()
    twin.plot(scan["index"], scan["kl"], "s--", color="C3", label="KL")
    twin.set_ylabel("first-token KL", color="C3")
    fig.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return fig
