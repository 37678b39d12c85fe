"""hereticlab: a Jupyter-first toolkit for finding, removing and steering behaviour directions in language models.

The core loop: ``load_model`` → ``load_prompts`` / ``PromptSet.split`` → ``capture_residuals`` → ``mean_difference``
(or any method in ``DIRECTION_METHODS``) → ``ablate`` (a reversible weight edit) or ``ablation_hooks`` /
``activation_addition`` (reversible hooks) → ``refusal_rate`` / ``kl_divergence``.

``hl.*`` holds these ~40 names; everything else lives in the subpackages, one concept in one home (ARCHITECTURE.md):
``core`` (models, prompts, architecture, capture, generation) → ``directions`` → ``interventions`` (kernels, edits,
steering, conceptors, export) → ``measure`` (metrics, detectors, behaviours, depth, selection, geometry, persona) →
``search`` (study, evaluator, runner, cli) → ``ui`` (plots, widgets, chat, trial picker).
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

from . import core, directions, interventions, measure, search
from .core import (
    ModelLoadError,
    PromptError,
    PromptSet,
    UnsupportedModelError,
    capture_mean,
    capture_residuals,
    encode,
    find_layers,
    find_writers,
    format_chat,
    generate,
    load_model,
    load_prompts,
    num_layers,
    verify_writers,
)
from .directions import (
    DIRECTION_METHODS,
    Directions,
    biprojected,
    compute_directions,
    mean_difference,
    normalize,
    orthonormal_basis,
    random_directions,
)
from .interventions import (
    WeightBackup,
    ablate,
    ablation_hooks,
    activation_addition,
    apply_edits,
    constant_kernel,
    orthogonalize,
    plan_ablation,
    steer,
    tent_kernel,
)
from .measure import (
    MarkerDetector,
    first_token_logprobs,
    get_behaviour,
    kl_divergence,
    kl_from_logprobs,
    refusal_rate,
)
from .search import (
    TrialEvaluator,
    run_search,
)

__version__ = "0.2.0"

__all__ = [
    "load_model",
    "ModelLoadError",
    "load_prompts",
    "PromptSet",
    "PromptError",
    "format_chat",
    "encode",
    "capture_residuals",
    "capture_mean",
    "find_layers",
    "find_writers",
    "num_layers",
    "verify_writers",
    "UnsupportedModelError",
    "generate",
    "Directions",
    "mean_difference",
    "biprojected",
    "normalize",
    "orthonormal_basis",
    "random_directions",
    "compute_directions",
    "DIRECTION_METHODS",
    "ablate",
    "plan_ablation",
    "apply_edits",
    "orthogonalize",
    "WeightBackup",
    "tent_kernel",
    "constant_kernel",
    "ablation_hooks",
    "activation_addition",
    "steer",
    "refusal_rate",
    "first_token_logprobs",
    "kl_divergence",
    "kl_from_logprobs",
    "MarkerDetector",
    "get_behaviour",
    "TrialEvaluator",
    "run_search",
]

# 0.1 names that left hl.* in 0.2: still reachable here for one release, with a DeprecationWarning naming the new home.
_MOVED = {
    "ABItem": "hereticlab.interventions",
    "AND": "hereticlab.interventions",
    "ARCHITECTURES": "hereticlab.core",
    "BEHAVIOURS": "hereticlab.measure",
    "Behaviour": "hereticlab.measure",
    "Conceptor": "hereticlab.interventions",
    "DetectionResult": "hereticlab.measure",
    "Detector": "hereticlab.measure",
    "EditHandle": "hereticlab.interventions",
    "EmbeddingJudge": "hereticlab.measure",
    "EnsembleDetector": "hereticlab.measure",
    "KeywordDetector": "hereticlab.measure",
    "KeywordJudge": "hereticlab.measure",
    "NOT": "hereticlab.interventions",
    "OR": "hereticlab.interventions",
    "PersonaResult": "hereticlab.measure",
    "PoorClustersError": "hereticlab.directions",
    "Projection": "hereticlab.measure",
    "RunConfig": "hereticlab.search",
    "SearchSpace": "hereticlab.search",
    "Selection": "hereticlab.measure",
    "SelfJudge": "hereticlab.measure",
    "SelfJudgeDetector": "hereticlab.measure",
    "SemanticDetector": "hereticlab.measure",
    "TraitSpec": "hereticlab.measure",
    "TrialResult": "hereticlab.search",
    "Writer": "hereticlab.core",
    "WriterCheck": "hereticlab.core",
    "ab_pair_texts": "hereticlab.interventions",
    "aperture_sweep": "hereticlab.interventions",
    "architecture": "hereticlab.core",
    "as": "hereticlab.search",
    "available_traits": "hereticlab.measure",
    "build_trait": "hereticlab.measure",
    "caa_vector": "hereticlab.interventions",
    "capture_span_mean": "hereticlab.interventions",
    "choose_candidate": "hereticlab.measure",
    "choose_trial": "hereticlab.search",
    "clear_projection_cache": "hereticlab.measure",
    "cluster_directions": "hereticlab.directions",
    "compute_conceptor": "hereticlab.interventions",
    "conceptor_steering": "hereticlab.interventions",
    "contrastive_vector": "hereticlab.interventions",
    "edits_from_params": "hereticlab.search",
    "evaluate_detectors": "hereticlab.measure",
    "evaluate_direction": "hereticlab.measure",
    "extract_persona_vector": "hereticlab.measure",
    "gaussian_kernel": "hereticlab.interventions",
    "geometric_median": "hereticlab.directions",
    "geometric_median_batched": "hereticlab.directions",
    "geometry_table": "hereticlab.measure",
    "identity_conceptor": "hereticlab.interventions",
    "intervention_sweep": "hereticlab.interventions",
    "load_labelled": "hereticlab.measure",
    "load_trait": "hereticlab.measure",
    "median_difference": "hereticlab.directions",
    "monitor_projection": "hereticlab.measure",
    "normalize_text": "hereticlab.measure",
    "pareto": "hereticlab.search",
    "pca_pairs": "hereticlab.directions",
    "per_position_kl": "hereticlab.measure",
    "plot_candidates": "hereticlab.measure",
    "plot_layer_scan": "hereticlab.search",
    "plot_pareto": "hereticlab.search",
    "plots": "hereticlab.ui",
    "position_mask": "hereticlab.interventions",
    "post_norm_basis": "hereticlab.core",
    "prefill_refusal": "hereticlab.measure",
    "probe_accuracy_frame": "hereticlab.directions",
    "probe_direction": "hereticlab.directions",
    "project_layers": "hereticlab.measure",
    "projection_difference": "hereticlab.measure",
    "random_vector_like": "hereticlab.interventions",
    "reading_score": "hereticlab.interventions",
    "reading_vector": "hereticlab.interventions",
    "refusal_metric": "hereticlab.measure",
    "refusal_token_ids": "hereticlab.measure",
    "replay": "hereticlab.search",
    "residual_input_hooks": "hereticlab.interventions",
    "response_nll": "hereticlab.measure",
    "save_adapter": "hereticlab.interventions",
    "save_merged": "hereticlab.interventions",
    "scan_layers": "hereticlab.search",
    "score_candidates": "hereticlab.measure",
    "search": "hereticlab.search",
    "select_direction": "hereticlab.measure",
    "steering_sweep": "hereticlab.interventions",
    "strip_thinking": "hereticlab.core",
    "study": "hereticlab.search",
    "style_geometry_table": "hereticlab.measure",
    "svd_subspace": "hereticlab.directions",
    "trials_table": "hereticlab.search",
    "tune_batch_size": "hereticlab.search",
    "weiszfeld_median": "hereticlab.measure",
}


_OLD_MODULES = {
    "architecture",
    "behaviours",
    "capture",
    "chat",
    "cli",
    "conceptors",
    "depth",
    "detectors",
    "edits",
    "evaluation",
    "export",
    "geometry",
    "kernels",
    "methods",
    "metrics",
    "models",
    "persona",
    "plots",
    "prompts",
    "quantized",
    "runner",
    "selection",
    "steering",
    "testing",
    "trial_picker",
    "widgets",
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        warnings.warn(
            f"hl.{name} moved to {_MOVED[name]}.{name} (hl.{name} goes away in 0.3)", DeprecationWarning, stacklevel=2
        )
        return getattr(importlib.import_module(_MOVED[name]), name)
    if name == "ui" or name in _OLD_MODULES:  # hl.ui, and 0.1 module paths (hl.plots …: deprecation aliases)
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'hereticlab' has no attribute {name!r}")
