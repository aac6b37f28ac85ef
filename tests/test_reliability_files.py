"""Every file read back is untrusted: checksums, schemas, confined paths, atomic saves, fuzzing
(issue: reliability 5, 6, 10)."""

import json
import os
import random
import shutil

import pytest
import torch
from conftest import images_for

import residual_fast as rf
from residual_fast.cache import MANIFEST, ActivationCache, build_cache
from residual_fast.serialization import META, TENSORS, CorruptFileError

CLEAR = (ValueError, FileNotFoundError, RuntimeError)  # CorruptFileError is a ValueError


def _adapter_out(folder, v, x):
    with torch.no_grad():
        return rf.ResiDualVisual(v, rf.ResiDual.load(folder, v))(x)


def test_crash_between_the_two_renames_is_detected(tmp_path, fitted):
    """New tensors beside old metadata (a save killed between its renames) fail the checksum."""
    v, bases = fitted
    rf.ResiDual.from_bases(bases, "fine", seed=1).save(tmp_path / "old")
    rf.ResiDual.from_bases(bases, "full", seed=2).save(tmp_path / "new")
    shutil.copy(tmp_path / "new" / TENSORS, tmp_path / "old" / TENSORS)
    with pytest.raises(CorruptFileError, match="checksum"):
        rf.ResiDual.load(tmp_path / "old", v)


def test_flipped_data_byte_is_detected(tmp_path, fitted):
    v, bases = fitted
    rf.ResiDual.from_bases(bases, "fine").save(tmp_path / "a")
    data = bytearray((tmp_path / "a" / TENSORS).read_bytes())
    data[-5] ^= 0x01  # inside the last tensor's values
    (tmp_path / "a" / TENSORS).write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="checksum"):
        rf.ResiDual.load(tmp_path / "a", v)


ADAPTER_TAMPERING = [
    ("padding", 7, "padding"),
    ("padding", True, "padding"),
    ("add_means", "false", "add_means"),
    ("ablation", "bogus", "ablation"),
    ("variant", "superfine", "variant"),
    ("init", 3, "init"),
    ("units", [], "units"),
    ("units", ["head", "head"], "units"),
    ("units", ["attention"], "units"),
    ("k", {"head": [1, 2]}, "'k'"),
    ("scalar", {"head": "no"}, "scalar"),
    ("num_parameters", 3, "num_parameters"),
    ("seed", 1.5, "seed"),
    ("fingerprint", {}, "fingerprint"),
]


@pytest.mark.parametrize("key,value,match", ADAPTER_TAMPERING)
def test_tampered_adapter_metadata(tmp_path, fitted, key, value, match):
    v, bases = fitted
    rf.ResiDual.from_bases(bases, "fine").save(tmp_path / "a")
    meta = json.loads((tmp_path / "a" / META).read_text())
    meta[key] = value
    (tmp_path / "a" / META).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=match):
        rf.ResiDual.load(tmp_path / "a", v)


@pytest.mark.parametrize("key", ["padding", "ablation", "fingerprint", "tensors_sha256", "k", "kind"])
def test_missing_metadata_key(tmp_path, fitted, key):
    v, bases = fitted
    rf.ResiDual.from_bases(bases, "fine").save(tmp_path / "a")
    meta = json.loads((tmp_path / "a" / META).read_text())
    del meta[key]
    (tmp_path / "a" / META).write_text(json.dumps(meta))
    with pytest.raises(ValueError):
        rf.ResiDual.load(tmp_path / "a", v)


def test_bad_json_and_bad_safetensors(tmp_path, fitted):
    v, bases = fitted
    rf.ResiDual.from_bases(bases, "fine").save(tmp_path / "a")
    (tmp_path / "a" / META).write_text("{not json")
    with pytest.raises(CorruptFileError, match="not valid JSON"):
        rf.ResiDual.load(tmp_path / "a", v)
    bases.save(tmp_path / "b")
    meta = json.loads((tmp_path / "b" / META).read_text())
    meta["rtol"] = 2.0
    (tmp_path / "b" / META).write_text(json.dumps(meta))
    with pytest.raises(CorruptFileError, match="rtol"):
        rf.SpectralBases.load(tmp_path / "b", v)


def _cache(tmp_path, v):
    batches = [(images_for(v, 4, seed=s), torch.arange(4)) for s in range(3)]
    return build_cache(v, batches, tmp_path / "c", progress=False)


@pytest.mark.parametrize("edit,match", [
    (lambda m: m.update(complete="false"), "complete"),
    (lambda m: m["shards"][0].update(file="../../etc/passwd"), "plain file name"),
    (lambda m: m["shards"][0].update(file="/etc/passwd"), "plain file name"),
    (lambda m: m["shards"][0].update(n=-1), "'n'"),
    (lambda m: m["shards"][0].pop("sha256"), "sha256"),
    (lambda m: m.update(shards="shard-000000.safetensors"), "shards"),
    (lambda m: m["shards"].append(dict(m["shards"][0])), "listed twice"),
    (lambda m: m.update(shards=[]), "no shards"),
])
def test_tampered_cache_manifest(tmp_path, fitted, edit, match):
    v, _ = fitted
    _cache(tmp_path, v)
    manifest = json.loads((tmp_path / "c" / MANIFEST).read_text())
    edit(manifest)
    (tmp_path / "c" / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CorruptFileError, match=match):
        ActivationCache(tmp_path / "c").load()


def test_tampered_cache_shard(tmp_path, fitted):
    v, _ = fitted
    _cache(tmp_path, v)
    shard = tmp_path / "c" / "shard-000001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x40
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="checksum"):
        ActivationCache(tmp_path / "c").load()


def _flip_or_truncate(path, rng):
    data = bytearray(path.read_bytes())
    if rng.random() < 0.3:
        data = data[: rng.randrange(len(data))]
    else:
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))


def test_fuzz_byte_flips_and_truncations(tmp_path, fitted):
    """Every trial ends in a clear error or in a result equal to the original."""
    v, bases = fitted
    rng = random.Random(0)
    x = images_for(v, 2)
    rf.ResiDual.from_bases(bases, "fine").save(tmp_path / "adapter")
    bases.save(tmp_path / "bases")
    _cache(tmp_path / "cache_src", v)
    want_adapter = _adapter_out(tmp_path / "adapter", v, x)
    want_cache = ActivationCache(tmp_path / "cache_src" / "c").load()
    outcomes = {"error": 0, "equal": 0}
    for trial in range(60):
        which = trial % 3
        work = tmp_path / f"t{trial}"
        if which == 0:
            shutil.copytree(tmp_path / "adapter", work)
            _flip_or_truncate(work / rng.choice([TENSORS, META]), rng)
            try:
                got = _adapter_out(work, v, x)
            except CLEAR:
                outcomes["error"] += 1
                continue
            assert torch.equal(got, want_adapter)
        elif which == 1:
            shutil.copytree(tmp_path / "bases", work)
            _flip_or_truncate(work / rng.choice([TENSORS, META]), rng)
            try:
                got = rf.SpectralBases.load(work, v)
            except CLEAR:
                outcomes["error"] += 1
                continue
            assert torch.equal(got.components("head"), bases.components("head"))
        else:
            shutil.copytree(tmp_path / "cache_src" / "c", work)
            files = sorted(p.name for p in work.iterdir())
            _flip_or_truncate(work / rng.choice(files), rng)
            try:
                got = ActivationCache(work).load()
            except CLEAR:
                outcomes["error"] += 1
                continue
            assert torch.equal(got.output, want_cache.output) and torch.equal(got.labels, want_cache.labels)
        outcomes["equal"] += 1
        shutil.rmtree(work)
    assert outcomes["error"] > 30, outcomes


def test_saves_are_atomic_files(tmp_path, fitted):
    """No temporary files are left; the metadata (the commit marker) is written last."""
    _, bases = fitted
    rf.ResiDual.from_bases(bases, "fine").save(tmp_path / "a")
    names = sorted(os.listdir(tmp_path / "a"))
    assert names == sorted([META, TENSORS])
    assert (tmp_path / "a" / META).stat().st_mtime_ns >= (tmp_path / "a" / TENSORS).stat().st_mtime_ns
