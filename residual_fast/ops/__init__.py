"""Numerical ops behind ResiDual: a reference implementation and the fast paths."""

from .reference import residual_reference, spectral_reweight_reference
from .spectral_reweight import packed_index, spectral_reweight

__all__ = ["packed_index", "residual_reference", "spectral_reweight", "spectral_reweight_reference"]
