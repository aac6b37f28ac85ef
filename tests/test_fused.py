"""ResiDualVisual: the one-pass adapted encoder against the eager reference and the plain model."""

import open_clip
import pytest
import torch
from conftest import images_for, randomize, small_visual
from test_residual import CASES

import residual_fast as rf
from residual_fast.ops import residual_reference
from residual_fast.profiling import LiveBytes


@pytest.fixture(scope="module")
def setup():
    v = small_visual("w96h6p4")
    bases = rf.fit_bases(v, images_for(v, 120, seed=2).split(40), units=("emb", "head", "mlp"), progress=False)
    x = images_for(v, 5, seed=11)
    return v, bases, x, rf.decompose(v, x)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("variant,ablation,padding,add_means", CASES)
def test_fused_equals_reference(setup, variant, ablation, padding, add_means):
    v, bases, x, dec = setup
    adapter = rf.ResiDual.from_bases(bases, variant, ablation=ablation, padding=padding, add_means=add_means)
    ref = residual_reference(adapter, dec.contributions, dec.output)
    with torch.no_grad():
        out = rf.ResiDualVisual(v, adapter)(x)
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("units", [("head",), ("head", "mlp"), ("emb", "head", "mlp")])
def test_identity_adapter_is_the_plain_model(setup, units):
    v, bases, x, _ = setup
    adapter = rf.ResiDual.from_bases(bases, "full", units=units, init="ones", padding=1, ablation="sum",
                                     add_means=True)
    with torch.no_grad():
        assert rel_err(rf.ResiDualVisual(v, adapter)(x), v(x)) < 1e-5


def test_mean_pooling_model():
    v = small_visual("meanpool")
    bases = rf.fit_bases(v, [images_for(v, 64, seed=4)], units=("head", "mlp"), progress=False)
    x = images_for(v, 3)
    dec = rf.decompose(v, x)
    for variant in ("coarse", "fine", "full"):
        adapter = rf.ResiDual.from_bases(bases, variant)
        with torch.no_grad():
            out = rf.ResiDualVisual(v, adapter)(x)
        assert rel_err(out, residual_reference(adapter, dec.contributions, dec.output)) < 1e-5


def test_drop_in_for_open_clip_encode_image():
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    model.visual = randomize(model.visual)
    model.eval()
    x = images_for(model.visual, 2)
    bases = rf.fit_bases(model.visual, [images_for(model.visual, 4, seed=s) for s in range(2)], progress=False)
    adapter = rf.ResiDual.from_bases(bases, variant="fine")
    dec = rf.decompose(model.visual, x)
    ref = residual_reference(adapter, dec.contributions, dec.output)
    plain_visual = model.visual
    model.visual = rf.ResiDualVisual(model.visual, adapter)
    with torch.no_grad():
        feats = model.encode_image(x)
        normed = model.encode_image(x, normalize=True)
    assert rel_err(feats, ref) < 1e-5
    assert torch.allclose(normed, torch.nn.functional.normalize(ref, dim=-1), atol=1e-5)
    assert model.visual.image_size == plain_visual.image_size  # attributes pass through
    # an adapted encoder's output is not the model's: decomposing it is refused, not done on the inner model
    with pytest.raises(TypeError, match="adapted encoder"):
        rf.decompose(model.visual, x)
    assert rel_err(rf.decompose(model.visual.wrapped_visual, x).total(), dec.output) < 1e-6


def test_cache_follows_lambda_updates(setup):
    v, bases, x, dec = setup
    adapter = rf.ResiDual.from_bases(bases, "fine")
    fused = rf.ResiDualVisual(v, adapter)
    with torch.no_grad():
        before = fused(x)
        adapter.lambdas["head"].mul_(0.5)
        after = fused(x)
    assert not torch.allclose(before, after)
    assert rel_err(after, residual_reference(adapter, dec.contributions, dec.output)) < 1e-5


def test_gradient_through_fused_encoder(setup):
    v, bases, x, dec = setup
    adapter = rf.ResiDual.from_bases(bases, "fine")
    rf.ResiDualVisual(v, adapter)(x).square().sum().backward()
    other = rf.ResiDual.from_bases(bases, "fine")
    residual_reference(other, dec.contributions, dec.output).square().sum().backward()
    g1, g2 = adapter.lambdas["head"].grad, other.lambdas["head"].grad
    assert torch.allclose(g1, g2, rtol=1e-3, atol=1e-3 * g2.abs().max().item())


def test_no_unit_tensor_and_plain_memory(setup):
    v, bases, x, dec = setup
    adapter = rf.ResiDual.from_bases(bases, "full", units=("emb", "head", "mlp"))
    fused = rf.ResiDualVisual(v, adapter)
    n, U, D = dec.contributions.shape
    with torch.no_grad():
        fused(x)  # fold once, as a deployed encoder does
        with LiveBytes() as plain:
            v(x)
        with LiveBytes() as ours:
            fused(x)
    # no (n, U, D)-like tensor for any unit count: every batch-sized tensor with a D axis is (n, D)
    counts = {dec.units.count("head"), dec.units.count("mlp"), U}
    assert not any(n in s and D in s and counts & set(s) for s in ours.shapes)
    assert ours.peak <= plain.peak * 1.01
