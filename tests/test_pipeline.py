"""Classifiers, data, activation cache, training and the command line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import images_for, small_visual

import residual_fast as rf
from residual_fast.cache import ActivationCache, build_cache, fit_bases_from_cache
from residual_fast.classifiers import Classifier, prototype_head, zero_shot_head
from residual_fast.cli import main as cli_main
from residual_fast.data import fill, load_dataset, stratified_split, templates
from residual_fast.train import OutputSpectralAdapter, fit, fit_method, method_forward


# -- classifiers --------------------------------------------------------------------------
def test_zero_shot_head_matches_its_definition():
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    tok = open_clip.get_tokenizer("ViT-B-32")
    names, temps = ["cat", "dog", "car"], ["a photo of a {c}.", "a drawing of a {c}."]
    head = zero_shot_head(model, tok, names, temps, progress=False)
    with torch.no_grad():
        for i, c in enumerate(names):
            emb = F.normalize(model.encode_text(tok([t.format(c=c) for t in temps])), dim=-1)
            assert torch.allclose(head.weights[i], F.normalize(emb.mean(0), dim=0), atol=1e-5)
    assert torch.allclose(head.weights.norm(dim=-1), torch.ones(3))
    assert head.logit_scale == pytest.approx(model.logit_scale.exp().item())
    # a feature equal to a class embedding is classified as that class, scaled cosine logits
    logits = head(head.weights * 3.0)
    assert torch.equal(logits.argmax(-1), torch.arange(3))
    assert torch.allclose(logits.diagonal(), torch.full((3,), head.logit_scale), rtol=1e-5)
    raw = Classifier(head.weights, 1.0, normalize=False)
    assert torch.allclose(raw(head.weights * 3.0).diagonal(), torch.full((3,), 3.0), rtol=1e-5)


def test_prototype_head():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 5
    labels = torch.arange(4).repeat_interleave(25)
    feats = centers[labels] + torch.randn(100, 16, generator=g) * 0.1
    head = prototype_head(feats, labels)
    expected = F.normalize(torch.stack([F.normalize(feats[labels == c], dim=-1).mean(0) for c in range(4)]), dim=-1)
    assert torch.allclose(head.weights, expected, atol=1e-6)
    assert torch.equal(head(feats).argmax(-1), labels)
    with pytest.raises(ValueError, match="without examples"):
        prototype_head(feats, labels, num_classes=5)


# -- data ---------------------------------------------------------------------------------
def test_templates_and_classnames_come_from_maintained_sources():
    cifar = templates("cifar10")
    assert len(cifar) > 5 and all("{c}" in t for t in cifar)
    assert fill(cifar[0], "ship").count("ship") == 1
    imagenet = templates("imagenet")
    assert callable(imagenet[0]) and "dog" in fill(imagenet[0], "dog")
    assert rf.data.classnames("imagenet")[0] == "tench"
    assert rf.data.classnames("eurosat") is not None


def test_digits_is_offline_and_split_stratified():
    data = load_dataset("digits")
    assert len(data) == 1797 and len(data.classnames) == 10
    img, label = data.dataset[0]
    assert img.size == (8, 8) and img.mode == "RGB" and label == int(data.labels[0])
    parts = stratified_split(data.labels, {"train": 0.6, "val": 0.1, "test": 0.3}, seed=3)
    all_idx = torch.cat(list(parts.values()))
    assert all_idx.unique().numel() == all_idx.numel() == 1797
    for c in range(10):
        n_c = int((data.labels == c).sum())
        assert abs(int((data.labels[parts["train"]] == c).sum()) - 0.6 * n_c) <= 1
    again = stratified_split(data.labels, {"train": 0.6, "val": 0.1, "test": 0.3}, seed=3)
    assert all(torch.equal(parts[k], again[k]) for k in parts)
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("imagenet-21k-nope")
    with pytest.raises(ValueError, match="no official test split"):
        load_dataset("digits", "test")


# -- cache ----------------------------------------------------------------------------------
def _batches(visual, n_batches=4, size=6, seed=0):
    x = images_for(visual, n_batches * size, seed=seed)
    y = torch.arange(n_batches * size) % 3
    return list(zip(x.split(size), y.split(size), strict=True))


def test_cache_round_trip_is_exact(tmp_path, small):
    batches = _batches(small)
    cache = build_cache(small, batches, tmp_path / "c", progress=False)
    split = cache.load()
    x = torch.cat([b[0] for b in batches])
    acts = rf.capture(rf.get_adapter(small), x)
    for field, ref in (("emb", acts.emb_raw), ("attn", acts.attn_raw), ("mlp", acts.mlp_raw), ("z", acts.z),
                       ("output", acts.output)):
        assert torch.allclose(getattr(split, field), ref, atol=1e-6, rtol=1e-6)
    assert torch.equal(split.labels, torch.cat([b[1] for b in batches]))
    # calibration from the cache equals streaming the model
    a = fit_bases_from_cache(cache, small, progress=False)
    b = rf.fit_bases(small, [bb[0] for bb in batches], progress=False)
    assert torch.allclose(a.eigenvalues("head"), b.eigenvalues("head"), rtol=1e-5, atol=1e-8)


def test_cache_resumes_after_interruption_without_partial_files(tmp_path, small):
    batches = _batches(small, n_batches=5)

    def interrupted():
        for i, b in enumerate(batches):
            if i == 3:
                raise KeyboardInterrupt("simulated")
            yield b

    with pytest.raises(KeyboardInterrupt):
        build_cache(small, interrupted(), tmp_path / "c", progress=False)
    files = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert files == ["manifest.json"] + [f"shard-{i:06d}.safetensors" for i in range(3)]
    partial = ActivationCache(tmp_path / "c")
    assert not partial.complete and partial.num_images == 18
    with pytest.raises(RuntimeError, match="incomplete"):
        partial.load()
    resumed = build_cache(small, batches, tmp_path / "c", progress=False).load()
    fresh = build_cache(small, batches, tmp_path / "fresh", progress=False).load()
    assert torch.equal(resumed.attn, fresh.attn) and torch.equal(resumed.labels, fresh.labels)


def test_cache_failure_leaves_no_partial_shard(tmp_path, small):
    batches = _batches(small, n_batches=3)
    batches[1] = (batches[1][0][:, :, :5], batches[1][1])  # wrong image size: capture fails
    with pytest.raises(ValueError, match="32x32"):
        build_cache(small, batches, tmp_path / "c", progress=False)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["manifest.json", "shard-000000.safetensors"]


def test_cache_of_another_model_is_refused(tmp_path, small):
    build_cache(small, _batches(small, 1), tmp_path / "c", progress=False)
    other = small_visual("w64h4p8", seed=5)
    with pytest.raises(ValueError, match="another model"):
        build_cache(other, _batches(other, 1), tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match="another model"):
        ActivationCache(tmp_path / "c").check_model(other)
    with pytest.raises(FileNotFoundError, match="no activation cache"):
        ActivationCache(tmp_path / "missing")


# -- training -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Labels planted in one head's leading component; a head that reads that direction."""
    v = small_visual("w64h4p8")
    root = tmp_path_factory.mktemp("planted")
    x = images_for(v, 300, seed=7)
    caches = {}
    for name, sl in (("train", slice(0, 200)), ("val", slice(200, 250)), ("test", slice(250, 300))):
        dummy = [(b, torch.zeros(len(b), dtype=torch.long)) for b in x[sl].split(50)]
        caches[name] = build_cache(v, dummy, root / name, progress=False)
    bases = fit_bases_from_cache(caches["train"], v, ("head", "mlp"), progress=False)
    unit, idx = 5, bases.table.indices("head")[5]
    direction = bases.components("head")[unit, 0].float()
    splits = {}
    for name, c in caches.items():
        s = c.load()
        dec_o = rf.decompose(v, x[{"train": slice(0, 200), "val": slice(200, 250), "test": slice(250, 300)}[name]])
        coef = (dec_o.contributions[:, idx] - bases.means[idx].float()) @ direction
        s.labels = (coef > 0).long()
        splits[name] = s
    head = Classifier(torch.stack([-direction, direction]), logit_scale=20.0)
    return v, bases, splits, head


def test_training_lowers_loss_and_beats_init(planted):
    _, bases, splits, head = planted
    module, res = fit_method("fine", splits["train"], splits["val"], head, bases=bases, init="ones", epochs=15,
                             patience=15, progress=False)
    losses = [h["train_loss"] for h in res.history[1:]]
    assert losses[-1] < losses[0]
    assert res.best_val_accuracy > res.history[0]["val_accuracy"] + 0.05
    init = rf.ResiDual.from_bases(bases, "fine", init="ones")
    fwd = method_forward("fine", module)
    from residual_fast.train import evaluate

    assert evaluate(fwd, splits["test"], head) > evaluate(method_forward("fine", init), splits["test"], head)


def test_training_is_deterministic(planted):
    _, bases, splits, head = planted
    a, _ = fit_method("fine", splits["train"], splits["val"], head, bases=bases, epochs=3, progress=False, seed=1)
    b, _ = fit_method("fine", splits["train"], splits["val"], head, bases=bases, epochs=3, progress=False, seed=1)
    assert torch.equal(a.lambdas["head"], b.lambdas["head"])


@pytest.mark.parametrize("method", ["zeroshot", "linear", "spectral_output", "coarse", "full"])
def test_every_method_runs(planted, method):
    _, bases, splits, head = planted
    module, res = fit_method(method, splits["train"], splits["val"], head, bases=bases, epochs=2, progress=False)
    assert 0.0 <= res.best_val_accuracy <= 1.0
    assert (module is None) == (method == "zeroshot")
    if module is not None:
        assert res.trainable_parameters == sum(p.numel() for p in module.parameters())


def test_output_spectral_adapter_is_identity_at_init(planted):
    _, _, splits, _ = planted
    out = splits["train"].output
    adapter = OutputSpectralAdapter(out)
    with torch.no_grad():
        assert torch.allclose(adapter(out), out, atol=1e-4)


def test_fit_rejects_empty_splits(planted):
    _, bases, splits, head = planted
    empty = splits["val"].subset(torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="non-empty"):
        fit(rf.ResiDual.from_bases(bases, "fine"), method_forward("fine", None), splits["train"], empty, head,
            lr=0.1)


# -- command line ---------------------------------------------------------------------------
def test_cli_demo_runs_offline(tmp_path):
    exe = Path(sys.executable).parent / "residual-fast"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "residual_fast.cli"]
    proc = subprocess.run(cmd + ["demo", "--out", str(tmp_path / "demo"), "--no-progress"], capture_output=True,
                          text=True, timeout=170, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ResiDual-fine" in proc.stdout and "one plain inference pass" in proc.stdout
    for name in ("report.md", "results.json", "results.csv", "lambdas.png", "spectra.png", "adapter/meta.json"):
        assert (tmp_path / "demo" / name).is_file()
    rows = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert [r["method"] for r in rows] == ["zeroshot", "fine"]
    assert rows[1]["fit_seconds"] <= 1.3 * rows[1]["plain_pass_seconds"]


def test_cli_errors_are_clear(tmp_path, capsys):
    assert cli_main(["cache", "--dataset", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "unknown dataset 'nope'" in capsys.readouterr().err
    assert cli_main(["eval", "--fit", str(tmp_path / "none"), "--cache", str(tmp_path / "none")]) == 2
    assert "no fit.json" in capsys.readouterr().err
    assert cli_main(["demo", "--model", "ViT-Q-99", "--out", str(tmp_path / "d")]) == 2
    assert "unknown open_clip model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["fit", "--help"])
    help_text = capsys.readouterr().out
    assert "--train-cache" in help_text and "(default: 30)" in help_text


def test_cli_cache_fit_eval(tmp_path, capsys):
    common = ["--image-size", "32", "--max-images", "120", "--no-progress"]
    for split in ("train", "val"):
        assert cli_main(["cache", "--split", split, "--out", str(tmp_path / split), *common]) == 0
    assert cli_main(["fit", "--image-size", "32", "--train-cache", str(tmp_path / "train"), "--val-cache",
                     str(tmp_path / "val"), "--method", "fine", "--epochs", "2", "--out", str(tmp_path / "fit"),
                     "--no-progress"]) == 0
    capsys.readouterr()
    assert cli_main(["eval", "--image-size", "32", "--fit", str(tmp_path / "fit"), "--cache",
                     str(tmp_path / "val")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["method"] == "fine" and 0 <= result["accuracy"] <= 1
    # tampered files: one line on stderr, exit 2, before any model is built
    fit_json = tmp_path / "fit" / "fit.json"
    meta = json.loads(fit_json.read_text())
    fit_json.write_text(json.dumps({**meta, "method": "magic"}))
    ev = ["eval", "--image-size", "32", "--fit", str(tmp_path / "fit"), "--cache", str(tmp_path / "val")]
    assert cli_main(ev) == 2
    assert "'method' must be one of" in capsys.readouterr().err
    fit_json.write_text(json.dumps(meta))
    assert cli_main([*ev, "--model", "ViT-B-16"]) == 2  # fitted with another model
    assert "fitted with --model ViT-B-32" in capsys.readouterr().err
    (tmp_path / "fit" / "adapter" / "tensors.safetensors").write_bytes(b"\x00garbage")
    assert cli_main(ev) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checksum" in err[0]


def test_reproduce_grid_offline_records_failures(tmp_path):
    from residual_fast.pipeline import reproduce

    rows = reproduce(["ViT-B-32", "ViT-Q-99", "timm:vit_tiny_patch16_224"], ["digits", "nope"],
                     ["zeroshot", "fine"], tmp_path, epochs=1, max_images=24, batch_size=24, progress=False)
    ok = [r for r in rows if "error" not in r]
    assert [(r["dataset"], r["method"]) for r in ok] == [("digits", "zeroshot"), ("digits", "fine")]
    assert all(0 <= r["accuracy"] <= 1 and r["weights"] == "random" for r in ok)
    # the paper's protocol: bases from a calibration set (ImageNet train, absent offline: the first target's
    # train split instead), fitted once and recorded in every adapted row
    fine = ok[1]
    assert fine["bases"] == "digits train" and fine["bases_images"] > 0
    assert "imagenet unavailable" in fine["bases_note"] and "first target" in fine["bases_note"]
    assert "bases" not in ok[0]  # zero-shot uses no bases
    errors = {(r["model"], r["dataset"]): r["error"] for r in rows if "error" in r}
    assert "unknown dataset" in errors[("ViT-B-32", "nope")]
    assert "unknown open_clip model" in errors[("ViT-Q-99", "-")]
    assert "could not create timm model" in errors[("timm:vit_tiny_patch16_224", "-")]  # offline: no weights
    assert (tmp_path / "results.csv").read_text().startswith("model,weights,dataset,method")


def test_run_methods_uses_the_given_calibration_bases(planted):
    """The paper's protocol: bases fitted once elsewhere are the ones every variant trains on (none refitted
    from the target's train cache)."""
    from types import SimpleNamespace

    from residual_fast.pipeline import PreparedData, run_methods

    v, bases, splits, head = planted
    no_cache = SimpleNamespace(seconds=0.0)  # refitting would need the cache's shards: there are none
    data = PreparedData({"train": no_cache}, splits, {k: len(s) for k, s in splits.items()})
    rows, modules = run_methods(["fine", "full"], data, head, v, epochs=1, seed=0, progress=False, info={},
                                bases=bases)
    assert [r["method"] for r in rows] == ["fine", "full"]
    assert modules["fine"][1] is bases and modules["full"][1] is bases
