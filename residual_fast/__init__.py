"""residual_fast: exact, fast ResiDual (arXiv 2411.00246) for vision transformers."""

from ._version import __version__
from .classifiers import prototype_head, zero_shot_head
from .decompose import Decomposition, capture, decompose
from .fused import MergedResiDualVisual, ResiDualVisual
from .loading import LoadedModel, load
from .models import UnsupportedModelError, get_adapter
from .pretrained import from_pretrained, get_residual_model, save_pretrained
from .residual import VARIANTS, ResiDual
from .spectral import SpectralBases, UnitMoments, accumulate_moments, fit_bases
from .units import Activations, UnitTable

__all__ = [
    "VARIANTS",
    "Activations",
    "Decomposition",
    "LoadedModel",
    "MergedResiDualVisual",
    "ResiDual",
    "ResiDualVisual",
    "SpectralBases",
    "UnitMoments",
    "UnitTable",
    "UnsupportedModelError",
    "__version__",
    "accumulate_moments",
    "capture",
    "decompose",
    "fit_bases",
    "from_pretrained",
    "get_adapter",
    "get_residual_model",
    "load",
    "prototype_head",
    "save_pretrained",
    "zero_shot_head",
]
