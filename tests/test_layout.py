"""The package layout: layers import only downwards, old paths are deprecation aliases, hl.* is curated."""

import ast
import importlib
from pathlib import Path

import pytest

import hereticlab as hl

PACKAGE = Path(hl.__file__).parent
LAYERS = ["core", "directions", "interventions", "measure", "search", "ui"]


def _imports_of(path: Path) -> set[str]:
    """Subpackages of hereticlab that ``path`` imports at module level (relative or absolute).

    Imports inside a function body are not counted: a convenience method such as ``Directions.ablate`` may reach a
    layer above lazily, as long as importing the module never does.
    """
    tree = ast.parse(path.read_text())
    here = path.relative_to(PACKAGE).parts[:-1]
    found = set()
    top_level = [n for n in tree.body if isinstance(n, ast.ImportFrom)]
    top_level += [n for node in tree.body if isinstance(node, (ast.If, ast.Try)) for n in ast.walk(node)]
    for node in top_level:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(here[: len(here) - node.level + 1]) + (node.module.split(".") if node.module else [])
            elif node.module and node.module.startswith("hereticlab."):
                base = node.module.split(".")[1:]
            else:
                continue
            if base:
                found.add(base[0])
    return found


@pytest.mark.parametrize("layer", LAYERS)
def test_each_layer_imports_only_itself_and_the_layers_below(layer):
    allowed = set(LAYERS[: LAYERS.index(layer) + 1])
    for path in (PACKAGE / layer).rglob("*.py"):
        upward = (_imports_of(path) & set(LAYERS)) - allowed
        assert not upward, f"{path.relative_to(PACKAGE)} imports {sorted(upward)}, a layer above {layer}"


def test_curated_namespace():
    assert 35 <= len(hl.__all__) <= 45 and len(set(hl.__all__)) == len(hl.__all__)
    for name in hl.__all__:
        assert getattr(hl, name) is not None


@pytest.mark.parametrize(
    "old, new",
    [
        ("steering", "hereticlab.interventions.steering"),
        ("metrics", "hereticlab.measure.metrics"),
        ("capture", "hereticlab.core.capture"),
        ("trial_picker", "hereticlab.ui.trial_picker"),
    ],
)
def test_old_module_paths_are_the_new_modules_with_a_warning(old, new):
    import sys

    sys.modules.pop(f"hereticlab.{old}", None)
    with pytest.warns(DeprecationWarning, match=new):
        module = importlib.import_module(f"hereticlab.{old}")
    assert module is importlib.import_module(new)


def test_names_that_left_hl_warn_and_resolve_to_their_home():
    from hereticlab.measure import geometry_table

    with pytest.warns(DeprecationWarning, match="hereticlab.measure"):
        assert hl.geometry_table is geometry_table
    with pytest.raises(AttributeError, match="no_such_name"):
        _ = hl.no_such_name


def test_importing_the_package_warns_about_nothing():
    import subprocess
    import sys

    code = (
        "import warnings; warnings.simplefilter('error'); "
        "import hereticlab, hereticlab.ui.widgets, hereticlab.search.cli"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
