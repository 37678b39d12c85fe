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

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

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
from .detectors import DetectionResult
from .embedding import SentenceEmbedder, embedding_model_dir
from .judges import token_ids
from .metrics import normalize_text

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
    decides ``score >= threshold``; ``decided(text)`` is always ``None``: a trait score can change with more text,
    so no prefix decides it."""

    threshold: float = 0.5

    def detect(self, texts: Sequence[str], prompts: Sequence[str] | None = None) -> DetectionResult:
        texts = list(texts)
        questions = list(prompts) if prompts is not None else [""] * len(texts)
        scores = [float(s) for s in self(questions, texts)]
        return DetectionResult([s >= self.threshold for s in scores], scores)

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


# ----------------------------------------------------------------------------------------------------------
# Extraction
# ----------------------------------------------------------------------------------------------------------


def generate_contrastive(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    trait: TraitSpec,
    *,
    questions: Sequence[str] | None = None,
    n_prompts: int | None = None,
    max_new_tokens: int = 64,
    batch_size: int | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Greedy responses to each question under each positive and negative system prompt.

    Returns rows ``(pair, question, prompt_index, side, system_prompt, response)``; ``side`` is ``"positive"``
    or ``"negative"``, and a pair is one question under the positive and negative prompt of one index.
    ``n_prompts``: use only the first few system-prompt pairs.
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
        responses = generate(
            model,
            tokenizer,
            questions,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            progress=False,
            system_prompt=system_prompt,
        )
        for q_index, (question, response) in enumerate(zip(questions, responses)):
            rows.append(
                {
                    "pair": i * len(questions) + q_index,
                    "question": question,
                    "prompt_index": i,
                    "side": side,
                    "system_prompt": system_prompt,
                    "response": response,
                }
            )
    return pd.DataFrame(rows)


def judge_pairs(
    frame: pd.DataFrame, judge: Judge, *, positive_min: float = 0.5, negative_max: float = 0.5
) -> pd.DataFrame:
    """Add ``score`` (the judge's) and ``keep``: a pair is kept when its positive response scores
    ``> positive_min`` and its negative one ``< negative_max`` (Chen et al.'s filter, on a 0–1 scale)."""
    frame = frame.copy()
    frame["score"] = [float(s) for s in judge(list(frame["question"]), list(frame["response"]))]
    pos = frame[frame.side == "positive"].set_index("pair")["score"]
    neg = frame[frame.side == "negative"].set_index("pair")["score"]
    good = set(pos.index[(pos > positive_min).values]) & set(neg.index[(neg < negative_max).values])
    frame["keep"] = frame["pair"].isin(good)
    frame.attrs["kept_pairs"] = len(good)
    frame.attrs["pairs"] = int(frame["pair"].nunique())
    return frame


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
    """Mean response-token activation of kept positive responses minus kept negative ones, per residual index."""
    kept = frame[frame["keep"]] if "keep" in frame else frame
    if kept["pair"].nunique() < min_pairs:
        raise ValueError(
            f"the judge kept {kept['pair'].nunique()} pairs (< {min_pairs}); loosen the thresholds, "
            "use more questions / system prompts, or another judge"
        )
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
    batch_size: int | None = None,
    progress: bool = True,
) -> PersonaResult:
    """The whole pipeline: generate under contrastive system prompts, judge, keep separated pairs, average.

    ``judge``: a callable, or ``"keyword"`` / ``"embedding"`` / ``"self"`` for the built-in judges of ``trait``.
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
        batch_size=batch_size,
        progress=progress,
    )
    frame = judge_pairs(frame, judge, positive_min=positive_min, negative_max=negative_max)
    directions = persona_directions(model, tokenizer, frame, trait=spec, batch_size=batch_size, progress=progress)
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


def minilm_path() -> Path:
    """Deprecated (one release): the packaged MiniLM folder; use ``measure.embedding.embedding_model_dir()``."""
    import warnings

    warnings.warn(
        "persona.minilm_path moved to hereticlab.measure.embedding.embedding_model_dir",
        DeprecationWarning,
        stacklevel=2,
    )
    return embedding_model_dir()
