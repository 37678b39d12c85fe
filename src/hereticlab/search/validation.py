"""Cheap checks of every ``hereticlab`` command-line argument, run before any model is loaded or file written.

Each check raises ``InputError`` (exit code 2: the command line is wrong) or ``EnvironmentProblem`` (exit code 1:
the command is fine but this machine cannot serve it: no GPU, a database server that does not answer, a folder
that cannot be written). Both carry a *problem* and a *fix*; ``str(error)`` is ``"<problem>; <fix>"``, which the
CLI prints as ``hereticlab: error: <problem>; <fix>``.

Nothing here loads a model, writes a file or opens a study: reading prompt sets, ``run.json`` and safetensors
headers, looking at the file system and one 2-second TCP connect to a database server is all it does.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # core.prompts is imported by the check itself (cheap start-up)
    from ..core.prompts import PromptSet

#: Longest prompt accepted (characters). A 200,000-character line is a file that is not one prompt per line, and
#: would cost minutes of padding per batch before failing on the model's context length.
MAX_PROMPT_CHARS = 20_000
#: Seconds to wait for a TCP connection to a database server named in ``--storage``.
CONNECT_TIMEOUT_S = 2.0
DTYPES = ("float32", "bfloat16", "float16", "float64")
# Direction methods that give one direction per layer (``name:k`` with k > 1 is an error for these).
RANK_ONE_ONLY = ("mean_difference", "projected", "median", "probe")
# Storage dialects Optuna supports: name → (label, default port, driver modules a bare URL can use).
DIALECTS = {
    "postgresql": ("PostgreSQL", 5432, ("psycopg", "psycopg2")),  # see search.database_url
    "mysql": ("MySQL", 3306, ("MySQLdb",)),
    "mariadb": ("MariaDB", 3306, ("MySQLdb",)),
}
# SQLAlchemy driver name → (module to import, pip package).
DRIVERS = {
    "psycopg2": ("psycopg2", "psycopg2-binary"),
    "psycopg": ("psycopg", "'psycopg[binary]'"),
    "pg8000": ("pg8000", "pg8000"),
    "pymysql": ("pymysql", "PyMySQL"),
    "mysqldb": ("MySQLdb", "mysqlclient"),
    "mysqlconnector": ("mysql.connector", "mysql-connector-python"),
    "mariadbconnector": ("mariadb", "mariadb"),
}
_MODULE_PIP = {module: pip for module, pip in DRIVERS.values()}


class InputError(Exception):
    """A command-line argument is wrong (exit code 2). ``problem`` says what, ``fix`` what to do instead."""

    exit_code = 2

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(f"{problem}; {fix}")
        self.problem, self.fix = problem, fix


class EnvironmentProblem(InputError):
    """The arguments are valid but this machine cannot serve them (exit code 1)."""

    exit_code = 1


# ----------------------------------------------------------------------------------------------------------
# Numbers and names
# ----------------------------------------------------------------------------------------------------------


def check_count(flag: str, value: int | None, minimum: int = 1) -> None:
    """``value`` (when given) is an integer ≥ ``minimum``."""
    if value is not None and value < minimum:
        raise InputError(f"{flag} must be at least {minimum}, got {value}", f"pass {flag} {max(minimum, 1)} or more")


def check_seed(flag: str, value: int) -> None:
    if not 0 <= value < 2**32:
        raise InputError(f"{flag} must be between 0 and 2**32 - 1, got {value}", f"pass a non-negative {flag}")


def check_kl(flag: str, value: float, *, allow_negative: bool = False) -> None:
    """A finite KL bound; positive unless ``allow_negative`` (where a negative value means 'off')."""
    if not math.isfinite(value):
        raise InputError(f"{flag} must be a finite number, got {value}", f"pass e.g. {flag} 0.2")
    if not allow_negative and value <= 0:
        raise InputError(f"{flag} must be greater than 0, got {value} (KL is never negative)", f"pass e.g. {flag} 0.2")


def _split_list(flag: str, text: str) -> list[str]:
    items = [part.strip() for part in text.split(",") if part.strip()]
    if not items:
        raise InputError(
            f"{flag} is empty", f"pass at least one name, e.g. {flag} {'projected' if 'method' in flag else 'none'}"
        )
    return items


def check_methods(text: str, *, train_prompts: int | None = None) -> tuple[str, ...]:
    """``--methods``: comma-separated ``name`` or ``name:k`` (k ≥ 1; k > 1 only for subspace methods)."""
    from ..directions.methods import DIRECTION_METHODS

    known = ", ".join(DIRECTION_METHODS)
    out = []
    for item in _split_list("--methods", text):
        name, colon, rank_text = item.partition(":")
        if name not in DIRECTION_METHODS:
            raise InputError(
                f"--methods: unknown direction method {name!r}",
                f"choose from {known} (append :k for a rank, e.g. svd:2)",
            )
        if colon:
            if not rank_text.isdigit() or int(rank_text) < 1:
                raise InputError(
                    f"--methods: rank {rank_text!r} in {item!r} is not a positive integer", f"write e.g. {name}:2"
                )
            rank = int(rank_text)
            if rank > 1 and name in RANK_ONE_ONLY:
                raise InputError(
                    f"--methods: {name} gives one direction per layer, not rank {rank}",
                    "use svd:k, pca_pairs:k or cluster:k for a subspace",
                )
            if train_prompts is not None and rank > train_prompts:
                raise InputError(
                    f"--methods: rank {rank} in {item!r} exceeds --train-prompts={train_prompts}",
                    "lower the rank or raise --train-prompts",
                )
        if item not in out:
            out.append(item)
    return tuple(out)


def check_norms(text: str) -> tuple[str, ...]:
    from ..interventions.edits import NORM_MODES

    out = []
    for item in _split_list("--norms", text):
        if item not in NORM_MODES:
            raise InputError(f"--norms: unknown norm mode {item!r}", f"choose from {', '.join(NORM_MODES)}")
        if item not in out:
            out.append(item)
    return tuple(out)


def check_objectives(text: str) -> tuple[str, ...]:
    """``--objectives``: ``refusals,kl`` or ``refusals,kl,nll`` (the NLL proxy as a third objective)."""
    from .study import KNOWN_OBJECTIVES

    items = tuple(_split_list("--objectives", text))
    allowed = (KNOWN_OBJECTIVES[:2], KNOWN_OBJECTIVES)
    if items not in allowed:
        raise InputError(
            f"--objectives {text!r} is not one of: {' | '.join(','.join(a) for a in allowed)}",
            "pass --objectives refusals,kl (default) or refusals,kl,nll",
        )
    return items


def check_behaviour(name: str) -> str:
    """The canonical behaviour name (aliases resolved); raises for an unknown one."""
    from ..measure.behaviours import ALIASES, BEHAVIOURS

    key = ALIASES.get(name.strip().lower(), name.strip().lower())
    if key not in BEHAVIOURS:
        raise InputError(f"--behaviour: unknown behaviour {name!r}", f"choose from {', '.join(sorted(BEHAVIOURS))}")
    return key


def check_dtype(text: str | None, flag: str = "--dtype") -> None:
    if text is not None and text not in DTYPES:
        raise InputError(
            f"{flag}: unknown dtype {text!r}",
            f"choose from {', '.join(DTYPES)} (or leave it out: fp32 on CPU, bf16 on CUDA)",
        )


def check_device(text: str | None, flag: str = "--device") -> None:
    """A device string torch understands and this machine has (``cuda`` needs a visible GPU)."""
    if text is None:
        return
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise InputError(f"{flag}: unknown device {text!r}", "use cpu, cuda, cuda:N or mps (or leave it out)") from None
    with warnings.catch_warnings():  # a broken driver warns on the first CUDA query; the error below says it all
        warnings.simplefilter("ignore")
        if device.type == "cuda":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if count == 0:
                raise EnvironmentProblem(
                    f"{flag} {text}: no CUDA GPU is visible on this machine",
                    "use --device cpu (or leave --device out), or run on a machine with a GPU",
                )
            if device.index is not None and device.index >= count:
                raise EnvironmentProblem(
                    f"{flag} {text}: this machine has {count} CUDA GPU(s) (cuda:0..cuda:{count - 1})",
                    "pass an existing index or plain cuda",
                )
        elif device.type == "mps":
            if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
                raise EnvironmentProblem(f"{flag} mps: Apple MPS is not available on this machine", "use --device cpu")
        elif device.type != "cpu":
            raise InputError(f"{flag}: device type {device.type!r} is not supported", "use cpu, cuda, cuda:N or mps")


# ----------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------

_WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")


def check_model(name: str, flag: str = "--model") -> None:
    """The model can be found without loading it: ``tiny:<family>``, a packaged model, a folder, or a cached hub id."""
    from ..core.models import PACKAGED_MODELS, ModelLoadError, _packaged_files, cache_dir

    if not name.strip():
        raise InputError(f"{flag} is empty", "pass 'default', a model folder or a cached hub id")
    if name.startswith("tiny:"):
        from ..core.testing import ALL_FAMILIES

        family = name.split(":", 1)[1]
        if family not in ALL_FAMILIES:
            raise InputError(
                f"{flag}: unknown tiny model family {family!r}",
                f"use tiny:<family> with one of {', '.join(ALL_FAMILIES)}",
            )
        return
    if name in PACKAGED_MODELS:
        folder = cache_dir() / PACKAGED_MODELS[name].key
        if (folder / "config.json").is_file() and (folder / ".complete").is_file():
            return
        try:
            _packaged_files(PACKAGED_MODELS[name])  # package metadata only; nothing is read or converted
        except ModelLoadError as exc:
            problem, _, fix = str(exc).partition("; ")
            raise EnvironmentProblem(
                f"{flag} {name}: {problem}", fix or "reinstall hereticlab's model packages"
            ) from None
        return
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise InputError(
                f"{flag} {name} is a file, not a model folder",
                "pass the folder that holds config.json (e.g. runs/default/model)",
            )
        if not (path / "config.json").is_file():
            raise InputError(
                f"{flag} {name} is not a model folder (no config.json)",
                "pass a folder saved by save_pretrained (e.g. runs/default/model)",
            )
        if not any(any(path.glob(pattern)) for pattern in _WEIGHT_GLOBS):
            raise InputError(
                f"{flag} {name} has a config.json but no weights (*.safetensors or *.bin)",
                "export the model again (hereticlab run / replay) or pass a complete folder",
            )
        return
    if name.count("/") > 1 or name.startswith((".", "/", "~")) or name.endswith("/"):
        raise InputError(
            f"no model folder at {name} ({flag})", "check the path ('hereticlab run' writes one to <out>/model)"
        )
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(name, local_files_only=True)
    except Exception:  # noqa: BLE001 - any failure means: not usable offline
        raise InputError(
            f"{flag} {name!r} is neither a local folder nor a hub id in the local Hugging Face cache",
            "pass an existing model folder, 'default' or tiny:llama (this machine is offline)",
        ) from None


# ----------------------------------------------------------------------------------------------------------
# Prompt sets
# ----------------------------------------------------------------------------------------------------------


def check_prompts(source: str, flag: str) -> PromptSet:
    """Load a prompt set (cheap) and check every prompt's length; returns the ``PromptSet``."""
    from ..core.prompts import PromptError, load_prompts

    try:
        prompts = load_prompts(source)
    except PromptError as exc:
        problem, _, fix = str(exc).partition("; ")
        raise InputError(
            f"{flag}: {problem}", fix or "pass a named set or a text file with one prompt per line"
        ) from None
    for i, prompt in enumerate(prompts):
        if len(prompt) > MAX_PROMPT_CHARS:
            raise InputError(
                f"{flag}: prompt #{i + 1} of {source} is {len(prompt):,} characters long (limit {MAX_PROMPT_CHARS:,})",
                "shorten it, or check that the file holds one prompt per line",
            )
    return prompts


def check_run_split(prompts: PromptSet, flag: str, train: int, search: int) -> None:
    """``hereticlab run`` cuts each set into train + search + test; the test part needs at least one prompt."""
    n, need = len(prompts), train + search + 1
    if train >= n:
        most = n - search - 1
        fix = (
            f"lower --train-prompts to at most {most} (with --search-prompts {search}) or add prompts"
            if most >= 1
            else f"add prompts: with --search-prompts {search} the set needs at least {search + 2} "
            "(train + search + 1 test)"
        )
        raise InputError(f"--train-prompts={train} but {flag} {prompts.name} has only {n} prompts", fix)
    if n < need:
        raise InputError(
            f"{flag} {prompts.name} has {n} prompts but the split needs {need} "
            f"(--train-prompts {train} + --search-prompts {search} + at least 1 test prompt)",
            f"lower --search-prompts to at most {n - train - 1}, lower --train-prompts, or add prompts",
        )


# ----------------------------------------------------------------------------------------------------------
# Folders, files and storage
# ----------------------------------------------------------------------------------------------------------


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable_folder(path_text: str | Path, flag: str) -> Path:
    """``path_text`` is an existing writable folder, or can be created (its nearest existing ancestor is a
    writable folder). An existing folder is only looked at (never written to)."""
    path = Path(path_text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise InputError(
                f"{flag} {path} is an existing file, not a folder",
                f"pass a folder path to {flag} (it is created when missing)",
            )
        if not os.access(path, os.W_OK | os.X_OK):
            raise EnvironmentProblem(f"{flag} {path} is not writable", "fix its permissions or pass another folder")
        return path
    ancestor = _nearest_existing(path)
    if not ancestor.is_dir():
        raise InputError(
            f"{flag} {path} cannot be created: {ancestor} is a file", "pass a path whose parents are folders"
        )
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise EnvironmentProblem(
            f"{flag} {path} cannot be created: {ancestor} is not writable", "pass a folder you can write to"
        )
    try:  # os.access says yes to root everywhere; an empty probe folder, removed at once, tells the truth
        os.rmdir(tempfile.mkdtemp(prefix=".hereticlab-probe-", dir=ancestor))
    except OSError as exc:
        raise EnvironmentProblem(
            f"{flag} {path} cannot be created: {ancestor} is not writable ({exc.strerror or exc})",
            "pass a folder you can write to",
        ) from None
    return path


def check_run_dir(path_text: str) -> Path:
    """``--out`` of ``run``: a writable folder; when it already holds a run, its ``settings.json`` must parse."""
    path = check_writable_folder(path_text, "--out")
    settings = path / "settings.json"
    if settings.exists():
        try:
            data = json.loads(settings.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise EnvironmentProblem(
                f"{settings} is damaged ({_short(exc)}), so the run in {path} cannot be resumed",
                "restore that file, or pass another --out for a new run",
            ) from None
        if not isinstance(data, dict):
            raise EnvironmentProblem(
                f"{settings} does not hold run settings", "restore that file, or pass another --out"
            )
    return path


def _short(exc: Exception) -> str:
    return " ".join(str(exc).split())[:120]


def _installed(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _check_driver(modules: tuple[str, ...], storage: str) -> None:
    """At least one of ``modules`` (database drivers) is installed."""
    if not any(_installed(m) for m in modules):
        pip = " or ".join(_MODULE_PIP.get(m, m) for m in modules)
        raise EnvironmentProblem(
            f"--storage {storage!r} needs the database driver {' or '.join(modules)}, which is not installed",
            f"pip install {pip}, or use sqlite:///study.db",
        )


def _check_sqlite(database: str | None, storage: str, query: dict) -> None:
    if not database or database == ":memory:" or database.startswith("file::memory:"):
        raise InputError(
            f"--storage {storage!r} is an in-memory database: every trial would be lost when the run ends",
            "pass a file, e.g. sqlite:///study.db",
        )
    if query.get("uri") or database.startswith("file:"):
        return  # SQLite URI filenames: leave them to SQLite
    path = Path(database).expanduser()
    if path.is_dir():
        raise InputError(
            f"cannot open storage {storage!r}: {path} is a folder", "name a database file, e.g. sqlite:///study.db"
        )
    parent = path.parent
    if not parent.is_dir():
        what = "is a file, not a directory" if parent.exists() else "does not exist"
        raise InputError(
            f"cannot open storage {storage!r}: directory {parent} {what}",
            f"create it first (mkdir -p {parent}) or put the database in an existing folder",
        )
    if path.exists():
        try:
            with open(path, "rb") as f:
                head = f.read(16)
        except OSError as exc:
            raise EnvironmentProblem(
                f"cannot open storage {storage!r}: {path} is not readable ({exc.strerror})", "fix its permissions"
            ) from None
        if head and head != b"SQLite format 3\0":
            raise InputError(
                f"cannot open storage {storage!r}: {path} is not a SQLite database",
                "name a new file or an existing Optuna SQLite database",
            )
        if not os.access(path, os.W_OK):
            raise EnvironmentProblem(f"cannot open storage {storage!r}: {path} is read-only", "fix its permissions")
    else:
        check_writable_folder(parent, "--storage folder")


def _greeting_problem(sock: socket.socket, dialect: str) -> str | None:
    """None when the peer speaks ``dialect``'s wire protocol; else what it did instead. No login is attempted:
    PostgreSQL is asked whether it does SSL (one byte back: S or N), MySQL/MariaDB greet first (protocol 10)."""
    try:
        if dialect == "postgresql":
            sock.sendall((8).to_bytes(4, "big") + (80877103).to_bytes(4, "big"))  # SSLRequest
            reply = sock.recv(1)
            return None if reply in (b"S", b"N", b"E") else f"its first byte was {reply[:1]!r}"
        head = sock.recv(5)
        if len(head) == 5 and head[4] in (10, 0xFF):  # handshake v10, or an error packet (e.g. host not allowed)
            return None
        return f"its greeting began {head[:5]!r}" if head else "it closed the connection without a greeting"
    except TimeoutError:
        return f"no protocol answer within {sock.gettimeout():g} s"
    except OSError as exc:
        return (exc.strerror or str(exc)).lower()


def check_reachable(
    host: str, port: int, label: str, storage: str, *, dialect: str = "postgresql", timeout: float = CONNECT_TIMEOUT_S
) -> None:
    """One TCP connect to ``host:port`` (``timeout`` seconds) and a look at the server's first protocol bytes;
    raises ``EnvironmentProblem`` when nothing answers or something else (a proxy, a web server) does."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            reason = _greeting_problem(sock, dialect)
            if reason is None:
                return
            raise EnvironmentProblem(
                f"the server at {host}:{port} named in --storage does not answer like a {label} server ({reason})",
                "fix host/port in the URL, or use sqlite:///study.db",
            )
    except socket.gaierror:
        reason = "unknown host"
    except TimeoutError:
        reason = f"no answer within {timeout:g} s"
    except OSError as exc:
        reason = (exc.strerror or str(exc)).lower()
    raise EnvironmentProblem(
        f"cannot reach the {label} server at {host}:{port} for --storage ({reason})",
        "start the server, fix host/port in the URL, or use sqlite:///study.db",
    )


def check_storage(storage: str | None) -> None:
    """``--storage``: a ``.journal`` file, ``sqlite:///file.db`` in an existing folder, or a reachable server URL."""
    if storage is None:
        return
    if not storage.strip():
        raise InputError(
            "--storage is empty", "leave it out (the study goes to <out>/study.journal) or pass sqlite:///study.db"
        )
    if "://" not in storage:
        if storage.endswith((".journal", ".log")):
            path = Path(storage).expanduser()
            if path.is_dir():
                raise InputError(f"--storage {storage} is a folder", "pass a journal file path ending in .journal")
            if path.exists():
                if not os.access(path, os.R_OK | os.W_OK):
                    raise EnvironmentProblem(f"--storage {storage} is not readable and writable", "fix its permissions")
            else:
                check_writable_folder(path.parent, "--storage folder")
            return
        raise InputError(
            f"cannot open storage {storage!r}: not a URL or a .journal file",
            "pass sqlite:///study.db, postgresql://user@host:5432/db or a path ending in .journal",
        )
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(storage)
        port = url.port
    except (ArgumentError, ValueError) as exc:
        raise InputError(
            f"cannot open storage {storage!r}: the URL does not parse ({_short(exc)})",
            "write it as dialect://user:password@host:port/database, e.g. postgresql://me@db:5432/optuna",
        ) from None
    dialect, _, driver = url.drivername.partition("+")
    if dialect == "sqlite":
        _check_sqlite(url.database, storage, dict(url.query))
        return
    if dialect == "postgres":
        raise InputError(
            f"cannot open storage {storage!r}: the scheme postgres:// is not recognized", "write postgresql://"
        )
    if dialect not in DIALECTS:
        raise InputError(
            f"cannot open storage {storage!r}: unknown scheme {url.drivername!r}",
            f"use sqlite:///study.db, a .journal file, or one of {', '.join(d + '://' for d in DIALECTS)}",
        )
    label, default_port, default_drivers = DIALECTS[dialect]
    modules = (DRIVERS[driver][0],) if driver in DRIVERS else (default_drivers if not driver else ())
    if modules:
        _check_driver(modules, storage)
    if url.host:  # no host: a local socket (or host in the query string); let the driver find it
        check_reachable(url.host, port or default_port, label, storage, dialect=dialect)


# ----------------------------------------------------------------------------------------------------------
# run.json (replay)
# ----------------------------------------------------------------------------------------------------------


def _safetensors_header_ok(path: Path) -> str | None:
    """None when ``path`` has a complete safetensors header whose data fits the file; else the reason."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return "shorter than a safetensors header"
            n = int.from_bytes(head, "little")
            if n > size - 8 or n > 100_000_000:
                return "truncated header"
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        return _short(exc)
    if not isinstance(header, dict):
        return "header is not a table"
    ends = [
        v["data_offsets"][1]
        for k, v in header.items()
        if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v
    ]
    if ends and 8 + n + max(ends) > size:
        return f"truncated ({size} bytes, the header promises {8 + n + max(ends)})"
    return None


def check_run_record(path_text: str) -> dict[str, Any]:
    """``replay``'s run.json: exists, parses, has the fields replay reads, and its direction files are intact."""
    path = Path(path_text).expanduser()
    if path.is_dir():
        hint = (
            f"pass {path / 'run.json'}"
            if (path / "run.json").is_file()
            else "pass the run.json written by 'hereticlab run'"
        )
        raise InputError(f"{path} is a folder, not a run.json", hint)
    if not path.is_file():
        raise InputError(f"{path} does not exist", "pass the run.json written by 'hereticlab run'")
    try:
        record = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise EnvironmentProblem(f"cannot read {path} ({exc.strerror})", "fix its permissions") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(
            f"{path} is not valid JSON (truncated or damaged: {_short(exc)})",
            "restore it from a copy, or run 'hereticlab run' with --trial N on its run folder to write it again",
        ) from None
    problem = None
    if not isinstance(record, dict):
        problem = "is not a JSON object"
    elif not isinstance(record.get("settings"), dict) or not isinstance(record["settings"].get("model"), str):
        problem = "has no settings.model"
    elif not isinstance(record.get("directions"), dict) or not record["directions"]:
        problem = "has no directions"
    elif not isinstance(record.get("chosen_trial"), dict) or not isinstance(record["chosen_trial"].get("params"), dict):
        problem = "has no chosen_trial.params"
    if problem:
        raise InputError(
            f"{path} {problem}, so it is not a complete run.json",
            "pass the run.json that 'hereticlab run' wrote (it is written last, after the export)",
        )
    for method, rel in record["directions"].items():
        file = path.parent / str(rel)
        if not file.is_file():
            raise InputError(
                f"{path} names directions {file} for {method!r}, which does not exist",
                "keep run.json inside its run folder (next to directions/)",
            )
        reason = _safetensors_header_ok(file)
        if reason:
            raise InputError(
                f"direction file {file} is damaged ({reason})",
                "restore it, or run 'hereticlab run' again in a new folder",
            )
    settings = record["settings"]
    check_model(settings["model"], "run.json settings.model")
    check_dtype(settings.get("dtype"), "run.json settings.dtype")
    check_device(settings.get("device"), "run.json settings.device")
    return record


# ----------------------------------------------------------------------------------------------------------
# Whole commands
# ----------------------------------------------------------------------------------------------------------


@dataclass
class RunInputs:
    """What ``validate_run`` normalized: method and norm tuples, the canonical behaviour name."""

    methods: tuple[str, ...]
    norms: tuple[str, ...]
    behaviour: str
    objectives: tuple[str, ...] = ("refusals", "kl")


def validate_run(args: argparse.Namespace) -> RunInputs:
    """Every check for ``hereticlab run``, cheapest first. Nothing is written or loaded."""
    for flag, value, minimum in (
        ("--trials", args.trials, 1),
        ("--startup-trials", args.startup_trials, 1),
        ("--worker-trials", args.worker_trials, 1),
        ("--train-prompts", args.train_prompts, 1),
        ("--search-prompts", args.search_prompts, 1),
        ("--decide-after", args.decide_after, 1),
        ("--batch-size", args.batch_size, 1),
        ("--trial", args.trial, 0),
        ("--finalists", args.finalists, 0),
        ("--judge-new-tokens", args.judge_new_tokens, 1),
        ("--over-refusal-new-tokens", args.over_refusal_new_tokens, 1),
        ("--capability-new-tokens", args.capability_new_tokens, 1),
    ):
        check_count(flag, value, minimum)
    objectives = check_objectives(args.objectives)
    max_nll = args.max_nll_increase
    if max_nll is not None and not (math.isfinite(max_nll) and max_nll >= 0):
        raise InputError(
            f"--max-nll-increase must be a finite number ≥ 0, got {max_nll}", "pass e.g. 0.1 or leave it out"
        )
    retention = args.min_retention
    if not 0 <= retention <= 1:
        raise InputError(f"--min-retention is a fraction between 0 and 1, got {retention}", "pass e.g. 0.97")
    check_seed("--seed", args.seed)
    check_kl("--kl-max", args.kl_max)
    check_kl("--kl-ceiling", args.kl_ceiling, allow_negative=True)
    if not args.study_name.strip():
        raise InputError("--study-name is empty", "leave it out (hereticlab) or pass a name")
    methods = check_methods(args.methods, train_prompts=args.train_prompts)
    norms = check_norms(args.norms)
    behaviour = check_behaviour(args.behaviour)
    check_dtype(args.dtype)
    check_device(args.device)
    check_model(args.model)
    from ..core.prompts import PromptError
    from ..measure.behaviours import get_behaviour

    try:
        preset = get_behaviour(behaviour)
    except PromptError as exc:
        raise EnvironmentProblem(
            f"--behaviour {behaviour}: {exc}", "reinstall hereticlab (its prompt files are missing)"
        ) from None
    if preset.run_settings:  # refusal: the run's --harmful / --harmless / --system-prompt (runner.run_behaviour)
        for flag, source in (("--harmful", args.harmful), ("--harmless", args.harmless)):
            check_run_split(check_prompts(source, flag), flag, args.train_prompts, args.search_prompts)
    else:
        for flag, value, default in (
            ("--harmful", args.harmful, "harmful"),
            ("--harmless", args.harmless, "harmless"),
            ("--system-prompt", args.system_prompt, None),
        ):
            if value != default:
                raise InputError(
                    f"{flag} is not used with --behaviour {behaviour} (it brings its own prompts and system prompts)",
                    f"leave {flag} out, or use --behaviour refusal",
                )
        try:
            evals = preset.eval_pair(args.split_seed)
        except PromptError as exc:
            raise EnvironmentProblem(
                f"--behaviour {behaviour}: {exc}", "reinstall hereticlab (its prompt files are missing)"
            ) from None
        if min(len(s) for s in evals) < 2:
            raise EnvironmentProblem(
                f"--behaviour {behaviour} has fewer than 2 evaluation prompts per class",
                "add prompts to its data files",
            )
    check_run_dir(args.out)
    check_storage(args.storage)  # last: it may wait CONNECT_TIMEOUT_S for a server
    if not preset.run_settings and ("nll" in objectives or max_nll is not None):
        raise InputError(
            f"--objectives nll and --max-nll-increase apply to refusal only, not --behaviour {behaviour}",
            "leave them out for a preset",
        )
    return RunInputs(methods=methods, norms=norms, behaviour=behaviour, objectives=objectives)


def validate_replay(args: argparse.Namespace) -> dict[str, Any]:
    record = check_run_record(args.record)
    out = Path(args.out) if args.out else Path(args.record).expanduser().parent / "replay"
    check_writable_folder(out, "--out")
    return record


def validate_evaluate(args: argparse.Namespace) -> None:
    check_count("--limit", args.limit)
    check_count("--max-new-tokens", args.max_new_tokens)
    if args.split:
        check_count("--train-prompts", args.train_prompts)
    for flag, source in (("--harmful", args.harmful), ("--harmless", args.harmless)):
        prompts = check_prompts(source, flag)
        if args.split and args.train_prompts >= len(prompts):
            raise InputError(
                f"--train-prompts={args.train_prompts} leaves no evaluation prompts in {flag} {prompts.name} "
                f"({len(prompts)} prompts)",
                f"lower --train-prompts below {len(prompts)}, or pass --no-split",
            )
    check_model(args.model, "MODEL")
    check_model(args.baseline, "--baseline")


__all__ = [
    "CONNECT_TIMEOUT_S",
    "MAX_PROMPT_CHARS",
    "EnvironmentProblem",
    "InputError",
    "RunInputs",
    "check_behaviour",
    "check_count",
    "check_device",
    "check_dtype",
    "check_kl",
    "check_methods",
    "check_model",
    "check_norms",
    "check_prompts",
    "check_reachable",
    "check_run_record",
    "check_run_split",
    "check_storage",
    "check_writable_folder",
    "validate_evaluate",
    "validate_replay",
    "validate_run",
]
