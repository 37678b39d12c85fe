"""hereticlab: a Jupyter-first toolkit for finding, removing and steering behaviour directions in language models."""

from .architecture import Writer, find_layers, find_writers, num_layers, UnsupportedModelError
from .capture import capture_mean, capture_residuals, encode
from .directions import Directions, biprojected, mean_difference, normalize, orthonormal_basis, random_directions
from .edits import EditHandle, WeightBackup, ablate, apply_edits, orthogonalize, plan_ablation
from .kernels import constant_kernel, gaussian_kernel, tent_kernel
from .metrics import (
    MarkerDetector, first_token_logprobs, generate, kl_divergence, kl_from_logprobs, normalize_text, refusal_rate,
)
from .models import ModelLoadError, load_model
from .prompts import PromptError, PromptSet, format_chat, load_prompts
from .steering import ablation_hooks, activation_addition

__version__ = "0.1.0"
