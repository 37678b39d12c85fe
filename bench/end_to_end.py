"""Both tools' whole main job on the default model, then their chosen models judged by one evaluator.

hereticlab: a finished ``hereticlab run`` folder (``--hereticlab-run``, e.g. the ``runs/default`` that ``make run``
wrote; its wall time and peak RSS come from ``/usr/bin/time -v make run``, passed in with ``--hereticlab-wall`` and
``--hereticlab-rss-gib`` so that this script does not have to rerun it).
Heretic 1.4.0 (its own venv, see ``heretic_side_by_side.py``): run as shipped (its defaults, including
``row_normalization = full``) on the same model folder with hereticlab's splits — the same 200 + 200 training prompts
for its directions, the same 32 + 32 search prompts for its trials, the same chat template system prompt — stopped
by SIGINT when ``--budget`` seconds have passed since its start (its study keeps every finished trial). Heretic
leaves the choice of a trial to a person, so the script applies hereticlab's rule to Heretic's own Pareto menu (the
lowest refusals with KL ≤ ``--kl-max``, then the lowest KL) and exports that trial through Heretic's menus as a
merged model folder. Both exported folders and the unedited model are then judged by ``held_out.py`` on the test
prompts neither tool saw.

    python bench/end_to_end.py --hereticlab-run runs/default --hereticlab-wall 491 --hereticlab-rss-gib 3.87 \
        [--budget 1200] [--run-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from heretic_side_by_side import (  # noqa: E402
    HERETIC_VENV,
    ensure_heretic_venv,
    heretic_env,
    read_study,
    spawn_heretic,
    venv_python,
    write_config,
    write_dataset,
)

from hereticlab.core.models import resolve_model_source  # noqa: E402
from hereticlab.search.runner import RunConfig, prompt_splits  # noqa: E402

MENU_TRIAL = re.compile(r"^\[(\d+)\] \[Trial\s+(\d+)\] Refusals:\s*(\d+)/(\d+), KL divergence: ([0-9.]+)\s*$")
MENU_EXIT = re.compile(r"^\[(\d+)\] Exit program\s*$")


def template_system_prompt(folder: str) -> str | None:
    """The system prompt the chat template inserts when none is given (Qwen's), so Heretic can be handed the same
    text; checked by rendering both ways."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    user = [{"role": "user", "content": "x"}]
    bare = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    found = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", bare, flags=re.S)
    if not found:
        return None
    system = found.group(1)
    explicit = tok.apply_chat_template(
        [{"role": "system", "content": system}, *user], tokenize=False, add_generation_prompt=True
    )
    assert explicit == bare, "the template renders the default system prompt differently when it is passed"
    return system


def run_heretic_for(run_dir: Path, env: dict[str, str], budget: float, kl_max: float, export: Path) -> dict:
    """Run Heretic in ``run_dir``; SIGINT at ``budget`` s; choose from its menu by hereticlab's rule; export."""
    proc = spawn_heretic(HERETIC_VENV / "bin" / "heretic", run_dir, env)
    start = time.perf_counter()
    stopped = threading.Event()

    def stop() -> None:
        stopped.set()
        os.killpg(proc.pid, signal.SIGINT)

    timer = threading.Timer(budget, stop)
    timer.start()
    menu: list[tuple[int, int, int, float]] = []  # (menu number, trial, refusals, kl)
    chosen, answered = None, False
    log = open(run_dir / "heretic.log", "w", encoding="utf-8")
    assert proc.stdout is not None and proc.stdin is not None
    for raw in proc.stdout:
        line = raw.decode("utf-8", errors="replace").rstrip("\n")
        log.write(f"{time.perf_counter() - start:9.2f}  {line}\n")
        log.flush()
        if m := MENU_TRIAL.match(line.strip()):
            menu.append((int(m.group(1)), int(m.group(2)), int(m.group(3)), float(m.group(5))))
        elif (m := MENU_EXIT.match(line.strip())) and not answered:
            timer.cancel()
            allowed = [row for row in menu if row[3] <= kl_max] or menu
            chosen = min(allowed, key=lambda row: (row[2], row[3]))
            # trial → save to a local folder → path → return → exit (Heretic's numbered notebook-mode menus)
            proc.stdin.write(f"{chosen[0]}\n1\n{export}\n5\n{m.group(1)}\n".encode())
            proc.stdin.close()
            answered = True
    _, status, usage = os.wait4(proc.pid, 0)
    timer.cancel()
    log.close()
    return {
        "returncode": os.waitstatus_to_exitcode(status),
        "wall_seconds": time.perf_counter() - start,
        "stopped_by_budget": stopped.is_set(),
        "peak_rss": usage.ru_maxrss * 1024,
        "menu": menu,
        "chosen": chosen,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hereticlab-run", type=Path, required=True)
    parser.add_argument("--hereticlab-wall", type=float, required=True, help="seconds, from /usr/bin/time")
    parser.add_argument("--hereticlab-rss-gib", type=float, required=True, help="peak RSS, from /usr/bin/time")
    parser.add_argument("--budget", type=float, default=1200.0)
    parser.add_argument("--kl-max", type=float, default=0.2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--run-dir", type=Path, default=Path("runs/end_to_end") / time.strftime("%Y%m%d-%H%M%S"))
    args = parser.parse_args()
    record_path = args.hereticlab_run / "run.json"
    if not (record_path.is_file() and (args.hereticlab_run / "model" / "config.json").is_file()):
        sys.exit(
            f"end_to_end.py: {args.hereticlab_run} is not a finished hereticlab run (run.json + model/); run "
            "`make run` first"
        )
    record = json.loads(record_path.read_text())

    folder = resolve_model_source("default")
    splits = prompt_splits(RunConfig())
    system = splits["bad_search"].system_prompt or template_system_prompt(folder)
    run_dir = args.run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    tables = {
        name: write_dataset(run_dir / "data" / name, list(splits[key]))
        for name, key in (
            ("bad_prompts", "bad_train"),
            ("good_prompts", "good_train"),
            ("bad_evaluation_prompts", "bad_search"),
            ("good_evaluation_prompts", "good_search"),
        )
    }
    settings = {
        "model": folder,
        "dtypes": ["float32"],
        "batch_size": args.batch_size,
        "n_trials": 10_000,  # stopped by the budget
        "seed": 0,
        "system_prompt": system,
        "study_checkpoint_dir": str(run_dir / "checkpoints"),
        "export_strategy": "merge",
    }
    write_config(run_dir / "config.toml", settings, tables)
    ensure_heretic_venv()
    env = heretic_env(run_dir, torch.get_num_threads())
    print(
        f"Heretic 1.4.0 as shipped, budget {args.budget:.0f} s, splits {len(splits['bad_train'])}+"
        f"{len(splits['good_train'])} train, {len(splits['bad_search'])}+{len(splits['good_search'])} search; "
        f"system prompt {system!r}; run folder {run_dir}",
        flush=True,
    )
    export = run_dir / "heretic_model"
    heretic = run_heretic_for(run_dir, env, args.budget, args.kl_max, export)
    journal = next((run_dir / "checkpoints").glob("*.jsonl"))
    study = read_study(venv_python(HERETIC_VENV), journal)
    complete = [t for t in study["trials"] if t["state"] == "COMPLETE"]
    first_start = min(t["start"] for t in study["trials"] if t["start"])
    print(
        f"Heretic: exit {heretic['returncode']}, stopped by the budget: {heretic['stopped_by_budget']}, "
        f"{len(complete)} complete trials, chosen menu row {heretic['chosen']}, wall {heretic['wall_seconds']:.0f} s "
        f"(incl. export), peak RSS {heretic['peak_rss'] / 2**30:.2f} GiB",
        flush=True,
    )
    chosen = record["chosen_trial"]
    print(
        f"hereticlab: {record['n_trials']} trials, wall {args.hereticlab_wall:.0f} s (make run), peak RSS "
        f"{args.hereticlab_rss_gib:.2f} GiB, chosen trial #{chosen['number']} "
        f"(search: {chosen.get('refusals')} refusals, KL {chosen.get('kl')})",
        flush=True,
    )
    if not (export / "config.json").is_file():
        sys.exit(f"end_to_end.py: Heretic exported no model to {export}; see {run_dir / 'heretic.log'}")
    (run_dir / "heretic_study.json").write_text(json.dumps({"first_trial_start": first_start, **study}))
    subprocess.run(
        [
            sys.executable,
            str(Path(__file__).resolve().parent / "held_out.py"),
            "--model",
            f"hereticlab={args.hereticlab_run.resolve() / 'model'}",
            "--model",
            f"heretic={export}",
            "--json",
            str(run_dir / "held_out.json"),
        ],
        check=True,
    )


if __name__ == "__main__":
    main()
