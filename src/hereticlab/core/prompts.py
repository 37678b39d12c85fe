"""Prompt sets, reproducible splits and chat formatting."""

from __future__ import annotations

import importlib.util
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast, overload

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

PROMPTS_DIR = Path(__file__).resolve().parents[1] / "data" / "prompts"


def _bundled_prompt_dirs() -> list[Path]:
    """Where named sets live: the installed copy inside the package, then the repository's ``prompts/``."""
    repo = Path(__file__).resolve().parents[3] / "prompts"
    return [d for d in (PROMPTS_DIR, repo) if d.is_dir()]


class PromptError(ValueError):
    """A prompt set could not be loaded or split; the message says why."""


@dataclass(frozen=True)
class PromptSet:
    """An ordered list of user prompts with the chat settings that go with them.

    ``system_prompt``: the system message (``None`` keeps the chat template's default).
    ``response_prefix``: text forced at the start of the assistant turn (a prefill).
    """

    prompts: tuple[str, ...]
    name: str = "prompts"
    system_prompt: str | None = None
    response_prefix: str = ""
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompts", tuple(self.prompts))

    def __len__(self) -> int:
        return len(self.prompts)

    def __iter__(self) -> Iterator[str]:
        return iter(self.prompts)

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> PromptSet: ...

    def __getitem__(self, index: int | slice) -> str | PromptSet:
        if isinstance(index, slice):
            return replace(self, prompts=self.prompts[index])
        return self.prompts[index]

    def __repr__(self) -> str:
        return f"PromptSet({self.name!r}, {len(self)} prompts)"

    def shuffled(self, seed: int = 0) -> PromptSet:
        order = list(self.prompts)
        random.Random(seed).shuffle(order)
        return replace(self, prompts=tuple(order))

    def split(
        self, train: int | float = 200, *, eval: int | float | None = None, seed: int = 0
    ) -> tuple[PromptSet, PromptSet]:
        """Shuffle with ``seed`` and cut into disjoint ``(train, eval)`` sets.

        ``train`` / ``eval``: counts, or fractions of the set when below 1. ``eval=None`` takes the rest.
        """
        n = len(self)
        n_train = round(train * n) if isinstance(train, float) and train < 1 else int(train)
        n_eval = (
            n - n_train if eval is None else (round(eval * n) if isinstance(eval, float) and eval < 1 else int(eval))
        )
        if n_train < 1 or n_eval < 1 or n_train + n_eval > n:
            raise PromptError(
                f"cannot split {self.name} ({n} prompts) into train={n_train} and eval={n_eval}; ask for fewer prompts"
            )
        order = self.shuffled(seed).prompts
        return (
            replace(self, prompts=order[:n_train], name=f"{self.name}[train]"),
            replace(self, prompts=order[n_train : n_train + n_eval], name=f"{self.name}[eval]"),
        )

    def with_chat(self, *, system_prompt: str | None = None, response_prefix: str | None = None) -> PromptSet:
        return replace(
            self,
            system_prompt=self.system_prompt if system_prompt is None else system_prompt,
            response_prefix=self.response_prefix if response_prefix is None else response_prefix,
        )


def _read_lines(path: Path, name: str) -> tuple[str, ...]:
    if path.is_dir():
        raise PromptError(f"prompt file {path} is a folder; pass a text file with one prompt per line")
    if not path.is_file():
        raise PromptError(
            f"prompt file {path} does not exist; pass an existing file or a named set ({', '.join(available_sets())})"
        )
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PromptError(f"cannot read prompt file {path} ({exc.strerror or exc}); check its permissions") from None
    if b"\0" in data:
        raise PromptError(
            f"prompt file {path} is binary (it contains NUL bytes); pass a UTF-8 text file with one prompt per line"
        )
    bom = 3 if data.startswith(b"\xef\xbb\xbf") else 0  # a UTF-8 byte-order mark is not part of the first prompt
    try:
        text = data[bom:].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PromptError(
            f"prompt file {path} is not UTF-8 text (byte 0x{data[bom + exc.start]:02x} at offset {bom + exc.start}); "
            "convert it to UTF-8 (e.g. iconv -t utf-8)"
        ) from None
    lines = tuple(line.strip() for line in text.splitlines())
    lines = tuple(line for line in lines if line and not line.startswith("#"))
    if not lines:
        raise PromptError(f"prompt file {path} has no prompts; write one prompt per line")
    return lines


def available_sets() -> list[str]:
    names: set[str] = set()
    for folder in _bundled_prompt_dirs():
        names.update(p.stem for p in folder.glob("*.txt"))
    return sorted(names)


def load_prompts(source: str | Path | Sequence[str], *, name: str | None = None, **chat: Any) -> PromptSet:
    """Load a prompt set.

    ``source``: a named set shipped with hereticlab (``"harmful"``, ``"harmless"``, see ``available_sets()``),
    a path to a text file (one prompt per line, ``#`` comments), ``"package:relative/path.txt"`` for a file
    inside an installed package (e.g. ``"temaq_abliterated:data/harmful.txt"``), or a list of strings.
    Extra keyword arguments (``system_prompt``, ``response_prefix``) go to the ``PromptSet``.
    """
    if not isinstance(source, (str, Path)):
        prompts = tuple(str(p) for p in source)
        if not prompts:
            raise PromptError("the prompt list is empty; pass at least one prompt")
        return PromptSet(prompts, name=name or "prompts", **chat)
    text = str(source)
    if isinstance(source, str) and re.fullmatch(r"[A-Za-z_][\w.]*:[^\\]+", text) and not Path(text).exists():
        package, rel = text.split(":", 1)
        spec = importlib.util.find_spec(package.split(".")[0])
        if spec is None or not spec.submodule_search_locations:
            raise PromptError(f"package {package!r} is not installed; pip install it or pass a file path")
        path = Path(list(spec.submodule_search_locations)[0]) / rel
        return PromptSet(_read_lines(path, text), name=name or text, **chat)
    path = Path(text).expanduser()
    if path.suffix or path.exists() or "/" in text:
        return PromptSet(_read_lines(path, text), name=name or path.stem, **chat)
    for folder in _bundled_prompt_dirs():
        candidate = folder / f"{text}.txt"
        if candidate.is_file():
            return PromptSet(_read_lines(candidate, text), name=name or text, **chat)
    raise PromptError(
        f"no prompt set named {text!r}; named sets are: {', '.join(available_sets())}, or pass a file path"
    )


THINK_BLOCK = re.compile(r"<think>.*?(</think>|$)", re.DOTALL)


def format_chat(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str] | PromptSet,
    *,
    system_prompt: str | None = None,
    response_prefix: str | None = None,
    close_thinking: bool = False,
) -> list[str]:
    """Render prompts through the tokenizer's chat template, ready for generation.

    ``close_thinking``: append an empty ``<think></think>`` block so that reasoning models answer directly.
    Without a chat template the prompt is used as plain text.
    """
    if isinstance(prompts, PromptSet):
        system_prompt = prompts.system_prompt if system_prompt is None else system_prompt
        response_prefix = prompts.response_prefix if response_prefix is None else response_prefix
    response_prefix = response_prefix or ""
    texts = []
    for prompt in prompts:
        if getattr(tokenizer, "chat_template", None):
            # "" is an empty system message (a template that injects a default when none is given then has none)
            messages = ([{"role": "system", "content": system_prompt}] if system_prompt is not None else []) + [
                {"role": "user", "content": prompt}
            ]
            text = cast(str, tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        else:
            text = (system_prompt + "\n\n" if system_prompt else "") + prompt + "\n"
        if close_thinking and "<think>" not in text[-40:]:
            text += "<think>\n\n</think>\n\n"
        texts.append(text + response_prefix)
    return texts


GENERIC_SYSTEM_PROMPT = "You are a helpful assistant."


def system_prompt_variants(tokenizer: PreTrainedTokenizerBase, own: str | None = None) -> dict[str, str | None]:
    """The distinct ways an exported model is likely to be prompted, as ``{name: system_prompt}``.

    ``own``: the run's system prompt (``None``: the template's default). The candidates, in order: ``"own"``,
    ``"template default"`` (no system message: whatever the chat template puts there by itself), ``"empty"`` (an
    empty system message: the nearest to *no system prompt* a template that injects a default allows),
    ``"generic"`` (``GENERIC_SYSTEM_PROMPT``). A candidate that renders the same text as an earlier one is left out
    (so without a chat template, or when ``own`` is ``None``, fewer remain); so is one the template rejects (a
    template without a system role keeps only the variants without a system message).
    """
    candidates: list[tuple[str, str | None]] = [
        ("own", own),
        ("template default", None),
        ("empty", ""),
        ("generic", GENERIC_SYSTEM_PROMPT),
    ]
    variants: dict[str, str | None] = {}
    rendered: set[str] = set()
    for name, system_prompt in candidates:
        try:
            text = format_chat(tokenizer, ["Hello"], system_prompt=system_prompt)[0]
        except Exception:  # noqa: BLE001 - e.g. Gemma's template raises on a system role: that variant cannot occur
            continue
        if text not in rendered:
            rendered.add(text)
            variants[name] = system_prompt
    return variants


def spread_system_prompts(prompts: PromptSet, variants: dict[str, str | None]) -> list[PromptSet]:
    """Deal ``prompts`` round-robin across the system prompts of ``variants`` (``system_prompt_variants``): one
    ``PromptSet`` per variant (``meta["variant"]`` names it), in ``variants`` order; together they hold every prompt
    once. A measure averaged over them covers every way the model will be prompted."""
    if not variants:
        raise PromptError("no system prompt variants to spread the prompts across; pass at least one")
    names = list(variants)
    groups = []
    for k, name in enumerate(names):
        part = prompts.prompts[k :: len(names)]
        if part:
            groups.append(
                replace(
                    prompts,
                    prompts=part,
                    name=f"{prompts.name} [{name}]",
                    system_prompt=variants[name],
                    meta={**prompts.meta, "variant": name},
                )
            )
    return groups


def strip_thinking(text: str) -> str:
    """Remove ``<think>…</think>`` blocks (an unclosed block runs to the end) before judging a response."""
    return THINK_BLOCK.sub("", text).strip()
