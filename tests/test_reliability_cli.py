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
