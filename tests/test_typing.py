"""Every public function and method of hereticlab has full type hints (mypy checks them: `make typecheck`).

Public: a name without a leading underscore, in a module whose path has no part with a leading underscore
(``__init__.py`` files are the packages themselves and count), defined at module level or in a public class at
module level (nested public classes included). Each parameter except a method's ``self`` / ``cls`` and the return
need an annotation. Functions nested inside functions are not API and are not listed.

Left out on purpose:
* ``_moved.py`` and the 0.1 alias modules (``hereticlab/steering.py`` …): private, or only a call to ``alias``.
* ``__getattr__`` forwarders (``hl.__getattr__``, ``measure.detectors.__getattr__``): deprecated-name shims whose
  name starts with an underscore, like every dunder method (``__init__`` and friends are annotated where they
  matter, but this test does not require it).
"""

from __future__ import annotations

import ast
from pathlib import Path

import hereticlab as hl

PACKAGE = Path(hl.__file__).parent


def _is_public_module(path: Path) -> bool:
    parts = path.relative_to(PACKAGE).parts
    return all(p == "__init__.py" or not p.startswith("_") for p in parts)


def _is_static(node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    return any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in node.decorator_list)


def _missing(node: ast.FunctionDef | ast.AsyncFunctionDef, method: bool) -> list[str]:
    """What ``node`` lacks: unannotated parameter names, and ``return``."""
    args = node.args
    params = [*args.posonlyargs, *args.args]
    if method and params and not _is_static(node):
        params = params[1:]  # self / cls
    params += args.kwonlyargs
    params += [p for p in (args.vararg, args.kwarg) if p is not None]
    missing = [p.arg for p in params if p.annotation is None]
    if node.returns is None:
        missing.append("return")
    return missing


def _public_functions(tree: ast.Module) -> list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef, bool]]:
    found = []

    def visit(body: list[ast.stmt], prefix: str, method: bool) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
                found.append((prefix + node.name, node, method))
            elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                visit(node.body, f"{prefix}{node.name}.", True)

    visit(tree.body, "", False)
    return found


def untyped_public_api() -> tuple[int, list[str]]:
    """``(number of public functions/methods, ["file:line name (missing: …)", …])`` over src/hereticlab."""
    total, problems = 0, []
    for path in sorted(PACKAGE.rglob("*.py")):
        if not _is_public_module(path):
            continue
        for name, node, method in _public_functions(ast.parse(path.read_text(encoding="utf-8"))):
            total += 1
            missing = _missing(node, method)
            if missing:
                where = path.relative_to(PACKAGE.parent).as_posix()
                problems.append(f"{where}:{node.lineno} {name} (missing: {', '.join(missing)})")
    return total, problems


def test_every_public_function_and_method_is_fully_annotated():
    total, problems = untyped_public_api()
    assert total > 300, f"found only {total} public functions; did the package layout change?"
    assert not problems, f"{len(problems)} of {total} public functions/methods lack type hints:\n" + "\n".join(problems)


def test_the_check_sees_what_it_should():
    source = """
def typed(a: int, *args: str, b: float = 1.0, **kw: object) -> None: ...
def untyped(a, b: int): ...
def _private(a): ...
class Public:
    def method(self, x) -> int: ...
    @staticmethod
    def static(x: int) -> int: ...
    @classmethod
    def build(cls) -> "Public": ...
    def _hidden(self, y): ...
    class Inner:
        def deep(self, z: int): ...
class _Private:
    def method(self, x): ...
"""
    report = {name: _missing(node, method) for name, node, method in _public_functions(ast.parse(source))}
    assert report == {
        "typed": [],
        "untyped": ["a", "return"],
        "Public.method": ["x"],
        "Public.static": [],
        "Public.build": [],
        "Public.Inner.deep": ["return"],
    }


if __name__ == "__main__":
    n, found = untyped_public_api()
    print(f"{len(found)} of {n} public functions/methods lack type hints")
    print("\n".join(found))
