"""The paper's analyses against known answers."""

import math

import pytest
import torch
from conftest import images_for

import residual_fast as rf
from residual_fast.analysis import (
    HeadContributions,
    bases_similarity,
    correlation_scores,
    default_dictionary,
    first_component_evr,
    greedy_selection,
    jaccard,
    linear_id,
    participation_ratio,
    per_head_accuracy,
    somp,
    spectral_similarity,
    textspan,
    twonn,
)
from residual_fast.analysis.specialization import _pearson_columns
from residual_fast.cache import build_cache
from residual_fast.classifiers import prototype_head
from residual_fast.cli import main as cli_main


def random_rotation(dim, seed=0):
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


# -- intrinsic dimension ------------------------------------------------------------------------
@pytest.mark.parametrize("d", [2, 5])
def test_twonn_linear_subspace(d):
    g = torch.Generator().manual_seed(d)
    x = torch.randn(2000, d, generator=g, dtype=torch.float64)
    emb = torch.cat([x, torch.zeros(2000, 25 - d, dtype=torch.float64)], 1) @ random_rotation(25)
    assert abs(twonn(emb) - d) < 0.1 * d


def test_twonn_torus_and_chunking():
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(2, 3000, generator=g, dtype=torch.float64) * 2 * math.pi
    torus = torch.stack([torch.cos(a), torch.sin(a), torch.cos(b), torch.sin(b)], 1)
    emb = torch.cat([torus, torch.zeros(3000, 6, dtype=torch.float64)], 1) @ random_rotation(10, 2)
    est = twonn(emb, chunk=256)
    assert abs(est - 2) < 0.2
    assert est == pytest.approx(twonn(emb, chunk=5000), rel=1e-12)


def test_spectral_measures_on_known_spectra():
    eig = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.5, 0.3, 0.2, 0.0]], dtype=torch.float64)
    assert torch.allclose(participation_ratio(eig), torch.tensor([1.0, 4.0, 1.0 / (0.25 + 0.09 + 0.04)],
                                                                 dtype=torch.float64))
    assert linear_id(eig, 0.99).tolist() == [1, 4, 3]
    assert linear_id(eig, 0.8).tolist() == [1, 4, 2]
    assert linear_id(eig, 0.5).tolist() == [1, 2, 1]
    assert torch.allclose(first_component_evr(eig), torch.tensor([1.0, 0.25, 0.5], dtype=torch.float64))


# -- text decomposition --------------------------------------------------------------------------
def test_somp_recovers_planted_atoms():
    g = torch.Generator().manual_seed(0)
    atoms = torch.randn(60, 32, generator=g, dtype=torch.float64)
    planted = [7, 19, 33, 50]
    coef = torch.randn(40, 4, generator=g, dtype=torch.float64)
    C = coef @ torch.nn.functional.normalize(atoms[planted], dim=-1)
    sel = somp(C, atoms, steps=4)
    assert sorted(sel.indices) == planted
    assert sel.explained[-1] == pytest.approx(1.0, abs=1e-10)
    assert all(a <= b + 1e-12 for a, b in zip(sel.explained, sel.explained[1:], strict=False))


def _textspan_brute_force(C, T, steps, rank):
    """TextSpan by its definition, with explicit projectors instead of in-place updates."""
    C = C.double() - C.double().mean(0)
    _, _, vh = torch.linalg.svd(C, full_matrices=False)
    V = vh[:rank]
    P0 = T.double() @ V.T @ V
    D = C.shape[1]
    chosen, dirs, explained = [], [], []
    for _ in range(steps):
        Pi = torch.eye(D, dtype=torch.float64)
        for d in dirs:
            Pi = Pi - torch.outer(d, d)
        best, best_var, best_dir = None, -1.0, None
        for j in range(T.shape[0]):
            if j in chosen:
                continue
            dj = Pi @ P0[j]
            dj = dj / dj.norm()
            var = float((C @ Pi @ dj).var())
            if var > best_var:
                best, best_var, best_dir = j, var, dj
        chosen.append(best)
        dirs.append(best_dir)
        Pi = Pi - torch.outer(best_dir, best_dir)
        explained.append(float(1 - (C @ Pi).square().sum() / C.square().sum()))
    return chosen, explained


def test_textspan_matches_its_definition():
    g = torch.Generator().manual_seed(3)
    C = torch.randn(80, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 24, generator=g, dtype=torch.float64)
    T = torch.randn(40, 24, generator=g, dtype=torch.float64)
    sel = textspan(C, T, steps=4, rank=6)
    chosen, explained = _textspan_brute_force(C, T, 4, 6)
    assert sel.indices == chosen
    assert sel.explained == pytest.approx(explained, abs=1e-10)


# -- spectral similarity ------------------------------------------------------------------------
def test_spectral_similarity_known_answers():
    B = random_rotation(20, 4)[:6]
    e = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5, 0.1], dtype=torch.float64)
    assert spectral_similarity(B, e, B, e) == pytest.approx(1.0, abs=1e-12)
    flips = torch.tensor([1, -1, 1, -1, -1, 1], dtype=torch.float64)[:, None]
    assert spectral_similarity(B, e, B * flips, e) == pytest.approx(1.0, abs=1e-12)
    rotated = B @ random_rotation(20, 5)
    assert spectral_similarity(B, e, rotated, e) < 0.9
    assert spectral_similarity(B, e, B, e.flip(0)) < 1.0


def test_bases_similarity_between_datasets(small):
    a = rf.fit_bases(small, [images_for(small, 60, seed=1)], progress=False)
    b = rf.fit_bases(small, [images_for(small, 60, seed=2) * 3 + 1], progress=False)
    same = bases_similarity(a, a)
    assert torch.allclose(same, torch.ones_like(same))
    diff = bases_similarity(a, b)
    assert (diff <= 1 + 1e-9).all() and diff.mean() < 0.999


# -- specialization ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def specialization_setup(tmp_path_factory, small):
    root = tmp_path_factory.mktemp("spec")
    x = images_for(small, 90, seed=4)
    y = torch.arange(90) % 3
    cache = build_cache(small, list(zip(x.split(30), y.split(30), strict=True)), root / "c", progress=False)
    split = cache.load()
    bases = rf.fit_bases(small, [x], progress=False)
    heads = HeadContributions(split, bases.spec)
    return small, x, split, bases, heads


def test_head_contributions_equal_the_decomposition(specialization_setup):
    v, x, _, _, heads = specialization_setup
    dec = rf.decompose(v, x)
    ref = dec.of("head")
    for u in range(heads.num_heads):
        assert torch.allclose(heads(u).float(), ref[:, u], atol=1e-5)
    assert torch.allclose(heads.sum([0, 3]).float(), ref[:, [0, 3]].sum(1), atol=1e-5)


def test_per_head_accuracy_and_selection(specialization_setup):
    v, x, split, bases, heads = specialization_setup
    clf = prototype_head(split.output, split.labels)
    dec = rf.decompose(v, x)
    acc = per_head_accuracy(heads, clf)
    for u in (0, 5):
        direct = (clf(dec.of("head")[:, u]).argmax(-1) == split.labels).float().mean()
        assert acc[u] == pytest.approx(float(direct))
    scores = torch.arange(heads.num_heads, dtype=torch.float64)  # prefers the last heads
    res = greedy_selection(heads, scores, [2, 0.5], clf, ablation="zero")
    assert res[0]["heads"] == [heads.num_heads - 2, heads.num_heads - 1] and res[1]["k"] == heads.num_heads // 2
    kept = dec.of("head")[:, -2:].sum(1)
    assert res[0]["accuracy"] == pytest.approx(float((clf(kept).argmax(-1) == split.labels).float().mean()))
    mean_res = greedy_selection(heads, scores, [2], clf, ablation="mean", bases=bases)
    others = [u.index for u in bases.table if not (u.kind == "head" and u.layer * bases.spec.num_heads + u.head
                                                   in res[0]["heads"])]
    with_means = kept.double() + bases.means[others].sum(0)
    assert mean_res[0]["accuracy"] == pytest.approx(float((clf(with_means.float()).argmax(-1)
                                                            == split.labels).float().mean()))
    with pytest.raises(ValueError, match="calibration"):
        greedy_selection(heads, scores, [2], clf, ablation="mean")


def test_correlation_scores(specialization_setup):
    _, _, split, _, heads = specialization_setup
    a = torch.randn(50, 3, dtype=torch.float64)
    b = a * 2 + torch.randn(50, 3, dtype=torch.float64) * 0.1
    expected = torch.tensor([float(torch.corrcoef(torch.stack([a[:, i], b[:, i]]))[0, 1]) for i in range(3)],
                            dtype=torch.float64)
    assert torch.allclose(_pearson_columns(a, b), expected)
    # a direction along which the output moves only through one head singles that head out
    dirs = heads(2)[:1] - heads(2).mean(0)
    scores = correlation_scores(heads, dirs)
    assert scores.shape == (heads.num_heads,) and (scores.abs() <= 1 + 1e-9).all()


def test_jaccard():
    assert jaccard([1, 2, 3], [2, 3, 4]) == 0.5
    assert jaccard([], []) == 1.0


def test_default_dictionary():
    texts = default_dictionary()
    assert 200 <= len(texts) <= 1000 and len(set(texts)) == len(texts)
    assert any("letter" in t for t in texts) and any("texture" in t for t in texts)


def test_analyze_cli_offline(tmp_path, capsys, tiny_hf_clip):
    out = tmp_path / "an"  # a small CLIP: text encoding of the dictionary dominates analyze's time
    assert cli_main(["analyze", "--model", f"hf:{tiny_hf_clip}", "--pretrained", "--max-images", "40",
                     "--twonn-samples", "30", "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "linear ID" in text and "TextSpan" in text
    for name in ("report.md", "metrics.json", "heads.csv", "digits/linear_id.png", "digits/twonn.png",
                 "digits/head_accuracy.png", "digits/task_correlation.png"):
        assert (out / name).is_file()


def test_analyze_on_a_folder_by_absolute_path_writes_nothing_into_it(tmp_path, capsys):
    """Outputs go under --out (a slug of the folder name), never into the dataset folder."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    data = tmp_path / "my data"
    digits = load_digits()
    for c in range(3):
        (data / f"class{c}").mkdir(parents=True)
        for i, img in enumerate(digits.images[digits.target == c][:14]):
            Image.fromarray((img * 15).astype(np.uint8)).save(data / f"class{c}" / f"{i}.png")
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    out = tmp_path / "an"
    # a model without a text tower keeps this test about paths (text encoding costs most of analyze's time)
    args = ["analyze", "--model", "timm:vit_tiny_patch16_224", "--image-size", "32", "--max-images", "12",
            "--twonn-samples", "10", "--datasets", str(data.resolve()), "--out", str(out), "--no-progress"]
    assert cli_main(args) == 0
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before
    from residual_fast.data import load_dataset

    assert len(load_dataset(str(data.resolve()), "train").classnames) == 3  # the folder still loads afterwards
    capsys.readouterr()
    slug = next(p.name for p in out.iterdir() if p.is_dir() and p.name.startswith("my_data-"))
    assert (out / slug / "linear_id.png").is_file()


def test_max_images_is_stratified():
    from residual_fast.data.splits import stratified_subset

    labels = torch.tensor([0] * 36 + [1] * 28 + [2] * 30)  # a class-sorted split
    for n in (3, 10, 64):
        counts = torch.bincount(labels[stratified_subset(labels, torch.arange(94), n)], minlength=3)
        assert counts.sum() == n and bool((counts >= 1).all())
        assert (counts.double() - n * torch.tensor([36, 28, 30]) / 94).abs().max() <= 1
    assert torch.equal(stratified_subset(labels, torch.arange(94), 10, seed=1),
                       stratified_subset(labels, torch.arange(94), 10, seed=1))
