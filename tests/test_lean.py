"""The lean inference form: exact math, bounded construction, memory at rest, no stale state, deployment."""

import copy

import open_clip
import pytest
import torch
from conftest import images_for, randomize, small_visual
from open_clip.transformer import VisionTransformer

import residual_fast as rf
from residual_fast.bench import full_rank_bases
from residual_fast.models import get_adapter
from residual_fast.ops import residual_reference
from residual_fast.profiling import LiveBytes, persistent_extra_bytes, weight_bytes
from residual_fast.units import affine_maps


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def setup():
    v = small_visual("w96h6p4")  # D = 80 < MLP q = 98: more calibration images than D gives full-rank MLP bases
    bases = rf.fit_bases(v, images_for(v, 160, seed=2).split(40), units=("emb", "head", "mlp"), progress=False)
    x = images_for(v, 5, seed=11)
    return v, bases, x, rf.decompose(v, x)


def test_head_maps_factor_through_the_models_own_map(setup):
    """float64: ``R_u.T diag(w) B_u == A_u F_u`` with ``A_u = R_u.T diag(w) X_u`` (q x q), for every head."""
    v, bases, _, _ = setup
    assert int(bases.rank("mlp").min()) == v.output_dim  # full rank
    adapter = rf.ResiDual.from_bases(bases, "full", init="randn")
    g = adapter.groups["head"]
    F, _ = affine_maps(adapter.spec, "head")
    w = g.lam.detach().double() - adapter.padding
    Rp, Xp, Bp, wp = g.pad(g.R), g.pad(g.X), g.pad(g.components.double()), g.pad(w)
    M = (Rp * wp[..., None]).transpose(1, 2) @ Bp  # (U, q, D): the dense fold
    A = (Rp * wp[..., None]).transpose(1, 2) @ Xp  # (U, q, q)
    assert rel_err(A @ F, M) < 1e-10


def test_construction_is_bounded_at_full_rank():
    """Full variant (heads + MLPs, every component) on a mid-size model: peak working memory a small multiple
    of the adapter's own size; nothing the size of K x q x D."""
    torch.manual_seed(0)
    v = randomize(VisionTransformer(image_size=32, patch_size=8, width=256, layers=4, heads=4, mlp_ratio=2.0,
                                    output_dim=192))
    bases = full_rank_bases(v, ("head", "mlp"))
    with LiveBytes() as lb:
        adapter = rf.ResiDual.from_bases(bases, "full")
    own = weight_bytes(adapter)
    K = sum(sum(k) for k in adapter.ks().values())
    q_mlp, D = 256 + 2, 192
    assert lb.peak < 3 * own
    assert lb.max_numel < K * q_mlp * D / 100
    x = images_for(v, 3)
    dec = rf.decompose(v, x)
    with torch.no_grad():
        out = rf.ResiDualVisual(v, adapter)(x)
    assert rel_err(out, residual_reference(adapter, dec.contributions, dec.output)) < 1e-5


@pytest.mark.parametrize("name", ["ViT-B-16", "ViT-L-14"])
def test_merged_extra_bytes_under_one_percent(name):
    torch.manual_seed(0)
    v = open_clip.create_model(name, pretrained=None).visual.eval()
    bases = full_rank_bases(v, units=("head",))
    weights = weight_bytes(v)
    for variant in ("coarse", "fine"):
        fused = rf.ResiDualVisual(v, rf.ResiDual.from_bases(bases, variant))
        merged = fused.merge()
        extra = persistent_extra_bytes(merged, v)
        assert 0 < extra <= 0.01 * weights, (variant, extra / weights)
        assert persistent_extra_bytes(fused, v) > extra  # the un-merged module keeps the training objects
        for t in merged.buffers():
            assert t.dtype == torch.float32  # the model's dtype, nothing float64


@pytest.mark.parametrize("variant", ["coarse", "fine", "full"])
def test_merged_equals_unmerged_and_reference(setup, variant):
    v, bases, x, dec = setup
    adapter = rf.ResiDual.from_bases(bases, variant)
    fused = rf.ResiDualVisual(v, adapter)
    merged = fused.merge()
    ref = residual_reference(adapter, dec.contributions, dec.output)
    with torch.no_grad():
        assert rel_err(merged(x), ref) < 1e-5
        assert rel_err(fused(x), ref) < 1e-5
    assert not any(p.requires_grad for p in merged.buffers())
    assert "adapter" not in dict(merged.named_children())


def test_lambda_changes_are_never_stale(setup):
    v, bases, x, dec = setup
    adapter = rf.ResiDual.from_bases(bases, "fine")
    fused = rf.ResiDualVisual(v, adapter)
    with torch.no_grad():
        before = fused(x)
        adapter.lambdas["head"].data.mul_(2)  # .data: no _version bump
        after = fused(x)
    assert rel_err(after, residual_reference(adapter, dec.contributions, dec.output)) < 1e-5
    assert rel_err(after, before) > 1e-3
    other = rf.ResiDual.from_bases(bases, "fine", seed=5)
    adapter.load_state_dict(other.state_dict())
    with torch.no_grad():
        assert rel_err(fused(x), residual_reference(other, dec.contributions, dec.output)) < 1e-5
    fused.adapter.lambdas["head"].data.fill_(0.5)  # through the wrapper's own state
    with torch.no_grad():
        assert rel_err(fused(x), residual_reference(adapter, dec.contributions, dec.output)) < 1e-5


def test_model_weight_changes_are_never_stale(setup):
    _, bases, x, _ = setup
    v = copy.deepcopy(setup[0])
    adapter = rf.ResiDual.from_bases(bases, "fine")
    fused = rf.ResiDualVisual(v, adapter)
    merged = fused.merge()
    with torch.no_grad():
        fused(x), merged(x)
        # a weight the readout does not depend on: the lean maps still hold, outputs follow the new model
        qkv = v.transformer.resblocks[0].attn.in_proj_weight
        qkv.mul_(1.5)
        dec = rf.decompose(v, x)
        ref = residual_reference(adapter, dec.contributions, dec.output)
        assert rel_err(fused(x), ref) < 1e-5
        assert rel_err(merged(x), ref) < 1e-5
        # a readout weight changed in place (load_state_dict): refused, every time
        sd = v.state_dict()
        sd["transformer.resblocks.1.attn.out_proj.weight"] = sd["transformer.resblocks.1.attn.out_proj.weight"] * 2
        v.load_state_dict(sd)
        for module in (fused, merged, fused, merged):
            with pytest.raises(RuntimeError, match="readout weights changed"):
                module(x)
        # restored: served again
        sd["transformer.resblocks.1.attn.out_proj.weight"] /= 2
        v.load_state_dict(sd)
        assert rel_err(merged(x), ref) < 1e-5


def test_casts_are_followed(setup):
    _, bases, x, _ = setup
    v = copy.deepcopy(setup[0])
    fused = rf.ResiDualVisual(v, rf.ResiDual.from_bases(bases, "full"))
    with torch.no_grad():
        ref = fused(x)
        merged = fused.merge()
        fused.double()
        y64 = fused(x.double())
        assert y64.dtype == torch.float64 and rel_err(y64, ref.double()) < 1e-5
        v.float()  # the model alone, behind the wrappers' back
        assert rel_err(merged(x), ref) < 1e-5
        plain = v(x)
        merged.bfloat16()
        yb = merged(x.bfloat16())
        plain_err = rel_err(v(x.bfloat16()).float(), plain)
    assert yb.dtype == torch.bfloat16
    assert rel_err(yb.float(), ref) < 4 * plain_err + 1e-3


def test_export_and_compile_equal_eager(setup):
    v, bases, x, _ = setup
    fused = rf.ResiDualVisual(v, rf.ResiDual.from_bases(bases, "full"))
    merged = fused.merge()
    with torch.no_grad():
        want = merged(x)
        for module in (merged, fused):
            exported = torch.export.export(module, (x,))
            assert rel_err(exported.module()(x), want) < 1e-5
        compiled = torch.compile(merged, fullgraph=True, backend="aot_eager")
        assert rel_err(compiled(x), want) < 1e-5


def test_gradient_through_merged_form_matches_reference(setup):
    """The un-merged forward folds with autograd: dL/dlambda equals the eager reference's."""
    v, bases, x, dec = setup
    a1 = rf.ResiDual.from_bases(bases, "full")
    a2 = rf.ResiDual.from_bases(bases, "full")
    rf.ResiDualVisual(v, a1)(x).square().sum().backward()
    residual_reference(a2, dec.contributions, dec.output).square().sum().backward()
    for kind in a1.lambdas:
        g1, g2 = a1.lambdas[kind].grad, a2.lambdas[kind].grad
        assert torch.allclose(g1, g2, rtol=1e-3, atol=1e-4 * g2.abs().max().item())


def test_inductor_inference_and_training(setup):
    """torch.compile(fullgraph=True) with inductor: the merged encoder's forward, and lambda training on cached
    activations (forward and backward through the custom op) equal eager."""
    from residual_fast.decompose import capture

    v, bases, x, _ = setup
    merged = rf.ResiDualVisual(v, rf.ResiDual.from_bases(bases, "full")).merge()
    with torch.no_grad():
        assert rel_err(torch.compile(merged, fullgraph=True)(x), merged(x)) < 1e-5
        acts = capture(get_adapter(v), x)
    for variant in ("coarse", "fine"):
        adapter = rf.ResiDual.from_bases(bases, variant)

        def loss(a, adapter=adapter):
            return adapter(a).square().sum()

        want = loss(acts)
        want.backward()
        g_want = adapter.lambdas["head"].grad.clone()
        adapter.zero_grad()
        got = torch.compile(loss, fullgraph=True)(acts)
        got.backward()
        assert rel_err(got, want) < 1e-5
        assert rel_err(adapter.lambdas["head"].grad, g_want) < 1e-5


def test_compiled_training_through_the_fused_encoder(setup):
    v, bases, x, _ = setup
    adapter = rf.ResiDual.from_bases(bases, "fine")
    fused = rf.ResiDualVisual(v, adapter)
    fused(x).square().sum().backward()
    g_want = adapter.lambdas["head"].grad.clone()
    adapter.zero_grad()
    torch.compile(fused, fullgraph=True, backend="aot_eager")(x).square().sum().backward()
    assert rel_err(adapter.lambdas["head"].grad, g_want) < 1e-5
