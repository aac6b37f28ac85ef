"""pytest-benchmark cases: ``pytest benchmarks --benchmark-only``.

Each case also records the peak live tensor bytes of one call (deterministic,
see :mod:`residual_fast.profiling`) in ``extra_info``.
"""

import pytest
import torch
from cases import MODELS, build_paths, build_visual

from residual_fast.profiling import LiveBytes

_CACHE = {}


def _paths(model: str, variant: str, batch: int):
    key = (model, variant, batch)
    if key not in _CACHE:
        _CACHE[key] = build_paths(build_visual(model), variant, batch)[0]
    return _CACHE[key]


@pytest.mark.parametrize("path", ["plain", "merged", "fused", "eager"])
@pytest.mark.parametrize("variant", ["fine", "full"])
@pytest.mark.parametrize("model", MODELS)
def test_inference(benchmark, model, variant, path):
    torch.set_num_threads(2)
    fn = _paths(model, variant, 8)[path]
    with torch.no_grad():
        with LiveBytes() as lb:
            fn()
        benchmark.extra_info["peak_live_bytes"] = lb.peak
        benchmark.group = f"{model}-{variant}"
        benchmark.pedantic(fn, rounds=3 if model == "small" else 2, warmup_rounds=1)
