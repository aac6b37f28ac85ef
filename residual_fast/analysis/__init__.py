"""The paper's analyses as library functions: intrinsic dimension, head specialization, text decomposition,
spectral similarity; :func:`residual_fast.analysis.report.analyze` runs them all into a report folder."""

from pathlib import Path

from .dimension import first_component_evr, linear_id, participation_ratio, spectral_summary, twonn
from .similarity import bases_similarity, spectral_similarity
from .specialization import (
    HeadContributions,
    correlation_scores,
    greedy_selection,
    jaccard,
    per_head_accuracy,
    random_directions,
)
from .textspan import TextSelection, somp, textspan


def default_dictionary() -> list[str]:
    """A few hundred general visual descriptions (objects, scenes, colors, textures, shapes, text, counts,
    locations, styles) shipped with the package."""
    lines = (Path(__file__).parent / "descriptions.txt").read_text().splitlines()
    return [ln for ln in lines if ln and not ln.startswith("#")]


__all__ = [
    "HeadContributions",
    "TextSelection",
    "bases_similarity",
    "correlation_scores",
    "default_dictionary",
    "first_component_evr",
    "greedy_selection",
    "jaccard",
    "linear_id",
    "participation_ratio",
    "per_head_accuracy",
    "random_directions",
    "somp",
    "spectral_similarity",
    "spectral_summary",
    "textspan",
    "twonn",
]
