"""The README's Python examples run as written on a tiny model.

Each ```python block is executed in order in one namespace, with ``"default"`` swapped for ``"tiny:llama"`` and the
few names the prose leaves to the reader (``harmful``, ``answers``, ``X`` …) defined first, small.
"""

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


@pytest.fixture(scope="module")
def namespace(tmp_path_factory):
    import hereticlab as hl

    model, tok = hl.load_model("tiny:llama")
    harmful = hl.load_prompts("harmful")[:12]
    harmless = hl.load_prompts("harmless")[:12]
    d = model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    return {
        "model": model,
        "tok": tok,
        "harmful": harmful,
        "harmless": harmless,
        "L": model.config.num_hidden_layers,
        "answers": ["Sure, here it is."] * 16,
        "compliant_answers": ["Sure, here is how."] * 16,
        "prompts": list(harmless[:2]),
        "my_score": lambda text: float(len(text)),
        "X": torch.randn(40, d, generator=g),
        "r": None,
        "outputs": str(tmp_path_factory.mktemp("out")),
    }


def test_readme_has_examples():
    assert len(blocks()) >= 5


@pytest.mark.parametrize("index", range(len(blocks())))
def test_readme_block_runs(index, namespace, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    code = blocks()[index].replace('"default"', '"tiny:llama"').replace("train=200", "train=280")
    code = code.replace("range(4, 20, 2)", "range(1, 4)").replace("layer=12", "layer=2").replace("resid=12", "resid=2")
    code = code.replace("resid=8", "resid=1")
    code = code.replace("[6, 12]", "[1, 2]").replace("at(14.3)", "at(2.3)")
    code = code.replace("tent_kernel(24, peak=16", "tent_kernel(4, peak=2")
    code = code.replace("r.at(12)", "r.at(2)").replace(".at(10)", ".at(2)")
    # A random tiny model shows no trait, so the keyword judge keeps no pair (a clear error); a fixed arbitrary judge
    # exercises the same pipeline.
    code = code.replace('judge="keyword"', "judge=lambda questions, responses: [float(len(r) % 2) for r in responses]")
    exec(compile(code, f"README block {index + 1}", "exec"), namespace)
    if namespace.get("r") is None and "dirs" in namespace:
        namespace["r"] = namespace["dirs"]
