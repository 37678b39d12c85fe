"""Persona vectors offline (Chen et al. 2025, arXiv 2507.21509).

From a trait name and a one-line description: contrastive system prompts and trait-eliciting questions
(editable templates in ``prompts/personas/``) → greedy responses under each system prompt → a judge scores
each response for the trait → keep the pairs it separates → per residual, the mean over *response* tokens of
the kept positive responses minus that of the kept negative ones (a ``Directions``, pointing towards the trait).
Then: steer (``steering.activation_addition``), monitor (projection of the last prompt token onto ``v̂``, read
before any response exists), and screen a dataset by the projection difference between its responses and the
model's own.

Judges are callables ``judge(questions, responses) → list[float]`` with scores in ``[0, 1]`` (1 = shows the
trait): ``KeywordJudge`` (regexes), ``EmbeddingJudge`` (packaged all-MiniLM-L6-v2, offline), ``SelfJudge`` (the
model under study answering Yes/No), or any function (e.g. a scripted one in tests).
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from ..core import compat
from ..core.capture import auto_batch_size, batched, capture_residuals, encode, model_device
from ..core.generation import generate
from ..core.prompts import PromptError, format_chat
from ..directions.base import Directions, mean_difference, normalize
from ..interventions.steering import capture_span_mean
from .detectors import DetectionResult, Detector, detect_with
from .embedding import SentenceEmbedder, embedding_model_dir
from .judges import token_ids
from .metrics import normalize_text
from .report import Estimate

Judge = Callable[[Sequence[str], Sequence[str]], Sequence[float]]

_SECTION = re.compile(r"^\[([A-Za-z_]+)\]\s*$")


# ----------------------------------------------------------------------------------------------------------
# Trait specifications and templates
# ----------------------------------------------------------------------------------------------------------


def persona_dirs() -> list[Path]:
    """Where trait files live: the installed package's ``data/prompts/personas``, then the repository's."""
    here = Path(__file__).resolve()
    candidates = [here.parents[1] / "data" / "prompts" / "personas", here.parents[3] / "prompts" / "personas"]
    return [d for d in candidates if d.is_dir()]


def parse_sections(text: str) -> dict[str, list[str]]:
    """``[section]`` headers, one item per line, ``#`` comments, ``\\n`` escapes → ``{section: [items]}``."""
    sections: dict[str, list[str]] = {}
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _SECTION.match(line)
        if match:
            current = match.group(1).lower()
            sections.setdefault(current, [])
            continue
        if current is None:
            raise PromptError(f"persona file line {line[:40]!r} comes before any [section] header")
        sections[current].append(line.replace("\\n", "\n"))
    return sections


@dataclass
class TraitSpec:
    """Everything needed to extract, judge and evaluate one trait.

    ``positive`` / ``negative``: system prompts that elicit / suppress the trait, paired by index.
    ``questions``: extraction questions; ``heldout``: evaluation questions (disjoint).
    ``positive_patterns`` / ``negative_patterns``: regexes for ``KeywordJudge``; ``positive_examples`` /
    ``negative_examples``: reference texts for ``EmbeddingJudge``; ``judge_template``: ``SelfJudge``'s question.
    """

    name: str
    description: str
    positive: list[str]
    negative: list[str]
    questions: list[str]
    heldout: list[str] = field(default_factory=list)
    positive_patterns: list[str] = field(default_factory=list)
    negative_patterns: list[str] = field(default_factory=list)
    positive_examples: list[str] = field(default_factory=list)
    negative_examples: list[str] = field(default_factory=list)
    judge_template: str = ""
    keyword_neutral: float = 0.5

    def __post_init__(self) -> None:
        if len(self.positive) != len(self.negative) or not self.positive:
            raise PromptError(
                f"trait {self.name!r} needs as many positive as negative system prompts (≥ 1); "
                f"got {len(self.positive)} and {len(self.negative)}"
            )
        if not self.questions:
            raise PromptError(f"trait {self.name!r} has no questions")

    def fill(self, template: str, **extra: Any) -> str:
        return template.format(trait=self.name, description=self.description, **extra)

    def keyword_judge(self) -> KeywordJudge:
        return KeywordJudge(self.positive_patterns, self.negative_patterns, neutral=self.keyword_neutral)


def _template_sections() -> dict[str, list[str]]:
    for folder in persona_dirs():
        path = folder / "_template.txt"
        if path.is_file():
            return parse_sections(path.read_text(encoding="utf-8"))
    raise PromptError("the generic persona template prompts/personas/_template.txt is missing")


def build_trait(
    name: str,
    description: str,
    *,
    questions: Sequence[str] | None = None,
    heldout: Sequence[str] | None = None,
    template: dict[str, list[str]] | None = None,
    **overrides: Any,
) -> TraitSpec:
    """A ``TraitSpec`` from a trait name and one-line description, filled into the generic templates.

    ``questions`` replaces the generic questions (trait-specific questions elicit far better); ``template``:
    sections to use instead of ``_template.txt``; ``overrides``: any ``TraitSpec`` field.
    """
    sections = {**_template_sections(), **(template or {})}

    def fill(t: str) -> str:
        return t.format(trait=name, description=description)

    spec: dict[str, Any] = dict(
        name=name,
        description=description,
        positive=[fill(t) for t in sections.get("positive", [])],
        negative=[fill(t) for t in sections.get("negative", [])],
        questions=list(questions) if questions is not None else list(sections.get("questions", [])),
        heldout=list(heldout or []),
        judge_template=(sections.get("judge") or [""])[0],
    )
    spec.update(overrides)
    return TraitSpec(**spec)


def available_traits() -> list[str]:
    names: set[str] = set()
    for folder in persona_dirs():
        names.update(p.stem for p in folder.glob("*.txt") if not p.stem.startswith("_"))
    return sorted(names)


def load_trait(source: str | Path) -> TraitSpec:
    """A shipped trait (``"sycophancy"``, ``"formality"``, ``"refusal"``; see ``available_traits()``) or a file path.

    The file's ``[trait]`` section holds ``name:`` and ``description:``; missing sections come from the generic
    template (with the trait filled in).
    """
    path = Path(source)
    if not path.is_file():
        for folder in persona_dirs():
            if (folder / f"{source}.txt").is_file():
                path = folder / f"{source}.txt"
                break
        else:
            raise PromptError(
                f"no trait {str(source)!r}; shipped traits: {', '.join(available_traits())}, or pass a file path"
            )
    sections = parse_sections(path.read_text(encoding="utf-8"))
    info = dict(line.split(":", 1) for line in sections.pop("trait", []) if ":" in line)
    info = {k.strip(): v.strip() for k, v in info.items()}
    name, description = info.get("name", path.stem), info.get("description", "")
    generic = _template_sections()

    def fill(items):
        return [t.format(trait=name, description=description) for t in items]

    def get(key):
        return sections.get(key, fill(generic.get(key, [])))

    return TraitSpec(
        name=name,
        description=description,
        positive=get("positive"),
        negative=get("negative"),
        questions=get("questions"),
        heldout=sections.get("heldout", []),
        positive_patterns=sections.get("positive_patterns", []),
        negative_patterns=sections.get("negative_patterns", []),
        positive_examples=sections.get("positive_examples", []),
        negative_examples=sections.get("negative_examples", []),
        judge_template=(sections.get("judge") or generic.get("judge") or [""])[0],
        keyword_neutral=float(info.get("neutral", 0.5)),
    )


# ----------------------------------------------------------------------------------------------------------
# Judges
# ----------------------------------------------------------------------------------------------------------


class TraitDetector:
    """The ``Detector`` protocol for a trait judge (``judge(questions, responses) -> scores`` in ``[0, 1]``):
    ``detect(texts, prompts=None)`` scores the responses (the prompts are the questions; blank when ``None``) and
    decides ``score > threshold`` (strictly: a keyword judge that matched nothing scores its neutral 0.5, undecided,
    which is not "shows the trait"); ``decided(text)`` is always ``None``: a trait score can change with more text,
    so no prefix decides it."""

    threshold: float = 0.5

    def detect(self, texts: Sequence[str], prompts: Sequence[str] | None = None) -> DetectionResult:
        texts = list(texts)
        questions = list(prompts) if prompts is not None else [""] * len(texts)
        scores = [float(s) for s in self(questions, texts)]
        return DetectionResult([s > self.threshold for s in scores], scores)

    def decided(self, text: str) -> bool | None:
        return None

    def __call__(self, questions: Sequence[str], responses: Sequence[str]) -> list[float]:
        """The scores in ``[0, 1]`` (subclasses implement it)."""
        raise NotImplementedError


@dataclass
class KeywordJudge(TraitDetector):
    """Score = share of positive among all pattern hits (``neutral`` when nothing matches).

    Patterns are case-insensitive regexes matched against ``metrics.normalize_text(response)``. ``neutral``:
    0.5 (undecided: such pairs are dropped) by default; 0 when the trait is marked by its phrases alone
    (refusal: no refusal phrase = no refusal), set by ``neutral:`` in a trait file's ``[trait]`` section.
    """

    positive_patterns: Sequence[str]
    negative_patterns: Sequence[str] = ()
    neutral: float = 0.5

    def __post_init__(self) -> None:
        self._pos = [re.compile(p, re.IGNORECASE) for p in self.positive_patterns]
        self._neg = [re.compile(p, re.IGNORECASE) for p in self.negative_patterns]

    def score(self, response: str) -> float:
        text = normalize_text(response)
        pos = sum(len(p.findall(text)) for p in self._pos)
        neg = sum(len(p.findall(text)) for p in self._neg)
        return self.neutral if pos + neg == 0 else pos / (pos + neg)

    def __call__(self, questions: Sequence[str], responses: Sequence[str]) -> list[float]:
        return [self.score(r) for r in responses]


class EmbeddingJudge(TraitDetector):
    """Score = ``sigmoid((cos(e, pos) − cos(e, neg)) / temperature)`` against the mean embeddings of reference texts.

    ``positive`` / ``negative``: example texts that show / do not show the trait (``TraitSpec.positive_examples``
    / ``negative_examples``, or the system prompts themselves). ``embedder``: any ``texts → [n, k]`` callable.
    """

    def __init__(
        self,
        positive: Sequence[str],
        negative: Sequence[str],
        *,
        embedder: Callable[[list[str]], torch.Tensor] | None = None,
        temperature: float = 0.05,
    ) -> None:
        self.embedder = embedder or SentenceEmbedder.shared()
        self.temperature = temperature
        self.pos = normalize(self.embedder(list(positive)).mean(0))
        self.neg = normalize(self.embedder(list(negative)).mean(0))

    @classmethod
    def for_trait(cls, trait: TraitSpec, **kwargs: Any) -> EmbeddingJudge:
        pos = trait.positive_examples or trait.positive
        neg = trait.negative_examples or trait.negative
        return cls(pos, neg, **kwargs)

    def __call__(self, questions: Sequence[str], responses: Sequence[str]) -> list[float]:
        e = self.embedder([r if r.strip() else "(no answer)" for r in responses])
        margin = (e @ self.pos - e @ self.neg) / self.temperature
        return torch.sigmoid(margin).tolist()


class SelfJudge(TraitDetector):
    """The model under study judges: ``P(Yes) / (P(Yes) + P(No))`` for its first answer token.

    ``template``: with ``{trait}``, ``{description}``, ``{question}``, ``{response}`` (default: the trait's
    ``judge_template``). Summed over the case / leading-space variants of Yes and No in the vocabulary.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        trait: TraitSpec,
        *,
        template: str | None = None,
        batch_size: int | None = None,
    ) -> None:
        self.model, self.tokenizer, self.trait = model, tokenizer, trait
        self.template = template or trait.judge_template or _template_sections()["judge"][0]
        self.batch_size = batch_size
        self.yes = self._ids(("Yes", "yes", " Yes", " yes", "YES"))
        self.no = self._ids(("No", "no", " No", " no", "NO"))
        if not self.yes or not self.no:
            raise ValueError("the tokenizer has no single-token Yes / No; pass another judge")

    def _ids(self, words: Sequence[str]) -> list[int]:
        return sorted(token_ids(self.tokenizer, words, whole=True))

    @torch.no_grad()
    def __call__(self, questions: Sequence[str], responses: Sequence[str]) -> list[float]:
        prompts = [self.trait.fill(self.template, question=q, response=r) for q, r in zip(questions, responses)]
        texts = format_chat(self.tokenizer, prompts)
        device = model_device(self.model)
        scores = []
        for chunk in batched(texts, self.batch_size or auto_batch_size(self.model)):
            logits = compat.forward(self.model, encode(self.tokenizer, chunk, device))[0][:, -1].float()
            logp = torch.log_softmax(logits, -1)
            yes = torch.logsumexp(logp[:, self.yes], -1)
            no = torch.logsumexp(logp[:, self.no], -1)
            scores.extend(torch.sigmoid(yes - no).cpu().tolist())
        return scores


def detector_judge(detector: Detector) -> Judge:
    """A ``Detector`` (e.g. ``MarkerDetector``, ``calibrated_semantic_detector()``) as a judge: its decision per
    response as a score, 1.0 (shows the trait) or 0.0. The questions are passed to it as the prompts."""

    def judge(questions: Sequence[str], responses: Sequence[str]) -> list[float]:
        result = detect_with(detector, list(responses), list(questions))
        return [1.0 if d else 0.0 for d in result.decisions]

    return judge


def consensus(scores: np.ndarray | Sequence[Sequence[float]], *, neutral: float = 0.5) -> np.ndarray:
    """Combine several judges' scores ``[n, k]`` into one per response ``[n]``.

    A judge scoring exactly ``neutral`` abstains (e.g. a keyword judge that found no pattern). When every other
    judge is on the same side of ``neutral`` the result is their mean; when they disagree, or all abstain, it is
    ``neutral`` (undecided: ``judge_pairs``' strict thresholds drop such responses, and ``> neutral`` counts them
    as not showing the trait). So ``consensus > neutral`` means "every judge that decided says: trait".
    """
    data = np.asarray(scores, dtype=float)
    if data.ndim != 2:
        raise ValueError(f"consensus needs scores of shape [n, judges], got {data.shape}")
    out = np.full(data.shape[0], neutral, dtype=float)
    for i, row in enumerate(data):
        voting = row[row != neutral]
        if len(voting) and ((voting > neutral).all() or (voting < neutral).all()):
            out[i] = float(voting.mean())
    return out


def judge_table(judges: Mapping[str, Judge], questions: Sequence[str], responses: Sequence[str]) -> pd.DataFrame:
    """Every judge's score per response, and their combination: one column per judge name, ``score``
    (``consensus``), ``trait`` (``score > 0.5``: every deciding judge says the response shows the trait) and
    ``disagree`` (the judges' own decisions, ``score > 0.5`` each, differ). One row per response, in order."""
    if not judges:
        raise ValueError("judge_table needs at least one judge")
    table = pd.DataFrame(
        {name: [float(s) for s in judge(list(questions), list(responses))] for name, judge in judges.items()}
    )
    table["score"] = consensus(table[list(judges)].to_numpy())
    table["trait"] = table["score"] > 0.5
    decisions = table[list(judges)] > 0.5
    table["disagree"] = decisions.nunique(axis=1) > 1
    return table


def stand_in_side_judge(frame: pd.DataFrame) -> Judge:
    """A STAND-IN for pipeline tests on a random model, not a judge: it scores the rows of ``frame`` (in order) by the
    system prompt they were generated under (1.0 positive, 0.0 negative) and ignores the text. Use it only where
    no real judge can find the trait (a random tiny model), and say so in the output."""
    sides = [1.0 if side == "positive" else 0.0 for side in frame["side"]]

    def judge(questions: Sequence[str], responses: Sequence[str]) -> list[float]:
        if len(responses) != len(sides):
            raise ValueError(f"stand_in_side_judge was built for {len(sides)} rows, got {len(responses)}")
        return list(sides)

    return judge


# ----------------------------------------------------------------------------------------------------------
# Extraction
# ----------------------------------------------------------------------------------------------------------


def sample_responses(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    samples: int = 1,
    temperature: float = 1.0,
    seed: int = 0,
    max_new_tokens: int = 64,
    batch_size: int | None = None,
    progress: bool = False,
    **chat_kwargs: Any,
) -> list[list[str]]:
    """``samples`` sampled responses per prompt (chat template applied; ``chat_kwargs``, e.g. ``system_prompt``, go
    to it): ``[len(prompts)][samples]``. Each prompt is repeated ``samples`` times in the batches; one generator
    seeded with ``seed`` draws every token, so the same call gives the same responses."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if samples > 1 and temperature <= 0:
        raise ValueError(f"{samples} samples at temperature {temperature} would be {samples} identical greedy copies")
    repeated = [p for p in prompts for _ in range(samples)]
    flat = generate(
        model,
        tokenizer,
        repeated,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        progress=progress,
        temperature=temperature,
        seed=seed,
        **chat_kwargs,
    )
    return [flat[i * samples : (i + 1) * samples] for i in range(len(prompts))]


def generate_contrastive(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    trait: TraitSpec,
    *,
    questions: Sequence[str] | None = None,
    n_prompts: int | None = None,
    max_new_tokens: int = 64,
    samples: int = 1,
    temperature: float = 0.0,
    seed: int = 0,
    batch_size: int | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Responses to each question under each positive and negative system prompt: greedy (the default), or
    ``samples`` rollouts per question at ``temperature`` (Chen et al. sample several responses per question).

    Returns rows ``(pair, question, prompt_index, sample, side, system_prompt, response)``; ``side`` is
    ``"positive"`` or ``"negative"``, and a pair is one question's rollout number ``sample`` under the positive and
    the negative prompt of one index (``pair = (prompt_index · len(questions) + question_index) · samples +
    sample``). ``n_prompts``: use only the first few system-prompt pairs. ``seed``: each (prompt index, side) draws
    from its own generator seeded by ``seed``, the index and the side, so the rows do not depend on batching order.
    """
    questions = list(questions if questions is not None else trait.questions)
    n = len(trait.positive) if n_prompts is None else min(n_prompts, len(trait.positive))
    rows = []
    jobs = [
        (i, side, sp)
        for i in range(n)
        for side, sp in (("positive", trait.positive[i]), ("negative", trait.negative[i]))
    ]
    for i, side, system_prompt in tqdm(jobs, desc="persona generate", disable=not progress, leave=False):
        if samples == 1 and temperature <= 0:
            responses = [
                [r]
                for r in generate(
                    model,
                    tokenizer,
                    questions,
                    max_new_tokens=max_new_tokens,
                    batch_size=batch_size,
                    progress=False,
                    system_prompt=system_prompt,
                )
            ]
        else:
            responses = sample_responses(
                model,
                tokenizer,
                questions,
                samples=samples,
                temperature=temperature,
                seed=seed * 1_000_003 + 2 * i + (side == "negative"),
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
                system_prompt=system_prompt,
            )
        for q_index, (question, rollouts) in enumerate(zip(questions, responses)):
            for k, response in enumerate(rollouts):
                rows.append(
                    {
                        "pair": (i * len(questions) + q_index) * samples + k,
                        "question": question,
                        "prompt_index": i,
                        "sample": k,
                        "side": side,
                        "system_prompt": system_prompt,
                        "response": response,
                    }
                )
    return pd.DataFrame(rows)


def judge_pairs(
    frame: pd.DataFrame,
    judge: Judge | Mapping[str, Judge],
    *,
    positive_min: float = 0.5,
    negative_max: float = 0.5,
) -> pd.DataFrame:
    """Add ``score`` (the judge's) and ``keep``: a pair is kept when its positive response scores
    ``> positive_min`` and its negative one ``< negative_max`` (Chen et al.'s filter, on a 0–1 scale).

    ``judge``: one judge, or several by name (``{name: judge}``): then each gets a column and ``score`` is their
    ``consensus`` (a response the judges disagree on is undecided and its pair dropped), with ``trait`` and
    ``disagree`` as in ``judge_table``. ``frame.attrs``: ``pairs``, ``kept_pairs``, and per side how many responses
    pass their side's threshold (``positive_passed``, ``negative_passed``)."""
    frame = frame.copy()
    questions, responses = list(frame["question"]), list(frame["response"])
    if isinstance(judge, Mapping):
        table = judge_table(judge, questions, responses)
        for column in table.columns:
            frame[column] = table[column].to_numpy()
    else:
        frame["score"] = [float(s) for s in judge(questions, responses)]
    pos = frame[frame.side == "positive"].set_index("pair")["score"]
    neg = frame[frame.side == "negative"].set_index("pair")["score"]
    good = set(pos.index[(pos > positive_min).values]) & set(neg.index[(neg < negative_max).values])
    frame["keep"] = frame["pair"].isin(good)
    frame.attrs["kept_pairs"] = len(good)
    frame.attrs["pairs"] = int(frame["pair"].nunique())
    frame.attrs["positive_passed"] = int((pos > positive_min).sum())
    frame.attrs["negative_passed"] = int((neg < negative_max).sum())
    return frame


def require_pairs(kept: int, total: int, min_pairs: int) -> None:
    """Raise a ``ValueError`` naming the numbers and the fixes when fewer than ``min_pairs`` of ``total`` pairs
    survived the judge; never fall back to unjudged pairs."""
    if kept < min_pairs:
        raise ValueError(
            f"the judge kept {kept} of {total} contrastive pairs, fewer than min_pairs={min_pairs}: the model does "
            "not show the trait often enough under its eliciting system prompts (or shows it under the suppressing "
            "ones). Fix: more questions or system-prompt pairs, more rollouts per question (samples > 1 with "
            "temperature > 0), a trait the model can express, or another judge; pass a smaller min_pairs only "
            "knowingly (and report it)"
        )


def response_activations(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[str],
    responses: Sequence[str],
    *,
    system_prompts: Sequence[str | None] | str | None = None,
    layers: Sequence[int] | None = None,
    start: int = 0,
    stop: int | None = None,
    batch_size: int | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Residuals averaged over each response's tokens (with its system prompt in context): ``[n, layer, d]``."""
    if system_prompts is None or isinstance(system_prompts, str):
        system_prompts = [system_prompts] * len(questions)
    prefixes = [format_chat(tokenizer, [q], system_prompt=sp)[0] for q, sp in zip(questions, system_prompts)]
    return capture_span_mean(
        model,
        tokenizer,
        prefixes,
        list(responses),
        layers=layers,
        start=start,
        stop=stop,
        batch_size=batch_size,
        progress=progress,
    )


@dataclass
class PersonaResult:
    """``directions``: per-residual persona vectors (towards the trait); ``frame``: generations, scores, ``keep``."""

    trait: TraitSpec
    directions: Directions
    frame: pd.DataFrame

    def __repr__(self) -> str:
        return (
            f"PersonaResult({self.trait.name!r}, kept {self.frame.attrs.get('kept_pairs')} of "
            f"{self.frame.attrs.get('pairs')} pairs, {self.directions!r})"
        )


def persona_directions(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    frame: pd.DataFrame,
    *,
    trait: TraitSpec | None = None,
    batch_size: int | None = None,
    progress: bool = True,
    min_pairs: int = 1,
) -> Directions:
    """Mean response-token activation of kept positive responses minus kept negative ones, per residual index:
    ``Directions`` with ``vectors [L + 1, d]``. Raises ``ValueError`` (``require_pairs``) when fewer than
    ``min_pairs`` pairs are kept."""
    kept = frame[frame["keep"]] if "keep" in frame else frame
    require_pairs(int(kept["pair"].nunique()), int(frame["pair"].nunique()), min_pairs)
    acts = {}
    for side in ("positive", "negative"):
        rows = kept[kept.side == side]
        acts[side] = response_activations(
            model,
            tokenizer,
            list(rows.question),
            list(rows.response),
            system_prompts=list(rows.system_prompt),
            batch_size=batch_size,
            progress=progress,
        )
    directions = mean_difference(acts["positive"], acts["negative"])
    return replace(
        directions,
        method="persona",
        meta={**directions.meta, "trait": trait.name if trait else None, "kept_pairs": int(kept["pair"].nunique())},
    )


def extract_persona_vector(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    trait: TraitSpec | str,
    *,
    judge: Judge | str = "keyword",
    questions: Sequence[str] | None = None,
    n_prompts: int | None = None,
    max_new_tokens: int = 64,
    positive_min: float = 0.5,
    negative_max: float = 0.5,
    samples: int = 1,
    temperature: float = 0.0,
    seed: int = 0,
    min_pairs: int = 1,
    batch_size: int | None = None,
    progress: bool = True,
) -> PersonaResult:
    """The whole pipeline: generate under contrastive system prompts, judge, keep separated pairs, average.

    ``judge``: a callable, ``{name: judge}`` (their ``consensus``), or ``"keyword"`` / ``"embedding"`` / ``"self"``
    for the built-in judges of ``trait``. ``samples`` / ``temperature`` / ``seed``: rollouts per question
    (``generate_contrastive``). Fewer than ``min_pairs`` kept pairs raise a ``ValueError`` (Chen et al.'s recipe
    needs dozens; the default of 1 only refuses an empty set).
    """
    spec = load_trait(trait) if isinstance(trait, str) else trait
    if isinstance(judge, str):
        builders: dict[str, Callable[[], Judge]] = {
            "keyword": lambda: spec.keyword_judge(),
            "embedding": lambda: EmbeddingJudge.for_trait(spec),
            "self": lambda: SelfJudge(model, tokenizer, spec),
        }
        judge = builders[judge]()
    frame = generate_contrastive(
        model,
        tokenizer,
        spec,
        questions=questions,
        n_prompts=n_prompts,
        max_new_tokens=max_new_tokens,
        samples=samples,
        temperature=temperature,
        seed=seed,
        batch_size=batch_size,
        progress=progress,
    )
    frame = judge_pairs(frame, judge, positive_min=positive_min, negative_max=negative_max)
    directions = persona_directions(
        model, tokenizer, frame, trait=spec, batch_size=batch_size, progress=progress, min_pairs=min_pairs
    )
    return PersonaResult(spec, directions, frame)


# ----------------------------------------------------------------------------------------------------------
# Monitoring and screening
# ----------------------------------------------------------------------------------------------------------


def project(activations: torch.Tensor, directions: Directions | torch.Tensor, layer: int | None = None) -> torch.Tensor:
    """Scalar projection onto the unit direction: ``activations [n, d]`` (or ``[n, layer, d]`` with ``layer``)."""
    if isinstance(directions, Directions):
        v = directions.unit()[layer]
    else:
        v = normalize(directions.float())
    h = activations[:, layer] if activations.ndim == 3 else activations
    return (h.double() @ v.double()).float()


def monitor_projection(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    directions: Directions,
    layer: int,
    *,
    system_prompt: str | None = None,
    batch_size: int | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Projection of the last prompt token (the assistant turn's opening, before any response) onto ``v̂[layer]``:
    ``[n]``."""
    acts = capture_residuals(
        model,
        tokenizer,
        prompts,
        layers=[layer],
        positions=-1,
        batch_size=batch_size,
        progress=progress,
        system_prompt=system_prompt,
    )
    return project(acts[:, 0], directions, layer)


def projection_difference(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    responses: Sequence[str],
    directions: Directions,
    layer: int,
    *,
    model_responses: Sequence[str] | None = None,
    max_new_tokens: int = 64,
    system_prompt: str | None = None,
    batch_size: int | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Screen a dataset: for each ``(prompt, response)``, the response-token mean projection onto ``v̂[layer]``
    minus that of the model's own (greedy) response to the same prompt. Large positive = the sample would push
    the model towards the trait if trained on. Columns ``prompt, response, model_response, projection,
    model_projection, difference`` (sorted by nothing; sort by ``difference`` to rank)."""
    if model_responses is None:
        model_responses = generate(
            model,
            tokenizer,
            prompts,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            progress=progress,
            system_prompt=system_prompt,
        )
    kw: dict[str, Any] = dict(system_prompts=system_prompt, layers=[layer], batch_size=batch_size, progress=progress)
    data = response_activations(model, tokenizer, prompts, responses, **kw)[:, 0]
    own = response_activations(model, tokenizer, prompts, model_responses, **kw)[:, 0]
    p_data, p_own = project(data, directions, layer), project(own, directions, layer)
    return pd.DataFrame(
        {
            "prompt": list(prompts),
            "response": list(responses),
            "model_response": list(model_responses),
            "projection": p_data.tolist(),
            "model_projection": p_own.tolist(),
            "difference": (p_data - p_own).tolist(),
        }
    )


def separation(directions: Directions, positive: torch.Tensor, negative: torch.Tensor, layer: int) -> dict:
    """How well ``v̂[layer]`` separates two activation sets ``[n, layer, d]``: mean projections, their gap in
    pooled standard deviations (Cohen's d) and the share of (pos, neg) pairs ordered correctly (AUROC)."""
    p, q = project(positive, directions, layer).double(), project(negative, directions, layer).double()
    pooled = torch.sqrt(
        (p.var(unbiased=True) if len(p) > 1 else torch.tensor(0.0)) / 2
        + (q.var(unbiased=True) if len(q) > 1 else torch.tensor(0.0)) / 2
    ).clamp_min(1e-12)
    auroc = float((p[:, None] > q[None, :]).double().mean() + 0.5 * (p[:, None] == q[None, :]).double().mean())
    return {
        "positive_mean": float(p.mean()),
        "negative_mean": float(q.mean()),
        "cohens_d": float((p.mean() - q.mean()) / pooled),
        "auroc": auroc,
    }


def prompt_projections(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    directions: Directions,
    layers: Sequence[int],
    *,
    system_prompt: str | None = None,
    batch_size: int | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """``monitor_projection`` at several residuals in one pass: the last prompt token's projection onto ``v̂[layer]``
    for each layer, ``[n, len(layers)]``."""
    acts = capture_residuals(
        model,
        tokenizer,
        list(prompts),
        layers=list(layers),
        positions=-1,
        batch_size=batch_size,
        progress=progress,
        system_prompt=system_prompt,
    )
    return torch.stack([project(acts[:, j], directions, layer) for j, layer in enumerate(layers)], dim=1)


# ----------------------------------------------------------------------------------------------------------
# Protocol helpers: splits and correlations with intervals
# ----------------------------------------------------------------------------------------------------------


def split_questions(pool: Sequence[str], n_validation: int, seed: int) -> tuple[list[str], list[str]]:
    """A seeded shuffle of ``pool`` cut into ``(validation, test)``: the first ``n_validation`` and the rest
    (disjoint, together the whole pool; ``random.Random(seed)``, so a seed gives the same split anywhere)."""
    if not 0 < n_validation < len(pool):
        raise ValueError(f"n_validation must be in 1..{len(pool) - 1} for a pool of {len(pool)}, got {n_validation}")
    if len(set(pool)) != len(pool):
        raise ValueError("split_questions needs distinct questions (a repeat would sit in both splits)")
    order = random.Random(seed).sample(list(pool), len(pool))
    return order[:n_validation], order[n_validation:]


def pearson(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Pearson correlation of two equally long ``[n]`` sequences; NaN when either has no variance (or n < 2)."""
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"pearson needs two [n] arrays of one length, got {a.shape} and {b.shape}")
    if len(a) < 2:
        return math.nan
    a, b = a - a.mean(), b - b.mean()
    denominator = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum() / denominator) if denominator > 0 else math.nan


def center_within(values: Sequence[float] | np.ndarray, groups: Sequence[Any]) -> np.ndarray:
    """``values [n]`` minus the mean of their group (``groups [n]`` labels): what is left once each group's level
    is removed. Correlating two such residuals asks whether x predicts y *within* a group (e.g. one system prompt),
    not merely which group a row came from."""
    frame = pd.DataFrame({"v": np.asarray(values, dtype=float), "g": list(groups)})
    return (frame["v"] - frame.groupby("g")["v"].transform("mean")).to_numpy()


def fisher_interval(r: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Fisher-z interval of a Pearson ``r`` from ``n`` independent pairs: ``tanh(atanh(r) ± z / sqrt(n − 3))``."""
    if n < 4:
        raise ValueError(f"fisher_interval needs n >= 4, got {n}")
    from scipy.stats import norm

    z = float(norm.ppf(0.5 + confidence / 2))
    centre = math.atanh(max(min(r, 1 - 1e-12), -1 + 1e-12))
    half = z / math.sqrt(n - 3)
    return math.tanh(centre - half), math.tanh(centre + half)


def correlation_estimate(
    x: Sequence[float] | np.ndarray,
    y: Sequence[float] | np.ndarray,
    *,
    clusters: Sequence[Any] | None = None,
    within: Sequence[Any] | None = None,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> Estimate:
    """Pearson ``r`` of ``x`` and ``y`` (``[n]`` each) with a percentile bootstrap that resamples whole
    ``clusters`` (e.g. the question: rows of one question under several system prompts are not independent;
    ``None``: every row its own cluster). ``within``: group labels; x and y are first centred per group
    (``center_within``, once, on all rows), so r measures prediction inside groups.

    When r is undefined (x or y constant, as when no response shows the trait) the estimate is 0 in [−1, 1] and its
    ``detail`` says so: a claim on it is then inconclusive, not silently passed or failed.
    """
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if within is not None:
        a, b = center_within(a, within), center_within(b, within)
    labels = list(range(len(a))) if clusters is None else list(clusters)
    kind = "within-group " if within is not None else ""
    r = pearson(a, b)
    unit = "rows" if clusters is None else "clusters"
    if math.isnan(r):
        return Estimate(0.0, -1.0, 1.0, f"{kind}Pearson r undefined (no variance in one variable; {len(a)} rows)")
    index = pd.Series(range(len(a))).groupby(pd.Series(labels)).apply(list).tolist()
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_resamples):
        picked = rng.integers(0, len(index), len(index))
        rows = np.concatenate([index[i] for i in picked])
        value = pearson(a[rows], b[rows])
        if not math.isnan(value):
            draws.append(value)
    if len(index) < 2 or not draws:
        return Estimate(r, -1.0, 1.0, f"{kind}Pearson r of {len(a)} rows; too few {unit} for an interval")
    tail = (1 - confidence) / 2 * 100
    low, high = (float(v) for v in np.percentile(draws, [tail, 100 - tail]))
    return Estimate(
        r,
        min(low, r),
        max(high, r),
        f"{kind}Pearson r of {len(a)} rows, bootstrap over {len(index)} {unit} {confidence:.0%}",
    )


def minilm_path() -> Path:
    """Deprecated (one release): the packaged MiniLM folder; use ``measure.embedding.embedding_model_dir()``."""
    import warnings

    warnings.warn(
        "persona.minilm_path moved to hereticlab.measure.embedding.embedding_model_dir",
        DeprecationWarning,
        stacklevel=2,
    )
    return embedding_model_dir()
