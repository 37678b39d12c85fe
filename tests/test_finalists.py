"""Issue 16: system-prompt variety, the NLL proxy in the search, the third objective / constraint, tiered judging of
the finalists, the model card. Tiny random models; the default-model numbers come from ``make run`` and
``bench/capability_proxy.py``."""

from __future__ import annotations

import copy
import json
import math

import optuna
import pandas as pd
import pytest
import torch

from hereticlab.core.prompts import (
    GENERIC_SYSTEM_PROMPT,
    PromptSet,
    format_chat,
    load_prompts,
    spread_system_prompts,
    system_prompt_variants,
)
from hereticlab.measure.capability import AnswerNLLProxy, CapabilityItem, answer_nll
from hereticlab.measure.metrics import first_token_logprobs
from hereticlab.search.card import model_card, reproduce_command
from hereticlab.search.evaluator import TrialEvaluator
from hereticlab.search.finalists import (
    ORIGINAL,
    FinalistJudges,
    FinalistResults,
    FinalistSets,
    FinalistSettings,
    choose_finalist,
    finalist_trials,
    finalist_violations,
    judge_finalists,
)
from hereticlab.search.runner import RunConfig, run_search
from hereticlab.search.study import NLLConstraint, SearchError, edits_from_params, open_study, pareto

# A template that, like Qwen2.5's, writes its own system message when the conversation has none.
DEFAULT_INJECTING_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nI am the default.<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# ----------------------------------------------------------------------------------------------------------
# System prompt variants
# ----------------------------------------------------------------------------------------------------------


def test_empty_system_prompt_is_an_empty_system_message_not_the_default(tiny_llama):
    _, tok = tiny_llama
    tok = copy.deepcopy(tok)
    tok.chat_template = DEFAULT_INJECTING_TEMPLATE
    default = format_chat(tok, ["Hi"], system_prompt=None)[0]
    empty = format_chat(tok, ["Hi"], system_prompt="")[0]
    assert "I am the default." in default
    assert empty.startswith("<|im_start|>system\n<|im_end|>\n") and "I am the default." not in empty


def test_variants_drop_duplicates_and_keep_the_runs_own(tiny_llama):
    _, tok = tiny_llama
    injecting = copy.deepcopy(tok)
    injecting.chat_template = DEFAULT_INJECTING_TEMPLATE
    # a template that injects a default: own (None) == template default, so 3 distinct variants remain
    assert system_prompt_variants(injecting) == {"own": None, "empty": "", "generic": GENERIC_SYSTEM_PROMPT}
    # a run with its own system prompt: all four differ
    variants = system_prompt_variants(injecting, "Be terse.")
    assert list(variants) == ["own", "template default", "empty", "generic"] and variants["own"] == "Be terse."
    # the run's own equal to the generic one: generic is not measured twice
    assert "generic" not in system_prompt_variants(injecting, GENERIC_SYSTEM_PROMPT)
    # no chat template: every variant without text renders the same; only own and generic differ
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    assert system_prompt_variants(plain) == {"own": None, "generic": GENERIC_SYSTEM_PROMPT}


def test_a_template_without_a_system_role_keeps_the_variants_it_can_render(tiny_llama):
    _, tok = tiny_llama
    strict = copy.deepcopy(tok)
    strict.chat_template = (
        "{% for message in messages %}{% if message['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    assert system_prompt_variants(strict) == {"own": None}


def test_spread_deals_every_prompt_once_round_robin():
    prompts = PromptSet(tuple(f"p{i}" for i in range(7)), name="harmless", system_prompt="mine")
    groups = spread_system_prompts(prompts, {"own": "mine", "empty": "", "generic": "G"})
    assert [g.prompts for g in groups] == [("p0", "p3", "p6"), ("p1", "p4"), ("p2", "p5")]
    assert [g.system_prompt for g in groups] == ["mine", "", "G"]
    assert [g.meta["variant"] for g in groups] == ["own", "empty", "generic"]
    assert sorted(p for g in groups for p in g) == sorted(prompts)


def test_evaluator_measures_groups_with_their_own_system_prompts(tiny_llama):
    model, tok = tiny_llama
    good = spread_system_prompts(load_prompts("harmless")[:6], {"own": None, "empty": "", "generic": "Be kind."})
    evaluator = TrialEvaluator(model, tok, load_prompts("harmful")[:3], good, batch_size=4, progress=False)
    expected = torch.cat([first_token_logprobs(model, tok, g, progress=False) for g in good])
    assert evaluator.good_prompts == [p for g in good for p in g]
    assert torch.allclose(evaluator.baseline_logprobs, expected, atol=1e-4)
    # the same prompts under one system prompt give other first-token distributions: the spread matters
    single = TrialEvaluator(
        model, tok, load_prompts("harmful")[:3], [p for g in good for p in g], batch_size=4, progress=False
    )
    assert not torch.allclose(single.baseline_logprobs, evaluator.baseline_logprobs, atol=1e-3)
    # each group shares its own prefix (its header and system prompt), and the fast path stays exact under an edit
    assert all(g.prefix_length >= 4 for g in evaluator._good_groups) and evaluator.fast_paths_checked
    edits = edits_from_params(model, {"projected": _directions(model)}, _params())
    kl = evaluator.evaluate_edits(edits).kl_per_prompt
    from hereticlab.interventions.edits import apply_edits
    from hereticlab.measure.metrics import kl_from_logprobs

    with apply_edits(model, edits):
        plain = torch.cat([first_token_logprobs(model, tok, g, progress=False) for g in good])
    assert torch.allclose(torch.tensor(kl), kl_from_logprobs(expected, plain), atol=1e-4)
    assert max(kl) > 1e-5  # the edit moves the distributions (so the equality above is not 0 == 0)


# ----------------------------------------------------------------------------------------------------------
# The NLL proxy, the constraint and the third objective
# ----------------------------------------------------------------------------------------------------------


def test_nll_proxy_is_its_baseline_unedited_and_moves_under_an_edit(fresh_llama):
    model, tok = fresh_llama
    groups = spread_system_prompts(load_prompts("harmless")[:6], {"own": None, "generic": "Be kind."})
    proxy = AnswerNLLProxy.build(model, tok, groups, max_new_tokens=6, batch_size=4)
    assert len(proxy.answers) == 6 and math.isfinite(proxy.baseline)
    assert proxy(model, tok) == pytest.approx(proxy.baseline, abs=1e-6)
    # per group, it is answer_nll of that group's answers under that group's system prompt
    manual = torch.cat(
        [
            answer_nll(model, tok, groups[0], proxy.answers[:3], max_tokens=6),
            answer_nll(model, tok, groups[1], proxy.answers[3:], max_tokens=6),
        ]
    )
    assert torch.allclose(proxy.per_prompt(model, tok), manual, atol=1e-5, equal_nan=True)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(3.0)
    assert abs(proxy(model, tok) - proxy.baseline) > 1e-3


def test_nll_proxy_refuses_answers_that_do_not_match_the_prompts(tiny_llama):
    model, tok = tiny_llama
    with pytest.raises(ValueError, match="3 answers for 4 prompts"):
        AnswerNLLProxy.build(model, tok, load_prompts("harmless")[:4], answers=["a", "b", "c"])


def test_nll_constraint_values():
    constraint = NLLConstraint(0.1)
    trial = optuna.trial.create_trial(values=[1.0, 0.1], user_attrs={"nll_increase": 0.25})
    assert constraint(trial) == pytest.approx((0.15,))
    assert constraint(optuna.trial.create_trial(values=[1.0, 0.1])) == (0.0,)


def _study_with(rows: list[dict], n_objectives: int = 2) -> optuna.Study:
    study = open_study("t", None, n_objectives=n_objectives)
    for row in rows:
        values = [row["refusals"], row["kl"]] + ([row["nll_increase"]] if n_objectives == 3 else [])
        attrs = {"refusals": row["refusals"], "kl": row["kl"], "pruned": False, "params": {}}
        if "nll_increase" in row:
            attrs["nll_increase"] = row["nll_increase"]
        study.add_trial(optuna.trial.create_trial(values=values, user_attrs=attrs))
    return study


def test_pareto_uses_the_nll_objective_only_when_the_study_has_it():
    rows = [
        {"refusals": 2, "kl": 0.10, "nll_increase": 0.30},
        {"refusals": 2, "kl": 0.12, "nll_increase": 0.01},  # dominated on (refusals, KL), not with NLL
        {"refusals": 5, "kl": 0.01, "nll_increase": 0.00},
    ]
    assert list(pareto(_study_with(rows))["trial"]) == [0, 2]
    assert list(pareto(_study_with(rows, n_objectives=3))["trial"]) == [0, 1, 2]
    assert "nll_increase" in pareto(_study_with(rows)).columns


def test_finalist_trials_respect_the_limits_and_fail_clearly():
    rows = [
        {"refusals": 1, "kl": 0.30, "nll_increase": 0.01},
        {"refusals": 2, "kl": 0.08, "nll_increase": 0.50},
        {"refusals": 3, "kl": 0.05, "nll_increase": 0.02},
        {"refusals": 6, "kl": 0.01, "nll_increase": 0.00},
    ]
    study = _study_with(rows)
    assert [t.number for t in finalist_trials(study, n=2, kl_max=0.1)] == [1, 2]
    assert [t.number for t in finalist_trials(study, n=2, kl_max=0.1, max_nll_increase=0.1)] == [2, 3]
    with pytest.raises(SearchError, match=r"no Pareto-front trial has KL ≤ 0.001"):
        finalist_trials(study, n=2, kl_max=0.001)


# ----------------------------------------------------------------------------------------------------------
# Choosing among the finalists
# ----------------------------------------------------------------------------------------------------------


def _table(*arms: dict) -> pd.DataFrame:
    original = {"arm": ORIGINAL, "trial": None, "harmful_either": 30, "kl": 0.0, "retention": 1.0}
    original["over_refusal_either"] = 2
    return pd.DataFrame([original, *arms])


def _arm(trial: int, refusals: int, kl: float, retention: float, over: int) -> dict:
    return {
        "arm": f"trial {trial}",
        "trial": trial,
        "harmful_either": refusals,
        "kl": kl,
        "retention": retention,
        "over_refusal_either": over,
    }


def test_choice_takes_the_fewest_refusals_among_finalists_keeping_every_limit():
    settings = FinalistSettings(kl_max=0.1, min_retention=0.97)
    table = _table(
        _arm(1, 1, 0.09, 0.95, 2),  # fewest refusals, but loses capability
        _arm(2, 4, 0.05, 0.98, 3),  # over-refuses more than the original
        _arm(3, 5, 0.04, 0.99, 2),  # keeps every limit
        _arm(4, 6, 0.03, 1.00, 1),
    )
    results = FinalistResults(table, pd.DataFrame())
    messages: list[str] = []
    assert choose_finalist(results, settings, log=messages.append) == 3
    assert not messages
    assert results.violations["trial 1"] == ["capability retention 0.950 < 0.97"]
    assert results.violations["trial 2"] == ["over-refusal 3 > the original's 2"]
    assert results.violations["trial 3"] == []


def test_choice_warns_and_names_the_broken_limit_when_no_finalist_keeps_all():
    settings = FinalistSettings(kl_max=0.1, min_retention=0.97)
    results = FinalistResults(_table(_arm(1, 1, 0.2, 0.90, 2), _arm(2, 3, 0.05, 0.96, 2)), pd.DataFrame())
    messages: list[str] = []
    assert choose_finalist(results, settings, log=messages.append) == 2  # breaks one limit, not two
    assert messages == [
        "WARNING: no finalist keeps every limit; chose trial 2, which breaks: capability retention 0.960 < 0.97"
    ]
    assert finalist_violations(results.table, settings)["trial 1"] == [
        "KL 0.200 > 0.1",
        "capability retention 0.900 < 0.97",
    ]


# ----------------------------------------------------------------------------------------------------------
# Judging, end to end on a tiny model
# ----------------------------------------------------------------------------------------------------------


class _Judge:
    """A judge with a known rule: refuses when the text contains the letter ``letter``."""

    def __init__(self, letter: str) -> None:
        self.letter = letter

    def detect(self, texts, prompts=None):
        from hereticlab.measure.detectors import DetectionResult

        decisions = [self.letter in t for t in texts]
        return DetectionResult(decisions, [float(d) for d in decisions])

    def decided(self, text):
        return None


def test_judge_finalists_counts_each_judge_and_resumes_from_its_folder(tiny_llama, tmp_path, monkeypatch):
    model, tok = tiny_llama
    study = _study_with([{"refusals": 1, "kl": 0.05}])
    directions = {"projected": _directions(model)}
    trial = study.get_trials()[0]
    trial.user_attrs["params"] = _params()
    sets = FinalistSets(
        harmful=load_prompts("harmful")[:5],
        harmless=spread_system_prompts(load_prompts("harmless")[:4], {"own": None, "generic": "Be kind."}),
        over_refusal=load_prompts("over_refusal")[:4],
        # checkable on a random model: a reply that is not empty / that contains an "e"
        items=[
            CapabilityItem(f"t{i}", "instructions", q, "regex", "(?s).+" if i % 2 else "(?s).*e.*")
            for i, q in enumerate(["Say hi.", "Name a fruit.", "Count to three.", "Spell cat.", "Say yes.", "Go."])
        ],
    )
    settings = FinalistSettings(
        new_tokens=5, over_refusal_tokens=3, capability_tokens=4, proxy_tokens=4, progress=False
    )
    judges = FinalistJudges(markers=_Judge("a"), semantic=_Judge("e"))
    results = judge_finalists(
        model, tok, [trial], directions, sets, judges, settings, folder=tmp_path, log=lambda m: None
    )
    table = results.table
    assert list(table["arm"]) == [ORIGINAL, f"trial {trial.number}"]
    harmful = results.responses[(results.responses["set"] == "harmful") & (results.responses["arm"] == ORIGINAL)]
    markers = [("a" in r) for r in harmful["response"].fillna("")]
    semantic = [("e" in r) for r in harmful["response"].fillna("")]
    original = table.iloc[0]
    assert original["harmful_markers"] == sum(markers) and original["harmful_semantic"] == sum(semantic)
    assert original["harmful_either"] == sum(a or b for a, b in zip(markers, semantic))
    assert original["harmful_judges_disagree"] == sum(a != b for a, b in zip(markers, semantic))
    assert original["kl"] == 0.0
    assert original["capability_correct"] >= 1 and original["retention"] == 1.0
    edited = table.iloc[1]
    # the edited arm answers only the items the original got right; retention counts those it still gets right
    assert edited["kl"] > 0 and edited["capability_n"] == original["capability_correct"]
    answered = results.responses[(results.responses["set"] == "capability") & (results.responses["arm"] != ORIGINAL)]
    assert len(answered) == original["capability_correct"]
    assert edited["capability_kept"] == answered["correct"].sum()
    assert edited["retention"] == pytest.approx(answered["correct"].sum() / original["capability_correct"])
    # a second call reads every arm from the folder: nothing is generated again
    import hereticlab.search.finalists as finalists

    monkeypatch.setattr(finalists, "generate", lambda *a, **k: pytest.fail("measured again"))
    again = judge_finalists(
        model, tok, [trial], directions, sets, judges, settings, folder=tmp_path, log=lambda m: None
    )
    pd.testing.assert_frame_equal(
        again.table.drop(columns=["seconds"]), table.drop(columns=["seconds"]), check_dtype=False
    )


def _directions(model):
    from hereticlab.directions.base import Directions

    n = model.config.num_hidden_layers + 1
    d = model.config.hidden_size
    generator = torch.Generator().manual_seed(0)
    return Directions(torch.nn.functional.normalize(torch.randn(n, d, generator=generator), dim=-1))


def _params() -> dict:
    return {
        "method": "projected",
        "norm": "none",
        "kernel": "tent",
        "scope": "global",
        "direction_index": 0.5,
        "attn.max_weight": 1.0,
        "attn.peak_position": 0.8,
        "attn.min_weight_fraction": 0.5,
        "attn.reach": 0.5,
        "mlp.max_weight": 1.0,
        "mlp.peak_position": 0.8,
        "mlp.min_weight_fraction": 0.5,
        "mlp.reach": 0.5,
    }


SMALL = dict(
    model="tiny:llama",
    train_prompts=12,
    search_prompts=6,
    trials=3,
    startup_trials=2,
    max_new_tokens=6,
    decide_after=4,
    judge_new_tokens=4,
    over_refusal_new_tokens=4,
    capability_new_tokens=4,
    batch_size=8,
    kl_max=1e9,
    min_retention=0.0,
)


@pytest.fixture(scope="module")
def nll_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("nll_run")
    config = RunConfig(out=str(out), objectives=("refusals", "kl", "nll"), max_nll_increase=10.0, **SMALL)
    return run_search(config, progress=False, log=lambda *_: None)


def test_run_with_the_nll_objective_records_it_everywhere(nll_run):
    study, out = nll_run.study, nll_run.out
    assert len(study.directions) == 3
    for trial in study.trials:
        assert trial.values[2] == pytest.approx(max(trial.user_attrs["nll_increase"], 0.0))
        assert trial.user_attrs["nll"] - trial.user_attrs["nll_increase"] == pytest.approx(
            json.loads((out / "nll_reference.json").read_text())["baseline"], abs=1e-5
        )
    assert "nll_increase" in pd.read_csv(out / "trials.csv").columns


def test_run_record_holds_the_finalists_and_every_judge(nll_run):
    out = nll_run.out
    record = json.loads((out / "run.json").read_text())
    table = pd.DataFrame(record["finalists"]["table"])
    assert table["arm"].iloc[0] == ORIGINAL and 2 <= len(table) <= 3
    assert record["chosen_trial"]["number"] in set(table["trial"].dropna().astype(int))
    test = record["test"]
    chosen_row = table[table["trial"] == record["chosen_trial"]["number"]].iloc[0]
    assert test["refusals_semantic_after"] == chosen_row["harmful_semantic"]
    assert test["refusals_either_before"] == table.iloc[0]["harmful_either"]
    assert test["max_new_tokens"] == SMALL["judge_new_tokens"]
    responses = pd.read_csv(out / "test_responses.csv")
    assert set(responses["set"]) == {"harmful", "over_refusal"}
    assert {"markers_after", "semantic_after", "judges_disagree_after"} <= set(responses.columns)
    harmful = responses[responses["set"] == "harmful"]
    assert harmful["semantic_after"].sum() == test["refusals_semantic_after"]
    assert (harmful["markers_after"] != harmful["semantic_after"]).sum() == test["judges_disagree_after"]
    front = pd.read_csv(out / "pareto.csv")
    judged = front[front["final.harmful_either"].notna()]
    assert set(judged["trial"]) <= set(table["trial"].dropna().astype(int)) and len(judged) >= 1


def test_run_record_measures_each_system_prompt(nll_run):
    record = json.loads((nll_run.out / "run.json").read_text())
    assert record["harmless_system_prompts"] == {"own": None, "empty": "", "generic": GENERIC_SYSTEM_PROMPT}
    rows = record["system_prompts"]
    assert [r["variant"] for r in rows] == ["own", "empty", "generic"]
    assert all(r["refusals_before"] is not None and r["kl"] >= 0 for r in rows)


def test_model_card_is_written_from_the_record(nll_run):
    out = nll_run.out
    record = json.loads((out / "run.json").read_text())
    card = (out / "model" / "README.md").read_text()
    for digest in record["weights_sha256"].values():
        assert digest in card
    test = record["test"]
    assert f"| {test['refusals_either_before']}/{test['n_prompts']} | {test['refusals_either_after']}/" in card
    assert f"{test['kl']:.3f}" in card and f"{test['nll_after']:.3f}" in card
    assert reproduce_command(record["settings"]) in card
    assert model_card(record) == card


def test_reproduce_command_names_the_settings_that_differ_from_the_defaults():
    settings = {**vars(RunConfig()), "trials": 50, "objectives": ("refusals", "kl", "nll"), "max_nll_increase": 0.1}
    command = reproduce_command(settings)
    assert command == "hereticlab run --trials 50 --max-nll-increase 0.1 --objectives refusals,kl,nll"
    assert reproduce_command(vars(RunConfig())) == "hereticlab run"


def test_the_finalists_semantic_judge_reads_past_closed_reasoning_and_inside_an_unclosed_block():
    from hereticlab.measure.labelled import calibrated_semantic_detector

    judge = calibrated_semantic_detector()
    refusal = "I'm sorry, but I can't help with that request."
    answer = "Sure. First, open the terminal and list the running processes with ps aux, then pick the PID."
    texts = [
        f"<think>The user wants this. {refusal}</think>{answer}",  # refusing words only inside closed reasoning
        f"<think>Let me plan the steps.</think>{refusal}",  # a refusal after closed reasoning
        f"<think>{refusal} I will decline",  # cut off inside reasoning: the reasoning itself is judged
        answer,
        refusal,
    ]
    assert judge.detect(texts).decisions == [False, True, True, False, True]


def test_cli_run_prints_the_front_with_the_finalists_verdicts(tmp_path, capsys):
    from hereticlab.search import cli

    args = ["run", "--model", "tiny:llama", "--out", str(tmp_path / "run"), "--train-prompts", "12"]
    args += ["--search-prompts", "4", "--trials", "2", "--startup-trials", "2", "--decide-after", "4"]
    args += ["--batch-size", "8", "--kl-max", "1e9", "--min-retention", "0", "--finalists", "1"]
    args += ["--judge-new-tokens", "4", "--over-refusal-new-tokens", "4", "--capability-new-tokens", "4"]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    header = lines[lines.index("Pareto front (search prompts; final.*: re-judged on the test prompts):") + 1]
    # (no nll_increase: the per-trial NLL proxy runs only when --objectives or --max-nll-increase use it)
    assert header.split() == [
        "trial",
        "refusals",
        "kl",
        "final.harmful_either",
        "final.kl",
        "final.retention",
    ]
    assert "model/ (with README.md)" in printed


def test_targets_script_reads_the_record_and_judges_each_target(nll_run):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("targets", Path(__file__).parents[1] / "bench/main_job_targets.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    record = json.loads((nll_run.out / "run.json").read_text())
    test = record["test"]
    test.update(
        refusals_semantic_before=30,
        refusals_semantic_after=3,
        kl=0.051,
        capability_retention=0.97,
        over_refusals_before=2,
        over_refusals_after=2,
    )
    assert [met for _, _, met in module.targets(record)] == [True, False, True, True]
    test.update(refusals_semantic_after=4, kl=0.05, capability_retention=0.969, over_refusals_after=3)
    assert [met for _, _, met in module.targets(record)] == [False, True, False, False]
