"""hereticlab: a Jupyter-first toolkit for finding, removing and steering behaviour directions in language models.

The core loop: ``load_model`` → ``load_prompts`` / ``PromptSet.split`` → ``capture_residuals`` → ``mean_difference``
(or any method in ``DIRECTION_METHODS``) → ``ablate`` (a reversible weight edit) or ``ablation_hooks`` /
``activation_addition`` (reversible hooks) → ``refusal_rate`` / ``kl_divergence``. The search lives in
``hereticlab.search`` / ``hereticlab.runner``; geometry pictures in ``geometry``, ``plots``, ``widgets``.
"""

from . import architecture, plots, search
from .architecture import (
    ARCHITECTURES, UnsupportedModelError, Writer, WriterCheck, find_layers, find_writers, num_layers, post_norm_basis,
    verify_writers,
)
from .behaviours import BEHAVIOURS, Behaviour, get_behaviour
from .capture import capture_mean, capture_residuals, encode
from .conceptors import AND, NOT, OR, Conceptor, aperture_sweep, compute_conceptor, conceptor_steering, identity_conceptor
from .depth import per_position_kl, prefill_refusal, response_nll
from .detectors import (
    DetectionResult, Detector, EnsembleDetector, KeywordDetector, SelfJudgeDetector, SemanticDetector,
    evaluate_detectors, load_labelled,
)
from .directions import Directions, biprojected, mean_difference, normalize, orthonormal_basis, random_directions
from .edits import EditHandle, WeightBackup, ablate, apply_edits, orthogonalize, plan_ablation
from .evaluation import TrialEvaluator, TrialResult, plot_layer_scan, scan_layers, tune_batch_size
from .export import save_adapter, save_merged
from .geometry import Projection, clear_projection_cache, geometry_table, project_layers, style_geometry_table, weiszfeld_median
from .kernels import constant_kernel, gaussian_kernel, tent_kernel
from .methods import (
    DIRECTION_METHODS, PoorClustersError, cluster_directions, compute_directions, geometric_median,
    geometric_median_batched, median_difference, pca_pairs, probe_accuracy_frame, probe_direction, svd_subspace,
)
from .metrics import (
    MarkerDetector, first_token_logprobs, generate, kl_divergence, kl_from_logprobs, normalize_text, refusal_rate,
)
from .models import ModelLoadError, load_model
from .persona import (
    EmbeddingJudge, KeywordJudge, PersonaResult, SelfJudge, TraitSpec, available_traits, build_trait,
    extract_persona_vector, load_trait, monitor_projection, projection_difference,
)
from .prompts import PromptError, PromptSet, format_chat, load_prompts, strip_thinking
from .runner import RunConfig, replay, run_search
from .search import SearchSpace, choose_trial, edits_from_params, pareto, plot_pareto, trials_table
from .selection import (
    Selection, choose_candidate, evaluate_direction, plot_candidates, refusal_metric, refusal_token_ids,
    score_candidates, select_direction,
)
from .steering import (
    ABItem, ab_pair_texts, ablation_hooks, activation_addition, caa_vector, capture_span_mean, contrastive_vector,
    intervention_sweep, position_mask, random_vector_like, reading_score, reading_vector, residual_input_hooks, steer,
    steering_sweep,
)

__version__ = "0.1.0"
