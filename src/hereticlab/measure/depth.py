"""Safety-alignment depth (Qi et al. 2024): where along a response an edit changes the model, and prefill attacks.

* ``per_position_kl``: teacher-force a fixed response after each prompt and compare the next-token distributions of
  the original and the edited model at every response position: ``KL_k(orig ‖ edited | x, y_<k)``.
* ``prefill_refusal``: force the first ``k`` tokens of a (compliant) response start and measure how often the model
  still refuses in what it generates next, for several ``k``.
* ``reference_nll`` / ``ce_shift``: teacher-forced NLL of fixed plain text that no model under study wrote
  (``load_reference_text``: ``prompts/reference/plain_prose.txt``), and the change an edit makes to it per token,
  with a bootstrap interval over paragraphs.

Interventions are given as a *factory*: a callable returning a fresh context manager, e.g.
``lambda: hl.ablate(model, r)`` or ``lambda: hl.ablation_hooks(model, r)`` (``None`` = the unedited model).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any, cast

import pandas as pd
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..core import compat
from ..core.capture import auto_batch_size, encode_ids, model_device, pad_id
from ..core.prompts import PROMPTS_DIR, PromptSet, format_chat, load_prompts
from .metrics import MarkerDetector, generate_and_judge
from .report import Estimate, bootstrap_interval

Intervention = Callable[[], AbstractContextManager] | None


def _context(intervention: Intervention) -> AbstractContextManager:
    return nullcontext() if intervention is None else intervention()


def _teacher_forced_batch(
    tokenizer: PreTrainedTokenizerBase,
    prompt_texts: Sequence[str],
    response_ids: Sequence[list[int]],
    device: torch.device | str,
) -> dict[str, torch.Tensor]:
    """Left-padded ``prompt + response`` ids (``core.capture.encode_ids``, the one batch builder)."""
    seqs = [tokenizer.encode(p, add_special_tokens=False) + list(r) for p, r in zip(prompt_texts, response_ids)]
    return encode_ids(seqs, pad_id(tokenizer), device)


def _prepare(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str] | PromptSet,
    responses: Sequence[str] | str,
    max_tokens: int,
    chat_kwargs: dict[str, Any],
) -> tuple[list[str], list[list[int]], int]:
    prompt_texts = format_chat(tokenizer, prompts, **chat_kwargs)
    if isinstance(responses, str):
        responses = [responses] * len(prompt_texts)
    if len(responses) != len(prompt_texts):
        raise ValueError(f"{len(responses)} responses for {len(prompt_texts)} prompts; give one per prompt")
    resp_ids = [tokenizer.encode(r, add_special_tokens=False)[:max_tokens] for r in responses]
    return prompt_texts, resp_ids, max(1, max(len(r) for r in resp_ids))


class PromptCache:
    """Keys/values of chat-formatted prompts under the model's weights, computed once per prompt and reused by every
    teacher-forced pass that continues the same prompt (``response_nll(..., prompt_cache=)``).

    An experiment scores many arms' responses to the *same* prompts with the *unedited* model (the coherence pass of
    ``measure.coherence``); without this each arm recomputes every prompt. Entries hold all of a prompt but its last
    token (that token is fed again, so its logits predict the first response token). A fingerprint of the weights
    (sum and norm of every parameter) is checked by every ``response_nll`` call: after an in-place edit the entries
    are dropped and recomputed, never reused. Hooks are not seen by it: score only outside any steering context, as
    ``coherence_nll`` already requires. ``max_bytes`` bounds the memory; the least recently used prompts go first.
    Models whose cache is not plain per-layer keys/values (sliding windows, …) take the plain path, with one warning.
    """

    def __init__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, *, max_bytes: int = 2**30) -> None:
        self.model, self.tokenizer, self.max_bytes = model, tokenizer, max_bytes
        self._entries: OrderedDict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()
        self._bytes = 0
        self._fingerprint: torch.Tensor | None = None
        self.usable = True
        self.computed = 0  # prompts run through the model (the rest were reused)

    def __len__(self) -> int:
        return len(self._entries)

    def _weights_fingerprint(self) -> torch.Tensor:
        """Sum and norm of every parameter (float64): any in-place edit of the weights changes it."""
        return torch.stack(
            [
                torch.stack(
                    [p.detach().sum(dtype=torch.float64), torch.linalg.vector_norm(p.detach(), dtype=torch.float64)]
                )
                for p in self.model.parameters()
            ]
        ).cpu()

    def check_weights(self) -> None:
        """Drop every entry when the weights changed since the last check (once per scoring call: it reads them all)."""
        now = self._weights_fingerprint()
        if self._fingerprint is not None and not torch.equal(now, self._fingerprint):
            self._entries.clear()
            self._bytes = 0
        self._fingerprint = now

    def _store(self, key: tuple[int, ...], kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self._entries[key] = kv
        self._bytes += sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)
        while self._bytes > self.max_bytes and len(self._entries) > 1:
            _, old = self._entries.popitem(last=False)
            self._bytes -= sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in old)

    @torch.no_grad()
    def keys_values(self, heads: Sequence[list[int]]) -> list[list[tuple[torch.Tensor, torch.Tensor]]] | None:
        """Per prompt head (its ids but the last), per layer ``(keys [1, kv_heads, t, d_head], values …)``; None
        when this model's cache cannot be reused (``usable`` turns False, with a warning)."""
        if not self.usable:
            return None
        if self._fingerprint is None:
            self.check_weights()
        needed = list(dict.fromkeys(tuple(h) for h in heads if len(h)))
        found = {key: self._entries[key] for key in needed if key in self._entries}
        for key in found:
            self._entries.move_to_end(key)  # least recently used goes first
        missing = [key for key in needed if key not in found]
        if missing:
            batch = encode_ids(missing, pad_id(self.tokenizer), model_device(self.model))
            _, cache = compat.forward(self.model, batch, use_cache=True)
            n_layers = len(getattr(cache, "layers", ()))
            if cache is None or not n_layers or compat.plain_layer_count(cache) != n_layers:
                self.usable = False
                compat.warn_fallback("reusing prompt keys/values", "this model's cache is not plain keys/values")
                return None
            kv = compat.layer_keys_values(cache)
            width = batch["input_ids"].shape[1]
            for row, key in enumerate(missing):
                start = width - len(key)  # left padding
                found[key] = [(k[row : row + 1, :, start:].clone(), v[row : row + 1, :, start:].clone()) for k, v in kv]
                self._store(key, found[key])
            self.computed += len(missing)
        # A one-token prompt has nothing before its last token: an empty entry.
        out = [found[tuple(head)] if len(head) else [] for head in heads]
        return out


def _cached_response_logits(
    prompt_cache: PromptCache, texts: Sequence[str], rids: Sequence[list[int]]
) -> list[torch.Tensor] | None:
    """``_response_logits`` continuing cached prompts: the forward sees each prompt's last token and its response
    (right-padded), attending to the prompt's cached keys/values (left-padded). None when the cache is unusable."""
    model, tokenizer = prompt_cache.model, prompt_cache.tokenizer
    prompt_ids = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    cached = prompt_cache.keys_values([p[:-1] for p in prompt_ids])
    if cached is None or not any(cached):
        return None
    past = max(len(p) - 1 for p in prompt_ids)
    own = [[p[-1], *r[:-1]] if r else [p[-1]] for p, r in zip(prompt_ids, rids)]
    width = max(len(o) for o in own)
    layers = []
    for layer, (k0, v0) in enumerate(next(c for c in cached if c)):
        keys = k0.new_zeros(len(own), k0.shape[1], past, k0.shape[3])
        values = v0.new_zeros(len(own), v0.shape[1], past, v0.shape[3])
        for row, entry in enumerate(cached):
            if entry:
                t = entry[layer][0].shape[2]
                keys[row, :, past - t :] = entry[layer][0][0]
                values[row, :, past - t :] = entry[layer][1][0]
        layers.append((keys, values))
    ids = torch.full((len(own), width), pad_id(tokenizer), dtype=torch.long)
    mask = torch.zeros(len(own), past + width, dtype=torch.long)
    positions = torch.zeros(len(own), width, dtype=torch.long)
    for row, (p, tokens) in enumerate(zip(prompt_ids, own)):
        t = len(p) - 1
        ids[row, : len(tokens)] = torch.tensor(tokens)
        mask[row, past - t : past + len(tokens)] = 1
        positions[row] = t + torch.arange(width)
    device = model_device(model)
    inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": positions.to(device)}
    logits = compat.forward(model, inputs, cache=compat.cache_from_keys_values(layers), last=None)[0]
    return [logits[row, : len(r)] for row, r in enumerate(rids)]


def _response_logits(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    rids: Sequence[list[int]],
    prompt_cache: PromptCache | None = None,
) -> list[torch.Tensor]:
    """Per row, the teacher-forced logits that predict its response tokens: ``[k_i, vocab]`` (``k_i = len(rids[i])``).

    The forward keeps logits at this batch's own longest response + 1 positions only, which a batch of short
    sequences always has. The sequence ends with the response (left padding): response token j sits at index
    T−k+j and is predicted by the logits at T−k+j−1, which is here−k+j inside the kept window of here+1 positions.
    ``prompt_cache``: reuse the prompts' keys/values instead (``PromptCache``).
    """
    if prompt_cache is not None:
        reused = _cached_response_logits(prompt_cache, texts, rids)
        if reused is not None:
            return reused
    batch = _teacher_forced_batch(tokenizer, texts, rids, model_device(model))
    here = max(1, max(len(r) for r in rids))
    logits = compat.forward(model, batch, last=here + 1)[0]  # the last here+1 positions
    return [logits[i, here - len(r) : here] for i, r in enumerate(rids)]


def _batch_logprobs(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], rids: Sequence[list[int]], K: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``logprobs [b, K, vocab]`` at the teacher-forced response positions, ``valid [b, K]``, ``targets [b, K]``.

    ``K``: the width of the output (the longest response of the whole call, so that batches concatenate).
    """
    rows = _response_logits(model, tokenizer, texts, rids)
    out = torch.zeros(len(texts), K, rows[0].shape[-1])
    valid = torch.zeros(len(texts), K, dtype=torch.bool)
    targets = torch.zeros(len(texts), K, dtype=torch.long)
    for i, (r, logits) in enumerate(zip(rids, rows)):
        k = len(r)
        if k == 0:
            continue
        out[i, :k] = torch.log_softmax(logits.float(), dim=-1).cpu()
        valid[i, :k] = True
        targets[i, :k] = torch.tensor(r)
    return out, valid, targets


def _batch_nll(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    rids: Sequence[list[int]],
    prompt_cache: PromptCache | None = None,
) -> torch.Tensor:
    """Mean NLL per response token ``[b]`` (0 for an empty response), without materializing the log-probs of the
    whole vocabulary: ``logsumexp(logits) − logits[target]`` per position."""
    out = torch.zeros(len(texts))
    for i, (r, logits) in enumerate(zip(rids, _response_logits(model, tokenizer, texts, rids, prompt_cache))):
        if r:
            logits = logits.float()
            target = torch.tensor(r, device=logits.device)[:, None]
            out[i] = (torch.logsumexp(logits, dim=-1) - logits.gather(-1, target)[:, 0]).mean().cpu()
    return out


@torch.no_grad()
def response_logprobs(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str] | PromptSet,
    responses: Sequence[str] | str,
    *,
    max_tokens: int = 32,
    batch_size: int | None = None,
    **chat_kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token log-probs at each teacher-forced response position.

    Returns ``logprobs [n, K, vocab]`` (float32, CPU; position ``k`` predicts response token ``k`` from ``x, y_<k``)
    and ``valid [n, K]`` (False past the end of a shorter response). ``responses``: one per prompt, or one string for
    all; truncated to ``max_tokens`` tokens. Memory is ``n·K·vocab`` floats: for long sets use ``per_position_kl`` /
    ``response_nll``, which reduce batch by batch.
    """
    texts, rids, K = _prepare(tokenizer, prompts, responses, max_tokens, chat_kwargs)
    size = batch_size or auto_batch_size(model)
    parts = [
        _batch_logprobs(model, tokenizer, texts[s : s + size], rids[s : s + size], K)
        for s in range(0, len(texts), size)
    ]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


@torch.no_grad()
def per_position_kl(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str] | PromptSet,
    responses: Sequence[str] | str,
    intervention: Intervention,
    *,
    max_tokens: int = 32,
    batch_size: int | None = None,
    baseline: Intervention = None,
    **chat_kwargs: Any,
) -> pd.DataFrame:
    """Safety-depth curve: mean ``KL(orig ‖ edited)`` at each response position ``k`` (teacher-forced).

    ``intervention`` / ``baseline``: factories of context managers (``baseline=None`` is the unedited model); both
    are entered once per batch. Returns ``(position, kl, kl_std, n)``; ``frame.attrs['per_prompt']`` holds the
    ``[n, K]`` matrix (NaN past a response's end).
    """
    texts, rids, K = _prepare(tokenizer, prompts, responses, max_tokens, chat_kwargs)
    size = batch_size or auto_batch_size(model)
    kls, valids = [], []
    for s in range(0, len(texts), size):
        with _context(baseline):
            base, valid, _ = _batch_logprobs(model, tokenizer, texts[s : s + size], rids[s : s + size], K)
        with _context(intervention):
            edited, _, _ = _batch_logprobs(model, tokenizer, texts[s : s + size], rids[s : s + size], K)
        kls.append((base.exp() * (base - edited)).sum(-1))
        valids.append(valid)
    kl, valid = torch.cat(kls), torch.cat(valids)
    kl = torch.where(valid, kl, torch.full_like(kl, float("nan")))
    frame = pd.DataFrame(
        {
            "position": range(kl.shape[1]),
            "kl": torch.nanmean(kl, 0).numpy(),
            "kl_std": [float(torch.std(c[~c.isnan()])) if (~c.isnan()).sum() > 1 else float("nan") for c in kl.T],
            "n": valid.sum(0).numpy(),
        }
    )
    frame.attrs["per_prompt"] = kl
    return frame


@torch.no_grad()
def response_nll(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str] | PromptSet,
    responses: Sequence[str] | str,
    intervention: Intervention = None,
    *,
    max_tokens: int = 32,
    batch_size: int | None = None,
    prompt_cache: PromptCache | None = None,
    **chat_kwargs: Any,
) -> torch.Tensor:
    """Mean negative log-likelihood per response token ``[n]`` (teacher-forced cross-entropy) under ``intervention``.

    ``response_nll(..., edit).mean() − response_nll(...).mean()`` is the CE cost of an edit on fixed responses
    (e.g. the unedited model's own answers to harmless prompts). ``prompt_cache``: a ``PromptCache`` of this model,
    so that prompts scored before (e.g. by another arm of the experiment) are not run again; only without an
    intervention, since the cache holds the prompts as the model computes them outside any intervention.
    """
    if prompt_cache is not None and (intervention is not None or prompt_cache.model is not model):
        raise ValueError(
            "response_nll: prompt_cache holds this model's prompts without any intervention; "
            "drop the prompt_cache or the intervention (and pass the cache of the same model)"
        )
    texts, rids, _ = _prepare(tokenizer, prompts, responses, max_tokens, chat_kwargs)
    size = batch_size or auto_batch_size(model)
    if prompt_cache is not None:
        prompt_cache.check_weights()
    out = []
    with _context(intervention):
        for s in range(0, len(texts), size):
            out.append(_batch_nll(model, tokenizer, texts[s : s + size], rids[s : s + size], prompt_cache))
    return torch.cat(out)


@torch.no_grad()
def prefill_refusal(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str] | PromptSet,
    responses: Sequence[str] | str,
    *,
    ks: Sequence[int] = (0, 1, 2, 4, 8),
    intervention: Intervention = None,
    detector: Callable[[Sequence[str]], list[bool]] | None = None,
    max_new_tokens: int = 24,
    batch_size: int | None = None,
    early_stop: bool = False,
    **chat_kwargs: Any,
) -> pd.DataFrame:
    """Refusal rate when the first ``k`` tokens of ``responses`` are forced as the start of the answer.

    ``responses``: a compliant response per prompt (e.g. the ablated model's own answers) or one string for all
    (e.g. ``"Sure, here is how to do it:"``). The prefix is the decoded first ``k`` tokens, appended after the
    generation prompt exactly like ``format_chat(..., response_prefix=...)``/``PromptSet.response_prefix``. Only
    the *continuation* is judged (the forced prefix is compliant by construction). Returns ``(k, refusal_rate, n)``;
    ``frame.attrs['responses']`` maps ``k`` to the continuations. ``early_stop``: stop a continuation once the
    detector's decision is final (same decisions with a ``MarkerDetector``, fewer decoding steps, shorter texts).
    """
    detector = detector or MarkerDetector()
    prompt_list = list(prompts)
    if isinstance(responses, str):
        responses = [responses] * len(prompt_list)
    resp_ids = [tokenizer.encode(r, add_special_tokens=False) for r in responses]
    if isinstance(prompts, PromptSet):
        chat_kwargs.setdefault("system_prompt", prompts.system_prompt)
    chat_kwargs.pop("response_prefix", None)
    size = batch_size or auto_batch_size(model)
    rows, texts_by_k = [], {}
    with _context(intervention):
        for k in ks:
            texts = [
                format_chat(tokenizer, [p], response_prefix=cast(str, tokenizer.decode(r[:k])), **chat_kwargs)[0]
                for p, r in zip(prompt_list, resp_ids)
            ]
            outs, refused = generate_and_judge(
                model,
                tokenizer,
                texts,
                detector=detector,
                max_new_tokens=max_new_tokens,
                batch_size=size,
                early_stop=early_stop,
            )
            rows.append({"k": k, "refusal_rate": sum(refused) / len(refused), "n": len(refused)})
            texts_by_k[k] = outs
    frame = pd.DataFrame(rows)
    frame.attrs["responses"] = texts_by_k
    return frame


# ----------------------------------------------------------------------------------------------------------
# Cross-entropy on fixed reference text (text the model did not write)
# ----------------------------------------------------------------------------------------------------------


def load_reference_text(name: str = "plain_prose") -> list[str]:
    """Paragraphs of a reference text shipped in ``prompts/reference/`` (one paragraph per line, ``#`` comments).

    ``plain_prose``: 46 paragraphs of ordinary expository English written for hereticlab (see its README).
    """
    path = PROMPTS_DIR / "reference" / f"{name}.txt"
    if not path.exists():  # an editable install without the data link: the repository's prompts/
        path = PROMPTS_DIR.parents[2].parent / "prompts" / "reference" / f"{name}.txt"
    return list(load_prompts(path))


@torch.no_grad()
def reference_nll(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    intervention: Intervention = None,
    *,
    max_tokens: int = 128,
    batch_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced NLL of plain ``texts`` (no chat template) under ``intervention`` (``None``: unedited).

    Each text is tokenized as it is (with the tokenizer's special tokens, e.g. a BOS) and cut to ``max_tokens``;
    every token after the first is scored. Returns ``(nll_sum [n], n_tokens [n])`` (float64, int64): the summed
    NLL and the number of scored tokens per text, so that the corpus mean per token is ``nll_sum.sum() /
    n_tokens.sum()`` and a bootstrap can resample whole texts (``ce_shift``).
    """
    rows = [tokenizer.encode(t)[:max_tokens] for t in texts]
    if any(len(r) < 2 for r in rows):
        raise ValueError("reference_nll: every text needs at least 2 tokens (one to condition on, one to score)")
    size = batch_size or auto_batch_size(model)
    sums, counts = [], []
    with _context(intervention):
        for s in range(0, len(rows), size):
            chunk = rows[s : s + size]
            batch = encode_ids(chunk, pad_id(tokenizer), model_device(model))
            logits = compat.forward(model, batch, last=None)[0].float()  # [b, T, V]
            lp = torch.log_softmax(logits[:, :-1], dim=-1)
            targets = batch["input_ids"][:, 1:]
            nll = -lp.gather(-1, targets[..., None])[..., 0]  # [b, T − 1]: position t predicts token t + 1
            own = batch["attention_mask"][:, 1:].bool() & batch["attention_mask"][:, :-1].bool()  # left padding
            sums.append((nll * own).sum(1).double().cpu())
            counts.append(own.sum(1).cpu())
    return torch.cat(sums), torch.cat(counts).long()


def ce_shift(
    base_sum: torch.Tensor | Sequence[float],
    edited_sum: torch.Tensor | Sequence[float],
    n_tokens: torch.Tensor | Sequence[int],
    *,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> Estimate:
    """Change in cross-entropy per token, ``(Σ edited − Σ base) / Σ n_tokens`` over texts ``[n]``, with a
    percentile bootstrap over texts (a text's tokens are resampled together: they are not independent).

    ``base_sum`` / ``edited_sum``: summed NLL per text (``reference_nll``) of the same texts; positive = the edit
    makes the text less likely. To pool several edits (seeds, random draws) and still resample *texts*, pass each
    text's mean over the edits as ``edited_sum``.
    """
    base = torch.as_tensor(base_sum, dtype=torch.float64)
    edited = torch.as_tensor(edited_sum, dtype=torch.float64)
    counts = torch.as_tensor(n_tokens, dtype=torch.float64)
    if not base.shape == edited.shape == counts.shape or base.ndim != 1:
        raise ValueError(
            f"ce_shift needs three [n] vectors, got {tuple(base.shape)}, {tuple(edited.shape)}, {tuple(counts.shape)}"
        )
    rows = torch.stack([edited - base, counts], dim=1).numpy()  # [n, 2]

    def per_token(r: Any) -> float:
        return float(r[:, 0].sum() / r[:, 1].sum())

    value, low, high = bootstrap_interval(
        cast(Any, rows), per_token, confidence=confidence, n_resamples=n_resamples, seed=seed
    )
    detail = f"{len(rows)} texts, {int(counts.sum())} tokens, text bootstrap {confidence:.0%}"
    return Estimate(value, min(low, value), max(high, value), detail)
