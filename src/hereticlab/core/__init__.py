"""Layer 1, the model plumbing everything else stands on: loading models and prompts, the architecture registry
(blocks, residual writers, writer verification), transformers compatibility, batching, the one decode loop,
residual capture, and the hook primitive (``hooks``: sites, ``trace``, ``StopForward``). Imports nothing from the
other subpackages."""

from .architecture import (
    ARCHITECTURES,
    UnsupportedModelError,
    Writer,
    WriterCheck,
    find_layers,
    find_writers,
    num_layers,
    post_norm_basis,
    verify_writers,
)
from .capture import (
    auto_batch_size,
    batched,
    capture_mean,
    capture_residuals,
    chat_texts,
    encode,
    encode_ids,
    model_device,
)
from .compat import CompatibilityWarning
from .generation import eos_token_ids, generate, greedy_decode, iter_greedy
from .hooks import Call, Site, SiteError, StopForward, hook_outputs, resolve_site, trace
from .models import ModelLoadError, load_model
from .prompts import PromptError, PromptSet, available_sets, format_chat, load_prompts, strip_thinking
from .testing import tiny_model
