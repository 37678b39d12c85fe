"""Compare an installed environment with the lock file, or write the lock from it.

    python tools/check_lock.py constraints.txt           # exit 1 and name every package that differs
    python tools/check_lock.py --write constraints.txt   # write the environment's versions (make lock)

The check runs at the end of `make setup`: a venv that silently holds other versions than CI tested (an old venv,
a package installed by hand) is reported in one line per package instead of changing results unnoticed.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import distributions
from pathlib import Path

from packaging.utils import canonicalize_name

HEADER = """# The exact versions CI tested (`make` installs with `pip install -c constraints.txt`).
# Regenerate with `make lock` (newest versions pyproject.toml's ranges allow), then `make test`; commit when green.
# torch is the CPU build's version; a CUDA build of the same version satisfies it.
"""


def installed() -> dict[str, str]:
    versions = {}
    for dist in distributions():
        name = canonicalize_name(dist.metadata["Name"])
        if name in ("hereticlab", "pip", "setuptools", "wheel"):
            continue
        versions[name] = dist.version.split("+")[0]  # 2.13.0+cpu -> 2.13.0
    return versions


def read_lock(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lock", type=Path)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    have = installed()
    if args.write:
        args.lock.write_text(HEADER + "".join(f"{n}=={v}\n" for n, v in sorted(have.items())))
        print(f"wrote {len(have)} pins to {args.lock}")
        return 0
    pins = read_lock(args.lock)
    wrong = [f"{n} {have[n]} (lock: {v})" for n, v in sorted(pins.items()) if n in have and have[n] != v]
    if wrong:
        for line in wrong:
            print(f"hereticlab: error: installed {line}; `make clean setup` reinstalls the locked set", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
