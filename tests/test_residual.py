"""ResiDual: the factorized computation against the eager reference of DESIGN.md section 3."""

import itertools

import pytest
import torch
from conftest import images_for, small_visual

import residual_fast as rf
from residual_fast.ops import residual_reference
from residual_fast.profiling import LiveBytes

CASES = [
    (variant, ablation, padding, add_means)
    for variant, ablation, padding, add_means in itertools.product(
        ["coarse", "fine", "full"], ["sum", "mean", "zero"], [0, 1], [False, True]
    )
    if not (variant == "coarse" and add_means)
]


@pytest.fixture(scope="module")
def setup():
    v = small_visual("layerscale")
    bases = rf.fit_bases(v, images_for(v, 80, seed=2).split(40), units=("emb", "head", "mlp"), progress=False)
    x = images_for(v, 6, seed=9)
    return v, bases, rf.decompose(v, x)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("variant,ablation,padding,add_means", CASES)
def test_factorized_equals_reference(setup, variant, ablation, padding, add_means):
    _, bases, dec = setup
    adapter = rf.ResiDual.from_bases(bases, variant, ablation=ablation, padding=padding, add_means=add_means)
    ref = residual_reference(adapter, dec.contributions, dec.output)
    with torch.no_grad():
        fac = adapter(dec.activations)
    assert rel_err(fac, ref) < 1e-5


@pytest.mark.parametrize("k,evr", [(3, None), ("all", None), (None, 0.5), (None, 0.99)])
def test_pruning_choices(setup, k, evr):
    _, bases, dec = setup
    adapter = rf.ResiDual.from_bases(bases, "fine", k=k, evr_threshold=evr, units=("head", "mlp"))
    rank = {kind: bases.rank(kind) for kind in ("head", "mlp")}
    for kind, ks in adapter.ks().items():
        ks = torch.tensor(ks)
        if k == 3:
            assert torch.equal(ks, rank[kind].clamp(max=3))
        elif k == "all":
            assert torch.equal(ks, rank[kind])
        else:
            assert torch.equal(ks, bases.k_for_evr(kind, evr))
    ref = residual_reference(adapter, dec.contributions, dec.output)
    assert rel_err(adapter(dec.activations).detach(), ref) < 1e-5


def test_variant_defaults_and_parameter_counts(setup):
    _, bases, _ = setup
    spec = bases.spec
    coarse = rf.ResiDual.from_bases(bases, "coarse")
    assert coarse.num_parameters() == spec.num_layers * spec.num_heads
    fine = rf.ResiDual.from_bases(bases, "fine")
    assert fine.num_parameters() == int(bases.k_for_evr("head", 0.9).sum())
    assert (fine.padding, fine.ablation, tuple(fine.groups)) == (0, "zero", ("head",))
    full = rf.ResiDual.from_bases(bases, "full")
    assert full.num_parameters() == int(bases.rank("head").sum() + bases.rank("mlp").sum())
    assert (full.padding, full.ablation, tuple(full.groups)) == (1, "sum", ("head", "mlp"))
    # the lambdas are the only parameters
    assert [n for n, _ in full.named_parameters()] == ["groups.head.lam", "groups.mlp.lam"]


def test_lambda_inits(setup):
    _, bases, _ = setup
    ones = rf.ResiDual.from_bases(bases, "full", init="ones")
    assert all(torch.equal(p, torch.ones_like(p)) for p in ones.parameters())
    a = rf.ResiDual.from_bases(bases, "full", init="randn", seed=3)
    b = rf.ResiDual.from_bases(bases, "full", init="randn", seed=3)
    c = rf.ResiDual.from_bases(bases, "full", init="randn", seed=4)
    assert torch.equal(a.lambdas["head"], b.lambdas["head"])
    assert not torch.equal(a.lambdas["head"], c.lambdas["head"])
    flat = torch.cat([p.detach() for p in a.parameters()])
    assert abs(flat.mean().item() - 1.0) < 0.3 and abs(flat.std().item() - 1.0) < 0.3
    eig = rf.ResiDual.from_bases(bases, "fine", init="eigen")
    g = eig.groups["head"]
    assert torch.allclose(g.lam.double(), g.eigenvalues.sqrt(), rtol=1e-6)


def test_mean_ablation_uses_calibration_means(setup):
    """The "mean" rest is a constant: the same for any batch, equal to the calibration means."""
    v, bases, dec = setup
    adapter = rf.ResiDual.from_bases(bases, "fine", ablation="mean", init="ones")
    zero = rf.ResiDual.from_bases(bases, "fine", ablation="zero", init="ones")
    with torch.no_grad():
        diff = adapter(dec.activations) - zero(dec.activations)
    rest = [u.index for u in dec.units if u.kind != "head"]
    expected = bases.means[rest].sum(0).float()
    assert torch.allclose(diff, expected.expand_as(diff), atol=1e-5)
    # not the batch means of this batch
    assert not torch.allclose(expected, dec.contributions[:, rest].mean(0).sum(0), atol=1e-3)


def test_gradients_reach_lambdas_only(setup):
    _, bases, dec = setup
    adapter = rf.ResiDual.from_bases(bases, "full")
    adapter(dec.activations).square().sum().backward()
    for p in adapter.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    # the gradient agrees with the reference path's
    ref_adapter = rf.ResiDual.from_bases(bases, "full")
    residual_reference(ref_adapter, dec.contributions, dec.output).square().sum().backward()
    for p, q in zip(adapter.parameters(), ref_adapter.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, rtol=1e-3, atol=1e-3 * q.grad.abs().max().item())


def test_factorized_never_builds_unit_by_output_tensor(setup):
    _, bases, dec = setup
    adapter = rf.ResiDual.from_bases(bases, "full")
    n, U, D = dec.contributions.shape
    with torch.no_grad(), LiveBytes() as lb:
        adapter(dec.activations)
    for kind in ("head", "mlp"):
        assert not lb.has_shape_prefix(n, dec.units.count(kind), D)
    # nothing batch-sized is as large as one (n, U_head, D) tensor
    per_batch = [torch.Size(s).numel() for s in lb.shapes if n in s]
    assert max(per_batch) < n * dec.units.count("head") * D


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"variant": "nope"}, "unknown variant"),
        ({"padding": 2}, "padding"),
        ({"ablation": "median"}, "ablation"),
        ({"init": "xavier"}, "init"),
        ({"k": 0}, "k must be"),
        ({"k": 3, "evr_threshold": 0.9}, "either k or evr_threshold"),
        ({"evr_threshold": 1.5}, "evr threshold"),
        ({"units": ("head", "attn")}, "units must be"),
        ({"variant": "coarse", "init": "eigen"}, "eigen"),
    ],
)
def test_bad_arguments(setup, kwargs, match):
    _, bases, _ = setup
    with pytest.raises(ValueError, match=match):
        rf.ResiDual.from_bases(bases, **kwargs)


def test_units_not_fitted(small, calib):
    bases = rf.fit_bases(small, [calib], units=("head",), progress=False)
    with pytest.raises(ValueError, match="no PCA for 'mlp'"):
        rf.ResiDual.from_bases(bases, "full")
    with pytest.raises(TypeError, match="SpectralBases"):
        rf.ResiDual.from_bases(calib, "fine")
