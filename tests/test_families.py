"""HF transformers (CLIP, BLIP, DINOv2, ViT) and timm ViTs: the same exactness as open_clip.

Every family at small random-init configs: the decomposition sums to the model's
own output; streamed bases equal brute-force float64 PCA; ResiDualVisual and its
merged form equal the eager reference for every variant; save/load refuses a different model.
"""

import pytest
import torch
import transformers as tf
from conftest import randomize

import residual_fast as rf
from residual_fast.models.hf import own_output
from residual_fast.ops import residual_reference

VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
DINO = dict(hidden_size=64, mlp_ratio=2, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8,
            layerscale_value=0.5)


def _timm(**kw):
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, **kw)


BUILDERS = {
    "hf_clip_vision_eager": lambda: tf.CLIPVisionModel(tf.CLIPVisionConfig(**VISION, attn_implementation="eager")),
    "hf_clip_vision_sdpa": lambda: tf.CLIPVisionModel(tf.CLIPVisionConfig(**VISION, attn_implementation="sdpa")),
    "hf_clip_vision_proj": lambda: tf.CLIPVisionModelWithProjection(tf.CLIPVisionConfig(**VISION, projection_dim=48)),
    "hf_clip_model": lambda: tf.CLIPModel(tf.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=40)),
    "hf_blip_vision": lambda: tf.BlipVisionModel(tf.BlipVisionConfig(**VISION)),
    "hf_blip_itm": lambda: tf.BlipForImageTextRetrieval(tf.BlipConfig(
        text_config={**TEXT, "encoder_hidden_size": 64}, vision_config=VISION, image_text_hidden_size=40)),
    "hf_dinov2": lambda: tf.Dinov2Model(tf.Dinov2Config(**DINO)),
    "hf_dinov2_registers": lambda: tf.Dinov2WithRegistersModel(tf.Dinov2WithRegistersConfig(**DINO,
                                                                                              num_register_tokens=4)),
    "hf_vit": lambda: tf.ViTModel(tf.ViTConfig(**VISION)),
    "hf_vit_classifier": lambda: tf.ViTForImageClassification(tf.ViTConfig(**VISION, num_labels=7)),
    "timm_vit_token": lambda: _timm(global_pool="token", num_classes=10),
    "timm_vit_avg_fc_norm": lambda: _timm(global_pool="avg", fc_norm=True, num_classes=0),
    "timm_vit_unfused_attn": lambda: _timm(global_pool="token", num_classes=0),
    "timm_dinov2_like": lambda: _timm(init_values=0.3, reg_tokens=4, global_pool="token", num_classes=0),
    "timm_qk_norm": lambda: _timm(num_classes=0, qk_norm=True),
}


def build(name, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = BUILDERS[name]()
    if name == "timm_vit_unfused_attn":
        for blk in model.blocks:
            blk.attn.fused_attn = False
    with torch.no_grad():  # BLIP initializes its vision embeddings with std 1e-10: give the images a say
        for p in model.parameters():
            if p.dim() >= 2 and p.std() < 1e-4:
                p.normal_(0.0, 0.05)
    return randomize(model, seed).to(dtype).eval()


def own(model, x):
    with torch.no_grad():
        if rf.get_adapter(model).family == "timm_vit":
            return model(x)
        return own_output(model, x)


def images(n, seed=0, dtype=torch.float32):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)).to(dtype)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_decomposition_sums_to_the_models_output(name):
    model = build(name)
    x = images(4)
    ref = own(model, x)
    dec = rf.decompose(model, x)
    assert rel_err(dec.total(), ref) < 1e-5
    model64 = build(name, dtype=torch.float64)
    # HF's eager attention takes the softmax in float32 even for float64 inputs, so there the model's own
    # float64 output carries float32-level error (~1e-8); everywhere else float64 agrees to rounding
    tol = 1e-6 if name.endswith("eager") else 1e-12
    assert rel_err(rf.decompose(model64, x.double()).total(), own(model64, x.double())) < tol


@pytest.mark.parametrize("name", ["hf_clip_model", "hf_blip_itm", "hf_dinov2_registers", "hf_vit_classifier",
                                  "timm_dinov2_like", "timm_vit_avg_fc_norm"])
def test_streamed_bases_equal_brute_force(name):
    model = build(name, dtype=torch.float64)
    x = images(60, seed=1, dtype=torch.float64)
    bases = rf.fit_bases(model, x.split(25), units=("head", "mlp"), progress=False)
    dec = rf.decompose(model, x)
    for kind in ("head", "mlp"):
        o = dec.of(kind)
        for u in range(o.shape[1]):
            mean = o[:, u].mean(0)
            _, S, Vh = torch.linalg.svd(o[:, u] - mean, full_matrices=False)
            eig = S.square() / (x.shape[0] - 1)
            r = int(bases.rank(kind)[u])
            assert (bases.unit_means(kind)[u] - mean).abs().max() <= 1e-6 * mean.abs().max()
            assert ((bases.eigenvalues(kind)[u, :r] - eig[:r]).abs() / eig[:r]).max() < 1e-6
            cos = torch.linalg.svdvals(bases.components(kind)[u, :r] @ Vh[:r].T)
            assert (1 - cos).abs().max() < 1e-6


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_adapted_encoder_equals_eager_reference(name):
    model = build(name)
    bases = rf.fit_bases(model, [images(48, seed=2)], units=("head", "mlp"), progress=False)
    x = images(5, seed=3)
    dec = rf.decompose(model, x)
    for variant in ("coarse", "fine", "full"):
        adapter = rf.ResiDual.from_bases(bases, variant)
        ref = residual_reference(adapter, dec.contributions, dec.output)
        with torch.no_grad():
            wrapped = rf.ResiDualVisual(model, adapter)
            fused = wrapped(x)
            merged = wrapped.merge()(x)
            fac = adapter(dec.activations)
        assert rel_err(fused, ref) < 1e-5
        assert rel_err(merged, ref) < 1e-5
        assert rel_err(fac, ref) < 1e-5
    identity = rf.ResiDual.from_bases(bases, "full", init="ones", add_means=True)
    with torch.no_grad():
        assert rel_err(rf.ResiDualVisual(model, identity)(x), own(model, x)) < 1e-5


@pytest.mark.parametrize("name", ["hf_clip_vision_proj", "hf_dinov2", "timm_vit_token"])
def test_save_load_refuses_a_different_model(tmp_path, name):
    model = build(name)
    bases = rf.fit_bases(model, [images(24, seed=2)], progress=False)
    adapter = rf.ResiDual.from_bases(bases, "fine")
    adapter.save(tmp_path / "a")
    loaded = rf.ResiDual.load(tmp_path / "a", visual=model)
    x = images(3)
    with torch.no_grad():
        assert torch.equal(rf.ResiDualVisual(model, adapter)(x), rf.ResiDualVisual(model, loaded)(x))
    with pytest.raises(ValueError, match="another model"):
        rf.ResiDual.load(tmp_path / "a", visual=build(name, seed=1))
    with pytest.raises(ValueError, match="another model"):
        rf.ResiDual.load(tmp_path / "a", visual=build("hf_vit"))


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: _timm(global_pool="avg", fc_norm=False, num_classes=0), "each normalized"),
        (lambda: _timm(global_pool="map", num_classes=0), "attention pooling"),
        (lambda: _timm(global_pool="max", num_classes=0), "global_pool='max'"),
    ],
)
def test_unsupported_timm_configurations(make, match):
    with pytest.raises(rf.UnsupportedModelError, match=match):
        rf.get_adapter(make())


def test_wrong_image_size_for_hf():
    model = build("hf_clip_vision_proj")
    with pytest.raises(ValueError, match="32x32"):
        rf.decompose(model, torch.randn(1, 3, 16, 16))


def test_load_by_name_offline():
    oc = rf.load("open_clip:ViT-B-32", pretrained=False)
    assert oc.visual is oc.model.visual and oc.encode_text is not None
    with torch.no_grad():
        assert oc.encode_text(["a cat"]).shape == (1, 512)
    tm = rf.load("timm:vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1)
    assert rf.get_adapter(tm.visual).family == "timm_vit" and tm.preprocess is not None
    hf = rf.load("hf:random-clip", pretrained=False,
                 config=tf.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=40))
    assert isinstance(hf.model, tf.CLIPModel) and rf.get_adapter(hf.visual).family == "hf_clip"
    # random weights are seeded for every family: two loads are the same model
    tm2 = rf.load("timm:vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1)
    hf2 = rf.load("hf:random-clip", pretrained=False,
                  config=tf.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=40))
    for a, b in ((tm, tm2), (hf, hf2)):
        assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values(),
                                                     strict=True))
    assert tuple(tm.preprocess(__import__("PIL").Image.new("RGB", (50, 40))).shape) == (3, 32, 32)
    # random HF weights get the family's processor at the model's size: CLIP's published mean / std
    x = hf.preprocess(__import__("PIL").Image.new("RGB", (50, 40), (128, 128, 128)))
    size = hf.model.config.vision_config.image_size
    mean, std = torch.tensor([0.48145466, 0.4578275, 0.40821073]), torch.tensor([0.26862954, 0.26130258, 0.27577711])
    torch.testing.assert_close(x, ((128 / 255 - mean) / std)[:, None, None].expand(3, size, size), atol=1e-3,
                               rtol=0)
    with pytest.raises(ValueError, match="start with one of"):
        rf.load("ViT-B-32")
    with pytest.raises(RuntimeError, match="could not create timm model"):
        rf.load("timm:not_a_model", pretrained=False)
    with pytest.raises(ValueError, match="not supported"):
        rf.load("hf:x", pretrained=False, config=tf.BertConfig())
    with pytest.raises(rf.UnsupportedModelError, match="each normalized"):
        rf.load("timm:vit_tiny_patch16_224", pretrained=False, global_pool="avg", fc_norm=False)
