"""Fingerprints cover every weight of the vision tower and survive dtype casts (issue: reliability 1, 6, 9)."""

import copy
import json

import pytest
import torch
from conftest import images_for, small_visual

import residual_fast as rf
from residual_fast.cache import ActivationCache, build_cache
from residual_fast.serialization import META


@pytest.fixture(scope="module")
def fitted():
    v = small_visual("w64h4p8")
    bases = rf.fit_bases(v, [images_for(v, 64, seed=1)], units=("head", "mlp"), progress=False)
    return v, bases


# weights outside the readout: they change every activation the adapter, bases and caches were made from
CHANGES = {
    "qkv": lambda v: v.transformer.resblocks[0].attn.in_proj_weight,
    "mlp": lambda v: v.transformer.resblocks[1].mlp.c_fc.weight,
    "patch_embedding": lambda v: v.conv1.weight,
    "ln_1": lambda v: v.transformer.resblocks[0].ln_1.weight,
    "positional_embedding": lambda v: v.positional_embedding,
    "class_embedding": lambda v: v.class_embedding,
}


@pytest.mark.parametrize("what", sorted(CHANGES))
def test_files_are_refused_on_a_model_with_other_weights(tmp_path, fitted, what):
    v, bases = fitted
    adapter = rf.ResiDual.from_bases(bases, "fine")
    adapter.save(tmp_path / "adapter")
    bases.save(tmp_path / "bases")
    build_cache(v, [(images_for(v, 4), torch.arange(4))], tmp_path / "cache", progress=False)
    other = copy.deepcopy(v)
    with torch.no_grad():
        t = CHANGES[what](other)
        t.add_(0.3 * torch.randn_like(t))
    with pytest.raises(ValueError, match="differs"):
        rf.ResiDual.load(tmp_path / "adapter", other)
    with pytest.raises(ValueError, match="differs"):
        rf.SpectralBases.load(tmp_path / "bases", other)
    with pytest.raises(ValueError, match="differs"):
        ActivationCache(tmp_path / "cache").check_model(other)
    with pytest.raises(ValueError, match="differs"):
        rf.ResiDualVisual(other, adapter)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_a_dtype_cast_is_the_same_model(tmp_path, fitted, dtype):
    v, bases = fitted
    adapter = rf.ResiDual.from_bases(bases, "fine")
    adapter.save(tmp_path / "adapter")
    cast = copy.deepcopy(v).to(dtype)
    loaded = rf.ResiDual.load(tmp_path / "adapter", cast)  # no "weight differs"
    rf.SpectralBases.save(bases, tmp_path / "bases")
    rf.SpectralBases.load(tmp_path / "bases", cast)
    x = images_for(v, 3)
    with torch.no_grad():
        want = rf.ResiDualVisual(v, adapter)(x)
        got = rf.ResiDualVisual(cast, loaded)(x.to(dtype)).float()
        plain_err = ((cast(x.to(dtype)).float() - v(x)).abs().max() / v(x).abs().max()).item()
    assert ((got - want).abs().max() / want.abs().max()).item() < 10 * plain_err + 1e-6


def test_an_empty_or_missing_fingerprint_never_bypasses_the_check(tmp_path, fitted):
    v, bases = fitted
    rf.ResiDual.from_bases(bases, "fine").save(tmp_path / "a")
    for bad in ({}, {"dims": {}}, {"dims": {}, "tensors": {}}, "none", None):
        meta = json.loads((tmp_path / "a" / META).read_text())
        meta["fingerprint"] = bad
        (tmp_path / "a" / META).write_text(json.dumps(meta))
        with pytest.raises(ValueError, match="fingerprint|metadata"):
            rf.ResiDual.load(tmp_path / "a", v)


def test_small_readout_changes_are_refused_and_casts_of_tiny_weights_are_not(fitted):
    from open_clip.transformer import VisionTransformer

    v, bases = fitted
    other = copy.deepcopy(v)
    fused = rf.ResiDualVisual(other, rf.ResiDual.from_bases(bases, "fine"))
    merged = fused.merge()
    x = images_for(v, 2)
    with torch.no_grad():
        other.proj.mul_(1.009)  # a 0.9% change of the projection, in place
        for module in (fused, merged):
            with pytest.raises(RuntimeError, match="readout weights changed"):
                module(x)
    # untrained layer scale (1e-6): a half-precision copy rounds it by several percent, and is still the same model
    torch.manual_seed(0)
    ls = VisionTransformer(image_size=32, patch_size=8, width=64, layers=2, heads=4, mlp_ratio=2.0, output_dim=48,
                           ls_init_value=1e-6).eval()
    b = rf.fit_bases(ls, [images_for(ls, 32)], progress=False)
    adapter = rf.ResiDual.from_bases(b, "fine")
    for dtype in (torch.float16, torch.bfloat16):
        rf.ResiDualVisual(copy.deepcopy(ls).to(dtype), adapter)


def test_non_finite_fingerprints_match_nothing(tmp_path, fitted):
    v, bases = fitted
    rf.ResiDual.from_bases(bases, "fine").save(tmp_path / "a")
    meta = json.loads((tmp_path / "a" / META).read_text())
    for sk in meta["fingerprint"]["tensors"].values():
        sk["s"][1] = float("nan")
    (tmp_path / "a" / META).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="fingerprint"):
        rf.ResiDual.load(tmp_path / "a", v)
    broken = copy.deepcopy(v)
    with torch.no_grad():
        broken.conv1.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        rf.ResiDualVisual(broken, rf.ResiDual.from_bases(bases, "fine"))


def test_components_outside_the_units_space_are_refused(tmp_path, fitted):
    v, bases = fitted
    adapter = rf.ResiDual.from_bases(bases, "fine")
    g = adapter.groups["head"]
    with torch.no_grad():
        g.components[0] = torch.nn.functional.normalize(torch.randn_like(g.components[0]), dim=0)
    adapter.save(tmp_path / "a")  # a hand-made file with a valid checksum
    with pytest.raises(ValueError, match="output space"):
        rf.ResiDual.load(tmp_path / "a", v)


def test_merged_half_keeps_the_epilogue_in_fp32(fitted):
    v, bases = fitted
    merged = rf.ResiDualVisual(copy.deepcopy(v), rf.ResiDual.from_bases(bases, "fine")).merge()
    merged.half()
    assert merged.v1.dtype == merged.v2.dtype == merged.c.dtype == torch.float32
    assert merged.head_A.dtype == torch.float16
