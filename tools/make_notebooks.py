"""Writes notebooks 01 and 02 (the lead's) from the cell sources below; run once after editing them."""

import nbformat as nbf

HEADER = """import os
MODEL = os.environ.get("HERETICLAB_MODEL", "default")  # CI runs every notebook on "tiny:llama"
QUICK = MODEL.startswith("tiny:")                      # small prompt counts / few steps in CI
OUTPUT = os.environ.get("HERETICLAB_OUTPUT", "outputs")"""


def notebook(cells):
    nb = nbf.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbf.v4.new_markdown_cell(c[3:]) if c.startswith("md:") else nbf.v4.new_code_cell(c) for c in cells]
    return nb


quickstart = [
    "md:# 01 · Quickstart: does ablating one direction remove refusals, and at what cost?\n\n"
    "Load the embedded model, capture residuals of harmful and harmless prompts, take the difference of means per "
    "layer, scan which layer's direction works best, ablate it, and measure refusals and first-token KL before and "
    "after. Every step is one library call; leaving the `with` block restores the weights bit for bit.",
    HEADER,
    "import torch\nimport hereticlab as hl\n\nmodel, tok = hl.load_model(MODEL)\nL = hl.num_layers(model)\nprint(type(model).__name__, L, 'blocks')",
    "md:The project's own prompt sets, split reproducibly: 200 prompts per class train the directions, the other 100 "
    "are held out for evaluation.",
    'harmful, harmless = hl.load_prompts("harmful"), hl.load_prompts("harmless")\n'
    "train_h, eval_h = harmful.split(train=200)\ntrain_g, eval_g = harmless.split(train=200)\n"
    "n_train, n_eval = (16, 8) if QUICK else (128, 48)\n"
    "train_h, train_g, eval_h, eval_g = train_h[:n_train], train_g[:n_train], eval_h[:n_eval], eval_g[:n_eval]",
    "res_h = hl.capture_residuals(model, tok, train_h)   # [prompt, layer (L+1), d], last position\n"
    "res_g = hl.capture_residuals(model, tok, train_g)\n"
    "dirs = hl.mean_difference(res_h, res_g, project=True)\ndirs",
    "md:## Which layer's direction?\nAblate each layer's direction from every attention and MLP writer and count "
    "refusals on held-out harmful prompts (greedy decoding, stopped once decided) and first-token KL on held-out "
    "harmless prompts.",
    "from hereticlab.search.evaluator import TrialEvaluator, scan_layers, plot_layer_scan\n\n"
    "evaluator = TrialEvaluator(model, tok, eval_h, eval_g, decide_after=16)\nbaseline = evaluator.baseline()\n"
    "step = 1 if QUICK else 2\nscan = scan_layers(evaluator, dirs, indices=range(L // 3, L, step))\n"
    "plot_layer_scan(scan, baseline_refusals=baseline.refusals, n_prompts=len(eval_h));\nscan",
    "md:## Ablate by hand with a tent kernel around the best layer",
    'best = int(scan.loc[scan["kl"] <= 0.3].sort_values(["refusals", "kl"]).iloc[0]["index"]) if (scan["kl"] <= 0.3).any() else int(scan.iloc[0]["index"])\n'
    "kernel = hl.constant_kernel(L, 1.0)\nprint('direction from residual', best)\n\n"
    "base_logprobs = hl.first_token_logprobs(model, tok, eval_g)\n"
    "before = hl.refusal_rate(model, tok, eval_h, max_new_tokens=24)\n"
    'with hl.ablate(model, dirs.at(best), strength=kernel, components=("attn", "mlp")):\n'
    "    after = hl.refusal_rate(model, tok, eval_h, max_new_tokens=24)\n"
    "    kl = hl.kl_divergence(model, tok, eval_g, baseline=base_logprobs)\n"
    "print(f\"refusals {before.attrs['refusals']}/{len(before)} -> {after.attrs['refusals']}/{len(after)}, KL {kl:.3f}\")",
    'after.assign(before=before["response"]).head(8)',
    "md:Leaving the block restored every weight exactly:",
    "original = hl.load_model(MODEL)[0].state_dict() if QUICK else None\n"
    "if original is not None:\n    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())\n"
    "print(hl.kl_divergence(model, tok, eval_g, baseline=base_logprobs))  # 0.0: the model is unedited again",
]

search = [
    "md:# 02 · Automatic search: which ablation removes most refusals for the least damage?\n\n"
    "A small Optuna study over Heretic's parameter space (direction index, per-component peak strength, position, "
    "minimum and reach), scored on refusals and first-token KL. The study lives in a journal file in the run "
    "directory: re-running this cell resumes it.",
    HEADER,
    "import hereticlab as hl\nfrom hereticlab.search.runner import RunConfig, run_search\nfrom hereticlab.search import pareto, plot_pareto, trials_table\n\n"
    "model, tok = hl.load_model(MODEL)\n"
    'config = RunConfig(model=MODEL, out=f"{OUTPUT}/search", trials=4 if QUICK else 30, startup_trials=2 if QUICK else 10,\n'
    "                   train_prompts=16 if QUICK else 200, search_prompts=6 if QUICK else 32, kl_max=1e9 if QUICK else 0.05,\n"
    "                   judge_new_tokens=8 if QUICK else 128, over_refusal_new_tokens=8 if QUICK else 64,\n"
    "                   capability_new_tokens=8 if QUICK else 48, batch_size=8 if QUICK else None)\n"
    "result = run_search(config, model=model, tokenizer=tok)",
    "md:## The Pareto front",
    "plot_pareto(result.study, kl_max=config.kl_max, chosen=result.chosen.number);\npareto(result.study)",
    "md:## Pick a trial and compare its responses with the original model's",
    "from hereticlab.ui.trial_picker import TrialPicker\n\n"
    'directions = {m: hl.Directions.load(result.out / f"directions/{m}.safetensors") for m in config.methods}\n'
    'test_prompts = hl.load_prompts("harmful").split(train=200)[1][-(3 if QUICK else 6):]\n'
    "picker = TrialPicker(result.study, model, tok, directions, test_prompts, max_new_tokens=8 if QUICK else 48)\npicker",
    "picker.select(result.chosen.number)",
    "md:## The finalists, re-judged on held-out prompts\nThe best Pareto-front trials under the KL limit, measured "
    "again on the test prompts: longer answers judged by the refusal markers and the semantic detector, over-refusal "
    "on harmless prompts with alarming words, capability retention, KL under several system prompts.",
    'import json\nimport pandas as pd\n\nrecord = json.loads((result.out / "run.json").read_text())\n'
    'pd.DataFrame(record["finalists"]["table"])',
    "md:## What was exported\nThe chosen trial as a merged model (plain `transformers` folder, with a model card in "
    "`model/README.md`), the same edit as a PEFT LoRA adapter, and `run.json` with settings, versions, metrics and "
    "weight hashes. "
    "`hereticlab replay run.json` recreates the same weights.",
    '{k: record[k] for k in ("chosen_trial", "test", "system_prompts", "weights_sha256")}',
]

if __name__ == "__main__":
    nbf.write(notebook(quickstart), "notebooks/01_quickstart.ipynb")
    nbf.write(notebook(search), "notebooks/02_search.ipynb")
