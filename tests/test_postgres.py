"""Three `hereticlab run` workers share one study on a real PostgreSQL server.

The server comes from ``.ci/postgres-setup.sh`` (CI runs ``eval "$(bash .ci/postgres-setup.sh)"``), which exports
``HERETICLAB_TEST_POSTGRES=postgresql://user:pass@127.0.0.1:PORT/db``. Without it, or with the server down, the
test fails when ``CI`` is set and is skipped otherwise. Each run uses its own study name, so reruns on the same
database never collide; a passing run deletes its study again. The two other tests need no server: the storage
defaults (journal file, SQLite URLs untouched) and the per-trial seeding that keeps workers from repeating each
other's start-up trials.
"""

import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from itertools import pairwise

import optuna
import pytest

from hereticlab.search import database_url, make_storage

WORKERS = 3
PER_WORKER = 3
STARTUP = 6  # trials numbered below this are always drawn by the random sampler (fewer had finished before them)


def _unavailable(reason: str):
    """Fail in CI (a missing server must not turn into a silent skip there), skip elsewhere."""
    if os.environ.get("CI"):
        pytest.fail(f"CI is set but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def postgres_url():
    url = os.environ.get("HERETICLAB_TEST_POSTGRES")
    if not url:
        _unavailable('HERETICLAB_TEST_POSTGRES is not set (run: eval "$(sudo bash .ci/postgres-setup.sh)")')
    import importlib.util

    import sqlalchemy

    if not (importlib.util.find_spec("psycopg2") or importlib.util.find_spec("psycopg")):
        _unavailable("no PostgreSQL driver is installed (pip install psycopg2-binary)")
    engine = sqlalchemy.create_engine(database_url(url), connect_args={"connect_timeout": 5})
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - any failure to connect means the same thing here
        _unavailable(
            f"cannot reach the PostgreSQL server in HERETICLAB_TEST_POSTGRES ({type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else exc})"
        )
    finally:
        engine.dispose()
    return url


def _worker(url: str, study: str, out, log) -> subprocess.Popen:
    args = [
        "run",
        "--model",
        "tiny:llama",
        "--storage",
        url,
        "--study-name",
        study,
        "--out",
        str(out),
        "--worker-trials",
        str(PER_WORKER),
        "--startup-trials",
        str(STARTUP),
        "--train-prompts",
        "8",
        "--search-prompts",
        "4",
        "--decide-after",
        "4",
        "--batch-size",
        "8",
        "--kl-max",
        "1e9",
        "--no-export",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    # Output goes to a file, not a pipe: a full pipe would stall a worker until the test reads it.
    return subprocess.Popen(
        [sys.executable, "-m", "hereticlab.search.cli", *args], env=env, stdout=log, stderr=subprocess.STDOUT
    )


def test_three_workers_share_one_postgres_study(postgres_url, tmp_path):
    study_name = f"test-postgres-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
    logs = [tmp_path / f"w{k}.log" for k in range(WORKERS)]
    procs = []
    try:
        for k, log in enumerate(logs):
            with open(log, "w") as handle:
                procs.append(_worker(postgres_url, study_name, tmp_path / f"w{k}", handle))
        deadline = time.monotonic() + 240
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert all(p.returncode == 0 for p in procs), "\n\n".join(
        f"worker {k} (exit {p.returncode}), last lines of {log}:\n{log.read_text(errors='replace')[-3000:]}"
        for k, (p, log) in enumerate(zip(procs, logs))
    )

    storage = optuna.storages.RDBStorage(database_url(postgres_url))
    study = optuna.load_study(study_name=study_name, storage=storage)
    trials = study.get_trials(deepcopy=False)
    total = WORKERS * PER_WORKER

    # Every trial exactly once, numbered 0..n-1 without gaps, all finished. A trial over the KL ceiling is still
    # COMPLETE here (the runner records it with user attribute pruned=True), so no trial may be PRUNED or FAIL.
    numbers = [t.number for t in trials]
    assert sorted(numbers) == list(range(total)), numbers
    assert len({t._trial_id for t in trials}) == total
    states = Counter(t.state.name for t in trials)
    assert states == {"COMPLETE": total}, states
    assert all(len(t.values) == 2 for t in trials)
    # Each worker wrote its run directory, and the workers really ran at the same time: some trials overlap.
    assert all((tmp_path / f"w{k}" / "trials.csv").exists() for k in range(WORKERS))
    spans = sorted((t.datetime_start, t.datetime_complete) for t in trials)
    assert any(later[0] < earlier[1] for earlier, later in pairwise(spans)), "no two trials ran concurrently"

    # Start-up trials are random draws: workers sharing one seed must not replay the same random sequence.
    params = {t.number: tuple(sorted(t.user_attrs["params"].items())) for t in trials}
    startup = [params[n] for n in range(STARTUP)]
    assert len(set(startup)) == STARTUP, f"start-up trials repeat parameters: {Counter(startup).most_common(2)}"
    assert len(set(params.values())) == total, "two trials have identical parameters"

    # optuna-dashboard opens the study through its own storage loader.
    from optuna_dashboard._inmemory_cache import InMemoryCache
    from optuna_dashboard._storage import get_studies, get_trials
    from optuna_dashboard._storage_url import get_storage

    dash = get_storage(database_url(postgres_url))
    summaries = {s.study_name: s for s in get_studies(dash)}
    assert study_name in summaries
    summary = summaries[study_name]
    assert [d.name for d in summary.directions] == ["MINIMIZE", "MINIMIZE"]
    dash_trials = get_trials(InMemoryCache(), dash, summary._study_id)
    assert sorted(t.number for t in dash_trials) == list(range(total))
    assert {t.number: t.values for t in dash_trials} == {t.number: t.values for t in trials}

    pruned = sorted(t.number for t in trials if t.user_attrs.get("pruned"))
    print(f"{study_name}: trials {sorted(numbers)}, states {dict(states)}, over the KL ceiling (pruned attr) {pruned}")
    optuna.delete_study(study_name=study_name, storage=storage)


def test_storage_defaults_stay_journal_and_sqlite(tmp_path, monkeypatch):
    """No server needed: the journal file stays the single-machine default, SQLite URLs pass through untouched,
    and only a bare postgresql:// URL gets an explicit driver (psycopg2 when psycopg 3 is not installed)."""
    import importlib.util

    from optuna.storages import JournalStorage, RDBStorage

    assert isinstance(make_storage(None, tmp_path / "run"), JournalStorage)
    assert (tmp_path / "run" / "study.journal").exists()
    url = f"sqlite:///{tmp_path / 'study.db'}"
    assert database_url(url) == url
    assert isinstance(make_storage(url), RDBStorage) and (tmp_path / "study.db").exists()
    for explicit in ("postgresql+psycopg2://u:p@h:1/d", "postgresql+psycopg://u:p@h:1/d", "mysql://u:p@h/d"):
        assert database_url(explicit) == explicit
    real_find_spec = importlib.util.find_spec
    for installed, expected in (
        ({"psycopg2"}, "postgresql+psycopg2://u:p@h:1/d"),
        ({"psycopg", "psycopg2"}, "postgresql://u:p@h:1/d"),
        (set(), "postgresql://u:p@h:1/d"),
    ):

        def find_spec(name, *args, _installed=installed):
            if name in ("psycopg", "psycopg2"):
                return real_find_spec("os") if name in _installed else None
            return real_find_spec(name, *args)

        monkeypatch.setattr(importlib.util, "find_spec", find_spec)
        assert database_url("postgresql://u:p@h:1/d") == expected, installed


def test_shared_study_workers_do_not_repeat_startup_trials():
    """No server needed: three samplers with one seed on one storage (three workers) draw different start-up
    trials when the study is shared; a study that is not shared keeps Optuna's plain TPE sampler."""
    from hereticlab.search import SearchSpace, TrialSeededTPESampler, open_study

    storage = optuna.storages.InMemoryStorage()
    workers = [open_study("s", storage, seed=0, n_startup_trials=STARTUP, shared=True) for _ in range(WORKERS)]
    drawn = {}
    for _ in range(2):
        for study in workers:  # interleaved, as concurrent workers ask for trials
            trial = study.ask()
            drawn[trial.number] = tuple(sorted(SearchSpace().suggest(trial).items()))
            study.tell(trial, [1.0, 0.1])
    assert sorted(drawn) == list(range(2 * WORKERS)) and len(set(drawn.values())) == 2 * WORKERS
    # The n-th trial's draws depend on (seed, n) only: one worker alone reproduces the same parameters.
    alone = open_study("alone", storage, seed=0, n_startup_trials=STARTUP, shared=True)
    for number in range(2 * WORKERS):
        trial = alone.ask()
        assert tuple(sorted(SearchSpace().suggest(trial).items())) == drawn[number]
        alone.tell(trial, [1.0, 0.1])
    plain = open_study("plain", storage, seed=0, n_startup_trials=STARTUP)
    assert type(plain.sampler) is optuna.samplers.TPESampler
    assert isinstance(workers[0].sampler, TrialSeededTPESampler)


def test_make_storage_retries_the_schema_race_and_nothing_else(monkeypatch):
    """No server needed: workers starting together on a fresh database race to create Optuna's tables; the loser
    gets IntegrityError / OperationalError, or on PostgreSQL a ProgrammingError "relation ... already exists".
    Those are retried; any other ProgrammingError is one clear error at once."""
    import optuna.storages

    from hereticlab.search.study import SearchError

    class ProgrammingError(Exception):  # named like SQLAlchemy's: make_storage matches on the class name
        pass

    calls: list[str] = []

    def fake_storage(errors):
        def make(url, **_):
            calls.append(url)
            if errors:
                raise errors.pop(0)
            return "storage"

        return make

    monkeypatch.setattr("time.sleep", lambda _: None)
    race = ProgrammingError('(psycopg2.errors.DuplicateTable) relation "studies" already exists')
    monkeypatch.setattr(optuna.storages, "RDBStorage", fake_storage([race, race]))
    assert make_storage("sqlite:///x.db") == "storage" and len(calls) == 3

    calls.clear()
    wrong = ProgrammingError('(psycopg2.errors.UndefinedColumn) column "x" does not exist')
    monkeypatch.setattr(optuna.storages, "RDBStorage", fake_storage([wrong]))
    with pytest.raises(
        SearchError, match="cannot open storage 'sqlite:///x.db' \\(ProgrammingError: .*UndefinedColumn"
    ):
        make_storage("sqlite:///x.db")
    assert len(calls) == 1
