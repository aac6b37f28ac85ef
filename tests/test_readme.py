"""The README's quickstart runs as written."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.slow
def test_quickstart_runs(tmp_path, monkeypatch):
    text = README.read_text()
    section = text[text.index("## Quickstart"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "README-quickstart", "exec"), namespace)
    feats, dec = namespace["feats"], namespace["dec"]
    assert feats.shape == (4, 512)
    assert (dec.contributions.sum(1) - dec.output).abs().max() < 1e-4
    assert (tmp_path / "my_adapter" / "meta.json").is_file()
