"""Behaviours: what a direction is about, where it is measured and how it is scored.

A ``Behaviour`` bundles two prompt sets, *bad* (elicits the behaviour) and *good* (does not), with a scorer
for generated texts. Refusal is the classic one; ``slop`` (florid "AI-style" prose), ``humour`` and
``verbosity`` are style behaviours elicited by contrasting system prompts on the same questions.

Interface used by the search and the CLI::

    b = get_behaviour("refusal")               # or "slop", "humour", "verbosity"; BEHAVIOURS lists them
    bad_train, good_train = b.train_pair(seed)   # PromptSets for directions: r = mean(bad) − mean(good)
    bad_eval, good_eval = b.eval_pair(seed)      # behaviour measured on bad_eval, KL measured on good_eval
                                                 # (style presets: both are the same *neutral* prompts)
    b.score(texts)      -> list[float]           # per-text score, higher = more of the behaviour
                                                 # (refusal: 1.0/0.0 decisions; slop/humour: hits per 100 words;
                                                 #  verbosity: words)
    b.is_present(texts) -> list[bool]            # per-text decision used for counting
    b.measure(texts)    -> float                 # the objective: count of is_present (b.count == "present")
                                                 # or the mean score (b.count == "mean")
    b.count             # "present" | "mean"
    b.early_stop_safe   # True when the objective can be computed from rows whose decoding stopped early:
                        # the objective counts decisions and positive decisions are monotone in the prefix.
                        # False for verbosity (its objective is the mean length, which stopping would cap).
    b.decided(texts)    -> list[bool]            # the early-stop test: True = positive and final (no continuation
                                                 # can undo it). Stop a row on decided(prefix), not on
                                                 # is_present(prefix): a blank prefix or an unfinished <think>
                                                 # block counts as a refusal in is_present but may still become
                                                 # an answer. decided(t) implies is_present(t + anything).
    b.max_new_tokens    # suggested generation length for measuring the behaviour (the search's hard cap)
    b.search_decide_after  # clean tokens after which the search counts a row as decided negative
                           # (``decide_after``; None = ``max_new_tokens``, i.e. decode to the cap)
    b.report_new_tokens    # generation length of a run's held-out report
                           # (``final_new_tokens``; None = ``max_new_tokens``)
    b.unit              # what measure() returns, for tables ("refusals", "words", ...)
    b.counted, b.label  # how logs name a count: "refusals" / "refusals" (``noun``), else
                        # "responses with slop" / "slop"
    b.run_settings      # True: a search run gives it the run's prompts, split and lengths (refusal:
                        # --harmful, --harmless, --system-prompt, --train-prompts, --decide-after, ...);
                        # False: it brings its own (the style presets)
    b.neutral           # evaluation prompts without the eliciting instruction (presets: the plain questions)
    measure_contrast(model, tok, b) -> ContrastCheck  # pre-search check: bad vs good training prompts differ?

``train_pair`` / ``eval_pair`` use the same ``seed`` to cut *disjoint* train and eval parts of each set; for the
style behaviours the bad and good sets hold the same questions (only the system prompt differs), and the
cut is the same for both, so an eval question is never a training question in either class.

Neutral evaluation (``Behaviour.neutral``): the contrast that elicits a style behaviour (a florid or comedian system
prompt, "Answer with a joke first.") belongs in the *training* pairs only. A search that measured "less humour" on
prompts that ask for a joke would reward an edit that ignores instructions. So the presets evaluate (search and
test splits, both sides) on the plain questions, with no system prompt and no request: the edit must remove the
behaviour where the model shows it unasked. ``check_contrast`` / ``measure_contrast`` test, before a search, that
the training pairs do differ on the behaviour's own measure (see ``ContrastCheck``).

Presets ship their prompt sets and phrase lists in ``prompts/behaviours/`` (``questions.txt``,
``slop_phrases.txt``, ``humour_cues.txt``); refusal uses the named sets ``harmful`` / ``harmless``.
Build your own with ``Behaviour(...)`` and ``register(behaviour)``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

from torch import nn
from transformers import PreTrainedTokenizerBase

from ..core.generation import generate
from ..core.prompts import PromptError, PromptSet, _bundled_prompt_dirs, load_prompts
from .detectors import Detector, answer_text, decided_many, prepare_response
from .metrics import MarkerDetector, normalize_text

Scorer = Callable[[Sequence[str]], list[float]]
Decider = Callable[[Sequence[str]], list[bool]]


def behaviour_file(name: str) -> Path:
    """A file shipped under ``prompts/behaviours/`` (the installed copy first, then the repository's)."""
    for folder in _bundled_prompt_dirs():
        path = folder / "behaviours" / name
        if path.is_file():
            return path
    raise PromptError(f"behaviour data file {name!r} not found under prompts/behaviours/")


def read_list(name_or_path: str | Path) -> tuple[str, ...]:
    """Lines of a list file (``#`` comments and blanks dropped); a bare name is looked up in ``prompts/behaviours``."""
    path = Path(name_or_path)
    if not path.is_file():
        path = behaviour_file(str(name_or_path))
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return tuple(line for line in lines if line and not line.startswith("#"))


# ----------------------------------------------------------------------------------------------------------
# Scorers
# ----------------------------------------------------------------------------------------------------------

_WORDS = re.compile(r"[\w'’-]+")


def word_count(text: str) -> int:
    """Words in the answer (reasoning blocks removed)."""
    return len(_WORDS.findall(prepare_response(text)))


class PhraseScorer:
    """Counts phrase hits in normalized text (word boundary at the start of a phrase only, so stems match).

    ``score``: hits per 100 words (``per_words``; ``None`` = raw hit count). ``present``: at least ``min_hits``
    hits. Hits only accumulate as text grows, so ``present`` is monotone in the prefix.
    """

    def __init__(self, phrases: Sequence[str], *, min_hits: int = 2, per_words: int | None = 100) -> None:
        self.phrases = tuple(phrases)
        parts = []
        for phrase in sorted({normalize_text(p) for p in self.phrases if p.strip()}, key=len, reverse=True):
            prefix = r"\b" if re.match(r"\w", phrase) else ""
            parts.append(prefix + re.escape(phrase))
        self.pattern = re.compile("|".join(parts)) if parts else None
        self.min_hits = min_hits
        self.per_words = per_words

    def hits(self, text: str) -> int:
        if self.pattern is None:
            return 0
        return len(self.pattern.findall(normalize_text(prepare_response(text))))

    def matches(self, text: str) -> list[str]:
        return self.pattern.findall(normalize_text(prepare_response(text))) if self.pattern else []

    def score(self, texts: Sequence[str]) -> list[float]:
        out = []
        for text in texts:
            hits = self.hits(text)
            if self.per_words is None:
                out.append(float(hits))
            else:
                out.append(self.per_words * hits / max(word_count(text), 1))
        return out

    def present(self, texts: Sequence[str]) -> list[bool]:
        return [self.hits(t) >= self.min_hits for t in texts]

    def decided(self, texts: Sequence[str]) -> list[bool]:
        """``present`` counted outside reasoning blocks only: stays True whatever is generated next."""
        pattern = self.pattern
        return [
            pattern is not None and len(pattern.findall(normalize_text(answer_text(t)))) >= self.min_hits for t in texts
        ]


class LengthScorer:
    """Score = words in the answer; present = at least ``min_words`` words."""

    def __init__(self, min_words: int = 80) -> None:
        self.min_words = min_words

    def score(self, texts: Sequence[str]) -> list[float]:
        return [float(word_count(t)) for t in texts]

    def present(self, texts: Sequence[str]) -> list[bool]:
        return [word_count(t) >= self.min_words for t in texts]

    def decided(self, texts: Sequence[str]) -> list[bool]:
        return [len(_WORDS.findall(answer_text(t))) >= self.min_words for t in texts]


# ----------------------------------------------------------------------------------------------------------
# Behaviour
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Behaviour:
    """Two prompt sets and a scorer. See the module docstring for the interface the search relies on.

    ``bad`` / ``good``: full prompt sets (with their system prompts / response prefixes); ``n_train``: prompts per
    class for directions (an int, or a fraction below 1), the rest of each set is the eval part (``n_eval``
    caps it). ``scorer`` gives per-text scores, ``decider`` per-text decisions. ``count``: ``"present"`` (the
    objective is the number of texts where the behaviour is present) or ``"mean"`` (the mean score).

    Lengths: ``max_new_tokens`` caps generation; ``decide_after`` (clean tokens after which a search row counts
    as decided negative) and ``final_new_tokens`` (a run's held-out report) default to it. ``run_settings``: a
    search run replaces the prompt sets, ``n_train`` and the three lengths with its own settings (refusal); the
    style presets keep theirs. ``noun``: the plural noun logs use for a count ("refusals"); ``None`` = "responses
    with <name>".

    ``neutral``: evaluation prompts without the instruction that elicits the behaviour, the same questions in the
    same order as ``bad`` / ``good`` (the style presets: the plain questions). When set, ``eval_pair`` cuts *both*
    sides from it with the same split as the training pairs, so the contrast lives in the training pairs only.
    """

    name: str
    bad: PromptSet
    good: PromptSet
    scorer: Scorer
    decider: Decider
    stopper: Decider | None = None
    count: str = "present"
    early_stop_safe: bool = False
    max_new_tokens: int = 48
    n_train: int | float = 2 / 3
    n_eval: int | None = None
    unit: str = "texts"
    description: str = ""
    meta: dict = field(default_factory=dict)
    detector: Detector | None = None
    decide_after: int | None = None
    final_new_tokens: int | None = None
    run_settings: bool = False
    noun: str | None = None
    neutral: PromptSet | None = None

    def __post_init__(self) -> None:
        if self.count not in ("present", "mean"):
            raise ValueError(f"count must be 'present' or 'mean', not {self.count!r}")
        if self.neutral is not None and not len(self.neutral) == len(self.bad) == len(self.good):
            raise ValueError(
                f"neutral must hold the same questions as bad and good (sizes {len(self.neutral)}, {len(self.bad)}, "
                f"{len(self.good)}); pass neutral=None with other prompt sets"
            )
        if self.early_stop_safe and (self.stopper is None or self.count != "present"):
            raise ValueError("early_stop_safe needs a monotone stopper and count='present'")

    @property
    def search_decide_after(self) -> int:
        """Clean tokens after which the search counts a row as decided negative (``decide_after``, else the cap)."""
        return self.max_new_tokens if self.decide_after is None else self.decide_after

    @property
    def report_new_tokens(self) -> int:
        """Generation length of a run's held-out report (``final_new_tokens``, else ``max_new_tokens``)."""
        return self.max_new_tokens if self.final_new_tokens is None else self.final_new_tokens

    @property
    def counted(self) -> str:
        """What a count is called in logs: ``noun`` ("refusals"), else "responses with <name>"."""
        return self.noun or f"responses with {self.name}"

    @property
    def label(self) -> str:
        """The short name of the behaviour in logs: ``noun`` ("refusals"), else its name."""
        return self.noun or self.name

    @property
    def objective_is_mean(self) -> bool:
        """The objective is a mean score (``count == "mean"``, e.g. verbosity), not a count of decisions."""
        return self.count == "mean"

    def __repr__(self) -> str:
        return (
            f"Behaviour({self.name!r}, bad={len(self.bad)}, good={len(self.good)}, count={self.count!r}, "
            f"early_stop_safe={self.early_stop_safe})"
        )

    def _split(self, prompts: PromptSet, seed: int) -> tuple[PromptSet, PromptSet]:
        n = len(prompts)
        n_train = round(self.n_train * n) if isinstance(self.n_train, float) and self.n_train < 1 else int(self.n_train)
        n_eval = n - n_train if self.n_eval is None else min(self.n_eval, n - n_train)
        return prompts.split(train=n_train, eval=n_eval, seed=seed)

    def train_pair(self, seed: int = 0) -> tuple[PromptSet, PromptSet]:
        """``(bad_train, good_train)`` for estimating directions."""
        return self._split(self.bad, seed)[0], self._split(self.good, seed)[0]

    def eval_pair(self, seed: int = 0) -> tuple[PromptSet, PromptSet]:
        """``(bad_eval, good_eval)``: the behaviour is measured on ``bad_eval``, KL on ``good_eval``.

        With ``neutral`` both are its eval part (the questions of the bad / good eval parts, asked plainly): the same
        positions as the bad / good cut, because ``PromptSet.split`` shuffles by position with ``seed``."""
        if self.neutral is not None:
            neutral = self._split(self.neutral, seed)[1]
            return neutral, neutral
        return self._split(self.bad, seed)[1], self._split(self.good, seed)[1]

    def score(self, texts: Sequence[str]) -> list[float]:
        return [float(s) for s in self.scorer(list(texts))]

    def is_present(self, texts: Sequence[str]) -> list[bool]:
        return [bool(d) for d in self.decider(list(texts))]

    def decided(self, texts: Sequence[str]) -> list[bool]:
        """Rows whose decision is final (positive, and no continuation can undo it); all False without a stopper."""
        texts = list(texts)
        return [bool(d) for d in self.stopper(texts)] if self.stopper is not None else [False] * len(texts)

    def measure(self, texts: Sequence[str]) -> float:
        """The objective over a set of responses: a count of decisions or a mean score (see ``count``)."""
        texts = list(texts)
        if self.count == "present":
            return float(sum(self.is_present(texts)))
        scores = self.score(texts)
        return sum(scores) / max(len(scores), 1)

    def with_sets(self, bad: PromptSet | None = None, good: PromptSet | None = None, **changes: Any) -> Behaviour:
        """A copy with other prompt sets or settings (e.g. ``max_new_tokens``, ``n_train``, ``decide_after``)."""
        return replace(
            self, bad=bad if bad is not None else self.bad, good=good if good is not None else self.good, **changes
        )


# ----------------------------------------------------------------------------------------------------------
# Pre-search check: do the training pairs differ on the behaviour's own measure?
# ----------------------------------------------------------------------------------------------------------

CHECK_PROMPTS = 8  # prompts per side of the pre-search check
CHECK_NEW_TOKENS = 64  # its generation length (at most the behaviour's max_new_tokens)
CHECK_ALPHA = 0.05  # one-sided significance level of its test


def fisher_greater(k_bad: int, n_bad: int, k_good: int, n_good: int) -> float:
    """One-sided Fisher exact p-value that the bad side's rate ``k_bad / n_bad`` exceeds the good side's
    (``scipy.stats.fisher_exact``, alternative "greater", on the 2×2 table of present / absent per side)."""
    from scipy.stats import fisher_exact

    table = [[k_bad, n_bad - k_bad], [k_good, n_good - k_good]]
    return float(fisher_exact(table, alternative="greater").pvalue)


def welch_greater(bad: Sequence[float], good: Sequence[float]) -> float:
    """One-sided Welch t-test p-value that the bad side's mean exceeds the good side's (needs 2+ values a side;
    ``scipy.stats.ttest_ind(equal_var=False)``).

    When both sides have zero variance the test is degenerate (scipy gives NaN): p = 0 if the bad mean is higher,
    else 1."""
    if len(bad) < 2 or len(good) < 2:
        raise ValueError("welch_greater needs at least 2 values on each side")
    from scipy.stats import ttest_ind

    if len(set(bad)) == 1 and len(set(good)) == 1:
        return 0.0 if bad[0] > good[0] else 1.0
    return float(ttest_ind(list(bad), list(good), equal_var=False, alternative="greater").pvalue)


@dataclass(frozen=True)
class ContrastCheck:
    """Outcome of the pre-search check (``check_contrast``): the behaviour's own measure on a few *bad* (eliciting)
    vs *good* training prompts, and whether the bad side is higher by a one-sided test at level ``alpha``.

    Rule: ``count == "present"``: Fisher's exact test on the two counts of responses where the behaviour is present;
    ``count == "mean"``: Welch's t-test on the per-response scores. ``passed`` = p-value < ``alpha``. A preset whose
    bad side does not show more of the behaviour than its good side gives the search nothing to remove.
    """

    behaviour: str
    count: str
    n_bad: int
    n_good: int
    measure_bad: float  # behaviour.measure on the bad side (a count, or a mean score)
    measure_good: float
    p_value: float
    alpha: float
    passed: bool
    test: str
    max_new_tokens: int | None = None
    unit: str = ""  # the behaviour's unit ("responses with ≥2 slop phrases", "mean words")

    def describe(self, side: str) -> str:
        value, n = (self.measure_bad, self.n_bad) if side == "bad" else (self.measure_good, self.n_good)
        return f"{value:.0f}/{n}" if self.count == "present" else f"{value:.1f}"

    @property
    def summary(self) -> str:
        what = self.unit or ("responses with it" if self.count == "present" else "mean score")
        return (
            f"{self.behaviour} on {self.n_bad} + {self.n_good} training prompts ({what}): bad (eliciting) "
            f"{self.describe('bad')} vs good {self.describe('good')}; {self.test} one-sided p = {self.p_value:.3g} "
            f"(needs < {self.alpha})"
        )

    @property
    def message(self) -> str:
        """The one line that stops a search when the check fails."""
        return (
            f"behaviour check failed for preset {self.behaviour!r}: {self.summary}, so this model does not show the "
            "behaviour more when asked for it and the search would have nothing to remove; use a model that shows "
            "it, or other prompts (a Behaviour with your own bad/good sets), or pass --skip-behaviour-check to "
            "search anyway"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "behaviour": self.behaviour,
            "rule": f"{self.test} one-sided p < {self.alpha} (bad side above good side)",
            "n_bad": self.n_bad,
            "n_good": self.n_good,
            "measure_bad": self.measure_bad,
            "measure_good": self.measure_good,
            "unit": self.unit,
            "p_value": self.p_value,
            "passed": self.passed,
            "max_new_tokens": self.max_new_tokens,
        }


def check_contrast(
    behaviour: Behaviour,
    bad_texts: Sequence[str],
    good_texts: Sequence[str],
    *,
    alpha: float = CHECK_ALPHA,
    max_new_tokens: int | None = None,
) -> ContrastCheck:
    """The pre-search check on responses already generated to bad and good training prompts (see ``ContrastCheck``)."""
    bad_texts, good_texts = list(bad_texts), list(good_texts)
    if behaviour.count == "present":
        k_bad, k_good = sum(behaviour.is_present(bad_texts)), sum(behaviour.is_present(good_texts))
        p_value, test = fisher_greater(k_bad, len(bad_texts), k_good, len(good_texts)), "Fisher exact"
    else:
        p_value, test = welch_greater(behaviour.score(bad_texts), behaviour.score(good_texts)), "Welch t"
    return ContrastCheck(
        behaviour=behaviour.name,
        count=behaviour.count,
        n_bad=len(bad_texts),
        n_good=len(good_texts),
        measure_bad=behaviour.measure(bad_texts),
        measure_good=behaviour.measure(good_texts),
        p_value=p_value,
        alpha=alpha,
        passed=p_value < alpha,
        test=test,
        max_new_tokens=max_new_tokens,
        unit=behaviour.unit,
    )


def measure_contrast(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    behaviour: Behaviour,
    *,
    seed: int = 0,
    n: int = CHECK_PROMPTS,
    max_new_tokens: int | None = None,
    batch_size: int | None = None,
    alpha: float = CHECK_ALPHA,
) -> ContrastCheck:
    """Generate greedily for the first ``n`` bad and good *training* prompts (``train_pair(seed)``; they only feed
    the directions, so no evaluation prompt is used) and run ``check_contrast`` on the responses.

    ``max_new_tokens``: default ``min(behaviour.max_new_tokens, CHECK_NEW_TOKENS)``."""
    tokens = max_new_tokens or min(behaviour.max_new_tokens, CHECK_NEW_TOKENS)
    bad_train, good_train = behaviour.train_pair(seed)
    bad, good = bad_train[: min(n, len(bad_train))], good_train[: min(n, len(good_train))]
    texts = {}
    for side, prompts in (("bad", bad), ("good", good)):
        texts[side] = generate(
            model, tokenizer, prompts, max_new_tokens=tokens, batch_size=batch_size or len(prompts), progress=False
        )
    return check_contrast(behaviour, texts["bad"], texts["good"], alpha=alpha, max_new_tokens=tokens)


# ----------------------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------------------

SLOP_SYSTEM = (
    "You are an eloquent, enthusiastic writer. Answer in rich, flowing, evocative prose: use vivid metaphors, "
    "grand words like 'tapestry', 'delve', 'testament' and 'realm', and sweeping statements about how "
    "fascinating and profound the topic is."
)
PLAIN_SYSTEM = (
    "You are a plain-spoken expert. Answer in simple, direct, concrete sentences. No metaphors, no flourishes, "
    "no filler phrases; just the facts."
)
JOKEY_SYSTEM = (
    "You are a stand-up comedian who answers every question with jokes, puns, playful exaggeration and emoji. "
    "Be silly and make the reader laugh while answering."
)
SERIOUS_SYSTEM = (
    "You are a serious, formal reference librarian. Answer accurately and soberly. Never joke, never use emoji, "
    "never use exclamation marks."
)
VERBOSE_SYSTEM = (
    "You are a thorough teacher. Answer every question at great length: give background, several detailed "
    "examples, caveats, related facts and a summary. Never be brief."
)
TERSE_SYSTEM = "You are a terse assistant. Answer every question in one short sentence of at most fifteen words."


def questions(name: str = "questions.txt") -> PromptSet:
    return load_prompts(read_list(name), name="questions")


def refusal_behaviour(detector: Detector | None = None) -> Behaviour:
    """Harmful vs harmless prompts; refusals detected by ``detector`` (default ``MarkerDetector()``, the
    evaluator's detector). ``behaviour.detector`` holds it, for the trial evaluator.

    ``run_settings``: ``hereticlab run`` replaces the prompt sets (``--harmful`` / ``--harmless`` with
    ``--system-prompt``), ``n_train`` (``--train-prompts``) and the lengths (``--decide-after``,
    ``RunConfig.max_new_tokens`` / ``final_new_tokens``) with its own settings (``search.runner.run_behaviour``)."""
    detector = detector or MarkerDetector()

    def decide(texts: Sequence[str]) -> list[bool]:
        detect = getattr(detector, "detect", None)  # the Detector protocol; a plain callable judge also works
        if detect is not None:
            return list(detect(list(texts)).decisions)
        return list(cast(Callable[[Sequence[str]], list[bool]], detector)(texts))

    can_decide = getattr(detector, "decided", None) is not None
    stopper = (lambda texts: decided_many(detector, texts)) if can_decide else None
    return Behaviour(
        detector=detector,
        name="refusal",
        bad=load_prompts("harmful"),
        good=load_prompts("harmless"),
        scorer=lambda texts: [float(d) for d in decide(texts)],
        decider=decide,
        stopper=stopper,
        count="present",
        early_stop_safe=stopper is not None and bool(getattr(detector, "early_stop_safe", False)),
        max_new_tokens=48,
        n_train=200,
        unit="refusals",
        noun="refusals",
        run_settings=True,
        description="Refusing harmful requests (harmful vs harmless prompts; marker detector).",
        meta={"detector": getattr(detector, "name", type(detector).__name__)},
    )


def _with_suffix(prompts: PromptSet, suffix: str) -> PromptSet:
    return prompts if not suffix else load_prompts([f"{q} {suffix}" for q in prompts], name=prompts.name)


def _style_behaviour(
    name: str,
    bad_system: str,
    good_system: str,
    scorer: PhraseScorer | LengthScorer,
    *,
    count: str,
    early_stop_safe: bool,
    max_new_tokens: int,
    unit: str,
    description: str,
    meta: dict,
    bad_suffix: str = "",
    good_suffix: str = "",
) -> Behaviour:
    """The same questions under a behaviour-eliciting and a discouraging system prompt (and optional request
    suffixes in the user turn: small models follow a request there more readily than a system prompt) for the
    training pairs; the plain questions (no system prompt, no request) for evaluation (``neutral``)."""
    base = questions()
    return Behaviour(
        name=name,
        bad=_with_suffix(base, bad_suffix).with_chat(system_prompt=bad_system),
        good=_with_suffix(base, good_suffix).with_chat(system_prompt=good_system),
        neutral=base,
        scorer=scorer.score,
        decider=scorer.present,
        stopper=scorer.decided,
        count=count,
        early_stop_safe=early_stop_safe,
        max_new_tokens=max_new_tokens,
        n_train=2 / 3,
        unit=unit,
        description=description,
        meta=meta,
    )


def slop_behaviour(*, min_hits: int = 2) -> Behaviour:
    """Florid "AI-style" prose vs plain prose on the same questions; score = slop phrases per 100 words."""
    phrases = read_list("slop_phrases.txt")
    return _style_behaviour(
        "slop",
        SLOP_SYSTEM,
        PLAIN_SYSTEM,
        PhraseScorer(phrases, min_hits=min_hits),
        count="present",
        early_stop_safe=True,
        max_new_tokens=64,
        unit=f"responses with ≥{min_hits} slop phrases",
        description="Florid 'AI-style' writing (slop phrase list) vs plain writing.",
        meta={"phrases": len(phrases), "min_hits": min_hits},
    )


JOKEY_REQUEST = "Answer with a funny joke or pun first."
SERIOUS_REQUEST = "Answer seriously and factually."


def humour_behaviour(*, min_hits: int = 1) -> Behaviour:
    """Jokey vs serious answers to the same questions; score = humour cues per 100 words.

    The joke is asked for in the user turn as well as the system prompt: Qwen2.5-Coder-0.5B ignores a comedian
    system prompt alone (0 of 32 answers had a humour cue), but answers "Why did the …? Because …" when asked.
    One cue is enough to count (a short joke has one frame).
    """
    cues = read_list("humour_cues.txt")
    return _style_behaviour(
        "humour",
        JOKEY_SYSTEM,
        SERIOUS_SYSTEM,
        PhraseScorer(cues, min_hits=min_hits),
        bad_suffix=JOKEY_REQUEST,
        good_suffix=SERIOUS_REQUEST,
        count="present",
        early_stop_safe=True,
        max_new_tokens=64,
        unit=f"responses with ≥{min_hits} humour cues",
        description="Jokey answers (humour cue list: joke frames, interjections, emoji) vs serious answers.",
        meta={"cues": len(cues), "min_hits": min_hits},
    )


def verbosity_behaviour(*, min_words: int = 80, max_new_tokens: int = 160) -> Behaviour:
    """Long vs short answers to the same questions; score = words, objective = mean words."""
    return _style_behaviour(
        "verbosity",
        VERBOSE_SYSTEM,
        TERSE_SYSTEM,
        LengthScorer(min_words),
        count="mean",
        early_stop_safe=False,
        max_new_tokens=max_new_tokens,
        unit="mean words",
        description="Long, padded answers vs one-sentence answers; scored by length in words.",
        meta={"min_words": min_words},
    )


BEHAVIOURS: dict[str, Callable[[], Behaviour]] = {
    "refusal": refusal_behaviour,
    "slop": slop_behaviour,
    "humour": humour_behaviour,
    "verbosity": verbosity_behaviour,
}
ALIASES = {"humor": "humour", "length": "verbosity", "refusals": "refusal"}


def register(behaviour: Behaviour | Callable[[], Behaviour], name: str | None = None) -> None:
    """Add a behaviour (or a factory) to ``BEHAVIOURS`` so that ``get_behaviour(name)`` finds it."""
    factory = behaviour if callable(behaviour) and not isinstance(behaviour, Behaviour) else (lambda b=behaviour: b)
    BEHAVIOURS[name or (behaviour.name if isinstance(behaviour, Behaviour) else behaviour.__name__)] = factory


def get_behaviour(name: str | Behaviour = "refusal", **options: object) -> Behaviour:
    """A behaviour by name (``BEHAVIOURS``; ``options`` go to the preset's factory), or a ``Behaviour`` as is."""
    if isinstance(name, Behaviour):
        return name
    key = ALIASES.get(name.lower(), name.lower())
    if key not in BEHAVIOURS:
        raise KeyError(f"unknown behaviour {name!r}; available: {', '.join(sorted(BEHAVIOURS))}")
    return BEHAVIOURS[key](**options)


__all__ = [
    "BEHAVIOURS",
    "Behaviour",
    "ContrastCheck",
    "check_contrast",
    "measure_contrast",
    "LengthScorer",
    "PhraseScorer",
    "get_behaviour",
    "humour_behaviour",
    "read_list",
    "refusal_behaviour",
    "register",
    "slop_behaviour",
    "verbosity_behaviour",
    "word_count",
]
