"""Spectral toolkit: exact streaming PCA per unit, pruning, spectral cosine, intrinsic dimension.

Pure math (torch + numpy); no model or data code here.
"""

from .intrinsic_dim import linear_dimension, linear_dimensions, two_nn_distances, twonn
from .lowrank import GroupPCA, UnitBases, lifted_basis
from .pca import PCABasis, StreamingPCA, num_components_for_evr
from .similarity import cross_similarity, greedy_match, spectral_cosine, unit_similarity

__all__ = [
    "PCABasis",
    "StreamingPCA",
    "UnitBases",
    "GroupPCA",
    "lifted_basis",
    "num_components_for_evr",
    "spectral_cosine",
    "greedy_match",
    "unit_similarity",
    "cross_similarity",
    "linear_dimension",
    "linear_dimensions",
    "two_nn_distances",
    "twonn",
]
