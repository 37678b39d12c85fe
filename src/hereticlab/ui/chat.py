"""Side-by-side chat comparison: one prompt, one column per model variant, streamed token by token.

A *variant* is a factory of context managers — anything used as ``with factory(**params): ...``: ``None``
(the original model), an edit (``lambda: hl.ablate(model, r)``: an ``EditHandle`` reverts on exit), or
steering (``lambda alpha: hl.activation_addition(model, v, layer=12, alpha=alpha)``,
``lambda beta: conceptor_steering(model, C, layer=12, beta=beta)``). A column may offer several variants
(a dropdown). Columns run one after another (edits change the shared weights, so they cannot interleave);
each streams into its own HTML widget. All logic is headless: ``ChatComparison.run(prompt)`` returns the texts,
and ``.widget`` is the ipywidgets 8 UI (JupyterLab and classic Notebook).
"""

from __future__ import annotations

import html
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..core.capture import encode, model_device
from ..core.generation import eos_token_ids, iter_greedy
from ..core.prompts import format_chat

if TYPE_CHECKING:  # ipywidgets is imported when the UI is built
    import ipywidgets


@dataclass
class Variant:
    """``factory(**params)`` → a context manager active while this column generates (``None``: unchanged).

    ``params``: slider specs ``{name: (min, max, step, value)}``, passed to ``factory`` by keyword.
    """

    name: str
    factory: Callable[..., AbstractContextManager[Any]] | None = None
    params: dict[str, tuple[float, float, float, float]] = field(default_factory=dict)

    def context(self, **values: float) -> AbstractContextManager[Any]:
        if self.factory is None:
            return nullcontext()
        merged = {k: spec[3] for k, spec in self.params.items()}
        merged.update({k: v for k, v in values.items() if k in self.params})
        return self.factory(**merged)


@torch.no_grad()
def stream_generate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    *,
    max_new_tokens: int = 64,
    system_prompt: str | None = None,
    chat: bool = True,
) -> Iterator[str]:
    """Greedy decoding of one prompt (``core.generation.iter_greedy``), yielding the decoded response so far after
    each token."""
    text = format_chat(tokenizer, [prompt], system_prompt=system_prompt)[0] if chat else prompt
    batch = encode(tokenizer, [text], model_device(model))
    tokens: list[int] = []
    for step in iter_greedy(model, batch, max_new_tokens, eos_token_ids(model, tokenizer)):
        tokens.append(step[0])
        yield cast(str, tokenizer.decode(tokens, skip_special_tokens=True))  # one row: a str


class ChatComparison:
    """Compare responses of several variants of one model to the same prompt.

    ``columns``: ``{title: None | Variant | [Variant, …]}`` (a list becomes a dropdown). ``param_values``:
    current slider values per column (``{title: {param: value}}``), editable headlessly.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        columns: Mapping[str, Variant | Sequence[Variant] | None],
        *,
        max_new_tokens: int = 64,
        system_prompt: str | None = None,
        prompt: str = "",
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.options: dict[str, list[Variant]] = {}
        for title, spec in columns.items():
            if spec is None:
                spec = [Variant("original")]
            elif isinstance(spec, Variant):
                spec = [spec]
            self.options[title] = list(spec)
        self.selected = {title: 0 for title in self.options}
        self.param_values = {
            title: {k: s[3] for k, s in opts[0].params.items()} for title, opts in self.options.items()
        }
        self.max_new_tokens, self.system_prompt, self.prompt = max_new_tokens, system_prompt, prompt
        self.responses: dict[str, str] = {title: "" for title in self.options}
        self._widget = None
        self._outputs: dict = {}

    # ---- headless logic ----------------------------------------------------------------------------------

    def variant(self, title: str) -> Variant:
        return self.options[title][self.selected[title]]

    def select(self, title: str, name: str) -> None:
        """Pick the variant called ``name`` in column ``title`` (resets its parameters to their defaults)."""
        names = [v.name for v in self.options[title]]
        self.selected[title] = names.index(name)
        self.param_values[title] = {k: s[3] for k, s in self.variant(title).params.items()}

    def stream(self, title: str, prompt: str | None = None) -> Iterator[str]:
        """Partial responses of one column while it generates (its intervention active only inside)."""
        with self.variant(title).context(**self.param_values[title]):
            yield from stream_generate(
                self.model,
                self.tokenizer,
                self.prompt if prompt is None else prompt,
                max_new_tokens=self.max_new_tokens,
                system_prompt=self.system_prompt,
            )

    def run(self, prompt: str | None = None, on_token: Callable[[str, str], None] | None = None) -> dict[str, str]:
        """Generate every column in turn; ``on_token(title, text_so_far)`` after each token.

        Returns ``{title: text}``."""
        if prompt is not None:
            self.prompt = prompt
        for title in self.options:
            self.responses[title] = ""
            if on_token:
                on_token(title, "")
            for partial in self.stream(title):
                self.responses[title] = partial
                if on_token:
                    on_token(title, partial)
        return dict(self.responses)

    # ---- widget --------------------------------------------------------------------------------------------

    @staticmethod
    def _html(text: str, busy: bool = False) -> str:
        body = html.escape(text) + (" ▌" if busy else "")
        return (
            f"<div style='white-space:pre-wrap;font-family:monospace;font-size:12px;min-height:6em;"
            f"border:1px solid #ccc;padding:4px'>{body}</div>"
        )

    def _sliders(self, title: str):
        import ipywidgets as w

        sliders = []
        for name, (lo, hi, step, value) in self.variant(title).params.items():
            slider = w.FloatSlider(
                value=self.param_values[title].get(name, value),
                min=lo,
                max=hi,
                step=step,
                description=name,
                continuous_update=False,
                layout=w.Layout(width="95%"),
            )

            def changed(change, title=title, name=name):
                self.param_values[title][name] = change["new"]

            slider.observe(changed, names="value")
            sliders.append(slider)
        return sliders

    def build(self) -> ipywidgets.VBox:
        """The ipywidgets UI: prompt box, max-tokens slider, Generate button, one column per variant."""
        import ipywidgets as w

        self.prompt_box = w.Textarea(
            value=self.prompt, placeholder="Prompt", layout=w.Layout(width="100%", height="4em")
        )
        self.tokens_slider = w.IntSlider(value=self.max_new_tokens, min=1, max=512, description="max tokens")
        self.button = w.Button(description="Generate", button_style="primary")
        self.status = w.HTML("")
        columns = []
        self._outputs, self._slider_boxes, self.dropdowns = {}, {}, {}
        for title in self.options:
            header = [w.HTML(f"<b>{html.escape(title)}</b>")]
            if len(self.options[title]) > 1:
                dropdown = w.Dropdown(options=[v.name for v in self.options[title]], value=self.variant(title).name)

                def picked(change, title=title):
                    self.select(title, change["new"])
                    self._slider_boxes[title].children = tuple(self._sliders(title))

                dropdown.observe(picked, names="value")
                self.dropdowns[title] = dropdown
                header.append(dropdown)
            self._slider_boxes[title] = w.VBox(self._sliders(title))
            self._outputs[title] = w.HTML(self._html(self.responses[title]))
            columns.append(
                w.VBox(
                    header + [self._slider_boxes[title], self._outputs[title]],
                    layout=w.Layout(flex="1 1 0", min_width="0", margin="0 4px"),
                )
            )
        self.button.on_click(lambda _: self._generate())
        self._widget = w.VBox(
            [self.prompt_box, w.HBox([self.tokens_slider, self.button, self.status]), w.HBox(columns)]
        )
        return self._widget

    def _generate(self):
        self.max_new_tokens = int(self.tokens_slider.value)
        self.button.disabled = True
        self.status.value = "generating…"

        def on_token(title, text):
            self._outputs[title].value = self._html(text, busy=True)

        try:
            self.run(self.prompt_box.value, on_token)
        finally:
            for title, text in self.responses.items():
                self._outputs[title].value = self._html(text)
            self.button.disabled = False
            self.status.value = ""

    @property
    def widget(self) -> ipywidgets.VBox:
        return self._widget if self._widget is not None else self.build()

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)


def compare_chat(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    *,
    edit: Callable[[], AbstractContextManager[Any]] | None = None,
    steer: Mapping[str, Variant] | Sequence[Variant] | None = None,
    **kwargs: Any,
) -> ChatComparison:
    """The usual three columns: ``original``, ``edited`` (``edit()``: e.g. ``lambda: hl.ablate(model, r)``)
    and ``steered`` (a dropdown of ``steer`` variants with their sliders)."""
    columns: dict[str, Variant | list[Variant] | None] = {"original": None}
    if edit is not None:
        columns["edited"] = Variant("edited", lambda: edit())
    if steer:
        columns["steered"] = list(steer.values()) if isinstance(steer, Mapping) else list(steer)
    return ChatComparison(model, tokenizer, columns, **kwargs)
