"""Layer 5, the automatic search and the ``hereticlab`` command: the Optuna study and its space (``study``), the
fast trial evaluator, the main job (``runner``), input validation and the CLI.

``hereticlab.search`` also keeps the names of the 0.1 module ``hereticlab/search.py`` (now ``search.study``)."""

from .evaluator import TrialEvaluator, TrialResult, plot_layer_scan, scan_layers, tune_batch_size
from .runner import RunConfig, replay, run_search
from .study import (
    SearchError,
    SearchSpace,
    TrialSeededTPESampler,
    choose_trial,
    database_url,
    edits_from_params,
    finished_trials,
    layer_kernel,
    make_storage,
    objective_values,
    open_study,
    pareto,
    plot_pareto,
    requeue_interrupted,
    trial_params,
    trials_table,
)
