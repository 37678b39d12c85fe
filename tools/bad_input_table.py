"""Run every bad-input case of tests/test_cli_inputs.py as a real ``hereticlab`` subprocess; print a markdown table.

    .venv/bin/python tools/bad_input_table.py [CASE_ID ...]

Columns: the case, its arguments (run cases also get the safe base arguments ``RUN`` of the test file: a tiny
model and a temporary --out), the exit code, the one line printed on stderr, and the seconds from starting the
process until that line was printed (package import included). ``$D`` is the temporary folder of bad inputs;
``{closed}`` / ``{silent}`` are local ports where nothing listens / something accepts and never answers.
A case whose output is not exactly one ``hereticlab: error:`` line is marked ✗ and the script exits 1.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_cases():
    spec = importlib.util.spec_from_file_location("test_cli_inputs", ROOT / "tests" / "test_cli_inputs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_case(args: list[str], cwd: Path) -> tuple[int, str, float, str]:
    """(exit code, first stderr line, seconds until it appeared, all of stderr)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "hereticlab.search.cli", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    first = proc.stderr.readline()
    seconds = time.perf_counter() - t0
    rest = proc.stderr.read()
    proc.stdout.read()
    proc.wait(timeout=300)
    return proc.returncode, first.rstrip("\n"), seconds, first + rest


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def main(selected: list[str]) -> int:
    m = load_cases()
    cases = [c for c in m.CASES if not selected or c[0] in selected]
    failures = 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="hereticlab-bad-inputs-") as tmp:
        d = Path(tmp)
        values = m.make_inputs(d)
        with m.silent_server() as silent:
            values.update(closed=str(m.closed_port()), silent=str(silent))
            for case_id, args, code, keyword in cases:
                based = args[: len(m.RUN)] == m.RUN
                shown_text = ("run … " if based else "") + " ".join(args[len(m.RUN) :] if based else args)
                shown_text = (
                    shown_text.replace("{unwritable}", values["unwritable"]).replace("{d}", "$D").replace(str(d), "$D")
                )
                reason = m.skip_reason(case_id)
                if reason:
                    rows.append(f"| {case_id} | `{cell(shown_text)}` | – | skipped: {reason} | – |")
                    continue
                got, line, seconds, err = run_case(m.render(args, values), d)
                try:
                    m.check_error_line(err, keyword)
                    ok = got == code
                except AssertionError:
                    ok = False
                failures += not ok
                mark = "" if ok else " ✗"
                shown_line = cell(line.replace(str(d), "$D"))
                rows.append(f"| {case_id} | `{cell(shown_text)}` | {got}{mark} | `{shown_line}` | {seconds:.1f} |")
                print(f"{case_id}: {got} in {seconds:.1f} s", file=sys.stderr)
        (d / "read-only").chmod(0o755)
    print(
        f"Base arguments of every `run …` case: `{' '.join(m.RUN).replace('{d}', '$D')}`; `{{closed}}`: a local port "
        "where nothing listens, `{silent}`: one that accepts and never answers.\n"
    )
    print("| case | arguments | exit | line printed on stderr | s |")
    print("|---|---|---:|---|---:|")
    print("\n".join(rows))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
