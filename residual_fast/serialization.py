"""safetensors + JSON persistence (no pickle anywhere)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

TENSORS = "tensors.safetensors"
META = "meta.json"


def save_bundle(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write ``tensors`` and ``meta`` into the folder ``path`` (created if needed)."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    tmp_t, tmp_m = folder / (TENSORS + ".tmp"), folder / (META + ".tmp")
    save_file(flat, str(tmp_t))
    tmp_m.write_text(json.dumps(meta, indent=2, sort_keys=True))
    os.replace(tmp_t, folder / TENSORS)
    os.replace(tmp_m, folder / META)
    return folder


def load_bundle(path: str | os.PathLike, kind: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a folder written by :func:`save_bundle`; ``kind`` must match ``meta['kind']``."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"no saved {kind} at {folder} (expected a folder with {TENSORS} and {META})")
    for name in (TENSORS, META):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} is missing {name}; was it written by residual_fast?")
    meta = json.loads((folder / META).read_text())
    if meta.get("kind") != kind:
        raise ValueError(f"{folder} holds a {meta.get('kind')!r}, not a {kind!r}")
    return load_file(str(folder / TENSORS)), meta
