"""Bad command-line input gets one clear line, before any expensive work (issue 13, item 6).

Every case in ``CASES`` is run through ``hereticlab.search.cli.main`` in-process (with model loading patched to fail the
test, so "before any model load" is checked, not inferred from timing) and a handful again as real subprocesses.
Each must exit with its code (2: the command line is wrong, 1: this machine cannot serve it), print exactly one
stderr line ``hereticlab: error: <problem>; <fix>`` with a case-specific keyword, no traceback, write nothing,
and leave an existing run directory byte-identical. ``tools/bad_input_table.py`` runs the same table as
subprocesses and prints it as markdown.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Every run case starts from these arguments (later ones override: argparse keeps the last value), so that a
# validation bug can at worst start a small run on a tiny random model in a temporary folder.
RUN = [
    "run",
    "--model",
    "tiny:llama",
    "--out",
    "{d}/new-run",
    "--train-prompts",
    "12",
    "--search-prompts",
    "4",
    "--trials",
    "1",
    "--batch-size",
    "8",
    "--decide-after",
    "4",
    "--no-export",
]

# (id, arguments, exit code, keyword that must appear in the error line). ``{d}`` is the folder made by
# ``make_inputs``; ``{closed}`` a local port nobody listens on; ``{silent}`` a local port that accepts and never
# answers.
CASES: list[tuple[str, list[str], int, str]] = [
    ("trials-zero", [*RUN, "--trials", "0"], 2, "--trials must be at least 1"),
    ("trials-negative", [*RUN, "--trials", "-5"], 2, "--trials must be at least 1"),
    ("trials-not-a-number", [*RUN, "--trials", "abc"], 2, "invalid int value"),
    ("search-prompts-zero", [*RUN, "--search-prompts", "0"], 2, "--search-prompts must be at least 1"),
    ("batch-size-zero", [*RUN, "--batch-size", "0"], 2, "--batch-size must be at least 1"),
    ("decide-after-negative", [*RUN, "--decide-after", "-3"], 2, "--decide-after must be at least 1"),
    ("startup-trials-zero", [*RUN, "--startup-trials", "0"], 2, "--startup-trials must be at least 1"),
    ("train-prompts-over-set", [*RUN, "--train-prompts", "400"], 2, "has only 300 prompts"),
    ("split-too-small", [*RUN, "--train-prompts", "250", "--search-prompts", "60"], 2, "split needs 311"),
    ("kl-max-negative", [*RUN, "--kl-max", "-0.1"], 2, "--kl-max must be greater than 0"),
    ("kl-max-nan", [*RUN, "--kl-max", "nan"], 2, "finite"),
    ("objectives-unknown", [*RUN, "--objectives", "refusals,kl,ppl"], 2, "--objectives 'refusals,kl,ppl'"),
    ("objectives-order", [*RUN, "--objectives", "kl,refusals"], 2, "refusals,kl,nll"),
    ("max-nll-negative", [*RUN, "--max-nll-increase", "-0.1"], 2, "--max-nll-increase must be"),
    ("min-retention-percent", [*RUN, "--min-retention", "97"], 2, "fraction between 0 and 1"),
    ("finalists-negative", [*RUN, "--finalists", "-1"], 2, "--finalists must be at least 0"),
    ("judge-tokens-zero", [*RUN, "--judge-new-tokens", "0"], 2, "--judge-new-tokens must be at least 1"),
    (
        "nll-with-preset",
        [*RUN, "--behaviour", "slop", "--objectives", "refusals,kl,nll"],
        2,
        "apply to refusal only",
    ),
    ("seed-negative", [*RUN, "--seed", "-1"], 2, "--seed"),
    ("behaviour-unknown", [*RUN, "--behaviour", "rudeness"], 2, "unknown behaviour 'rudeness'"),
    (
        "behaviour-ignores-harmful",
        [*RUN, "--behaviour", "slop", "--harmful", "{d}/few.txt"],
        2,
        "not used with --behaviour",
    ),
    ("methods-unknown", [*RUN, "--methods", "projected,pca"], 2, "unknown direction method 'pca'"),
    ("methods-bad-rank", [*RUN, "--methods", "projected:2"], 2, "one direction per layer"),
    ("methods-rank-not-int", [*RUN, "--methods", "svd:x"], 2, "not a positive integer"),
    ("norms-unknown", [*RUN, "--norms", "none,diag"], 2, "unknown norm mode 'diag'"),
    ("dtype-unknown", [*RUN, "--dtype", "fp8"], 2, "unknown dtype 'fp8'"),
    ("device-unknown", [*RUN, "--device", "gpu"], 2, "unknown device 'gpu'"),
    ("device-cuda-no-gpu", [*RUN, "--device", "cuda"], 1, "no CUDA GPU"),
    ("device-cuda-index", [*RUN, "--device", "cuda:99"], 1, "cuda:99"),
    ("model-missing-folder", [*RUN, "--model", "./no/such/model"], 2, "no model folder"),
    ("model-unknown-tiny", [*RUN, "--model", "tiny:nope"], 2, "unknown tiny model family"),
    ("harmful-missing", [*RUN, "--harmful", "{d}/missing.txt"], 2, "does not exist"),
    ("harmful-unknown-set", [*RUN, "--harmful", "harmfull"], 2, "no prompt set named 'harmfull'"),
    ("harmful-folder", [*RUN, "--harmful", "{d}"], 2, "is a folder"),
    ("harmful-empty", [*RUN, "--harmful", "{d}/empty.txt"], 2, "has no prompts"),
    ("harmful-binary", [*RUN, "--harmful", "{d}/binary.txt"], 2, "is binary"),
    ("harmful-not-utf8", [*RUN, "--harmful", "{d}/latin1.txt"], 2, "not UTF-8"),
    ("harmful-long-line", [*RUN, "--harmful", "{d}/long.txt"], 2, "200,000 characters"),
    ("harmless-too-few", [*RUN, "--harmless", "{d}/few.txt"], 2, "has only 3 prompts"),
    ("out-is-a-file", [*RUN, "--out", "{d}/afile"], 2, "is an existing file"),
    ("out-not-writable", [*RUN, "--out", "{unwritable}/run"], 1, "not writable"),
    ("out-damaged-settings", [*RUN, "--out", "{d}/damaged-run"], 1, "settings.json is damaged"),
    ("resume-other-settings", [*RUN, "--out", "{d}/run", "--train-prompts", "13"], 2, "other settings"),
    ("storage-unknown-scheme", [*RUN, "--storage", "nosuchdb://x"], 2, "unknown scheme 'nosuchdb'"),
    ("storage-not-a-url", [*RUN, "--storage", "study.db"], 2, "not a URL"),
    ("storage-in-memory", [*RUN, "--storage", "sqlite://"], 2, "in-memory"),
    (
        "storage-sqlite-missing-dir",
        [*RUN, "--storage", "sqlite:///no/such/dir/study.db"],
        2,
        "no/such/dir does not exist",
    ),
    (
        "storage-postgres-refused",
        [*RUN, "--storage", "postgresql://user@127.0.0.1:{closed}/optuna"],
        1,
        "cannot reach the PostgreSQL server",
    ),
    (
        "storage-postgres-silent",
        [*RUN, "--storage", "postgresql://user@127.0.0.1:{silent}/optuna"],
        1,
        "no protocol answer within 2 s",
    ),
    ("no-command", [], 2, "required: command"),
    ("unknown-command", ["rnu"], 2, "invalid choice: 'rnu'"),
    ("replay-missing", ["replay", "{d}/nowhere/run.json"], 2, "does not exist"),
    ("replay-truncated", ["replay", "{d}/truncated-run/run.json"], 2, "not valid JSON"),
    ("replay-incomplete", ["replay", "{d}/incomplete-run/run.json"], 2, "no chosen_trial.params"),
    ("replay-damaged-directions", ["replay", "{d}/damaged-directions-run/run.json"], 2, "is damaged"),
    ("replay-out-is-a-file", ["replay", "{d}/run/run.json", "--out", "{d}/afile"], 2, "is an existing file"),
    ("evaluate-missing-model", ["evaluate", "{d}/runs/default/model"], 2, "no model folder"),
    ("evaluate-not-a-model", ["evaluate", "{d}/run/directions"], 2, "no config.json"),
    (
        "evaluate-limit-zero",
        ["evaluate", "{d}/run/model", "--baseline", "tiny:llama", "--limit", "0"],
        2,
        "--limit must be at least 1",
    ),
    (
        "evaluate-train-all",
        ["evaluate", "{d}/run/model", "--baseline", "tiny:llama", "--train-prompts", "300"],
        2,
        "leaves no evaluation prompts",
    ),
]
# Run again as real subprocesses (what a user sees, import time included).
SUBPROCESS_CASES = (
    "trials-not-a-number",
    "harmful-not-utf8",
    "storage-postgres-refused",
    "replay-truncated",
    "evaluate-missing-model",
)
IN_PROCESS_LIMIT_S = 10.0  # validation alone; the slowest case waits 2 s for a silent database server
# A subprocess also imports hereticlab (torch, transformers, optuna: ~4-5 s on the 2-core CI machine, more when
# it is busy); loading even the tiny model and running one trial would take longer than this.
SUBPROCESS_LIMIT_S = 30.0


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def skip_reason(case_id: str) -> str | None:
    if case_id == "device-cuda-no-gpu" and _cuda_count():
        return "this machine has a GPU"
    if case_id == "out-not-writable" and not Path("/proc/self").is_dir() and os.geteuid() == 0:
        return "no unwritable folder for root here"
    return None


def make_run_dir(path: Path) -> Path:
    """A small finished-looking run folder: settings, journal, directions, run.json, model/ (no model is built)."""
    import torch
    from safetensors.torch import save_file

    from hereticlab.directions import Directions
    from hereticlab.search.runner import RunConfig

    path.mkdir(parents=True)
    config = RunConfig(model="tiny:llama", out=str(path), train_prompts=12, search_prompts=4, decide_after=4)
    (path / "settings.json").write_text(json.dumps(config.identity(), indent=2))
    (path / "study.journal").write_text('{"op_code": 0, "worker_id": "w", "study_name": "hereticlab"}\n')
    (path / "baseline.json").write_text(json.dumps({"refusals": 3, "n_prompts": 4, "seconds": 1.0}))
    (path / "trials.csv").write_text("trial,refusals,kl\n0,1,0.05\n")
    (path / "directions").mkdir()
    Directions(torch.randn(5, 64, generator=torch.Generator().manual_seed(0))).save(
        path / "directions" / "projected.safetensors"
    )
    (path / "model").mkdir()
    (path / "model" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    save_file({"w": torch.zeros(2, 2)}, str(path / "model" / "model.safetensors"))
    params = {
        "method": "projected",
        "norm": "none",
        "kernel": "tent",
        "scope": "global",
        "direction_index": 0.5,
        "attn.max_weight": 1.0,
        "attn.peak_position": 0.8,
        "attn.min_weight_fraction": 0.1,
        "attn.reach": 0.3,
    }
    record = {
        "settings": {"model": "tiny:llama", "dtype": None, "device": None},
        "directions": {"projected": "directions/projected.safetensors"},
        "chosen_trial": {"number": 0, "params": params, "refusals": 1, "kl": 0.05},
        "weights_sha256": {"model.safetensors": "0" * 64},
    }
    (path / "run.json").write_text(json.dumps(record, indent=2))
    return path


def make_inputs(d: Path) -> dict[str, str]:
    """Create every bad input the cases name under ``d``; returns the values of the non-port placeholders."""
    (d / "afile").write_text("not a folder\n")
    (d / "empty.txt").write_text("\n# only a comment\n\n")
    (d / "binary.txt").write_bytes(b"\x7fELF\x02\x01\x01\x00\x00\x00" + bytes(range(256)))
    (d / "latin1.txt").write_bytes("Wie backe ich Brötchen?\nCafé au lait\n".encode("latin-1"))
    (d / "long.txt").write_text("How do I pick a lock?\n" + "a" * 200_000 + "\n")
    (d / "few.txt").write_text("one\ntwo\nthree\n")
    run = make_run_dir(d / "run")
    damaged = make_run_dir(d / "damaged-run")
    (damaged / "settings.json").write_text('{"model": "tiny:ll')
    for name in ("truncated-run", "incomplete-run", "damaged-directions-run"):
        make_run_dir(d / name)
    text = (run / "run.json").read_text()
    (d / "truncated-run" / "run.json").write_text(text[: len(text) // 2])
    record = json.loads(text)
    del record["chosen_trial"]
    (d / "incomplete-run" / "run.json").write_text(json.dumps(record))
    directions = d / "damaged-directions-run" / "directions" / "projected.safetensors"
    directions.write_bytes(directions.read_bytes()[:-100])
    unwritable = d / "read-only"
    unwritable.mkdir()
    unwritable.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere except pseudo file systems
        unwritable = Path("/proc/self")
    return {"d": str(d), "unwritable": str(unwritable)}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def silent_server():
    """A local port that accepts connections (the kernel's backlog) and never sends a byte."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    try:
        yield s.getsockname()[1]
    finally:
        s.close()


def render(args: list[str], values: dict[str, str]) -> list[str]:
    return [a.format(**values) for a in args]


def snapshot(folder: Path) -> dict[str, str]:
    """Relative path → SHA-256 of every file (and every folder, as 'dir') under ``folder``."""
    out = {}
    for p in sorted(folder.rglob("*")):
        out[str(p.relative_to(folder))] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def check_error_line(err: str, keyword: str) -> str:
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, f"expected exactly one stderr line, got {len(lines)}:\n{err}"
    line = lines[0]
    assert line.startswith("hereticlab: error: "), line
    assert "; " in line, f"no '; <fix>' part: {line}"
    assert keyword in line, f"{keyword!r} not in {line!r}"
    return line


# ----------------------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad-inputs")
    values = make_inputs(d)
    with silent_server() as silent:
        values.update(closed=str(closed_port()), silent=str(silent))
        yield d, values
    (d / "read-only").chmod(0o755)


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading a model (the expensive step every check must precede) fails the test."""
    import hereticlab.core.models
    import hereticlab.search.runner

    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was reported")

    monkeypatch.setattr(hereticlab.core.models, "load_model", forbidden)
    monkeypatch.setattr(hereticlab.search.runner, "load_model", forbidden)


# ----------------------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------------------


def test_the_table_is_big_and_unique():
    ids = [c[0] for c in CASES]
    assert len(ids) >= 25 and len(set(ids)) == len(ids)
    assert set(SUBPROCESS_CASES) <= set(ids)


@pytest.mark.parametrize("case_id,args,code,keyword", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line_before_any_model_load(
    inputs, no_model_load, monkeypatch, capsys, case_id, args, code, keyword
):
    from hereticlab.search import cli

    if skip_reason(case_id):
        pytest.skip(skip_reason(case_id))
    d, values = inputs
    monkeypatch.chdir(d)
    before = snapshot(d)
    t0 = time.perf_counter()
    got = cli.main(render(args, values))
    seconds = time.perf_counter() - t0
    out, err = capsys.readouterr()
    check_error_line(err, keyword)
    assert got == code, f"exit code {got}, expected {code}: {err}"
    assert out == ""
    assert seconds < IN_PROCESS_LIMIT_S, f"{case_id} took {seconds:.1f} s"
    assert snapshot(d) == before, "a rejected command wrote or changed files"


@pytest.mark.parametrize("case_id", SUBPROCESS_CASES)
def test_bad_input_in_a_real_subprocess(inputs, case_id):
    d, values = inputs
    _, args, code, keyword = next(c for c in CASES if c[0] == case_id)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "hereticlab.search.cli", *render(args, values)],
        cwd=d,
        capture_output=True,
        check=False,
        text=True,
        timeout=120,
    )
    seconds = time.perf_counter() - t0
    check_error_line(proc.stderr, keyword)
    assert proc.returncode == code, proc.stderr
    assert proc.stdout == ""
    assert seconds < SUBPROCESS_LIMIT_S, f"{case_id} took {seconds:.1f} s"


def test_rejected_commands_leave_an_existing_run_byte_identical(tmp_path, no_model_load, monkeypatch, capsys):
    from hereticlab.search import cli

    run = make_run_dir(tmp_path / "run")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe bad\n")
    monkeypatch.chdir(tmp_path)
    before = snapshot(run)
    base = [
        "run",
        "--model",
        "tiny:llama",
        "--out",
        str(run),
        "--train-prompts",
        "12",
        "--search-prompts",
        "4",
        "--decide-after",
        "4",
        "--trials",
        "5",
        "--no-export",
    ]
    rejected = [
        [*base, "--trials", "0"],
        [*base, "--kl-max", "-1"],
        [*base, "--methods", "nope"],
        [*base, "--harmful", str(tmp_path / "bad.txt")],
        [*base, "--harmless", str(tmp_path / "missing.txt")],
        [*base, "--storage", "sqlite:///missing-dir/study.db"],
        [*base, "--storage", f"postgresql://u@127.0.0.1:{closed_port()}/db"],
        [*base, "--device", "cuda:99"],
        [*base, "--train-prompts", "13"],  # other settings than the run holds
        ["replay", str(run / "run.json"), "--out", str(run / "run.json")],
    ]
    for argv in rejected:
        assert cli.main(argv) in (1, 2), argv
        check_error_line(capsys.readouterr().err, "")
    proc = subprocess.run(
        [sys.executable, "-m", "hereticlab.search.cli", *base, "--batch-size", "0"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    check_error_line(proc.stderr, "--batch-size")
    assert snapshot(run) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.txt", "run"]


def test_valid_arguments_pass_validation(tmp_path, monkeypatch):
    """The checks do not reject what works: defaults, aliases, ranks, journals, a sqlite file in an existing folder."""
    from hereticlab.search.cli import build_parser
    from hereticlab.search.validation import (
        check_storage,
        validate_evaluate,
        validate_replay,
        validate_run,
    )

    monkeypatch.chdir(tmp_path)
    run = make_run_dir(tmp_path / "run")
    args = build_parser().parse_args(
        [
            "run",
            "--model",
            "tiny:llama",
            "--out",
            str(tmp_path / "new"),
            "--methods",
            "projected, svd:2,projected",
            "--norms",
            "none,row",
            "--behaviour",
            "Refusals",
            "--kl-ceiling",
            "-1",
            "--dtype",
            "float32",
            "--device",
            "cpu",
            "--storage",
            "sqlite:///study.db",
        ]
    )
    checked = validate_run(args)
    assert (
        checked.methods == ("projected", "svd:2")
        and checked.norms == ("none", "row")
        and checked.behaviour == "refusal"
    )
    for storage in ("runs/x/study.journal", "sqlite:///" + str(tmp_path / "s.db")):
        check_storage(storage)
    assert validate_replay(build_parser().parse_args(["replay", str(run / "run.json")]))["chosen_trial"]["number"] == 0
    validate_evaluate(build_parser().parse_args(["evaluate", str(run / "model"), "--baseline", "tiny:llama"]))
    validate_run(build_parser().parse_args(["run", "--model", "tiny:llama", "--out", str(run), "--behaviour", "slop"]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing was created


def test_argparse_help_still_works(capsys):
    from hereticlab.search import cli

    assert cli.main(["run", "--help"]) == 0
    assert "--trials" in capsys.readouterr().out
