"""Numerical ops behind ResiDual: a reference implementation and the fast paths."""

from .reference import residual_reference, spectral_reweight_reference
from .spectral_reweight import coefficients, packed_index, reweight, spectral_reweight

__all__ = ["coefficients", "packed_index", "residual_reference", "reweight", "spectral_reweight",
           "spectral_reweight_reference"]
