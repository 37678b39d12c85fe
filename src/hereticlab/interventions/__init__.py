"""Layer 3, changing the model reversibly: strength kernels over layers, exact weight edits (orthogonalization of
residual writers, with revert), hook-based steering (ablation hooks, activation addition, CAA, reading vectors),
conceptors, export of an edit as merged weights or a LoRA adapter, and 4-bit models."""

from .base import HookIntervention, Intervention
from .conceptors import (
    AND,
    NOT,
    OR,
    Conceptor,
    aperture_sweep,
    compute_conceptor,
    conceptor_steering,
    identity_conceptor,
)
from .edits import (
    EditHandle,
    WeightAblation,
    WeightBackup,
    WriterEdit,
    ablate,
    apply_edits,
    orthogonalize,
    plan_ablation,
)
from .export import ExportError, save_adapter, save_merged
from .kernels import constant_kernel, gaussian_kernel, tent_kernel
from .steering import (
    ABItem,
    ab_pair_texts,
    ablation_hooks,
    activation_addition,
    caa_vector,
    capture_span_mean,
    contrastive_vector,
    intervention_sweep,
    position_mask,
    random_vector_like,
    reading_score,
    reading_vector,
    residual_input_hooks,
    steer,
    steering_sweep,
)
