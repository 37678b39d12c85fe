"""An ipywidgets trial picker: choose a search trial, see its responses next to the original model's."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import optuna
import pandas as pd
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..core.generation import generate
from ..directions.base import Directions
from ..interventions.edits import apply_edits
from ..search.study import edits_from_params, pareto, trial_params, trials_table


class TrialPicker:
    """A dropdown of trials (Pareto front first) and a table of responses: original vs the selected trial's edit.

    Original responses are generated once; each trial's responses are cached. ``select(n)`` does what choosing
    trial ``n`` in the dropdown does, so the widget can be driven from code and tests.
    """

    def __init__(
        self,
        study: optuna.Study,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        directions: Directions | Mapping[str, Directions],
        prompts: Sequence[str],
        *,
        max_new_tokens: int = 48,
        **chat_kwargs: Any,
    ) -> None:
        import ipywidgets as w

        self.study, self.model, self.tokenizer, self.directions = study, model, tokenizer, directions
        self.prompts, self.max_new_tokens, self.chat_kwargs = list(prompts), max_new_tokens, chat_kwargs
        self._cache: dict[int, list[str]] = {}
        self.selected: int | None = None
        self.original = generate(
            model, tokenizer, self.prompts, max_new_tokens=max_new_tokens, progress=False, **chat_kwargs
        )
        front = set(pareto(study)["trial"]) if len(trials_table(study)) else set()
        table = trials_table(study)
        options = []
        for _, row in table.sort_values(["refusals", "kl"], na_position="last").iterrows():
            mark = "★ " if row.trial in front else ""
            refusals = "pruned" if row.pruned else int(row.refusals)
            options.append((f"{mark}#{int(row.trial)}: refusals {refusals}, KL {row.kl:.3f}", int(row.trial)))
        self._numbers = {number for _, number in options}
        self.dropdown = w.Dropdown(options=options, description="trial", layout=w.Layout(width="420px"))
        self.output = w.HTML()
        self.dropdown.observe(self._on_choose, names="value")
        self.widget = w.VBox([self.dropdown, self.output])
        for widget, name in (
            (self.widget, "hl-trial-picker"),
            (self.dropdown, "hl-trial-dropdown"),
            (self.output, "hl-trial-responses"),
        ):
            widget.add_class(name)  # stable CSS hooks for browser tests and custom styling
        if options:
            self.select(options[0][1])

    def responses(self, number: int) -> list[str]:
        if number not in self._cache:
            trial = self.study.trials[number]
            edits = edits_from_params(self.model, self.directions, trial_params(trial))
            with apply_edits(self.model, edits):
                self._cache[number] = generate(
                    self.model,
                    self.tokenizer,
                    self.prompts,
                    max_new_tokens=self.max_new_tokens,
                    progress=False,
                    **self.chat_kwargs,
                )
        return self._cache[number]

    def table(self, number: int) -> pd.DataFrame:
        return pd.DataFrame(
            {"prompt": self.prompts, "original": self.original, f"trial #{number}": self.responses(number)}
        )

    def _on_choose(self, change) -> None:
        if change["new"] is not None and change["new"] != self.selected:
            self.select(change["new"])

    def select(self, number: int) -> pd.DataFrame:
        """Show trial ``number``'s responses; the dropdown follows, so it always names the trial displayed."""
        frame = self.table(number)
        self.output.value = frame.to_html(index=False, escape=True).replace(
            "<td>", '<td style="text-align:left;white-space:pre-wrap">'
        )
        self.selected = number
        if number in self._numbers:
            self.dropdown.value = number
        return frame

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)
