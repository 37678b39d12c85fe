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


def test_exported_model_loads_in_plain_transformers_with_same_logits(finished_run):
    from transformers import AutoModelForCausalLM

    model, tok = hl.load_model("tiny:llama")
    directions = {"projected": hl.Directions.load(finished_run.out / "directions/projected.safetensors")}
    edits = edits_from_params(model, directions, finished_run.record["chosen_trial"]["params"])
    batch = hl.encode(tok, hl.format_chat(tok, ["hello there"]), torch.device("cpu"))
    with hl.apply_edits(model, edits):
        expected = model(**batch).logits
    exported = AutoModelForCausalLM.from_pretrained(finished_run.out / "model")
    assert torch.allclose(exported(**batch).logits, expected, atol=1e-5)


def test_adapter_reproduces_the_edit(finished_run):
    from peft import PeftModel

    model, tok = hl.load_model("tiny:llama")
    directions = {"projected": hl.Directions.load(finished_run.out / "directions/projected.safetensors")}
    edits = edits_from_params(model, directions, finished_run.record["chosen_trial"]["params"])
    batch = hl.encode(tok, hl.format_chat(tok, ["hello there"]), torch.device("cpu"))
    with hl.apply_edits(model, edits):
        expected = model(**batch).logits
    peft_model = PeftModel.from_pretrained(model, finished_run.out / "adapter")
    assert torch.allclose(peft_model(**batch).logits, expected, atol=1e-4)


def test_replay_reproduces_weight_hashes(finished_run, tmp_path):
    hashes = replay(finished_run.out / "run.json", tmp_path / "replayed")
    assert hashes == finished_run.record["weights_sha256"]


def test_pareto_and_choice(finished_run):
    front = pareto(finished_run.study)
    assert len(front) >= 1 and front["refusals"].is_monotonic_increasing
    table = trials_table(finished_run.study)
    for _, row in front.iterrows():  # no trial dominates a front member
        assert (
            not ((table.refusals <= row.refusals) & (table.kl < row.kl - 1e-12)).any()
            or row.refusals == table.refusals.min()
        )
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
    target = kept + 2
    assert cli.main(cli_args(out, "--trials", str(target), "--no-export")) == 0
    study = optuna.load_study(study_name="hereticlab", storage=make_storage(str(journal)))
    after = {t.number: t.params for t in study.get_trials() if t.state == optuna.trial.TrialState.COMPLETE}
    assert len(after) == target
    assert all(after[n] == p for n, p in before.items())


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
