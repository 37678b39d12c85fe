import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

import pytest  # noqa: E402 (environment first)
import torch  # noqa: E402

from hereticlab.core.testing import tiny_model  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_llama():
    return tiny_model("llama")


@pytest.fixture
def fresh_llama():
    return tiny_model("llama", seed=1)


PROMPTS = [
    "Tell me a joke.",
    "How do I bake bread?",
    "Write a haiku about rain and tea.",
    "Hi",
    "List three prime numbers please.",
]
