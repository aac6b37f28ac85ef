"""The CLI on a user's own image folder (issue: adoption, rows 2 and 9): caches and heads carry class names,
fit reports base vs adapted accuracy with plots, eval prints the base accuracy, mismatched classes are refused."""

import json

import numpy as np
import pytest

from residual_fast.cache import ActivationCache
from residual_fast.cli import main as cli_main

MODEL = ["--image-size", "32", "--no-progress"]




@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from PIL import Image
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("data") / "three kinds"
    digits = load_digits()
    for c, name in enumerate(("circle", "stick", "swan")):
        (root / name).mkdir(parents=True)
        for i, img in enumerate(digits.images[digits.target == c][:20]):
            Image.fromarray((img * 15).astype(np.uint8)).convert("RGB").save(root / name / f"{i}.png")
    return root.resolve()


def test_folder_classes_flow_from_cache_to_head_to_eval(folder, tiny_hf_clip, tmp_path, capsys):
    """The adopter's path: an HF CLIP saved locally, an image folder by absolute path."""
    MODEL = ["--model", f"hf:{tiny_hf_clip}", "--pretrained", "--no-progress"]
    for split in ("train", "val"):
        assert cli_main(["cache", *MODEL, "--dataset", str(folder), "--split", split, "--out",
                         str(tmp_path / split)]) == 0
    assert ActivationCache(tmp_path / "train").classes == ["circle", "stick", "swan"]
    assert "{c}" in ActivationCache(tmp_path / "train").templates[0]
    capsys.readouterr()

    fit = ["fit", *MODEL, "--train-cache", str(tmp_path / "train"), "--val-cache", str(tmp_path / "val"),
           "--method", "fine", "--epochs", "2", "--head", "zeroshot"]
    # without --dataset the head is built over the cache's own 3 classes (it used to take digits' 10)
    assert cli_main([*fit, "--out", str(tmp_path / "fit")]) == 0
    out = capsys.readouterr().out
    assert "validation accuracy: base" in out
    summary = json.loads((tmp_path / "fit" / "fit.json").read_text())
    assert summary["classes"] == ["circle", "stick", "swan"] and 0 <= summary["base_val_accuracy"] <= 1
    for name in ("report.md", "lambdas.png", "spectra.png", "head/meta.json"):
        assert (tmp_path / "fit" / name).is_file(), name
    report = (tmp_path / "fit" / "report.md").read_text()
    assert "base (model output)" in report and "3 classes" in report

    # a baseline with a prototype head reads only the caches: no model is built (this one does not exist)
    nomodel = ["--model", "hf:/no/such/model", "--no-progress"]
    assert cli_main(["fit", *nomodel, "--train-cache", str(tmp_path / "train"), "--val-cache", str(tmp_path / "val"),
                     "--method", "linear", "--head", "prototype", "--epochs", "1", "--out", str(tmp_path / "lin")]) == 0
    assert cli_main(["eval", *nomodel, "--fit", str(tmp_path / "lin"), "--cache", str(tmp_path / "val")]) == 0
    capsys.readouterr()

    # another dataset's names are refused instead of silently used
    assert cli_main([*fit, "--dataset", "digits", "--out", str(tmp_path / "bad")]) == 2
    assert "10 classes" in capsys.readouterr().err

    assert cli_main(["eval", *MODEL, "--fit", str(tmp_path / "fit"), "--cache", str(tmp_path / "val")]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 <= res["accuracy"] <= 1 and res["base_accuracy"] == pytest.approx(summary["base_val_accuracy"])

    # a head fitted on these classes does not score a cache of other classes
    assert cli_main(["cache", *MODEL, "--dataset", "digits", "--max-images", "20", "--out",
                     str(tmp_path / "digits")]) == 0
    capsys.readouterr()
    assert cli_main(["eval", *MODEL, "--fit", str(tmp_path / "fit"), "--cache", str(tmp_path / "digits")]) == 2
    assert "fitted for 3 classes" in capsys.readouterr().err
    assert not any(p.suffix not in (".png",) for p in folder.rglob("*") if p.is_file())  # nothing written there


@pytest.mark.parametrize("command", [["analyze", "--datasets", "digits"], ["cache"], ["calibrate"]])
def test_pretrained_means_the_same_in_every_command(command, tmp_path, capsys):
    """``--pretrained TAG`` everywhere (analyze used to take a bare flag); a bare flag is for hf:/timm: names."""
    assert cli_main([*command, "--model", "ViT-B-32", "--pretrained", "--out", str(tmp_path / "o")]) == 2
    assert "need the pretrained tag" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main([command[0], "--help"])
    assert "--pretrained [TAG]" in capsys.readouterr().out
