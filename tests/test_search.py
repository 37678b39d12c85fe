"""Search, export, resume and the command line, on a tiny random model."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch

import hereticlab as hl
from hereticlab.search import (
    SearchSpace,
    choose_trial,
    cli,
    edits_from_params,
    make_storage,
    pareto,
    trials_table,
)
from hereticlab.search.runner import RunConfig, replay, run_search

TINY = dict(
    model="tiny:llama",
    train_prompts=12,
    search_prompts=4,
    trials=3,
    startup_trials=2,
    max_new_tokens=6,
    decide_after=4,
    final_new_tokens=4,
    judge_new_tokens=4,
    over_refusal_new_tokens=4,
    capability_new_tokens=4,
    batch_size=8,
    kl_max=1e9,
)


def cli_args(out, *extra):
    return [
        "run",
        "--model",
        "tiny:llama",
        "--out",
        str(out),
        "--train-prompts",
        "12",
        "--search-prompts",
        "4",
        "--startup-trials",
        "2",
        "--decide-after",
        "4",
        "--batch-size",
        "8",
        "--kl-max",
        "1e9",
        "--judge-new-tokens",
        "4",
        "--over-refusal-new-tokens",
        "4",
        "--capability-new-tokens",
        "4",
        *extra,
    ]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    result = run_search(RunConfig(out=str(out), **TINY), progress=False, log=lambda *_: None)
    return result


def test_run_writes_every_artifact(finished_run):
    out = finished_run.out
    for name in (
        "trials.csv",
        "pareto.csv",
        "pareto.png",
        "run.json",
        "model/config.json",
        "adapter/adapter_config.json",
    ):
        assert (out / name).exists(), name
    record = json.loads((out / "run.json").read_text())
    assert record["n_trials"] == 3 and record["weights_sha256"]
    assert record["chosen_trial"]["number"] in set(trials_table(finished_run.study)["trial"])
    assert {"torch", "transformers", "optuna"} <= set(record["versions"])


def _full_rank(edits):
    """A LoRA rank that holds any weight delta of these writers exactly (min of each weight's dimensions)."""
    return max(min(e.writer.weight.shape) for e in edits)


@pytest.mark.parametrize("norm", ["none", "row", "column"])
def test_exported_model_and_adapter_reproduce_the_edit(finished_run, tmp_path, norm):
    """The merged export (plain transformers) and the LoRA adapter give the edited model's logits, for every norm
    mode, and the edit itself moves the logits far more than the tolerance (so the match is not between two
    unedited models). ``none``: the run's own export; ``row`` / ``column``: the chosen trial's parameters with that
    norm mode, exported with the same functions the run uses."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from hereticlab.interventions.export import save_adapter, save_merged

    model, tok = hl.load_model("tiny:llama")
    directions = {"projected": hl.Directions.load(finished_run.out / "directions/projected.safetensors")}
    params = {**finished_run.record["chosen_trial"]["params"], "norm": norm}
    edits = edits_from_params(model, directions, params)
    assert edits and {e.norm for e in edits} == {norm}
    batch = hl.encode(tok, hl.format_chat(tok, ["hello there", "how do bees make honey?"]), torch.device("cpu"))
    with torch.no_grad():
        unedited = model(**batch).logits
        with hl.apply_edits(model, edits):
            expected = model(**batch).logits
        assert torch.equal(model(**batch).logits, unedited)  # reverted exactly
    mask = batch["attention_mask"].bool()
    change = (expected - unedited).abs()[mask].max().item()
    assert change > 1e-2, f"the {norm} edit barely changes the logits ({change:.2g}); the check below would be void"
    if norm == "none":
        merged, adapter, rank = finished_run.out / "model", finished_run.out / "adapter", None
    else:
        merged, adapter, rank = tmp_path / "model", tmp_path / "adapter", _full_rank(edits)
        save_merged(model, tok, edits, merged)
        save_adapter(model, edits, adapter, base_model="tiny:llama", rank=rank)
    exported = AutoModelForCausalLM.from_pretrained(merged)
    with torch.no_grad():
        got = exported(**batch).logits
    assert (got - expected).abs()[mask].max().item() < 1e-5 < change
    peft_model = PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        got = peft_model(**batch).logits
    assert (got - expected).abs()[mask].max().item() < 1e-4 < change


def test_adapter_truncation_is_reported_exactly(finished_run):
    """``lora_factors(errors=)`` reports ‖ΔW − BA‖ / ‖ΔW‖ per module: 0 for a plain edit, the hand-computed error
    of the rank-r truncation for a norm-preserving one (which the run logs and writes to run.json)."""
    from hereticlab.interventions.export import lora_factors

    model, _ = hl.load_model("tiny:llama")
    directions = {"projected": hl.Directions.load(finished_run.out / "directions/projected.safetensors")}
    params = finished_run.record["chosen_trial"]["params"]
    errors: dict[str, float] = {}
    lora_factors(model, edits_from_params(model, directions, {**params, "norm": "none"}), errors=errors)
    assert errors and set(errors.values()) == {0.0}
    edits = edits_from_params(model, directions, {**params, "norm": "row"})
    errors = {}
    factors = lora_factors(model, edits, rank=2, errors=errors)
    assert max(errors.values()) > 1e-3  # a row-norm edit is not rank 2
    for name, (A, B) in factors.items():
        module = model.get_submodule(name)
        with hl.apply_edits(model, [e for e in edits if e.writer.module is module]):
            delta = module.weight.detach().clone()
        delta -= module.weight.detach()
        by_hand = ((delta - B @ A).norm() / delta.norm()).item()
        assert errors[name] == pytest.approx(by_hand, rel=1e-3, abs=1e-6)
    assert "adapter_max_relative_error" in finished_run.record


def test_replay_reproduces_weight_hashes(finished_run, tmp_path):
    hashes = replay(finished_run.out / "run.json", tmp_path / "replayed")
    assert hashes == finished_run.record["weights_sha256"]


def test_pareto_and_choice(finished_run):
    """The front equals the non-dominated unpruned trials found by comparing every pair (no exemption), and the
    chosen trial is the lowest-refusal one with KL ≤ kl_max (ties: lower KL), found by sorting the table."""
    front = pareto(finished_run.study)
    assert len(front) >= 1 and front["refusals"].is_monotonic_increasing
    table = trials_table(finished_run.study)
    done = [(int(r.trial), float(r.refusals), float(r.kl)) for r in table.itertuples() if not r.pruned]
    assert done, "no unpruned trial: the front would be empty and this test void"

    def dominates(a, b):
        return a[1] <= b[1] and a[2] <= b[2] and (a[1] < b[1] or a[2] < b[2])

    expected = sorted((t for t in done if not any(dominates(o, t) for o in done)), key=lambda t: (t[1], t[2]))
    assert list(front["trial"]) == [t[0] for t in expected]
    for kl_max in (1e9, *(t[2] for t in done)):  # every cut that changes which trials qualify
        under = sorted((t for t in done if t[2] <= kl_max), key=lambda t: (t[1], t[2]))
        assert choose_trial(finished_run.study, kl_max=kl_max).number == under[0][0]
    assert finished_run.record["chosen_trial"]["number"] == sorted(done, key=lambda t: (t[1], t[2]))[0][0]
    with pytest.raises(hl.search.SearchError, match="does not exist"):
        choose_trial(finished_run.study, trial=999)
    with pytest.raises(hl.search.SearchError, match="no finished trial has KL"):
        choose_trial(finished_run.study, kl_max=-1.0)


def test_space_pins_and_mlp_switch_off():
    model, _ = hl.load_model("tiny:llama")
    space = SearchSpace().pin(**{"mlp.max_weight": -0.2, "scope": "global", "direction_index": 0.5})
    study = optuna.create_study(directions=["minimize", "minimize"])
    params = space.suggest(study.ask())
    assert params["mlp.max_weight"] == -0.2 and params["direction_index"] == 0.5
    dirs = hl.Directions(torch.randn(5, 64))
    edits = edits_from_params(model, dirs, params, space.components)
    assert edits and all(e.writer.component == "attn" for e in edits)


def test_same_seed_same_trials(tmp_path):
    runs = []
    for name in ("a", "b"):
        r = run_search(
            RunConfig(out=str(tmp_path / name), **{**TINY, "export": False}), progress=False, log=lambda *_: None
        )
        runs.append(trials_table(r.study).drop(columns=["seconds"]))
    assert runs[0].equals(runs[1])


def _count_complete(journal: Path) -> int:
    if not journal.exists():
        return 0
    storage = make_storage(str(journal))
    study = optuna.load_study(study_name="hereticlab", storage=storage)
    return len([t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE])


def _spawn(args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "hereticlab.search.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_resume_after_sigkill(tmp_path):
    out = tmp_path / "killed"
    proc = _spawn(cli_args(out, "--trials", "40", "--no-export"))
    journal = out / "study.journal"
    deadline = time.time() + 120
    while _count_complete(journal) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = _count_complete(journal)
    assert kept >= 2
    study = optuna.load_study(study_name="hereticlab", storage=make_storage(str(journal)))
    before = {t.number: t.params for t in study.get_trials() if t.state == optuna.trial.TrialState.COMPLETE}
    killed = [t.params for t in study.get_trials() if t.state == optuna.trial.TrialState.RUNNING and t.params]
    target = kept + 2
    assert cli.main(cli_args(out, "--trials", str(target), "--no-export")) == 0
    study = optuna.load_study(study_name="hereticlab", storage=make_storage(str(journal)))
    after = {t.number: t.params for t in study.get_trials() if t.state == optuna.trial.TrialState.COMPLETE}
    assert len(after) == target
    assert all(after[n] == p for n, p in before.items())
    # a trial the kill left running is run again with the parameters it had drawn: all of them, or, when the kill
    # came while they were being written to the journal (then a stale lock file delays the resume), the ones
    # written, the rest drawn anew. Continuous values make a chance match impossible.
    complete_size = max(len(a) for a in after.values())
    for p in killed:
        if p not in after.values():
            assert len(p) < complete_size, f"the killed trial's full parameters {p} were not run again"
            assert any(all(a.get(k) == v for k, v in p.items()) for a in after.values()), p
    assert len({json.dumps(p, sort_keys=True) for p in after.values()}) == len(after)  # nothing run twice


def test_resume_reruns_the_interrupted_trial_with_its_own_parameters(tmp_path, monkeypatch):
    """Ctrl-C in the middle of trial #2's evaluation (Optuna marks it FAIL), then the same command again: the study
    ends with #0 and #1 as they were, #2's parameters evaluated as a COMPLETE trial, and every other complete trial
    with parameters of its own (the resumed process must not replay the first process's random draws)."""
    from hereticlab.search.evaluator import TrialEvaluator

    config = RunConfig(out=str(tmp_path / "r"), **{**TINY, "trials": 5, "startup_trials": 5, "export": False})
    evaluate = TrialEvaluator.evaluate_edits
    calls = []

    def interrupted_at_the_third(self, edits):
        calls.append(len(edits))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return evaluate(self, edits)

    monkeypatch.setattr(TrialEvaluator, "evaluate_edits", interrupted_at_the_third)
    lines = []
    with pytest.raises(KeyboardInterrupt):
        run_search(config, progress=False, log=lines.append)
    assert any("run the same command again to resume" in line for line in lines)
    storage = make_storage(str(tmp_path / "r" / "study.journal"))
    first = optuna.load_study(study_name="hereticlab", storage=storage).get_trials()
    states = [t.state.name for t in first]
    assert states == ["COMPLETE", "COMPLETE", "FAIL", "WAITING"], states
    interrupted = first[2].params
    assert interrupted and first[3].system_attrs["fixed_params"] == interrupted

    monkeypatch.setattr(TrialEvaluator, "evaluate_edits", evaluate)
    lines = []
    result = run_search(config, progress=False, log=lines.append)
    trials = result.study.get_trials()
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "FAIL", *["COMPLETE"] * 3]
    assert [(t.number, t.params, t.values) for t in complete[:2]] == [(t.number, t.params, t.values) for t in first[:2]]
    assert complete[2].number == 3 and complete[2].params == interrupted  # the interrupted trial, its own params
    assert complete[2].user_attrs["params"] == {**first[2].user_attrs["params"]}
    assert len({json.dumps(t.params, sort_keys=True) for t in complete}) == len(complete) == 5
    # a second resume finds nothing to do and queues nothing again
    again = run_search(config, progress=False, log=lines.append)
    assert [t.state.name for t in again.study.get_trials()] == [t.state.name for t in trials]


def test_two_workers_share_one_sqlite_study(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    procs = [
        _spawn(cli_args(tmp_path / f"w{i}", "--storage", url, "--worker-trials", "3", "--no-export")) for i in range(2)
    ]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    study = optuna.load_study(study_name="hereticlab", storage=url)
    numbers = [t.number for t in study.get_trials() if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(numbers) == list(range(6))


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--harmful", "/nonexistent/prompts.txt"], "does not exist"),
        (["--storage", "nosuchdb://x"], "cannot open storage"),
        (["--model", "no/such/model/anywhere"], "no model folder"),
        (["--model", "unknown-model-id"], "Hugging Face cache"),
        (["--trials", "0"], "at least 1"),
    ],
)
def test_bad_inputs_give_one_line_and_nonzero_exit(tmp_path, capsys, extra, message):
    code = cli.main(cli_args(tmp_path / "bad", *extra))
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and err[0].startswith("hereticlab: error:") and message in err[0]


def test_empty_prompt_set_and_missing_trial(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    assert cli.main(cli_args(tmp_path / "e", "--harmful", str(empty))) == 2
    assert "no prompts" in capsys.readouterr().err
    assert cli.main(cli_args(tmp_path / "t", "--trials", "2", "--trial", "57")) == 2
    assert "trial 57 does not exist" in capsys.readouterr().err


def test_changed_settings_do_not_clobber_a_run(tmp_path, capsys):
    out = tmp_path / "r"
    assert cli.main(cli_args(out, "--trials", "1", "--no-export")) == 0
    assert cli.main(cli_args(out, "--trials", "1", "--no-export", "--train-prompts", "13")) == 2
    assert "other settings" in capsys.readouterr().err


def test_mean_objective_behaviour_minimizes_the_mean_score():
    """Verbosity's objective is mean words per response, not a count; a pruned trial scores ``worst``."""
    from hereticlab.measure.behaviours import get_behaviour
    from hereticlab.search.evaluator import TrialResult
    from hereticlab.search.runner import make_objective

    model, _ = hl.load_model("tiny:llama")
    dirs = hl.Directions(torch.randn(hl.num_layers(model) + 1, model.config.hidden_size))
    words = get_behaviour("verbosity")

    class StubEvaluator:
        def __init__(self, results):
            self.results = iter(results)

        def evaluate_edits(self, edits):
            return next(self.results)

    answers = ["one two three", "four five six seven eight", "nine"]
    results = [TrialResult(0.05, 1, 3, [False, True, False], answers), TrialResult(2.0, None, 3, pruned=True)]
    objective = make_objective(
        StubEvaluator(results), model, dirs, SearchSpace(), 0.01, measure=words.measure, worst=50.0
    )
    study = optuna.create_study(directions=["minimize", "minimize"])
    study.optimize(objective, n_trials=2)
    first, pruned = study.trials
    assert first.values == [pytest.approx(3.0), pytest.approx(0.05)]  # (3 + 5 + 1) / 3 words
    assert first.user_attrs["refusals"] == pytest.approx(3.0) and first.user_attrs["present"] == 1
    assert pruned.values[0] == 50.0 and pruned.user_attrs["refusals"] is None


def test_refusal_is_a_behaviour_that_takes_the_run_settings(tmp_path):
    """The run's prompts (--harmful/--harmless/--system-prompt), split (--train-prompts) and lengths reach refusal."""
    from hereticlab.measure.behaviours import get_behaviour
    from hereticlab.search.runner import prompt_splits, run_behaviour

    harmful = tmp_path / "bad.txt"
    harmful.write_text("\n".join(f"Do bad thing number {i}" for i in range(20)))
    config = RunConfig(**{**TINY, "harmful": str(harmful), "system_prompt": "Be brief.", "split_seed": 1})
    behaviour = run_behaviour(config)
    assert behaviour.name == "refusal" and behaviour.early_stop_safe
    assert (behaviour.search_decide_after, behaviour.max_new_tokens, behaviour.report_new_tokens) == (4, 6, 4)
    splits = prompt_splits(config, behaviour)
    for side, source in (("bad", str(harmful)), ("good", "harmless")):
        train, evaluation = hl.load_prompts(source, system_prompt="Be brief.").split(train=12, seed=1)
        expected = {"train": train, "search": evaluation[:4], "test": evaluation[4:]}
        for part, prompts in expected.items():
            got = splits[f"{side}_{part}"]
            assert got.prompts == prompts.prompts and got.system_prompt == "Be brief.", (side, part)
    # a style preset keeps its own prompts, split and lengths
    slop = run_behaviour(RunConfig(**{**TINY, "behaviour": "slop"}))
    preset = get_behaviour("slop")
    assert slop.max_new_tokens == slop.search_decide_after == slop.report_new_tokens == preset.max_new_tokens
    assert slop.train_pair(0)[0].prompts == preset.train_pair(0)[0].prompts
    with pytest.raises(hl.search.SearchError, match="need more than --train-prompts=19"):
        run_behaviour(RunConfig(**{**TINY, "harmful": str(harmful), "train_prompts": 19}))


def test_behaviour_detector_is_a_detector():
    from hereticlab.measure.behaviours import get_behaviour
    from hereticlab.measure.detectors import Detector
    from hereticlab.measure.metrics import MarkerDetector
    from hereticlab.search.runner import BehaviourDetector

    texts = ["I'm sorry, I can't help.", "Sure, here it is.", "", "<think>I cannot</think>Sure.", "<think>hmm"]
    markers, refusal = MarkerDetector(), BehaviourDetector(get_behaviour("refusal"))
    assert isinstance(refusal, Detector) and refusal.early_stop_safe
    assert refusal.detect(texts).decisions == refusal(texts) == markers.detect(texts).decisions
    assert refusal.detect(texts).scores == markers.detect(texts).scores
    assert [refusal.decided(t) for t in texts] == [markers.decided(t) for t in texts]
    # the names search/evaluator.py calls (until it uses the protocol) give the same decisions
    assert [refusal.is_refusal(t) for t in texts] == markers(texts)
    assert [bool(refusal.matched(t)) for t in texts] == [markers.matched(t) for t in texts]
    verbosity = BehaviourDetector(get_behaviour("verbosity"))
    assert isinstance(verbosity, Detector) and not hasattr(verbosity, "matched")
    # decided (≥ 80 words is final) differs from early_stop_safe (the mean-words objective needs whole responses)
    assert verbosity.decided("word " * 500) is True and verbosity.decided("a b") is None
    assert verbosity.detect(["a b"]).scores == [2.0]


def test_run_record_has_the_behaviour_measure(finished_run):
    test = finished_run.record["test"]
    assert test["max_new_tokens"] == TINY["final_new_tokens"]
    assert test["measure_before"] == test["refusals_before"] and test["measure_after"] == test["refusals_after"]
    assert "behaviour_check" not in finished_run.record  # refusal (run_settings) is not checked; its record as before


def test_preset_without_contrast_stops_before_searching_and_the_skip_flag_goes_through(tmp_path, capsys):
    """The tiny random model writes no slop whatever the system prompt: `run --behaviour slop` stops before any
    trial with one line naming the preset and both measured values, and writes nothing (a later run with other
    settings in the same --out is not refused). --skip-behaviour-check measures, warns and records, then searches."""
    out = tmp_path / "slop"
    args = ["--behaviour", "slop", "--trials", "1", "--startup-trials", "1"]
    assert cli.main(cli_args(out, *args, "--search-prompts", "3", "--no-export")) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hereticlab: error: behaviour check failed for preset 'slop'"), err
    assert "bad (eliciting) 0/8 vs good 0/8" in err[0] and "p = 1" in err[0]
    assert "use a model that shows it" in err[0] and "--skip-behaviour-check" in err[0]
    assert not out.exists() or not any(out.iterdir())  # no settings.json, no study: nothing a resume trips on

    assert cli.main(cli_args(out, *args, "--skip-behaviour-check")) == 0
    stdout = capsys.readouterr().out
    assert "WARNING: behaviour check NOT ENFORCED (--skip-behaviour-check); it FAILED" in stdout
    record = json.loads((out / "run.json").read_text())
    check = record["behaviour_check"]
    assert check["enforced"] is False and check["passed"] is False
    assert (check["behaviour"], check["n_bad"], check["n_good"], check["measure_bad"]) == ("slop", 8, 8, 0.0)
    assert check["rule"].startswith("Fisher exact one-sided p < 0.05") and record["n_trials"] == 1
