"""The benchmark cases: re-exported from :mod:`residual_fast.bench` (shared with ``residual-fast bench``)."""

from residual_fast.bench import (
    SMALL,
    build_paths,
    build_visual,
    full_rank_bases,
    images,
    measure,
    peak_bytes,
    rss_peak_of_call,
    timed,
)

MODELS = ("small", "ViT-B-16")

__all__ = ["MODELS", "SMALL", "build_paths", "build_visual", "full_rank_bases", "images", "measure", "peak_bytes",
           "rss_peak_of_call", "timed"]
