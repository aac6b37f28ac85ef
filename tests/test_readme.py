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


@pytest.mark.slow
@pytest.mark.parametrize("family", ["open_clip", "HF CLIP", "timm ViT"])
def test_peft_style_quickstarts_run(tmp_path, monkeypatch, family):
    """Each quickstart of the PEFT-style section runs offline as written, and its adapted features are adapted."""
    import torch

    text = README.read_text()
    section = text[text.index(f"### Quickstart: {family}"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, f"README-{family}", "exec"), namespace)
    adapted = namespace["adapted"]
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        adapted_out = adapted(images)
        with adapted.disable_adapter():
            base = adapted(images)
    assert adapted_out.shape == base.shape and not torch.allclose(adapted_out, base)
    saved = {"open_clip": "oc_adapter", "HF CLIP": "hf_adapter", "timm ViT": "timm_adapter"}[family]
    assert (tmp_path / saved / "meta.json").is_file()
    if family == "HF CLIP":
        out = namespace["out"]
        assert out.logits_per_image.shape == (2, 2)
        torch.testing.assert_close(namespace["features"].pooler_output if hasattr(namespace["features"],
                                   "pooler_output") else namespace["features"], adapted(namespace["pixel_values"]))
