"""Save/load (safetensors + JSON, fingerprinted) and clear errors for bad input."""

import json

import pytest
import torch
from conftest import images_for, small_visual
from open_clip.transformer import VisionTransformer

import residual_fast as rf


@pytest.fixture(scope="module")
def fitted():
    v = small_visual("w64h4p8")
    bases = rf.fit_bases(v, [images_for(v, 64, seed=1)], units=("head", "mlp"), progress=False)
    return v, bases


@pytest.mark.parametrize("variant", ["coarse", "fine", "full"])
def test_save_load_roundtrip(tmp_path, fitted, variant):
    v, bases = fitted
    adapter = rf.ResiDual.from_bases(bases, variant, seed=7)
    with torch.no_grad():
        adapter.lambdas["head"].add_(0.25)  # a trained state, not the init
    adapter.save(tmp_path / "ad")
    files = sorted(p.name for p in (tmp_path / "ad").iterdir())
    assert files == ["meta.json", "tensors.safetensors"]
    meta = json.loads((tmp_path / "ad" / "meta.json").read_text())
    assert meta["variant"] == variant and meta["version"] == rf.__version__
    assert meta["k"] == adapter.ks() and meta["num_parameters"] == adapter.num_parameters()
    assert set(meta["fingerprint"]["dims"]) >= {"num_layers", "num_heads", "width", "out_dim"}
    loaded = rf.ResiDual.load(tmp_path / "ad", visual=v)
    x = images_for(v, 3, seed=5)
    with torch.no_grad():
        a = rf.ResiDualVisual(v, adapter)(x)
        b = rf.ResiDualVisual(v, loaded)(x)
    assert torch.equal(a, b)


def test_load_onto_another_model_names_the_mismatch(tmp_path, fitted):
    v, bases = fitted
    rf.ResiDual.from_bases(bases, "fine").save(tmp_path / "ad")
    other_weights = small_visual("w64h4p8", seed=1)
    with pytest.raises(ValueError, match="another model: weight '"):
        rf.ResiDual.load(tmp_path / "ad", visual=other_weights)
    other_dims = small_visual("w96h6p4")
    with pytest.raises(ValueError, match="num_heads is 4 in the saved model but 6"):
        rf.ResiDual.load(tmp_path / "ad", visual=other_dims)


def test_missing_or_wrong_files(tmp_path, fitted):
    v, bases = fitted
    with pytest.raises(FileNotFoundError, match="no saved residual_adapter"):
        rf.ResiDual.load(tmp_path / "nothing", visual=v)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "meta.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="missing tensors.safetensors"):
        rf.ResiDual.load(tmp_path / "half", visual=v)
    bases.save(tmp_path / "bases")
    with pytest.raises(ValueError, match="holds a 'spectral_bases'"):
        rf.ResiDual.load(tmp_path / "bases", visual=v)


def test_bases_from_another_model(fitted):
    _, bases = fitted
    adapter = rf.ResiDual.from_bases(bases, "fine")
    with pytest.raises(ValueError, match="fitted on another model"):
        rf.ResiDualVisual(small_visual("w64h4p8", seed=3), adapter)


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda v: images_for(v, 2)[:, :2], ValueError, "3 channels"),
        (lambda v: torch.randn(2, 3, 16, 16), ValueError, "32x32"),
        (lambda v: torch.randn(3, 32, 32), ValueError, r"\(n, C, H, W\)"),
        (lambda v: torch.zeros(2, 3, 32, 32, dtype=torch.uint8), TypeError, "floating-point"),
        (lambda v: torch.randn(0, 3, 32, 32), ValueError, "empty batch"),
        (lambda v: torch.randn(2, 3, 32, 32, device="meta"), ValueError, "on meta"),
        (lambda v: images_for(v, 2).numpy(), TypeError, "torch.Tensor"),
    ],
)
def test_bad_images(fitted, make, exc, match):
    v, bases = fitted
    fused = rf.ResiDualVisual(v, rf.ResiDual.from_bases(bases, "fine"))
    bad = make(v)
    with pytest.raises(exc, match=match):
        rf.decompose(v, bad)
    with pytest.raises(exc, match=match):
        fused(bad)


def test_empty_or_bad_calibration_data(small):
    with pytest.raises(ValueError, match="calibration data is empty"):
        rf.fit_bases(small, [], progress=False)
    with pytest.raises(ValueError, match="at least 2"):
        rf.fit_bases(small, [images_for(small, 1)], progress=False)
    with pytest.raises(TypeError, match="calibration batch"):
        rf.fit_bases(small, ["not images"], progress=False)
    with pytest.raises(ValueError, match="units must be"):
        rf.fit_bases(small, [images_for(small, 4)], units=("heads",), progress=False)


def test_merging_moments_of_another_model(small):
    a = rf.accumulate_moments(small, [images_for(small, 4)], progress=False)
    other = small_visual("w64h4p8", seed=2)
    b = rf.accumulate_moments(other, [images_for(other, 4)], progress=False)
    with pytest.raises(ValueError, match="different models"):
        a.merge(b)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(attentional_pool=True), "attentional pooler"),
        (dict(pool_type="avg"), "final_ln_after_pool"),
        (dict(pool_type="none"), "pool_type='none'"),
        (dict(scale_attn_inner=True), "inner norm"),
        (dict(scale_attn=True), "norm after attention"),
        (dict(scaled_cosine_attn=True), "scaled cosine"),
    ],
)
def test_unsupported_configurations(kwargs, match):
    v = VisionTransformer(image_size=32, patch_size=8, width=64, layers=1, heads=4, mlp_ratio=2.0,
                          output_dim=32, **kwargs).eval()
    with pytest.raises(rf.UnsupportedModelError, match=match):
        rf.decompose(v, images_for(v, 2))


def test_not_a_vision_transformer():
    import open_clip

    model = open_clip.create_model("ViT-B-32", pretrained=None)
    with pytest.raises(rf.UnsupportedModelError, match="pass model.visual"):
        rf.decompose(model, torch.randn(1, 3, 224, 224))
    with pytest.raises(TypeError, match="nn.Module"):
        rf.decompose("ViT-B-32", torch.randn(1, 3, 224, 224))
    with pytest.raises(rf.UnsupportedModelError, match="no residual_fast adapter"):
        rf.decompose(torch.nn.Linear(3, 3), torch.randn(1, 3, 224, 224))
