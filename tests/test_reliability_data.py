"""Bad data and loader settings: non-finite values, short labels, cache identity, argument ranges
(issue: reliability 2, 3, 4, 8)."""

import pytest
import torch
from conftest import images_for, small_visual

import residual_fast as rf
from residual_fast.cache import build_cache
from residual_fast.classifiers import prototype_head
from residual_fast.train import fit_method


@pytest.fixture(scope="module")
def v():
    return small_visual("w64h4p8")


def _with_nan(x, i):
    x = x.clone()
    x[i, 0, 3, 5] = float("nan")
    return x


def test_nan_pixel_in_calibration_names_the_batch(v):
    batches = [images_for(v, 8, seed=s) for s in range(3)]
    batches[2] = _with_nan(batches[2], 5)
    with pytest.raises(ValueError, match=r"batch 2, image\(s\) \[5\]"):
        rf.fit_bases(v, batches, progress=False)


def test_nan_pixel_in_caching_names_the_batch(tmp_path, v):
    batches = [(images_for(v, 4, seed=s), torch.arange(4)) for s in range(2)]
    batches[1] = (_with_nan(batches[1][0], 0), batches[1][1])
    with pytest.raises(ValueError, match=r"batch 1, image\(s\) \[0\]"):
        build_cache(v, batches, tmp_path / "c", progress=False)


def test_labels_shorter_than_images_or_negative(tmp_path, v):
    with pytest.raises(ValueError, match="labels"):
        build_cache(v, [(images_for(v, 4), torch.arange(3))], tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match="class indices"):
        build_cache(v, [(images_for(v, 4), torch.tensor([0, 1, -1, 2]))], tmp_path / "d", progress=False)


def test_labels_outside_the_heads_classes(tmp_path, v):
    batches = [(images_for(v, 12, seed=s), torch.arange(12) % 3) for s in range(2)]
    train = build_cache(v, batches[:1], tmp_path / "tr", progress=False).load()
    val = build_cache(v, batches[1:], tmp_path / "va", progress=False).load()
    head = prototype_head(train.output[:8], train.labels[:8] % 2)  # 2 classes, labels go to 2
    with pytest.raises(ValueError, match="labels and classes do not match"):
        fit_method("linear", train, val, head, epochs=1, progress=False)


def test_training_on_non_finite_inputs_stops(tmp_path, v):
    batches = [(images_for(v, 12, seed=s), torch.arange(12) % 3) for s in range(2)]
    train = build_cache(v, batches[:1], tmp_path / "tr", progress=False).load()
    val = build_cache(v, batches[1:], tmp_path / "va", progress=False).load()
    bases = rf.fit_bases(v, [b[0] for b in batches], progress=False)
    head = prototype_head(train.output, train.labels)
    train.attn[4, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"train split has non-finite activations at image\(s\) \[4\]"):
        fit_method("fine", train, val, head, bases=bases, epochs=1, progress=False)
    train.attn[4, 0, 0] = 0.0
    head.weights[0, 0] = float("inf")  # a loss that leaves the finite numbers stops the run
    with pytest.raises(FloatingPointError, match="loss"):
        fit_method("fine", train, val, head, bases=bases, epochs=2, progress=False)


def test_cache_source_is_recorded_and_checked(tmp_path, v):
    batches = [(images_for(v, 4, seed=s), torch.arange(4)) for s in range(3)]
    src = {"dataset": "digits", "split": "train", "batch_size": 4}
    build_cache(v, batches[:2], tmp_path / "c", progress=False, source=src)  # interrupted after 2 of 3 batches
    m = tmp_path / "c" / "manifest.json"
    import json

    manifest = json.loads(m.read_text())
    manifest["complete"] = False
    m.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="batch_size was 4, now 8"):
        build_cache(v, batches, tmp_path / "c", progress=False, source={**src, "batch_size": 8})
    with pytest.raises(ValueError, match="split was 'train', now 'test'"):
        build_cache(v, batches, tmp_path / "c", progress=False, source={**src, "split": "test"})
    done = build_cache(v, batches, tmp_path / "c", progress=False, source=src)  # same settings: resumes
    assert done.complete and done.num_images == 12
    with pytest.raises(ValueError, match="max_images"):  # a finished cache is not returned for other settings
        build_cache(v, batches, tmp_path / "c", progress=False, source={**src, "max_images": 5})


@pytest.mark.parametrize("rtol", [0.0, 1.0, -1e-3, 2.0, float("nan")])
def test_rtol_out_of_range(v, rtol):
    with pytest.raises(ValueError, match="rtol"):
        rf.fit_bases(v, [images_for(v, 8)], rtol=rtol, progress=False)


def test_coarse_refuses_k_and_evr(v):
    bases = rf.fit_bases(v, [images_for(v, 16)], progress=False)
    for kw in ({"k": 3}, {"evr_threshold": 0.5}):
        with pytest.raises(ValueError, match="no components"):
            rf.ResiDual.from_bases(bases, "coarse", **kw)
