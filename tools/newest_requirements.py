"""Requirements for the newest-versions canary: pyproject.toml's dependencies with upper bounds lifted.

python tools/newest_requirements.py                           # print requirement lines (pins `==` kept)
python tools/newest_requirements.py --compare constraints.txt # installed version vs lock, per dependency
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
KEEP = {"torch"}  # the locked build stays: its newest release is a multi-GB CUDA wheel


def requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = project["dependencies"] + project["optional-dependencies"]["test"]
    return [Requirement(line) for line in lines]


def lifted(req: Requirement) -> str:
    """``name>=lower`` (upper bounds dropped); exact pins and KEEP stay as they are."""
    if canonicalize_name(req.name) in KEEP:
        return f"{req.name}=={version(req.name).split('+')[0]}"  # the build already installed
    if any(s.operator == "==" for s in req.specifier):
        return str(req)
    lower = [str(s) for s in req.specifier if s.operator in (">=", ">")]
    return req.name + ",".join(lower)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", type=Path, default=None)
    args = parser.parse_args()
    if args.compare is None:
        print("\n".join(lifted(r) for r in requirements()))
        return 0
    lock = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", args.compare.read_text(), flags=re.M))
    lock = {canonicalize_name(k): v for k, v in lock.items()}
    for req in requirements():
        name = canonicalize_name(req.name)
        try:
            have = version(req.name).split("+")[0]
        except PackageNotFoundError:
            have = "not installed"
        mark = "" if lock.get(name) == have else "   <- newer than the lock" if name in lock else ""
        print(f"  {req.name:24s} {have:14s} lock {lock.get(name, '-'):10s} range {req.specifier}{mark}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
