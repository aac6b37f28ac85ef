"""The decomposition sums to the model's own forward (DESIGN.md section 2)."""

import open_clip
import pytest
import torch
from conftest import SMALL_CONFIGS, images_for, randomize, small_visual
from open_clip.transformer import Transformer

import residual_fast as rf


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name", sorted(SMALL_CONFIGS))
def test_small_configs_sum_to_model_output(name):
    v = small_visual(name)
    x = images_for(v, 5)
    with torch.no_grad():
        ref = v(x)
    d = rf.decompose(v, x)
    spec = d.spec
    assert d.contributions.shape == (5, 1 + spec.num_layers * (spec.num_heads + 1), ref.shape[1])
    assert rel_err(d.total(), ref) < 1e-5
    assert rel_err(d.output, ref) < 1e-5


@pytest.mark.parametrize("name", ["w64h4p8", "layerscale", "meanpool", "custom_attn"])
def test_float64_is_tighter(name):
    v = small_visual(name, dtype=torch.float64)
    x = images_for(v, 4)
    with torch.no_grad():
        ref = v(x)
    assert rel_err(rf.decompose(v, x).total(), ref) < 1e-12


@pytest.mark.parametrize("model_name", ["ViT-B-32", pytest.param("ViT-B-16", marks=pytest.mark.slow)])
def test_open_clip_models(model_name):
    torch.manual_seed(0)
    model = open_clip.create_model(model_name, pretrained=None)
    v = randomize(model.visual)
    x = images_for(v, 2)
    with torch.no_grad():
        ref = model.encode_image(x)
    d = rf.decompose(v, x)
    assert rel_err(d.total(), ref) < 1e-5


def test_batch_first_false_transformer():
    v = small_visual("w64h4p8")
    t = Transformer(64, 2, 4, mlp_ratio=2.0, batch_first=False)
    t.load_state_dict(v.transformer.state_dict())
    v.transformer = t
    assert not v.transformer.resblocks[0].attn.batch_first
    x = images_for(v, 3)
    with torch.no_grad():
        ref = v(x)
    assert rel_err(rf.decompose(v, x).total(), ref) < 1e-5


def test_units_table_and_kinds():
    v = small_visual("w96h6p4")
    d = rf.decompose(v, images_for(v, 2))
    table = d.units
    assert len(table) == 1 + 3 * 7
    assert table[0].kind == "emb"
    assert [u.kind for u in table][1:8] == ["head"] * 6 + ["mlp"]
    assert table[7].layer == 0 and table[8].layer == 1 and table[8].head == 0
    assert d.of("head").shape == (2, 18, 80)
    assert d.of("mlp").shape == (2, 3, 80)
    # the LN statistics are those of the final residual
    z = d.activations.z
    assert torch.allclose(d.mu, z.mean(-1))
    assert torch.allclose(d.s, torch.sqrt(z.var(-1, unbiased=False) + v.ln_post.eps))


def test_head_contribution_matches_out_proj_slice():
    """One head's contribution, computed independently from nn.MultiheadAttention with other heads' values zeroed."""
    v = small_visual("w64h4p8", dtype=torch.float64)
    x = images_for(v, 3)
    d = rf.decompose(v, x)
    blk = v.transformer.resblocks[1]
    hd = 16
    r = d.activations.attn_raw[:, 1]  # (n, w) before out_proj
    masked = torch.zeros_like(r)
    masked[:, 2 * hd:3 * hd] = r[:, 2 * hd:3 * hd]
    c = masked @ blk.attn.out_proj.weight.T + blk.attn.out_proj.bias / 4
    z, gamma = d.activations.z, v.ln_post.weight
    wu = 1.0 / (2 * 2 + 1) / 4
    o = (gamma * c / d.s[:, None] - wu * (gamma * (d.mu / d.s)[:, None] - v.ln_post.bias)) @ v.proj
    idx = [u.index for u in d.units if u.kind == "head" and u.layer == 1 and u.head == 2][0]
    assert torch.allclose(d.contributions[:, idx], o, atol=1e-12)
    assert z.shape == (3, 64)
