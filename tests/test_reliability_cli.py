"""The CLI turns user mistakes into one line on stderr and exit code 2 (issue: reliability 2, 7)."""

import json

import pytest

from residual_fast.cli import main as cli_main

CACHE = ["cache", "--image-size", "32", "--max-images", "40", "--no-progress"]


def _one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error" in err[0] and "Traceback" not in err[0], err
    return err[0]


def test_out_is_a_file_or_under_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert cli_main([*CACHE, "--out", str(f)]) == 2
    _one_error_line(capsys)
    assert cli_main([*CACHE, "--out", str(f / "sub")]) == 2
    _one_error_line(capsys)
    assert cli_main([*CACHE, "--out", "/proc/residual_fast_cannot_write_here"]) == 2
    _one_error_line(capsys)


@pytest.mark.parametrize("args", [
    ["cache", "--max-images", "-5", "--out", "x"],
    ["cache", "--max-images", "0", "--out", "x"],
    ["cache", "--batch-size", "0", "--out", "x"],
    ["fit", "--epochs", "-1", "--train-cache", "a", "--val-cache", "b", "--out", "x"],
    ["bench", "--rounds", "0"],
    ["demo", "--epochs", "0"],
])
def test_argument_ranges(args, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(args)
    assert e.value.code == 2
    assert "must be at least" in capsys.readouterr().err


def test_resume_with_other_loader_settings_is_refused(tmp_path, capsys):
    out = str(tmp_path / "c")
    assert cli_main([*CACHE, "--batch-size", "16", "--out", out]) == 0
    capsys.readouterr()
    assert cli_main([*CACHE, "--batch-size", "8", "--out", out]) == 2
    assert "batch_size was 16, now 8" in _one_error_line(capsys)
    assert cli_main([*CACHE, "--batch-size", "16", "--split", "test", "--out", out]) == 2
    assert "split was 'train', now 'test'" in _one_error_line(capsys)
    assert cli_main([*CACHE, "--batch-size", "16", "--out", out]) == 0  # same settings: the finished cache


def test_reproduce_when_every_run_fails(tmp_path, capsys):
    rc = cli_main(["reproduce", "--models", "ViT-Q-99", "--datasets", "digits", "--methods", "zeroshot",
                   "--out", str(tmp_path / "r"), "--no-progress"])
    assert rc == 2
    assert "every run failed" in _one_error_line(capsys)
    rows = json.loads((tmp_path / "r" / "results.json").read_text())  # the printed path exists
    assert rows and all("error" in r for r in rows)


def test_cli_accepts_timm_names(tmp_path, capsys):
    """calibrate / cache / fit / eval take rf.load names (timm: here; random weights, offline)."""
    model = ["--model", "timm:vit_tiny_patch16_224", "--image-size", "32"]
    common = [*model, "--max-images", "24", "--no-progress"]
    for split in ("train", "val"):
        assert cli_main(["cache", "--split", split, "--out", str(tmp_path / split), *common]) == 0
    assert cli_main(["calibrate", "--out", str(tmp_path / "bases"), *common]) == 0
    fit = ["fit", *model, "--train-cache", str(tmp_path / "train"), "--val-cache", str(tmp_path / "val"),
           "--method", "fine", "--epochs", "1", "--no-progress"]
    assert cli_main([*fit, "--out", str(tmp_path / "fit")]) == 0
    capsys.readouterr()
    assert cli_main(["eval", *model, "--fit", str(tmp_path / "fit"), "--cache", str(tmp_path / "val")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["method"] == "fine"
    assert cli_main([*fit, "--head", "zeroshot", "--out", str(tmp_path / "fit2")]) == 2
    assert "no text tower" in _one_error_line(capsys)


def test_bench_unknown_model_is_one_line(capsys):
    assert cli_main(["bench", "--model", "ViT-Q-99", "--rounds", "1"]) == 2
    line = _one_error_line(capsys)
    assert "unknown model 'ViT-Q-99'" in line and len(line) < 300
