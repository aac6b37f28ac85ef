"""Streamed bases against brute-force float64 PCA of materialized contributions."""

import pytest
import torch
from conftest import images_for, small_visual

import residual_fast as rf
from residual_fast.spectral import UnitMoments


def brute_pca(o: torch.Tensor):
    """PCA of (n, D) samples by SVD of the centered data, float64."""
    mean = o.mean(0)
    _, S, Vh = torch.linalg.svd(o - mean, full_matrices=False)
    return mean, S.square() / (o.shape[0] - 1), Vh


@pytest.fixture(scope="module")
def f64_setup():
    v = small_visual("layerscale", dtype=torch.float64)
    x = images_for(v, 90, seed=3)
    bases = rf.fit_bases(v, x.split(32), units=("emb", "head", "mlp"), progress=False)
    return v, x, bases


@pytest.mark.parametrize("kind", ["head", "mlp", "emb"])
def test_bases_match_brute_force(f64_setup, kind):
    v, x, bases = f64_setup
    o = rf.decompose(v, x).of(kind)  # (n, U, D)
    for u in range(o.shape[1]):
        mean, eig, Vh = brute_pca(o[:, u])
        scale = mean.abs().max()
        assert (bases.unit_means(kind)[u] - mean).abs().max() / scale < 1e-6
        r = int(bases.rank(kind)[u])
        brute_rank = int((eig > 1e-10 * eig[0]).sum())
        assert r == brute_rank
        ours = bases.eigenvalues(kind)[u, :r]
        assert ((ours - eig[:r]).abs() / eig[:r]).max() < 1e-6
        # same subspace: all principal angles ~0 (cosines ~1)
        cos = torch.linalg.svdvals(bases.components(kind)[u, :r] @ Vh[:r].T)
        assert (1 - cos).abs().max() < 1e-6
        # each component individually (eigenvalues are distinct for random data), up to sign
        dots = (bases.components(kind)[u, :r] * Vh[:r]).sum(-1).abs()
        assert (1 - dots).abs().max() < 1e-6


def test_head_rank_at_most_head_dim_plus_two(f64_setup):
    _, _, bases = f64_setup
    hd = bases.spec.head_dim
    assert int(bases.rank("head").max()) <= hd + 2
    assert bases.components("head").shape[1] <= hd + 2
    evr = bases.evr("head")
    assert torch.allclose(evr.sum(-1), torch.ones(evr.shape[0], dtype=evr.dtype))
    comps = bases.components("head")[0, : int(bases.rank("head")[0])]
    assert torch.allclose(comps @ comps.T, torch.eye(comps.shape[0], dtype=comps.dtype), atol=1e-10)


def test_merging_two_halves_equals_one_pass():
    v = small_visual("w64h4p8", dtype=torch.float64)
    x = images_for(v, 60, seed=5)
    one = rf.accumulate_moments(v, [x], units=("head", "mlp"), progress=False)
    a = rf.accumulate_moments(v, x[:23].split(7), units=("head", "mlp"), progress=False)
    b = rf.accumulate_moments(v, [x[23:]], units=("head", "mlp"), progress=False)
    merged = a.merge(b)
    assert merged.count == one.count == 60
    for kind in ("emb", "head", "mlp"):
        assert torch.allclose(merged.moments[kind].mean, one.moments[kind].mean, rtol=1e-12, atol=1e-14)
    for kind in ("head", "mlp"):
        m1, m2 = merged.moments[kind].m2, one.moments[kind].m2
        assert ((m1 - m2).abs().max() / m2.abs().max()) < 1e-12
    b1, b2 = merged.bases(), one.bases()
    assert torch.allclose(b1.eigenvalues("head"), b2.eigenvalues("head"), rtol=1e-10, atol=0)


def test_moments_roundtrip_across_processes(tmp_path):
    """What one process saves, another loads and merges."""
    v = small_visual("w64h4p8", dtype=torch.float64)
    x = images_for(v, 40, seed=6)
    rf.accumulate_moments(v, [x[:20]], progress=False).save(tmp_path / "part0")
    rf.accumulate_moments(v, [x[20:]], progress=False).save(tmp_path / "part1")
    merged = UnitMoments.load(tmp_path / "part0", v).merge(UnitMoments.load(tmp_path / "part1", v))
    one = rf.accumulate_moments(v, [x], progress=False)
    assert torch.allclose(merged.bases().eigenvalues("head"), one.bases().eigenvalues("head"), rtol=1e-10)


def test_memory_independent_of_dataset_size():
    v = small_visual("w64h4p8")
    small_run = rf.accumulate_moments(v, [images_for(v, 8)], progress=False)
    big_run = rf.accumulate_moments(v, images_for(v, 64).split(8), progress=False)

    def nbytes(m):
        return sum(t.numel() * t.element_size() for mom in m.moments.values()
                   for t in (mom.mean, mom.m2) if t is not None)

    assert nbytes(small_run) == nbytes(big_run)
    assert big_run.count == 64


def test_accepts_loader_style_batches_and_dicts(small):
    x = images_for(small, 20)
    labels = torch.zeros(20, dtype=torch.long)
    b1 = rf.fit_bases(small, [(x[:10], labels[:10]), (x[10:], labels[10:])], progress=False)
    b2 = rf.fit_bases(small, [{"image": x}], progress=False)
    assert torch.allclose(b1.eigenvalues("head"), b2.eigenvalues("head"), rtol=1e-6)
    assert b1.num_samples == 20


def test_progress_bar_is_shown(small, capsys):
    rf.fit_bases(small, [images_for(small, 4)] * 2, progress=True)
    assert "calibrating" in capsys.readouterr().err


def test_k_for_evr_is_smallest_k_over_threshold(f64_setup):
    _, _, bases = f64_setup
    k = bases.k_for_evr("head", 0.9)
    cum = bases.evr("head").cumsum(-1)
    for u in range(k.numel()):
        ku = int(k[u])
        assert cum[u, ku - 1] > 0.9
        assert ku == 1 or cum[u, ku - 2] <= 0.9


def test_save_load_bases(tmp_path, f64_setup):
    v, _, bases = f64_setup
    bases.save(tmp_path / "bases")
    loaded = rf.SpectralBases.load(tmp_path / "bases", v)
    assert torch.equal(loaded.components("head"), bases.components("head"))
    assert torch.equal(loaded.means, bases.means)
    assert sorted(p.name for p in (tmp_path / "bases").iterdir()) == ["meta.json", "tensors.safetensors"]
