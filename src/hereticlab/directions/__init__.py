"""Layer 2, directions in the residual stream: the ``Directions`` container (one vector or rank-k basis per residual
index, float indices interpolate) and the methods that compute them from captured activations
(``DIRECTION_METHODS``: mean difference, projected, median, SVD / PCA pairs, probe, clusters)."""

from .base import Directions, biprojected, mean_difference, normalize, orthonormal_basis, project_out, random_directions
from .methods import (
    DIRECTION_METHODS,
    PoorClustersError,
    cluster_directions,
    compute_directions,
    geometric_median,
    geometric_median_batched,
    median_difference,
    pca_pairs,
    probe_accuracy_frame,
    probe_direction,
    svd_subspace,
)
