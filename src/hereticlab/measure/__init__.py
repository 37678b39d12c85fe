"""Layer 4, judging what a model does: refusal markers and detectors (semantic, self-judge, ensembles),
behaviours (refusal, slop, humour, verbosity), KL and log-prob metrics, safety-depth measures, Arditi et al.'s
direction selection, residual geometry, persona vectors with their judges, capability and over-refusal checks,
and claims with intervals (report)."""

from .behaviours import BEHAVIOURS, Behaviour, get_behaviour
from .capability import (
    CapabilityItem,
    answer_nll,
    capability_answers,
    capability_report,
    load_capability_items,
    over_refusal_rate,
    score_answer,
)
from .coherence import (
    coherence_nll,
    coherent_choice,
    distinct_n,
    repetition_rate,
    steered_outputs,
)
from .depth import PromptCache, per_position_kl, prefill_refusal, response_nll
from .detectors import DetectionResult, Detector, EnsembleDetector, KeywordDetector, SemanticDetector
from .embedding import SentenceEmbedder
from .geometry import (
    Projection,
    clear_projection_cache,
    geometry_table,
    project_layers,
    style_geometry_table,
    weiszfeld_median,
)
from .judges import SelfJudgeDetector
from .labelled import evaluate_detectors, load_labelled
from .metrics import MarkerDetector, first_token_logprobs, kl_divergence, kl_from_logprobs, normalize_text, refusal_rate
from .persona import (
    EmbeddingJudge,
    KeywordJudge,
    PersonaResult,
    SelfJudge,
    TraitSpec,
    available_traits,
    build_trait,
    extract_persona_vector,
    load_trait,
    monitor_projection,
    projection_difference,
)
from .report import (
    Claim,
    Estimate,
    bootstrap_interval,
    claims_table,
    clustered_estimate,
    conclusions,
    mean_interval,
    proportion_interval,
)
from .selection import (
    Selection,
    choose_candidate,
    evaluate_direction,
    plot_candidates,
    refusal_metric,
    refusal_token_ids,
    score_candidates,
    select_direction,
)
