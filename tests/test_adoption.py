"""Adoption (issue 14): low precision, HF-native wrapping, text heads, capture/decompose inputs, PEFT-style API.

Rows of the issue's table are named in each test. Every comparison is against something independent:
the fp32 result (at a tolerance set by the plain model's own low-precision error), the model's own
forward, or the base model's untouched output.
"""

import copy

import pytest
import torch
from conftest import images_for, small_visual

import residual_fast as rf

HALF = [torch.float16, torch.bfloat16]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def _cast(module, dtype, how):
    if how == "to":
        return module.to(dtype)
    return module.half() if dtype == torch.float16 else module.bfloat16()


# -- row 3: an fp32-fitted adapter on the same model in fp16 / bf16 -------------------------------------
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("how", ["to", "method"])
def test_row3_fp32_adapter_runs_in_half_precision(fitted, dtype, how):
    v, bases = fitted
    x = images_for(v, 4)
    with torch.no_grad():
        plain_err = _rel(copy.deepcopy(v).to(dtype)(x.to(dtype)), v(x))  # the model's own low-precision error
        for variant in ("coarse", "fine", "full"):
            fused = rf.ResiDualVisual(copy.deepcopy(v), rf.ResiDual.from_bases(bases, variant))
            want = fused(x)
            merged = _cast(copy.deepcopy(fused).merge(), dtype, how)
            fused = _cast(fused, dtype, how)
            # the adapter's own state stays in fp32 (the forward accumulates in fp32 anyway)
            assert all(p.dtype == torch.float32 for p in fused.adapter.parameters())
            for module in (fused, merged):
                got = module(x.to(dtype))
                assert got.dtype == dtype and torch.isfinite(got).all()
                assert _rel(got, want) < 4 * plain_err, (variant, type(module).__name__)
            if how != "to":
                continue
            # the fp32 adapter also wraps a model cast before wrapping, and merges from it
            late = rf.ResiDualVisual(copy.deepcopy(v).to(dtype), rf.ResiDual.from_bases(bases, variant))
            assert _rel(late(x.to(dtype)), want) < 4 * plain_err
            assert _rel(late.merge()(x.to(dtype)), want) < 4 * plain_err


@pytest.mark.parametrize("dtype", HALF)
def test_row3_residual_on_cached_half_activations(fitted, dtype):
    v, bases = fitted
    x = images_for(v, 4)
    half_model = copy.deepcopy(v).to(dtype)
    with torch.no_grad():
        plain_err = _rel(half_model(x.to(dtype)), v(x))
        acts32 = rf.capture(v, x)
        acts16 = rf.capture(half_model, x.to(dtype))
        for variant in ("coarse", "fine", "full"):
            adapter = rf.ResiDual.from_bases(bases, variant)
            want = adapter(acts32)
            ref_same_acts = adapter(acts16)
            cast = _cast(copy.deepcopy(adapter), dtype, "method")
            # casting the adapter adds no rounding of its own: same activations, same numbers
            torch.testing.assert_close(cast(acts16), ref_same_acts, rtol=1e-5, atol=1e-6)
            assert _rel(_cast(copy.deepcopy(adapter), dtype, "to")(acts16), want) < 4 * plain_err


# -- row 8: capture takes a model; decompose / fit_bases refuse an adapted encoder ---------------------
def test_row8_capture_takes_the_model_or_its_adapter(fitted):
    v, bases = fitted
    x = images_for(v, 3)
    with torch.no_grad():
        direct = rf.capture(v, x)
        via = rf.capture(rf.get_adapter(v), x)
        torch.testing.assert_close(direct.output, v(x), rtol=1e-5, atol=1e-5)  # the model's own forward
    torch.testing.assert_close(direct.attn_raw, via.attn_raw, rtol=0, atol=0)
    fused = rf.ResiDualVisual(v, rf.ResiDual.from_bases(bases, "fine"))
    for call in (lambda: rf.capture(fused, x), lambda: rf.decompose(fused, x),
                 lambda: rf.fit_bases(fused, [x], progress=False),
                 lambda: rf.fit_bases(fused.merge(), [x], progress=False)):
        with pytest.raises(TypeError, match="adapted encoder"):
            call()


# -- row 4: HF-native wrapping ---------------------------------------------------------------------------
def _hf(name):
    import transformers as tf

    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    torch.manual_seed(0)
    if name == "clip":
        return tf.CLIPModel(tf.CLIPConfig(text_config=text, vision_config=vision, projection_dim=40)).eval()
    if name == "vision_proj":
        return tf.CLIPVisionModelWithProjection(tf.CLIPVisionConfig(**vision, projection_dim=48)).eval()
    return tf.ViTForImageClassification(tf.ViTConfig(**vision, num_labels=7)).eval()


def _adapted(model):
    g = torch.Generator().manual_seed(3)
    calib = torch.randn(48, 3, 32, 32, generator=g)
    adapter = rf.ResiDual.from_bases(rf.fit_bases(model, [calib], progress=False), "fine")
    fused = rf.ResiDualVisual(model, adapter)
    x = torch.randn(3, 3, 32, 32, generator=g)
    return fused, x


def test_row4_hf_clip_model_keyword_calls_are_adapted():
    import transformers as tf

    model = _hf("clip")
    fused, x = _adapted(model)
    with torch.no_grad():
        want = fused(x)  # the positional call: the adapted features, as before
        plain = model.get_image_features(pixel_values=x)
        plain = plain if isinstance(plain, torch.Tensor) else plain.pooler_output
        assert _rel(want, plain) > 1e-2  # the adapter changes the features: the checks below can fail
        for module in (fused, fused.merge()):
            out = module.get_image_features(pixel_values=x)
            assert type(out) is type(model.get_image_features(pixel_values=x))
            torch.testing.assert_close(out if isinstance(out, torch.Tensor) else out.pooler_output, want)
            ids = torch.tensor([[49406, 5, 6, 49407, 0], [49406, 7, 49407, 0, 0]])
            res = module(pixel_values=x, input_ids=ids, return_loss=False)
            assert isinstance(res, tf.models.clip.modeling_clip.CLIPOutput)
            # independent: the model's own text features and logit scale against the adapted image embeddings
            t = model.get_text_features(input_ids=ids)
            t = t if isinstance(t, torch.Tensor) else t.pooler_output
            t = t / t.norm(dim=-1, keepdim=True)
            i = want / want.norm(dim=-1, keepdim=True)
            torch.testing.assert_close(res.logits_per_image, model.logit_scale.exp() * i @ t.T)
            torch.testing.assert_close(res.image_embeds, i)
            with pytest.raises(TypeError, match="input_ids"):
                module(pixel_values=x)
            for name in ("vision_model", "visual_projection"):  # unadapted image paths are not forwarded
                with pytest.raises(AttributeError, match="unadapted"):
                    getattr(module, name)
            assert module.text_model is model.text_model and module.config is model.config
            with pytest.raises(ValueError, match="output_hidden_states"):
                module.get_image_features(pixel_values=x, output_hidden_states=True)


@pytest.mark.parametrize("name", ["vision_proj", "vit_classifier"])
def test_row4_hf_forward_returns_the_models_output_class(name):
    model = _hf(name)
    fused, x = _adapted(model)
    field = "image_embeds" if name == "vision_proj" else "logits"
    with torch.no_grad():
        want = fused(x)
        own = model(pixel_values=x)
        for module in (fused, fused.merge()):
            out = module(pixel_values=x)
            assert type(out) is type(own)
            torch.testing.assert_close(getattr(out, field), want)
            assert _rel(getattr(out, field), getattr(own, field)) > 1e-2
            assert module(pixel_values=x, return_dict=False)[0].shape == want.shape
            with pytest.raises(AttributeError, match="unadapted"):
                module.vit if name == "vit_classifier" else module.vision_model  # noqa: B018
            if name == "vit_classifier":
                with pytest.raises(TypeError, match="no get_image_features"):
                    module.get_image_features(pixel_values=x)


# -- row 5: zero-shot heads from HF CLIP and from rf.load; an offline tokenizer for random HF CLIP ------------
TEXT_CFG = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
VISION_CFG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)


@pytest.mark.parametrize("eos", [49407, 2])  # current configs pool at eos_token_id, legacy ones at argmax(ids)
def test_row5_offline_tokenizer_and_zero_shot_head_for_hf_clip(eos):
    import transformers as tf

    from residual_fast.classifiers import zero_shot_head

    cfg = tf.CLIPConfig(text_config={**TEXT_CFG, "eos_token_id": eos}, vision_config=VISION_CFG, projection_dim=40)
    loaded = rf.load("hf:random-clip", pretrained=False, config=cfg)
    assert loaded.tokenizer is not None and loaded.encode_text is not None
    model = loaded.model

    def own(ids):  # the model on exactly the text's tokens: no padding convention involved
        out = model.get_text_features(input_ids=torch.tensor([ids]))
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    with torch.no_grad():
        got = loaded.encode_text(["a cat", "a " * 200 + "dog"])
        # "a cat" in CLIP's BPE: <start> a cat <end>
        torch.testing.assert_close(got[0], own([49406, 320, 2368, 49407])[0], rtol=1e-5, atol=1e-5)
        long = [49406] + [320] * 75 + [49407]  # truncated to the 77 positions with the end token kept last
        torch.testing.assert_close(got[1], own(long)[0], rtol=1e-5, atol=1e-5)
        names, templates = ["cat", "dog"], ["a photo of a {c}.", "a {c}."]
        heads = [zero_shot_head(model, None, names, templates, progress=False),
                 zero_shot_head(loaded, None, names, templates, progress=False),
                 zero_shot_head(_adapted(model)[0], None, names, templates, progress=False)]
        e = torch.nn.functional.normalize(loaded.encode_text(["a photo of a cat.", "a cat."]), dim=-1)
        want = torch.nn.functional.normalize(e.mean(0), dim=-1)
    for head in heads:
        torch.testing.assert_close(head.weights[0], want, rtol=1e-5, atol=1e-5)
        assert head.logit_scale == pytest.approx(model.logit_scale.exp().item())


def test_row5_clear_errors_without_a_text_encoder():
    import transformers as tf

    from residual_fast.classifiers import zero_shot_head

    vit = rf.load("hf:random-vit", pretrained=False, config=tf.ViTConfig(**VISION_CFG))
    with pytest.raises(TypeError, match="no text tower"):
        zero_shot_head(vit, None, ["a"], ["{c}"], progress=False)
    bad = tf.CLIPConfig(text_config={**TEXT_CFG, "eos_token_id": 5}, vision_config=VISION_CFG, projection_dim=40)
    odd = rf.load("hf:odd-clip", pretrained=False, config=bad)
    assert odd.encode_text is None and "eos_token_id=5" in odd.no_text_reason
    with pytest.raises(TypeError, match="eos_token_id=5"):
        zero_shot_head(odd, None, ["a"], ["{c}"], progress=False)


# -- row 10 / deliverable 4: the PEFT-style surface -----------------------------------------------------------
def test_peft_style_round_trip_small_float32_files(tmp_path, fitted):
    import json
    import os
    import stat

    from safetensors.torch import load_file

    from residual_fast.serialization import META, TENSORS

    v, _ = fitted
    calib = images_for(v, 64, seed=1)
    x = images_for(v, 3)
    model = rf.get_residual_model(v, calib, "fine")
    assert isinstance(model, rf.ResiDualVisual)
    # PEFT's convention: the base weights are frozen, only the lambdas train
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == model.adapter.num_parameters() > 0
    with torch.no_grad():
        model.adapter.lambdas["head"].mul_(0.5).add_(0.3)  # "trained"
        want = model(x)
        plain = v(x)
    model.save_pretrained(tmp_path / "lean", base_model_name_or_path="my/vit")
    model.save_pretrained(tmp_path / "full", include_bases=True)
    old_adapter = tmp_path / "old"
    model.adapter.save(old_adapter)
    lean_bytes = (tmp_path / "lean" / TENSORS).stat().st_size
    # float32 and far smaller than the float64 bases of the old format
    assert lean_bytes < (old_adapter / TENSORS).stat().st_size / 4
    for folder in ("lean", "full"):
        tensors = load_file(str(tmp_path / folder / TENSORS))
        assert all(t.dtype in (torch.float32, torch.int64) for t in tensors.values())
        assert set(tensors) == set(model.adapter_state_dict(include_bases=folder == "full"))
        for name in (TENSORS, META):  # the usual mode for new files, not 0600
            mode = stat.S_IMODE(os.stat(tmp_path / folder / name).st_mode)
            assert mode & stat.S_IRGRP, oct(mode)
    meta = json.loads((tmp_path / "lean" / META).read_text())
    assert meta["base_model_name_or_path"] == "my/vit" and meta["fingerprint"] == model.adapter.fingerprint
    for folder in ("lean", "full"):
        back = rf.from_pretrained(copy.deepcopy(v), tmp_path / folder)
        merged = rf.MergedResiDualVisual.from_pretrained(copy.deepcopy(v), tmp_path / folder)
        assert isinstance(back, rf.ResiDualVisual) and isinstance(merged, rf.MergedResiDualVisual)
        with torch.no_grad():
            assert _rel(back(x), want) < 1e-5 and _rel(merged(x), want) < 1e-5
        with torch.no_grad():  # onto the same model in bf16: as close as the model's own bf16 error allows
            half = copy.deepcopy(v).bfloat16()
            plain_err = _rel(half(x.bfloat16()), plain)
            assert _rel(rf.from_pretrained(half, tmp_path / folder, merged=True)(x.bfloat16()), want) < 4 * plain_err
        # the loaded lambdas train on: gradients reach them
        back(x).sum().backward()
        assert back.adapter.lambdas["head"].grad.abs().sum() > 0
    # unload gives the untouched base model; disable_adapter runs it temporarily
    assert model.unload() is v
    with torch.no_grad():
        with model.disable_adapter():
            torch.testing.assert_close(model(x), plain, rtol=0, atol=0)
        assert _rel(model(x), want) == 0 and _rel(want, plain) > 1e-2
    with pytest.raises(TypeError, match="merged"):
        model.merge().save_pretrained(tmp_path / "m")


def test_peft_style_files_are_validated(tmp_path, fitted):
    import json

    from safetensors.torch import load_file, save_file

    from residual_fast.serialization import META, TENSORS, CorruptFileError, sha256_file

    v, bases = fitted
    model = rf.ResiDualVisual(v, rf.ResiDual.from_bases(bases, "fine"))
    model.save_pretrained(tmp_path / "a")
    other = small_visual("w64h4p8", seed=5)
    with pytest.raises(ValueError, match="another model"):
        rf.from_pretrained(other, tmp_path / "a")
    with pytest.raises(TypeError, match="adapted encoder"):
        rf.from_pretrained(model, tmp_path / "a")

    def tamper(edit_tensors=None, edit_meta=None):
        d = tmp_path / "t"
        if d.exists():
            for f in d.iterdir():
                f.unlink()
        model.save_pretrained(d)
        if edit_tensors:
            t = load_file(str(d / TENSORS))
            edit_tensors(t)
            save_file(t, str(d / TENSORS))
        meta = json.loads((d / META).read_text())
        if edit_meta:
            edit_meta(meta)
        meta["tensors_sha256"] = sha256_file(d / TENSORS)  # a consistent checksum: the content checks must catch it
        (d / META).write_text(json.dumps(meta))
        return d

    cases = [
        (lambda t: t.__setitem__("head.coordinates", t["head.coordinates"][:-1]), None, "shape"),
        (lambda t: t.__setitem__("extra", torch.zeros(2)), None, "unexpected"),
        (lambda t: t["head.lambda"].__setitem__(0, float("nan")), None, "NaN"),
        (None, lambda m: m.__setitem__("padding", 3), "padding"),
        (None, lambda m: m.__setitem__("base_model_name_or_path", 5), "base_model_name_or_path"),
        (None, lambda m: m.pop("family"), "family"),
    ]
    for et, em, match in cases:
        with pytest.raises(CorruptFileError, match=match):
            rf.from_pretrained(v, tamper(et, em))
    (tmp_path / "a" / TENSORS).write_bytes(b"garbage")
    with pytest.raises(CorruptFileError, match="checksum"):
        rf.from_pretrained(v, tmp_path / "a")


def test_row10_readable_bases_repr_and_labeled_report_numbers(fitted):
    from residual_fast.analysis.report import describe_md

    _, bases = fitted
    text = repr(bases)
    assert text.startswith("SpectralBases(") and "samples=64" in text and "head: 8 units" in text
    assert "mlp: 2 units" in text and "tensor(" not in text and len(text) < 400
    line = describe_md("TextSpan", [("red", 0.125), ("stripes", 0.5)])
    assert "1. red (cumulative explained variance 12.5%)" in line and "2. stripes" in line


@pytest.mark.parametrize("variant, options", [("coarse", {}), ("full", {}), ("fine", {"ablation": "mean"}),
                                              ("fine", {"units": ("emb", "head"), "add_means": True})])
def test_peft_style_round_trip_of_every_variant(tmp_path, fitted, variant, options):
    v, _ = fitted
    x = images_for(v, 3)
    units = options.get("units", ("head", "mlp"))
    model = rf.get_residual_model(v, images_for(v, 64, seed=1), variant, **{**options, "units": units}
                                  if variant != "coarse" else options)
    with torch.no_grad():
        want = model(x)
        model.save_pretrained(tmp_path / "a")
        back = rf.from_pretrained(v, tmp_path / "a")
        assert _rel(back(x), want) < 1e-5
        assert back.adapter.ks() == model.adapter.ks() and back.adapter.variant == variant


def test_row10_saved_files_get_the_usual_mode(tmp_path, fitted):
    import json
    import os
    import stat

    v, bases = fitted
    rf.ResiDual.from_bases(bases, "fine").save(tmp_path / "a", base_model_name_or_path="open_clip:tiny")
    assert json.loads((tmp_path / "a" / "meta.json").read_text())["base_model_name_or_path"] == "open_clip:tiny"
    rf.ResiDual.load(tmp_path / "a", v)
    bases.save(tmp_path / "b")
    mask = os.umask(0o022)
    os.umask(mask)
    for f in [*(tmp_path / "a").iterdir(), *(tmp_path / "b").iterdir()]:
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask, f  # not safetensors' 0600
