"""The model card of an exported model: ``model/README.md``, written from ``run.json`` (every number in it is a
value of the run record, so the card and the record cannot disagree)."""

from __future__ import annotations

import shlex
from typing import Any


def _count(value: Any, n: Any) -> str:
    return "n/a" if value is None else f"{value}/{n}"


def _interval(pair: Any) -> str:
    return "" if not pair or pair[0] != pair[0] else f" (95% CI {pair[0]:.1%}–{pair[1]:.1%})"


def reproduce_command(settings: dict[str, Any]) -> str:
    """The ``hereticlab run`` command line that repeats this run's search (options that differ from the defaults)."""
    from .runner import RunConfig

    defaults = RunConfig()
    flags = {
        "model": "--model",
        "harmful": "--harmful",
        "harmless": "--harmless",
        "trials": "--trials",
        "startup_trials": "--startup-trials",
        "seed": "--seed",
        "split_seed": "--split-seed",
        "train_prompts": "--train-prompts",
        "search_prompts": "--search-prompts",
        "system_prompt": "--system-prompt",
        "kl_max": "--kl-max",
        "max_nll_increase": "--max-nll-increase",
        "finalists": "--finalists",
        "out": "--out",
    }
    parts = ["hereticlab", "run"]
    for key, flag in flags.items():
        value = settings.get(key)
        if value is not None and value != getattr(defaults, key, None):
            parts += [flag, str(value)]
    for key, flag in (("methods", "--methods"), ("norms", "--norms"), ("objectives", "--objectives")):
        value = settings.get(key)
        if value is not None and tuple(value) != tuple(getattr(defaults, key)):
            parts += [flag, ",".join(value)]
    return shlex.join(parts)


def model_card(record: dict[str, Any]) -> str:
    """Markdown for ``model/README.md`` from a run record (``run.json``)."""
    settings, test = record["settings"], record.get("test", {})
    chosen = record["chosen_trial"]
    versions = ", ".join(f"{k} {v}" for k, v in record.get("versions", {}).items())
    lines = [
        f"# {record.get('base_model', settings['model']).split(' (')[0]}, directional ablation (hereticlab)",
        "",
        f"Base model: `{record.get('base_model', settings['model'])}`. Weights edited by directional ablation "
        f"(difference-of-means direction removed from the attention-output and MLP-down weights with a per-layer "
        f"kernel), chosen by an Optuna search of {record['n_trials']} trials (trial #{chosen['number']}).",
        "",
        "## Method and parameters",
        "",
        "| parameter | value |",
        "| --- | --- |",
        *[f"| `{k}` | {v:.4g} |" if isinstance(v, float) else f"| `{k}` | {v} |" for k, v in chosen["params"].items()],
        "",
        "## Held-out measurements (prompts the search never saw)",
        "",
    ]
    if test:
        n = test.get("n_prompts")
        lines += [
            "| measure | original | this model |",
            "| --- | --- | --- |",
            f"| refusals, markers ({test.get('max_new_tokens')} tokens) | {_count(test.get('refusals_before'), n)} | "
            f"{_count(test.get('refusals_after'), n)} |",
        ]
        if "refusals_semantic_before" in test:
            over_n = test.get("over_refusal_n")
            lines += [
                f"| refusals, semantic judge | {_count(test['refusals_semantic_before'], n)} | "
                f"{_count(test['refusals_semantic_after'], n)} |",
                f"| refusals, either judge | {_count(test['refusals_either_before'], n)} | "
                f"{_count(test['refusals_either_after'], n)}{_interval(test.get('refusals_either_after_ci'))} |",
                f"| over-refusal (harmless prompts with alarming words), either judge | "
                f"{_count(test['over_refusals_before'], over_n)} | {_count(test['over_refusals_after'], over_n)} |",
                f"| capability items answered right | {test['capability_correct_before']}/{test['capability_n']} | "
                f"retention {test['capability_retention']:.1%}{_interval(test.get('capability_retention_ci'))} |",
                f"| NLL of the original's answers to harmless prompts (nats/token) | {test['nll_before']:.3f} | "
                f"{test['nll_after']:.3f} |",
            ]
        lines += [f"| first-token KL on harmless prompts | 0 | {test.get('kl', float('nan')):.3f} |", ""]
    robustness = record.get("system_prompts") or []
    if robustness:
        lines += [
            "Under other system prompts (refusals by markers with the search's early decisions; KL on the harmless "
            "test prompts):",
            "",
            "| system prompt | refusals before → after | KL |",
            "| --- | --- | --- |",
            *[
                f"| {r['variant']} ({'none given' if r['system_prompt'] is None else repr(r['system_prompt'])}) | "
                f"{r['refusals_before']} → {r['refusals_after']} of {r['n_prompts']} | {r['kl']:.3f} |"
                for r in robustness
            ],
            "",
        ]
    lines += [
        "## Prompts",
        "",
        f"Harmful set `{settings['harmful']}` and harmless set `{settings['harmless']}` (hereticlab's bundled sets "
        f"unless a path is given), split with seed {settings['split_seed']}: {settings['train_prompts']} per class "
        f"for the direction, {settings['search_prompts']} per class to score trials, the rest held out for the "
        "table above. Over-refusal: `prompts/over_refusal.txt`; capability: `prompts/capability/items.tsv`.",
        "",
        "## Reproduce",
        "",
        "```",
        reproduce_command(settings),
        "hereticlab replay run.json   # re-creates these exact weights from the run record",
        "```",
        "",
        f"Versions: {versions}.",
        "",
        "Weights (SHA-256):",
        "",
        *[f"- `{name}`: `{digest}`" for name, digest in sorted(record.get("weights_sha256", {}).items())],
        "",
    ]
    return "\n".join(lines)
