"""Time per search trial: Heretic itself (the ``heretic`` CLI, heretic-llm 1.4.0) vs hereticlab's ``TrialEvaluator``.

Both tools get the same model folder (the converted default model, or ``--model``), the same prompts
(``common.setup``: training prompts for the directions, evaluation prompts for the trials), the same system prompt,
batch size, dtype, thread count and number of trials.

1. Heretic runs first, headless, in its own venv (``.venv-heretic/``, created on first use: its pins conflict with
   ours). The prompts are written as local JSON-lines datasets, the settings as ``config.toml`` in a fresh run folder,
   so Heretic starts a new study there. Its set-up phases are timed from its output lines; every trial's wall time
   (``datetime_start`` → ``datetime_complete``), parameters, refusal count and KL come from the Optuna journal it
   writes. Its end-of-search menu is answered with "Exit program" through stdin (notebook-style numbered menus).
2. hereticlab then computes its own directions from the same training prompts and evaluates, with ``TrialEvaluator``
   (``decide_after=16``, ``max_new_tokens`` = Heretic's ``max_response_length`` = 100, Heretic's refusal markers
   read from its install), Heretic's own trial parameters mapped onto hereticlab's space (exact for
   ``--row-normalization none``, the default here) or, when the mapping is not exact, ``common.parameter_sets(n)``.
   A hereticlab trial's time covers building the edit, applying it, the evaluation and the exact revert; a Heretic
   trial's time covers its adapter reset, abliteration and evaluation (and its sampler's draw).

Prints the per-trial table (wall and CPU seconds, refusals, KL), both set-up breakdowns, mean time per trial and
the ratio, the agreement of the refusal counts and each tool's peak RSS. Everything (config, prompts, Heretic's log
and study, ``results.json``) is kept in the run folder. Notes: ``notes/issue-15-heretic.md``. Run with the project
venv::

    .venv/bin/python bench/heretic_side_by_side.py [--trials 10] [--prompts 32] [--batch-size 32]
    .venv/bin/python bench/heretic_side_by_side.py --dry-check   # pipeline check in a few minutes
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: everything here is local
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import parameter_sets, setup  # noqa: E402

import hereticlab as hl  # noqa: E402
from hereticlab.core.architecture import find_layers, find_writers  # noqa: E402
from hereticlab.core.models import resolve_model_source  # noqa: E402
from hereticlab.interventions.kernels import tent_kernel  # noqa: E402
from hereticlab.search import edits_from_params  # noqa: E402
from hereticlab.search.evaluator import TrialEvaluator  # noqa: E402
from hereticlab.search.study import layer_kernel  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HERETIC_VENV = ROOT / ".venv-heretic"
HERETIC_VERSION = "1.4.0"
TORCH_PIN = "torch==2.13.0"  # CPU wheel from the local index; an unpinned torch would pull a CUDA build
# Heretic component name → hereticlab component name (the writers each one edits: o_proj, down_proj).
COMPONENTS = {"attn.o_proj": "attn", "mlp.down_proj": "mlp"}
# Lines of Heretic's output that open each set-up phase (matched at the start of the stripped line).
PHASES = (
    ("model load", "Loading model"),
    ("training prompts", "Loading good prompts"),
    ("baseline KL log-probs", "Loading good evaluation prompts"),
    ("baseline refusals", "Loading bad evaluation prompts"),
    ("directions", "Calculating per-layer"),
)
FIRST_TRIAL = "Running trial"
TRIAL_DONE = "Elapsed time"  # printed right after a trial's evaluation
EXIT_CHOICE = re.compile(r"^\[(\d+)\] Exit program\s*$")

# Run inside Heretic's venv: the defaults we keep (markers, response length, system prompt, ...).
DEFAULTS_SCRIPT = """
import json
from heretic.config import Settings
fields = Settings.model_fields
names = ("refusal_markers", "max_response_length", "system_prompt", "row_normalization", "n_startup_trials",
         "full_normalization_lora_rank", "kl_divergence_target")
print(json.dumps({n: fields[n].default for n in names}, default=lambda v: getattr(v, "value", str(v))))
"""

# Run inside Heretic's venv (its own Optuna reads its own journal): every trial as JSON.
DUMP_SCRIPT = """
import json, sys
import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
study = optuna.load_study(study_name="heretic", storage=JournalStorage(JournalFileBackend(sys.argv[1])))
trials = [
    {"number": t.number, "state": t.state.name, "params": t.params, "user_attrs": t.user_attrs,
     "start": t.datetime_start.timestamp() if t.datetime_start else None,
     "complete": t.datetime_complete.timestamp() if t.datetime_complete else None}
    for t in study.trials
]
print(json.dumps({"study_attrs": study.user_attrs, "trials": trials}))
"""


# ----------------------------------------------------------------------------------------------------------
# Heretic's venv
# ----------------------------------------------------------------------------------------------------------


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def installed_version(python: Path, dist: str) -> str | None:
    code = f"import importlib.metadata as m\ntry: print(m.version({dist!r}))\nexcept m.PackageNotFoundError: pass"
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    return out or None


def ensure_heretic_venv(venv: Path = HERETIC_VENV) -> Path:
    """Create ``venv`` with the pinned CPU torch first, then heretic-llm; returns the ``heretic`` executable."""
    python = venv_python(venv)
    if not python.exists():
        print(f"creating {venv} (torch first, then heretic-llm=={HERETIC_VERSION}; a minute or two)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    if (installed_version(python, "torch") or "").split("+")[0] != TORCH_PIN.split("==")[1]:
        subprocess.run([*pip, TORCH_PIN], check=True)
    if installed_version(python, "heretic-llm") != HERETIC_VERSION:
        subprocess.run([*pip, f"heretic-llm=={HERETIC_VERSION}"], check=True)
    return venv / "bin" / "heretic"


def heretic_defaults(python: Path) -> dict[str, Any]:
    out = subprocess.run([str(python), "-c", DEFAULTS_SCRIPT], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


# ----------------------------------------------------------------------------------------------------------
# Heretic's inputs: datasets and config
# ----------------------------------------------------------------------------------------------------------


def write_dataset(folder: Path, prompts: list[str]) -> dict[str, str]:
    """A local JSON-lines dataset (one split, ``train``; column ``text``) that keeps every prompt byte for byte;
    returns its Heretic dataset specification."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "train.jsonl", "w", encoding="utf-8") as f:
        for prompt in prompts:
            f.write(json.dumps({"text": prompt}) + "\n")
    return {"dataset": str(folder), "split": "train", "column": "text"}


def toml_value(value: Any) -> str:
    """TOML for strings, numbers, booleans and lists of those (JSON's escapes are valid TOML)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def write_config(path: Path, settings: dict[str, Any], tables: dict[str, dict[str, str]]) -> None:
    lines = [f"{key} = {toml_value(value)}" for key, value in settings.items()]
    for name, table in tables.items():
        lines += ["", f"[{name}]"] + [f"{key} = {toml_value(value)}" for key, value in table.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------------------------
# Running Heretic
# ----------------------------------------------------------------------------------------------------------


@dataclass
class HereticRun:
    returncode: int
    wall_seconds: float
    peak_rss: int  # bytes, from the child's rusage
    lines: list[tuple[float, str]]  # (seconds since start, line)
    phases: dict[str, float] = field(default_factory=dict)  # phase → seconds
    setup_seconds: float | None = None  # start → first trial
    setup_cpu: float | None = None  # CPU seconds (all threads) up to the first trial
    trial_cpu: list[float] = field(default_factory=list)  # CPU seconds of each trial (reset, abliterate, evaluate)
    timed_out: bool = False


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of process ``pid`` (all its threads) from ``/proc``; None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def heretic_env(run_dir: Path, threads: int) -> dict[str, str]:
    """The environment Heretic runs in: offline, unbuffered and unwrapped output, numbered menus, ``threads``."""
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(run_dir / "datasets-cache"),
        "PYTHONUNBUFFERED": "1",  # line timestamps are taken as lines arrive
        "COLUMNS": "1000",  # no wrapping of Heretic's console lines
        "KAGGLE_KERNEL_RUN_TYPE": "Batch",  # Heretic's menus become numbered input() questions (answered by stdin)
        "OMP_NUM_THREADS": str(threads),
    }


def spawn_heretic(executable: Path, run_dir: Path, env: dict[str, str]) -> subprocess.Popen:
    """Start ``heretic`` in ``run_dir`` (it reads ``config.toml`` there) in its own process group, stdin a pipe for
    the menus, stdout and stderr merged."""
    return subprocess.Popen(
        [str(executable)],
        cwd=run_dir,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def run_heretic(executable: Path, run_dir: Path, env: dict[str, str], *, timeout: float, echo: bool) -> HereticRun:
    """Run ``heretic`` in ``run_dir`` (it reads ``config.toml`` there), answer its final menu with "Exit program",
    timestamp every output line and take the peak RSS from the child's resource usage."""
    log = open(run_dir / "heretic.log", "w", encoding="utf-8")
    start = time.perf_counter()
    proc = spawn_heretic(executable, run_dir, env)
    timed_out = threading.Event()

    def kill() -> None:
        timed_out.set()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    watchdog = threading.Timer(timeout, kill)
    watchdog.start()
    lines: list[tuple[float, str]] = []
    cpu_marks: list[tuple[str, float | None]] = []  # CPU time when a trial starts / ends
    assert proc.stdout is not None and proc.stdin is not None
    for raw in proc.stdout:
        t = time.perf_counter() - start
        line = raw.decode("utf-8", errors="replace").rstrip("\n")
        lines.append((t, line))
        if line.strip().startswith((FIRST_TRIAL, TRIAL_DONE)):
            cpu_marks.append((line.strip()[:7], cpu_seconds(proc.pid)))
        log.write(f"{t:9.2f}  {line}\n")
        log.flush()
        if echo:
            print(f"  heretic | {line}", flush=True)
        match = EXIT_CHOICE.match(line.strip())
        if match and not proc.stdin.closed:
            proc.stdin.write(f"{match.group(1)}\n".encode())
            proc.stdin.close()  # any further question reads end-of-file
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    watchdog.cancel()
    wall = time.perf_counter() - start
    log.close()

    phases: dict[str, float] = {}
    marks = [("start-up (imports)", 0.0)]
    for name, prefix in PHASES:
        t = next((t for t, line in lines if line.strip().startswith(prefix)), None)
        if t is not None:
            marks.append((name, t))
    first_trial = next((t for t, line in lines if line.strip().startswith(FIRST_TRIAL)), None)
    ends = [t for _, t in marks[1:]] + [first_trial if first_trial is not None else wall]
    for (name, t0), t1 in zip(marks, ends):
        phases[name] = t1 - t0
    trial_cpu = [
        end - begin
        for (kind, begin), (next_kind, end) in zip(cpu_marks, cpu_marks[1:])
        if kind == FIRST_TRIAL[:7] and next_kind == TRIAL_DONE[:7] and begin is not None and end is not None
    ]
    setup_cpu = next((c for kind, c in cpu_marks if kind == FIRST_TRIAL[:7]), None)
    return HereticRun(
        proc.returncode,
        wall,
        usage.ru_maxrss * 1024,
        lines,
        phases,
        first_trial,
        setup_cpu,
        trial_cpu,
        timed_out.is_set(),
    )


def read_study(python: Path, journal: Path) -> dict[str, Any]:
    out = subprocess.run([str(python), "-c", DUMP_SCRIPT, str(journal)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"could not read Heretic's study {journal}:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout)


# ----------------------------------------------------------------------------------------------------------
# Heretic's parameters in hereticlab's space
# ----------------------------------------------------------------------------------------------------------


def map_params(heretic_params: dict[str, Any], n_layers: int, norm: str) -> dict[str, Any]:
    """Heretic's raw trial parameters (layer units) → hereticlab's parameters (fractions), the same edit.

    Heretic: ``direction_index`` ``x`` (block units) selects the interpolated direction at residual ``x + 1``;
    ``max_weight_position``, ``min_weight_distance`` are block units; ``min_weight`` is sampled as a fraction of
    ``max_weight``. hereticlab: ``direction_index`` is a fraction of the last residual index ``L``; positions and
    reach are fractions of ``L − 1``; ``reach`` is clipped below at one block (Heretic samples it from [1, …]).
    """
    top = n_layers - 1
    scope = "global" if heretic_params["direction_scope"] == "global" else "per_layer"
    params: dict[str, Any] = {"method": "projected", "norm": norm, "kernel": "tent", "scope": scope}
    if scope == "global":
        params["direction_index"] = (float(heretic_params["direction_index"]) + 1.0) / n_layers
    for theirs, ours in COMPONENTS.items():
        params[f"{ours}.max_weight"] = float(heretic_params[f"{theirs}.max_weight"])
        params[f"{ours}.peak_position"] = float(heretic_params[f"{theirs}.max_weight_position"]) / top
        params[f"{ours}.min_weight_fraction"] = float(heretic_params[f"{theirs}.min_weight"])
        params[f"{ours}.reach"] = float(heretic_params[f"{theirs}.min_weight_distance"]) / top
    return params


def check_mapping(trial: dict[str, Any], params: dict[str, Any], n_layers: int) -> float:
    """Largest difference between the per-block strengths Heretic stored for ``trial`` (its user attributes, in
    block units) and the ones hereticlab derives from ``params``."""
    worst = 0.0
    for theirs, ours in COMPONENTS.items():
        p = trial["user_attrs"]["parameters"][theirs]
        peak, reach = p["max_weight_position"], p["min_weight_distance"]
        heretic = tent_kernel(n_layers, peak, p["max_weight"], p["min_weight"], reach)
        worst = max(worst, float((heretic - layer_kernel(params, ours, n_layers)).abs().max()))
    return worst


def describe(params: dict[str, Any]) -> str:
    if params.get("scope", "global") == "global":
        return f"global@{params['direction_index']:.2f}"
    return "per-layer"


# ----------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="packaged model name or model folder")
    parser.add_argument("--trials", type=int, default=None, help="default 10")
    parser.add_argument(
        "--prompts", type=int, default=None, help="harmful and harmless evaluation prompts per trial (default 32)"
    )
    parser.add_argument(
        "--train", type=int, default=None, help="harmful and harmless prompts for the directions (default 100)"
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--decide-after", type=int, default=16)
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="tokens per response for both tools (default: Heretic's max_response_length default, 100)",
    )
    parser.add_argument("--seed", type=int, default=0, help="Heretic's seed (its sampler draws the trials)")
    parser.add_argument(
        "--row-normalization",
        choices=("none", "full"),
        default="none",
        help="Heretic's row_normalization. 'none' (the default here) maps exactly onto hereticlab's norm 'none'; "
        "'full' (Heretic's own default) is a rank-3 randomized-SVD approximation of hereticlab's exact norm 'row'",
    )
    parser.add_argument(
        "--params",
        choices=("auto", "heretic", "benchmark"),
        default="auto",
        help="what hereticlab evaluates: Heretic's trials mapped onto its space, or common.parameter_sets(n); "
        "auto: Heretic's when the mapping is exact",
    )
    parser.add_argument(
        "--markers",
        choices=("heretic", "hereticlab"),
        default="heretic",
        help="refusal markers of hereticlab's detector (Heretic's defaults are read from its install)",
    )
    parser.add_argument("--system-prompt", default=None, help="for both tools (default: Heretic's default)")
    parser.add_argument(
        "--prefix-check",
        action="store_true",
        help="let Heretic look for a common response prefix (response_prefix unset); by default it is set to '' "
        "(no prefix), as hereticlab uses",
    )
    parser.add_argument("--run-dir", type=Path, default=None, help="default: runs/heretic_side_by_side/<time>")
    parser.add_argument("--heretic-timeout", type=float, default=4 * 3600, help="seconds before Heretic is killed")
    parser.add_argument("--show-heretic", action="store_true", help="echo Heretic's output as it runs")
    parser.add_argument(
        "--dry-check",
        action="store_true",
        help="pipeline check, not a measurement: 2 trials, 8+8 eval prompts, 16+16 train, 32 tokens per response "
        "(each unless given explicitly)",
    )
    args = parser.parse_args()
    small = args.dry_check
    args.trials = args.trials or (2 if small else 10)
    args.prompts = args.prompts or (8 if small else 32)
    args.train = args.train or (16 if small else 100)
    args.max_new_tokens = args.max_new_tokens or (32 if small else None)  # None: Heretic's default
    return args


def main() -> None:
    args = parse_args()
    heretic = ensure_heretic_venv()
    hpython = venv_python(HERETIC_VENV)
    defaults = heretic_defaults(hpython)
    system_prompt = args.system_prompt if args.system_prompt is not None else defaults["system_prompt"]
    max_new_tokens = args.max_new_tokens or defaults["max_response_length"]
    run_dir = (args.run_dir or ROOT / "runs" / "heretic_side_by_side" / time.strftime("%Y%m%d-%H%M%S")).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    if any((run_dir / "checkpoints").glob("*.jsonl")):
        sys.exit(f"{run_dir} already holds a Heretic study; pass a fresh --run-dir")

    # Same model and prompts for both tools; the system prompt made explicit so both render the same chat text.
    t0 = time.perf_counter()
    model, tok, htr, gtr, hev, gev = setup(args.model, n_train=args.train, n_eval=args.prompts)
    htr, gtr, hev, gev = (dataclasses.replace(p, system_prompt=system_prompt) for p in (htr, gtr, hev, gev))
    load_seconds = time.perf_counter() - t0
    folder = resolve_model_source(args.model)
    n_layers = len(find_layers(model))
    threads = torch.get_num_threads()
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    print(
        f"model {args.model} ({folder}), {dtype}, {n_layers} blocks; {args.trials} trials; "
        f"{len(hev)} harmful + {len(gev)} harmless eval prompts, {len(htr)} + {len(gtr)} training prompts; "
        f"batch {args.batch_size}; threads {threads} (both tools); run folder {run_dir}",
        flush=True,
    )

    # (a) Heretic
    data = run_dir / "data"
    tables = {
        "good_prompts": write_dataset(data / "good_train", list(gtr)),
        "bad_prompts": write_dataset(data / "bad_train", list(htr)),
        "good_evaluation_prompts": write_dataset(data / "good_eval", list(gev)),
        "bad_evaluation_prompts": write_dataset(data / "bad_eval", list(hev)),
    }
    settings: dict[str, Any] = {
        "model": str(folder),
        "dtypes": [dtype],
        "batch_size": args.batch_size,
        "n_trials": args.trials,
        "seed": args.seed,
        "row_normalization": args.row_normalization,
        "system_prompt": system_prompt,
        "study_checkpoint_dir": str(run_dir / "checkpoints"),
    }
    if max_new_tokens != defaults["max_response_length"]:
        settings["max_response_length"] = max_new_tokens
    if not args.prefix_check:
        settings["response_prefix"] = ""
    write_config(run_dir / "config.toml", settings, tables)
    env = heretic_env(run_dir, threads)
    print(f"running Heretic {HERETIC_VERSION} (log: {run_dir / 'heretic.log'})", flush=True)
    hrun = run_heretic(heretic, run_dir, env, timeout=args.heretic_timeout, echo=args.show_heretic)
    journals = sorted((run_dir / "checkpoints").glob("*.jsonl"))
    if hrun.timed_out or not journals:
        tail = "\n".join(line for _, line in hrun.lines[-30:])
        sys.exit(f"Heretic {'timed out' if hrun.timed_out else 'wrote no study'} (exit {hrun.returncode}):\n{tail}")
    study = read_study(hpython, journals[0])
    htrials = [t for t in study["trials"] if t["state"] == "COMPLETE"]
    if not htrials:
        sys.exit(f"Heretic finished no trial (exit {hrun.returncode}); see {run_dir / 'heretic.log'}")
    base_refusals_heretic = htrials[0]["user_attrs"]["base_refusals"]

    # (b) hereticlab: directions from the same training prompts, then the same trials
    exact = args.row_normalization == "none"
    use_heretic = args.params == "heretic" or (args.params == "auto" and exact)
    norm = "none" if exact else "row"
    if use_heretic:
        params = [map_params(t["params"], n_layers, norm) for t in htrials]
        mismatch = max(check_mapping(t, p, n_layers) for t, p in zip(htrials, params))
        mapping = f"Heretic's trials, {'exact' if exact else 'approximate (rank-3 SVD vs exact row norm)'} mapping"
        mapping += f", largest per-block strength difference {mismatch:.1e}"
    else:
        params = parameter_sets(len(htrials), seed=args.seed)
        mapping = "common.parameter_sets(n) (not Heretic's trials: refusal counts are not comparable per trial)"
    writers = find_writers(model, tuple(COMPONENTS.values()))
    kinds = sorted({w.name.rsplit(".", 1)[-1] for w in writers})
    markers = defaults["refusal_markers"] if args.markers == "heretic" else hl.MarkerDetector().markers
    detector = hl.MarkerDetector(markers=tuple(markers))

    t0 = time.perf_counter()
    dirs = hl.mean_difference(
        hl.capture_residuals(model, tok, htr, batch_size=args.batch_size, progress=False),
        hl.capture_residuals(model, tok, gtr, batch_size=args.batch_size, progress=False),
        project=True,
    )
    directions_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    fast = TrialEvaluator(
        model,
        tok,
        hev,
        gev,
        detector=detector,
        decide_after=args.decide_after,
        max_new_tokens=max_new_tokens,
        batch_size=args.batch_size,
        progress=False,
    )
    evaluator_seconds = time.perf_counter() - t0
    c0 = time.process_time()
    base = fast.baseline()
    base_cpu = time.process_time() - c0
    fast_times, fast_cpu, fast_results = [], [], []
    for p in params:
        t0, c0 = time.perf_counter(), time.process_time()
        result = fast.evaluate_edits(edits_from_params(model, dirs, p))
        fast_times.append(time.perf_counter() - t0)
        fast_cpu.append(time.process_time() - c0)
        fast_results.append(result)
    # CPU seconds (all threads) per Heretic trial, when every trial's start and end line were seen
    complete = len(hrun.trial_cpu) == len(htrials)
    heretic_cpu: list[float | None] = list(hrun.trial_cpu) if complete else [None] * len(htrials)
    peak_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    # Report
    print(
        f"\nHeretic: exit {hrun.returncode}, {len(htrials)} complete trials, row_normalization "
        f"{args.row_normalization}, {max_new_tokens} tokens per response, "
        f"{len(defaults['refusal_markers'])} default markers; hereticlab: decide_after {args.decide_after}, "
        f"max_new_tokens {max_new_tokens}, {args.markers}'s markers, writers edited: {', '.join(kinds)}"
    )
    print(f"hereticlab evaluates {mapping}")
    columns = (
        "trial", "params", "Heretic s", "hereticlab s", "ratio", "Heretic CPU s", "hereticlab CPU s",
        "Heretic refusals", "hereticlab refusals", "Heretic KL", "hereticlab KL", "start", "steps",
    )  # fmt: skip

    def line(*cells: object) -> str:
        return " ".join(f"{c!s:>{len(name)}}" for c, name in zip(cells, columns))

    n_bad = len(hev)
    print("\n" + line(*columns))
    print(
        line(
            "base",
            "unedited",
            "",
            f"{base.seconds:.1f}",
            "",
            "",
            f"{base_cpu:.1f}",
            f"{base_refusals_heretic}/{n_bad}",
            f"{base.refusals}/{n_bad}",
            "",
            f"{base.kl:.4f}",
            base.start_layer,
            base.decode_steps,
        )
    )
    heretic_times = []
    rows = []
    for t, p, fr, ft, hc, fc in zip(htrials, params, fast_results, fast_times, heretic_cpu, fast_cpu):
        hs = t["complete"] - t["start"]
        heretic_times.append(hs)
        ua = t["user_attrs"]
        print(
            line(
                t["number"],
                describe(p),
                f"{hs:.1f}",
                f"{ft:.1f}",
                f"{hs / ft:.1f}",
                "?" if hc is None else f"{hc:.1f}",
                f"{fc:.1f}",
                f"{ua['refusals']}/{n_bad}",
                f"{fr.refusals}/{n_bad}",
                f"{ua['kl_divergence']:.4f}",
                f"{fr.kl:.4f}",
                fr.start_layer,
                fr.decode_steps,
            )
        )
        rows.append(
            {
                "trial": t["number"],
                "heretic_params": t["params"],
                "hereticlab_params": p,
                "heretic_seconds": hs,
                "hereticlab_seconds": ft,
                "hereticlab_eval_seconds": fr.seconds,
                "heretic_cpu_seconds": hc,
                "hereticlab_cpu_seconds": fc,
                "heretic_refusals": ua["refusals"],
                "hereticlab_refusals": fr.refusals,
                "heretic_kl": ua["kl_divergence"],
                "hereticlab_kl": fr.kl,
                "start_layer": fr.start_layer,
                "decode_steps": fr.decode_steps,
            }
        )

    heretic_setup = hrun.setup_seconds
    fast_setup = load_seconds + directions_seconds + evaluator_seconds
    print("\nset-up (once per search):")
    print(
        "  Heretic    "
        + ", ".join(f"{name} {s:.1f} s" for name, s in hrun.phases.items())
        + (f"; total {heretic_setup:.1f} s (process start → first trial)" if heretic_setup is not None else "")
    )
    print(
        f"  hereticlab model + prompts {load_seconds:.1f} s, directions {directions_seconds:.1f} s, evaluator "
        f"(records prefix caches, baseline log-probs) {evaluator_seconds:.1f} s; total {fast_setup:.1f} s "
        f"(+ baseline refusals {base.seconds:.1f} s, which Heretic's set-up includes)"
    )
    t_heretic, t_fast = statistics.mean(heretic_times), statistics.mean(fast_times)
    print(
        f"time per trial (mean of {len(rows)}): Heretic {t_heretic:.1f} s, hereticlab {t_fast:.1f} s, "
        f"ratio {t_heretic / t_fast:.2f}x (median ratio "
        f"{statistics.median(h / f for h, f in zip(heretic_times, fast_times)):.2f}x)"
    )
    if complete:
        c_heretic, c_fast = statistics.mean(hrun.trial_cpu), statistics.mean(fast_cpu)
        print(
            f"CPU time per trial (all threads; less sensitive to other load on the machine): Heretic "
            f"{c_heretic:.1f} s, hereticlab {c_fast:.1f} s, ratio {c_heretic / c_fast:.2f}x"
        )
    print(f"Heretic wall time {hrun.wall_seconds:.1f} s in all (start-up, set-up, trials, exit)")
    if use_heretic:
        diffs = [r["heretic_refusals"] - r["hereticlab_refusals"] for r in rows]
        equal = sum(d == 0 for d in diffs)
        print(
            f"refusal counts: equal in {equal}/{len(diffs)} trials; mean |Heretic − hereticlab| "
            f"{statistics.mean(abs(d) for d in diffs):.2f} of {n_bad} prompts (max {max(map(abs, diffs))}); "
            f"mean signed difference {statistics.mean(diffs):+.2f}; unedited model {base_refusals_heretic} vs "
            f"{base.refusals}"
        )
    else:
        print("refusal counts: not comparable per trial (different parameter sets)")
    print(
        f"peak RSS: Heretic process {hrun.peak_rss / 2**30:.2f} GiB; this process (model, hereticlab) "
        f"{peak_self / 2**30:.2f} GiB"
    )
    results = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "model_folder": str(folder),
        "threads": threads,
        "max_new_tokens": max_new_tokens,
        "system_prompt": system_prompt,
        "mapping": mapping,
        "heretic": {
            "returncode": hrun.returncode,
            "wall_seconds": hrun.wall_seconds,
            "setup_seconds": heretic_setup,
            "setup_cpu_seconds": hrun.setup_cpu,
            "phases": hrun.phases,
            "peak_rss": hrun.peak_rss,
            "base_refusals": base_refusals_heretic,
            "defaults": defaults,
        },
        "hereticlab": {
            "load_seconds": load_seconds,
            "directions_seconds": directions_seconds,
            "evaluator_seconds": evaluator_seconds,
            "baseline_seconds": base.seconds,
            "base_refusals": base.refusals,
            "peak_rss": peak_self,
        },
        "trials": rows,
    }
    (run_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"results: {run_dir / 'results.json'}")


if __name__ == "__main__":
    main()
