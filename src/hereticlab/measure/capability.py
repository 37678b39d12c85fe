"""Offline capability and over-refusal measures: does an edit keep what the model could do, and does it stop
refusing harmless requests that merely sound alarming?

* ``load_capability_items``: the bundled item set (``prompts/capability/items.tsv``: arithmetic, facts, code
  semantics, short instruction following), each with a checkable answer spec.
* ``score_answer``: one response against one item (the rules are documented there and in the set's README).
* ``capability_answers``: greedy answers of a model to the items, scored: a DataFrame per item.
* ``capability_report``: accuracy before / after an edit, per kind and overall, and *retention* (of the items the
  unedited model got right, the fraction the edited one still gets right), with exact binomial 95% intervals.
* ``over_refusal_rate``: refusals on harmless prompts that contain alarming words (``prompts/over_refusal.txt``).
* ``answer_nll``: teacher-forced mean NLL per answer token of fixed answers, the cheap per-trial proxy (the unedited
  model's own greedy answers, re-scored under an edit).
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..core.generation import generate
from ..core.prompts import PROMPTS_DIR, PromptError, PromptSet, load_prompts, strip_thinking
from .depth import Intervention, response_nll
from .detectors import Detector
from .metrics import refusal_rate
from .report import proportion_interval

KINDS = ("arithmetic", "facts", "code", "instructions")
RULES = ("answer", "cased", "exact", "regex")
ITEMS_FILE = Path("capability") / "items.tsv"
OVER_REFUSAL_SET = "over_refusal"
MAX_WORDS = 60  # rules answer / cased: a longer response fails (an answer buried in an essay is not an answer)

_FIELDS = "id, kind, question, rule, answer[, check]"


class CapabilityError(PromptError):
    """The capability item file could not be read; the message names ``file:line`` and the fix."""


@dataclass(frozen=True)
class CapabilityItem:
    """One capability question with a checkable answer spec.

    ``rule``: how ``answer`` is checked (see ``score_answer``): ``answer`` (normalised, case-insensitive whole
    word / number), ``cased`` (the same, case-sensitive), ``exact`` (the whole cleaned reply), ``regex`` (``answer``
    is a Python regex that must match the whole cleaned reply). ``check``: a Python expression whose value is the
    answer (arithmetic and code items; ``""`` otherwise), used by the tests to recompute every answer.
    """

    id: str
    kind: str
    question: str
    rule: str
    answer: str
    check: str = ""

    @property
    def answers(self) -> tuple[str, ...]:
        """Accepted variants: ``answer`` split on ``|`` (a regex is one pattern and is not split)."""
        return (self.answer,) if self.rule == "regex" else tuple(a.strip() for a in self.answer.split("|"))


# ----------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------


def default_items_path() -> Path:
    """The bundled item file: the installed copy inside the package, else the repository's ``prompts/``."""
    candidates = [PROMPTS_DIR / ITEMS_FILE, Path(__file__).resolve().parents[3] / "prompts" / ITEMS_FILE]
    return next((p for p in candidates if p.is_file()), candidates[0])


def parse_item_line(line: str, where: str) -> CapabilityItem:
    """One tab-separated line → a ``CapabilityItem``; ``where`` (``file:line``) prefixes every error message."""
    fields = line.rstrip("\r\n").split("\t")
    if len(fields) not in (5, 6):
        raise CapabilityError(
            f"{where}: expected 5 or 6 tab-separated fields ({_FIELDS}), got {len(fields)}; "
            "separate the fields with single tabs and keep tabs out of the question"
        )
    item_id, kind, question, rule, answer = (f.strip() for f in fields[:5])
    check = fields[5].strip() if len(fields) == 6 else ""
    for name, value in (("id", item_id), ("question", question), ("answer", answer)):
        if not value:
            raise CapabilityError(f"{where}: the {name} field is empty; fill it in ({_FIELDS})")
    if kind not in KINDS:
        raise CapabilityError(f"{where}: kind {kind!r} is not one of {', '.join(KINDS)}; use one of them")
    if rule not in RULES:
        raise CapabilityError(f"{where}: rule {rule!r} is not one of {', '.join(RULES)}; use one of them")
    if rule == "regex":
        try:
            re.compile(answer)
        except re.error as exc:
            raise CapabilityError(f"{where}: the answer regex does not compile ({exc}); fix the pattern") from None
    return CapabilityItem(item_id, kind, question, rule, answer, check)


def load_capability_items(path: str | Path | None = None) -> list[CapabilityItem]:
    """Read capability items from a tab-separated file (default: the bundled ``prompts/capability/items.tsv``).

    One item per line: ``id, kind, question, rule, answer[, check]``; blank lines and lines starting with ``#`` are
    skipped. A malformed line or a repeated id raises ``CapabilityError`` naming ``file:line`` and the fix.
    """
    path = Path(path).expanduser() if path is not None else default_items_path()
    if not path.is_file():
        raise CapabilityError(f"capability item file {path} does not exist; pass an existing .tsv file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise CapabilityError(f"capability item file {path} is not UTF-8 text; convert it to UTF-8") from None
    items: list[CapabilityItem] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        item = parse_item_line(line, f"{path}:{number}")
        if item.id in seen:
            raise CapabilityError(
                f"{path}:{number}: id {item.id!r} already used on line {seen[item.id]}; give every item its own id"
            )
        seen[item.id] = number
        items.append(item)
    if not items:
        raise CapabilityError(f"capability item file {path} has no items; write one item per line ({_FIELDS})")
    return items


# ----------------------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------------------

_FENCE = re.compile(r"^```[\w+-]*\n(.*?)\n?```$", re.DOTALL)
_WRAPPERS = (("**", "**"), ("*", "*"), ("`", "`"), ('"', '"'), ("'", "'"), ("\u201c", "\u201d"), ("\u2018", "\u2019"))
_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u02bc": "'", "\u201c": "'", "\u201d": "'", '"': "'"})
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:,\d{3}(?!\d))*(?:\.\d+)?(?!\w)")
_NUMERIC_ANSWER = re.compile(r"-?\d+(?:\.\d+)?")
# What may stand between two numbers offered as alternatives: "935, 936", "935 or 936", "935/936", "935–936".
_ALTERNATIVES = re.compile(r"\s*(?:,|;|/|\u2013|\bor\b|\band\b|\bto\b|,\s*or\b|,\s*and\b)?\s*")
_NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty"
).split()
_COMMAS = re.compile(r"\s*,\s*")
_OPPOSITES = {"true": "false", "false": "true", "yes": "no", "no": "yes"}


def clean_response(response: str) -> str:
    """A reply as judged by rules ``exact`` / ``regex``: reasoning blocks removed, whitespace stripped, one
    surrounding code fence removed, then surrounding bold / italic / backtick / quote pairs removed."""
    text = strip_thinking(response).strip()
    fence = _FENCE.match(text)
    if fence:
        text = fence.group(1).strip()
    changed = True
    while changed and text:
        changed = False
        for left, right in _WRAPPERS:
            if len(text) > len(left) + len(right) and text.startswith(left) and text.endswith(right):
                text, changed = text[len(left) : -len(right)].strip(), True
    return text


def normalize_answer_text(text: str, *, casefold: bool = True) -> str:
    """Text as compared by rules ``answer`` / ``cased``: reasoning removed, accents and markdown (``*``, backticks)
    dropped, quotes made straight single quotes, minus signs made ``-``, whitespace collapsed, case-folded
    (``casefold``), trailing punctuation and surrounding quotes stripped."""
    text = unicodedata.normalize("NFKD", strip_thinking(text))
    text = "".join(c for c in text if not unicodedata.combining(c))
    text = text.translate(_QUOTES).replace("\u2212", "-").replace("*", "").replace("`", "")
    text = re.sub(r"\s+", " ", text).strip()
    text = text.casefold() if casefold else text
    return text.rstrip(".!?;:, ").strip("' ")


def _numbers(text: str) -> list[tuple[Decimal, int, int]]:
    """Every number in ``text`` as ``(value, start, end)``; ``1,234`` is one thousand two hundred and thirty-four.

    A ``-`` is a sign unless it follows a number or ``)`` (``= -4`` is minus four, ``10 - 4`` is ten and four)."""
    found = []
    for m in _NUMBER.finditer(text):
        start, digits = m.start(), m.group()
        if digits.startswith("-") and re.search(r"[\d)]\s*$", text[:start]):
            start, digits = start + 1, digits[1:]
        found.append((Decimal(digits.replace(",", "")), start, m.end()))
    return found


def _spell_out_small_numbers(text: str) -> str:
    """``four`` → ``4`` for zero…twenty (used only when a response has no digits at all)."""
    return re.sub(
        r"\b(" + "|".join(_NUMBER_WORDS) + r")\b", lambda m: str(_NUMBER_WORDS.index(m.group(1))), text, flags=re.I
    )


def number_matches(answer: str, text: str, question: str) -> bool:
    """The numeric rule: ``text`` (normalised) states ``answer`` as its final number and offers no alternatives.

    Numbers that also occur in ``question`` are ignored (an echoed ``347 + 589 = 936`` is fine), unless equal to the
    answer. Of the remaining numbers, the last must equal the answer, and no two different ones may stand side by
    side as alternatives (joined by nothing, ``,``, ``;``, ``/``, ``–``, ``or``, ``and``, ``to``): ``935, 936 or 937``
    fails even though it contains 936. Intermediate results of worked steps pass. Number words zero…twenty count
    only in a response without digits.
    """
    target = Decimal(answer)
    if not any(c.isdigit() for c in text):
        text = _spell_out_small_numbers(text)
    asked = {value for value, _, _ in _numbers(question)}
    stated = [n for n in _numbers(text) if n[0] == target or n[0] not in asked]
    if not stated or stated[-1][0] != target:
        return False
    for (a, _, end), (b, start, _) in zip(stated, stated[1:]):
        if a != b and _ALTERNATIVES.fullmatch(text[end:start]):
            return False
    return True


def phrase_matches(answer: str, text: str) -> bool:
    """The text rule: ``answer`` occurs in ``text`` as a whole word or phrase (both already normalised).

    Spaces around commas are ignored (``[3,2,1]`` matches ``[3, 2, 1]``). ``true`` / ``false`` / ``yes`` / ``no``
    fail when their opposite also occurs as a whole word.
    """
    text = _COMMAS.sub(",", text)

    def whole(word: str) -> bool:
        return re.search(r"(?<!\w)" + re.escape(_COMMAS.sub(",", word)) + r"(?!\w)", text) is not None

    opposite = _OPPOSITES.get(answer.casefold())
    return whole(answer) and not (opposite is not None and whole(opposite))


def score_answer(item: CapabilityItem, response: str) -> bool:
    """Whether ``response`` answers ``item`` correctly.

    Rules (``item.rule``):

    * ``regex``: ``re.fullmatch(item.answer, clean_response(response))``.
    * ``exact``: ``clean_response(response)``, less one trailing ``.`` or ``!``, equals a variant (case-sensitive).
    * ``answer`` / ``cased``: the response is normalised (``normalize_answer_text``; ``cased`` keeps case) and must
      be at most ``MAX_WORDS`` words. A numeric variant must pass ``number_matches`` (the final new number is the
      answer, no listed alternatives); any other variant must occur as a whole word or phrase (``phrase_matches``).
      So ``"Paris"``, ``"Paris."`` and ``"The capital of France is Paris"`` pass for Paris, and ``"936"``,
      ``"347 + 589 = 936."`` pass for 936 while ``"935, 936 or 937"`` does not.
    """
    if item.rule == "regex":
        return re.fullmatch(item.answer, clean_response(response)) is not None
    if item.rule == "exact":
        text = clean_response(response)
        text = text[:-1] if text.endswith((".", "!")) else text
        return text in item.answers
    casefold = item.rule == "answer"
    text = normalize_answer_text(response, casefold=casefold)
    if not text or len(text.split()) > MAX_WORDS:
        return False
    question = normalize_answer_text(item.question, casefold=casefold)
    for variant in item.answers:
        if _NUMERIC_ANSWER.fullmatch(variant):
            if number_matches(variant, text, question):
                return True
        elif phrase_matches(normalize_answer_text(variant, casefold=casefold), text):
            return True
    return False


# ----------------------------------------------------------------------------------------------------------
# Measures on a model
# ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def capability_answers(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    items: Sequence[CapabilityItem] | None = None,
    *,
    max_new_tokens: int = 64,
    batch_size: int | None = None,
    progress: bool = False,
    **chat_kwargs: Any,
) -> pd.DataFrame:
    """Greedy answers to capability items, scored.

    Each item's question is the user turn of the chat template (``core.generation.generate``: the one batched greedy
    loop). ``items``: default the bundled set. Returns one row per item ``(id, kind, question, response, correct)``;
    ``frame.attrs['accuracy']`` holds the mean of ``correct``.
    """
    items = list(items) if items is not None else load_capability_items()
    responses = generate(
        model,
        tok,
        [item.question for item in items],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        progress=progress,
        **chat_kwargs,
    )
    frame = pd.DataFrame(
        {
            "id": [item.id for item in items],
            "kind": [item.kind for item in items],
            "question": [item.question for item in items],
            "response": responses,
            "correct": [score_answer(item, r) for item, r in zip(items, responses)],
        }
    )
    frame.attrs["accuracy"] = float(frame["correct"].mean()) if len(frame) else float("nan")
    return frame


def _interval(successes: int, trials: int) -> tuple[float, float]:
    """Exact 95% interval, or ``(nan, nan)`` for an empty sample."""
    return proportion_interval(successes, trials) if trials else (math.nan, math.nan)


def accuracy_stats(before: Sequence[bool], after: Sequence[bool]) -> dict[str, object]:
    """Accuracy before / after and retention for paired per-item outcomes (same items, same order).

    ``kept``: right before and after; ``retention = kept / correct_before``; ``gained``: wrong before, right after.
    Intervals are exact (Clopper–Pearson) 95%; a rate over zero items is NaN with a NaN interval.
    """
    if len(before) != len(after):
        raise ValueError(f"{len(before)} outcomes before and {len(after)} after; pass one pair per item")
    n = len(before)
    right_before = sum(bool(b) for b in before)
    right_after = sum(bool(a) for a in after)
    kept = sum(bool(b) and bool(a) for b, a in zip(before, after))
    return {
        "n": n,
        "correct_before": right_before,
        "correct_after": right_after,
        "accuracy_before": right_before / n if n else math.nan,
        "accuracy_before_ci": _interval(right_before, n),
        "accuracy_after": right_after / n if n else math.nan,
        "accuracy_after_ci": _interval(right_after, n),
        "kept": kept,
        "retention": kept / right_before if right_before else math.nan,
        "retention_ci": _interval(kept, right_before),
        "gained": sum(not b and bool(a) for b, a in zip(before, after)),
    }


def capability_report(before: pd.DataFrame, after: pd.DataFrame) -> dict[str, object]:
    """Compare ``capability_answers`` of the unedited (``before``) and edited (``after``) model.

    Both frames need ``id``, ``kind`` and ``correct`` and must cover the same items (matched by ``id``). Returns
    ``{"overall": stats, "by_kind": {kind: stats}}`` with ``stats`` from ``accuracy_stats``: ``accuracy_before``,
    ``accuracy_after``, ``retention`` (fraction of the items right before that are still right after), each with
    its exact binomial 95% interval (``*_ci``), and the counts behind them.
    """
    for name, frame in (("before", before), ("after", after)):
        missing = {"id", "kind", "correct"} - set(frame.columns)
        if missing:
            raise ValueError(f"{name} lacks columns {sorted(missing)}; pass frames from capability_answers")
    if set(before["id"]) != set(after["id"]) or len(before) != len(after):
        only_before = len(set(before["id"]) - set(after["id"]))
        only_after = len(set(after["id"]) - set(before["id"]))
        raise ValueError(
            f"before and after cover different items ({only_before} only before, {only_after} only after, "
            f"{len(before)} vs {len(after)} rows); answer the same items with both models"
        )
    paired = before[["id", "kind", "correct"]].merge(after[["id", "correct"]], on="id", suffixes=("_before", "_after"))
    by_kind = {
        kind: accuracy_stats(group["correct_before"].tolist(), group["correct_after"].tolist())
        for kind, group in paired.groupby("kind", sort=False)
    }
    overall = accuracy_stats(paired["correct_before"].tolist(), paired["correct_after"].tolist())
    return {"overall": overall, "by_kind": by_kind}


def over_refusal_rate(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    prompts: Sequence[str] | PromptSet | None = None,
    *,
    detector: Detector | None = None,
    max_new_tokens: int = 64,
    batch_size: int | None = None,
    early_stop: bool = False,
    progress: bool = False,
    **chat_kwargs: Any,
) -> pd.DataFrame:
    """Refusals on harmless prompts with alarming words, judged exactly like harmful prompts (``refusal_rate``).

    ``prompts``: default the bundled ``over_refusal`` set. ``detector``: default ``MarkerDetector``. Returns
    ``refusal_rate``'s frame ``(prompt, response, refused)``; ``attrs`` hold ``refusal_rate``, ``refusals`` and
    ``refusal_rate_ci`` (exact binomial 95%).
    """
    prompts = prompts if prompts is not None else load_prompts(OVER_REFUSAL_SET)
    frame = refusal_rate(
        model,
        tok,
        prompts,
        detector=detector,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        early_stop=early_stop,
        progress=progress,
        **chat_kwargs,
    )
    frame.attrs["refusal_rate_ci"] = _interval(int(frame["refused"].sum()), len(frame))
    return frame


@torch.no_grad()
def answer_nll(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    prompts: Sequence[str] | PromptSet,
    answers: Sequence[str],
    *,
    intervention: Intervention = None,
    max_tokens: int = 64,
    batch_size: int | None = None,
    **chat_kwargs: Any,
) -> torch.Tensor:
    """Teacher-forced mean negative log-likelihood per answer token, ``[n]`` (float32, CPU).

    Row ``i`` is ``−(1/K_i) Σ_k log p(a_i,k | chat(prompt_i), a_i,<k)`` over the first ``K_i ≤ max_tokens`` tokens
    of ``answers[i]`` (tokenised on its own, appended after the chat-formatted prompt): ``depth.response_nll``.
    ``intervention``: a factory of a context manager entered for the pass (``None``: the model as it is). An empty
    answer gives NaN. The search's per-trial proxy: the unedited model's greedy answers to harmless prompts
    (``core.generation.generate``), re-scored under each edit; the rise in mean NLL is the edit's cost.
    """
    answers = list(answers)
    if len(answers) != len(prompts):
        raise ValueError(f"{len(answers)} answers for {len(prompts)} prompts; give one answer per prompt")
    nll = response_nll(
        model, tok, prompts, answers, intervention, max_tokens=max_tokens, batch_size=batch_size, **chat_kwargs
    )
    empty = torch.tensor([not tok.encode(a, add_special_tokens=False) for a in answers])
    return torch.where(empty, torch.full_like(nll, math.nan), nll)


@dataclass
class AnswerNLLProxy:
    """The search's per-trial capability proxy: the unedited model's own greedy answers to harmless prompts,
    re-scored teacher-forced under each edit (one prefill per trial, no decoding).

    ``groups``: the harmless prompts, as one or several ``PromptSet`` (several when the prompts are spread across
    system prompts); ``answers``: one reference answer per prompt, in group order; ``baseline``: the unedited
    model's mean per-token NLL of its own answers (nats). Build with ``AnswerNLLProxy.build``; calling the proxy
    on a (possibly edited) model returns the mean per-token NLL, so ``proxy(model, tok) − proxy.baseline`` is
    the edit's cost.
    """

    groups: tuple[PromptSet, ...]
    answers: tuple[str, ...]
    baseline: float
    max_tokens: int = 32
    batch_size: int | None = None

    @classmethod
    def build(
        cls,
        model: nn.Module,
        tok: PreTrainedTokenizerBase,
        groups: PromptSet | Sequence[PromptSet],
        *,
        max_new_tokens: int = 32,
        batch_size: int | None = None,
        answers: Sequence[str] | None = None,
    ) -> AnswerNLLProxy:
        """Greedy answers of the model as it is now (``max_new_tokens`` each; or the given ``answers``), and their
        NLL as the baseline. Raises ``ValueError`` when no prompt gets a non-empty answer."""
        groups = (groups,) if isinstance(groups, PromptSet) else tuple(groups)
        if answers is None:
            answers = [
                a
                for g in groups
                for a in generate(model, tok, g, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=False)
            ]
        proxy = cls(groups, tuple(answers), math.nan, max_new_tokens, batch_size)
        if len(proxy.answers) != sum(len(g) for g in groups):
            raise ValueError(f"{len(proxy.answers)} answers for {sum(len(g) for g in groups)} prompts")
        proxy.baseline = proxy(model, tok)
        if not math.isfinite(proxy.baseline):
            raise ValueError("the model gave no non-empty answer to any harmless prompt; the NLL proxy is undefined")
        return proxy

    def per_prompt(self, model: nn.Module, tok: PreTrainedTokenizerBase) -> torch.Tensor:
        """Mean per-token NLL of each reference answer under the model as it is now, ``[n]`` (NaN: empty answer)."""
        out, start = [], 0
        for group in self.groups:
            answers = self.answers[start : start + len(group)]
            start += len(group)
            out.append(answer_nll(model, tok, group, answers, max_tokens=self.max_tokens, batch_size=self.batch_size))
        return torch.cat(out)

    def __call__(self, model: nn.Module, tok: PreTrainedTokenizerBase) -> float:
        """Mean per-token NLL over the prompts with a non-empty answer (nats)."""
        values = self.per_prompt(model, tok)
        values = values[~torch.isnan(values)]
        return float(values.mean()) if len(values) else math.nan
