"""Held-out refusals and KL of exported models, measured by one evaluator that belongs to neither search tool.

Each model folder is loaded with plain ``transformers`` (``AutoModelForCausalLM``, fp32 on CPU) and judged on the
held-out *test* prompts of hereticlab's main job (``prompt_splits(RunConfig())``: neither tool trains or searches on
them when both get the same train and search parts): ``--max-new-tokens`` greedy tokens from ``model.generate`` for
every harmful test prompt, judged by two judges that only read the text (hereticlab's refusal markers, and its
semantic detector, logistic, calibrated on the labelled set's calibration half), and the first-token
``KL(base ‖ edited)`` on every harmless test prompt against the base model. Chat formatting is the tokenizer's own
template with the run's system prompt (the template's default when the run has none). Refusal counts come with exact
binomial 95% intervals.

    python bench/held_out.py --model edited=/path/to/folder [--model other=/path] [--base default] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from hereticlab.core.models import resolve_model_source
from hereticlab.measure.labelled import calibrated_semantic_detector
from hereticlab.measure.metrics import MarkerDetector, kl_from_logprobs
from hereticlab.measure.report import proportion_interval
from hereticlab.search.runner import RunConfig, prompt_splits


def chat_texts(tok: PreTrainedTokenizerBase, prompts: list[str], system_prompt: str | None) -> list[str]:
    """The tokenizer's chat template around each prompt, ready for the assistant's turn."""
    texts = []
    for prompt in prompts:
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": prompt})
        texts.append(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    return texts


@torch.no_grad()
def responses(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, texts: list[str], *, new_tokens: int, batch_size: int
) -> list[str]:
    """Greedy continuations from ``model.generate`` (left-padded batches), special tokens removed."""
    out = []
    for start in range(0, len(texts), batch_size):
        batch = tok(texts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        ids = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        out += tok.batch_decode(ids[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return out


@torch.no_grad()
def first_token_logprobs(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, texts: list[str], *, batch_size: int
) -> torch.Tensor:
    """Log-probabilities of the first response token, ``[prompt, vocab]``."""
    rows = []
    for start in range(0, len(texts), batch_size):
        batch = tok(texts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        rows.append(torch.log_softmax(model(**batch).logits[:, -1].float(), dim=-1))
    return torch.cat(rows)


def load(folder: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, tok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, help="name=folder of an exported model")
    parser.add_argument("--base", default="default", help="the unedited model (folder or 'default')")
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    named = dict(item.split("=", 1) for item in args.model)
    missing = [f"{name}={folder}" for name, folder in named.items() if not (Path(folder) / "config.json").is_file()]
    if missing:
        sys.exit(f"held_out.py: no model folder (config.json) at {', '.join(missing)}; pass exported model folders")

    splits = prompt_splits(RunConfig())
    bad, good = list(splits["bad_test"]), list(splits["good_test"])
    system = splits["bad_test"].system_prompt
    # the semantic judge as calibrated in notes/issue-9.md (logistic on the labelled set's calibration half)
    markers = MarkerDetector()
    semantic = calibrated_semantic_detector()
    print(
        f"held-out test prompts: {len(bad)} harmful, {len(good)} harmless; {args.max_new_tokens} greedy tokens; "
        f"system prompt: {system or 'the template default'}; torch threads {torch.get_num_threads()}"
    )

    base_model, base_tok = load(resolve_model_source(args.base))
    base_lp = first_token_logprobs(base_model, base_tok, chat_texts(base_tok, good, system), batch_size=args.batch_size)
    results = {}
    for name, folder in [("unedited", resolve_model_source(args.base)), *named.items()]:
        t0 = time.perf_counter()
        model, tok = (base_model, base_tok) if name == "unedited" else load(folder)
        texts = responses(
            model, tok, chat_texts(tok, bad, system), new_tokens=args.max_new_tokens, batch_size=args.batch_size
        )
        lp = first_token_logprobs(model, tok, chat_texts(tok, good, system), batch_size=args.batch_size)
        kl = kl_from_logprobs(base_lp, lp)
        by_markers = [bool(d) for d in markers.detect(texts).decisions]
        by_semantic = [bool(d) for d in semantic.detect(texts).decisions]
        results[name] = {
            "folder": folder,
            "refusals_markers": sum(by_markers),
            "refusals_semantic": sum(by_semantic),
            "judges_disagree": sum(a != b for a, b in zip(by_markers, by_semantic)),
            "n_harmful": len(bad),
            "kl_mean": float(kl.mean()),
            "kl_median": float(kl.median()),
            "seconds": time.perf_counter() - t0,
            "examples": texts[:3],
        }
        if model is not base_model:
            del model

    print(
        f"\n{'model':>10} {'refusals (markers)':>26} {'refusals (semantic)':>26} {'judges differ':>13} "
        f"{'KL mean':>8} {'KL median':>9}"
    )
    for name, r in results.items():
        cells = []
        for key in ("refusals_markers", "refusals_semantic"):
            low, high = proportion_interval(r[key], r["n_harmful"])
            cells.append(f"{r[key]:>3}/{r['n_harmful']} [{low:.0%}, {high:.0%}]")
        print(
            f"{name:>10} {cells[0]:>26} {cells[1]:>26} {r['judges_disagree']:>13} {r['kl_mean']:>8.4f} "
            f"{r['kl_median']:>9.4f}"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
