"""2-process gloo runs on CPU under torchrun equal one process (issue: scale-out on torch.distributed).

Every child runs with one thread, and the one-process references too, so activations are computed in the
same batches by the same kernels; what differs is only how moments and gradients are reduced.
"""

import json
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from residual_fast.cache import ActivationCache, build_cache
from residual_fast.cli import main as cli_main
from residual_fast.distributed import block, shard_range

TORCHRUN = Path(sys.executable).with_name("torchrun")
MODEL = ["--model", "timm:vit_tiny_patch16_224", "--image-size", "32", "--no-progress"]
DATA = ["--max-images", "120", "--seed", "0", "--batch-size", "8"]  # 120 images > q = 66: full-rank head bases

pytestmark = pytest.mark.skipif(not TORCHRUN.exists() or not torch.distributed.is_available()
                                or not torch.distributed.is_gloo_available(), reason="needs torchrun and gloo")


def torchrun(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path.cwd())}
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", *args]
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


@contextmanager
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def test_blocks_cover_every_item_once_in_order():
    for n in (0, 1, 5, 17, 64):
        for world in (1, 2, 3, 8):
            for bs in (1, 4, 7):
                got = [x for r in range(world) for x in range(*block_of(n, r, world, bs))]
                assert got == list(range(n)), (n, world, bs)
    assert shard_range(10, None, 4) == (0, 10)
    with pytest.raises(ValueError):
        block(3, 2, 2)


def block_of(n, rank, world, bs):
    lo, hi = block(-(-n // bs), rank, world)
    return min(lo * bs, n), min(hi * bs, n)


def test_torchrun_calibrate_equals_one_process(tmp_path):
    torchrun(["-m", "residual_fast", "calibrate", *MODEL, *DATA, "--units", "head", "mlp", "--out", "b2"],
             tmp_path)
    with one_thread():
        assert cli_main(["calibrate", *MODEL, *DATA, "--units", "head", "mlp", "--out",
                         str(tmp_path / "b1")]) == 0
    from safetensors.torch import load_file

    one, two = load_file(str(tmp_path / "b1" / "tensors.safetensors")), load_file(str(tmp_path / "b2" /
                                                                                       "tensors.safetensors"))
    assert set(one) == set(two)
    m1, m2 = (json.loads((tmp_path / d / "meta.json").read_text()) for d in ("b1", "b2"))
    assert m1["num_samples"] == m2["num_samples"] == 120
    for kind in ("head", "mlp"):
        assert torch.equal(one[f"{kind}.rank"], two[f"{kind}.rank"])
        for key in ("eigenvalues", "total_variance", "zmean"):
            assert rel(two[f"{kind}.{key}"], one[f"{kind}.{key}"]) < 1e-10, (kind, key)
        # eigenvectors of (nearly) equal eigenvalues are not unique: compare each unit's covariance B^T diag(l) B
        B1, B2 = one[f"{kind}.components"].double(), two[f"{kind}.components"].double()
        l1, l2 = one[f"{kind}.eigenvalues"].double(), two[f"{kind}.eigenvalues"].double()
        C1 = torch.einsum("ukd,uk,uke->ude", B1, l1, B1)
        C2 = torch.einsum("ukd,uk,uke->ude", B2, l2, B2)
        assert rel(C2, C1) < 1e-10, kind
    assert rel(two["means"], one["means"]) < 1e-10


def test_torchrun_cache_equals_one_process(tmp_path):
    torchrun(["-m", "residual_fast", "cache", *MODEL, *DATA, "--out", "c2"], tmp_path)
    with one_thread():
        assert cli_main(["cache", *MODEL, *DATA, "--out", str(tmp_path / "c1")]) == 0
    c1, c2 = ActivationCache(tmp_path / "c1").load(), ActivationCache(tmp_path / "c2").load()
    assert len(c1) == len(c2) == 120
    assert torch.equal(c1.labels, c2.labels)
    for f in ("emb", "attn", "mlp", "z", "output"):
        torch.testing.assert_close(getattr(c2, f), getattr(c1, f), rtol=1e-6, atol=1e-6)
    manifest = json.loads((tmp_path / "c2" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and [s["start"] for s in manifest["shards"]] == list(range(0, 120, 8))
    assert not list((tmp_path / "c2").glob("part-*.json"))  # per-rank manifests merged away


def test_killed_rank_then_resume_equals_uninterrupted(tmp_path):
    script = str(Path(__file__).with_name("distributed_scripts") / "cache_until_killed.py")
    r = torchrun([script, "--out", "c", "--die-after", "2"], tmp_path, check=False)
    assert r.returncode != 0
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert not manifest["complete"]
    part = json.loads((tmp_path / "c" / "part-00001-of-00002.json").read_text())
    assert len(part["shards"]) == 2 and not part["complete"]
    written = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "c").glob("shard-r00001-*.safetensors")}
    torchrun([script, "--out", "c", "--fit", "fit"], tmp_path)
    for name, t in written.items():  # rank 1 resumed after its own shards instead of rewriting them
        assert (tmp_path / "c" / name).stat().st_mtime_ns == t

    from torch.utils.data import DataLoader, Subset

    import residual_fast as rf
    from residual_fast.pipeline import load_splits

    with one_thread():
        loaded = rf.load("timm:vit_tiny_patch16_224", pretrained=False, img_size=32)
        data, idx = load_splits("digits", transform=loaded.preprocess, seed=0)["train"]
        loader = DataLoader(Subset(data.dataset, idx[:60].tolist()), batch_size=8)
        ref = build_cache(loaded.visual, loader, tmp_path / "ref", progress=False).load()
    got = ActivationCache(tmp_path / "c").load()
    assert torch.equal(got.labels, ref.labels)
    for f in ("emb", "attn", "mlp", "z", "output"):
        torch.testing.assert_close(getattr(got, f), getattr(ref, f), rtol=1e-6, atol=1e-6)

    # the data-parallel fit on the resumed cache (bases all-reduced, gradients summed, validation counts
    # gathered) equals one process's fit up to float rounding
    from safetensors.torch import load_file

    from residual_fast.cache import fit_bases_from_cache
    from residual_fast.classifiers import prototype_head
    from residual_fast.train import fit_method

    with one_thread():
        bases = fit_bases_from_cache(ActivationCache(tmp_path / "ref"), loaded.visual, progress=False)
        module, result = fit_method("fine", ref, ref, prototype_head(ref.output, ref.labels, 10), bases=bases,
                                    epochs=3, progress=False)
    two = json.loads((tmp_path / "fit.json").read_text())
    assert [h["val_accuracy"] for h in two["history"]] == [h["val_accuracy"] for h in result.history]
    assert two["history"][-1]["train_loss"] == pytest.approx(result.history[-1]["train_loss"], rel=1e-5)
    lam2 = load_file(str(tmp_path / "fit.safetensors"))
    lam1 = {k: v for k, v in module.state_dict().items() if "lam" in k}
    assert lam1 and set(lam1) == set(lam2)
    for k in lam1:
        torch.testing.assert_close(lam2[k], lam1[k], rtol=1e-4, atol=1e-5)
        assert not torch.equal(lam1[k], torch.ones_like(lam1[k]))  # it trained

    # a partial cache of 2 processes is not resumed by 1 (its blocks would not line up)
    shutil.copytree(tmp_path / "c", tmp_path / "p")
    m = json.loads((tmp_path / "p" / "manifest.json").read_text())
    m["complete"] = False
    (tmp_path / "p" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="started by 2 process"):
        build_cache(loaded.visual, loader, tmp_path / "p", progress=False,
                    source={"images": 60, "batch_size": 8})
