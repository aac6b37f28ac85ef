"""safetensors + JSON persistence (no pickle anywhere), with integrity checks and schema validation.

A bundle is a folder with ``tensors.safetensors`` and ``meta.json``. Every file
read back is untrusted input:

* ``meta.json`` records the sha256 of the tensor file, verified on load (about
  1 GB/s: a few ms for an adapter). The tensor file is written first and the
  metadata last, each to a temporary name and renamed, so the metadata is the
  commit marker: a crash between the two renames leaves new tensors beside old
  metadata, which then fails the checksum instead of loading with the wrong settings.
* metadata is checked against a schema (:func:`check_meta`): required keys,
  types, ranges and allowed values, with one clear error naming the file and key.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

TENSORS = "tensors.safetensors"
META = "meta.json"


class CorruptFileError(ValueError):
    """A file residual_fast reads is corrupt, truncated, tampered with or of an unexpected form."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptFileError(f"{path} is not valid JSON ({what} corrupt or truncated): {e}") from None


def save_bundle(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write ``tensors`` and ``meta`` into the folder ``path`` (created if needed)."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} exists and is not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    tmp_t = folder / (TENSORS + ".tmp")
    save_file(flat, str(tmp_t))
    meta = dict(meta, tensors_sha256=sha256_file(tmp_t))
    _normal_mode(tmp_t)
    os.replace(tmp_t, folder / TENSORS)
    write_json_atomic(folder / META, meta)  # last: the commit marker
    return folder


def _normal_mode(path: Path) -> None:
    """Give ``path`` the mode a new file gets (0666 less the umask): safetensors writes 0600."""
    mask = os.umask(0o022)  # reading the umask means setting it; restored at once
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def load_bundle(path: str | os.PathLike, kind: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a folder written by :func:`save_bundle`; ``kind`` must match ``meta['kind']``; checksum verified."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"no saved {kind} at {folder} (expected a folder with {TENSORS} and {META})")
    for name in (TENSORS, META):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} is missing {name}; was it written by residual_fast?")
    meta = read_json(folder / META, kind)
    if not isinstance(meta, dict):
        raise CorruptFileError(f"{folder / META} must hold a JSON object")
    if meta.get("kind") != kind:
        raise CorruptFileError(f"{folder} holds a {meta.get('kind')!r}, not a {kind!r}")
    want = meta.get("tensors_sha256")
    if not isinstance(want, str):
        raise CorruptFileError(f"{folder / META} records no checksum of {TENSORS} (written by an earlier "
                               "residual_fast, or tampered with); save it again")
    if sha256_file(folder / TENSORS) != want:
        raise CorruptFileError(f"{folder / TENSORS} does not match the checksum in {META}: the file is corrupt, "
                               "tampered with, or from an interrupted save")
    return load_tensors(folder / TENSORS), meta


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CorruptFileError(f"{path} is not a readable safetensors file: {e}") from None


# -- metadata schemas ------------------------------------------------------------------------------------
Check = Callable[[Any], str | None]  # None when valid, else what is wrong


def is_int(lo: int | None = None, hi: int | None = None) -> Check:
    def check(v):
        if isinstance(v, bool) or not isinstance(v, int):
            return f"an integer, got {v!r}"
        if lo is not None and v < lo or hi is not None and v > hi:
            return f"an integer in [{lo}, {hi}], got {v}"
        return None

    return check


def is_float(lo: float | None = None, hi: float | None = None, open_lo: bool = False, open_hi: bool = False
             ) -> Check:
    def check(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return f"a finite number, got {v!r}"
        if lo is not None and (v < lo or open_lo and v == lo) or hi is not None and (v > hi or open_hi and v == hi):
            return f"a number in {'(' if open_lo else '['}{lo}, {hi}{')' if open_hi else ']'}, got {v}"
        return None

    return check


def is_bool(v) -> str | None:
    return None if isinstance(v, bool) else f"true or false, got {v!r}"


def is_str(v) -> str | None:
    return None if isinstance(v, str) else f"a string, got {v!r}"


def is_dict(v) -> str | None:
    return None if isinstance(v, dict) else f"an object, got {type(v).__name__}"


def one_of(*values) -> Check:
    def check(v):
        ok = any(v == x and type(v) is type(x) for x in values)
        return None if ok else f"one of {list(values)}, got {v!r}"

    return check


def list_of(item: Check, non_empty: bool = False, unique: bool = False) -> Check:
    def check(v):
        if not isinstance(v, list) or non_empty and not v:
            return f"a{' non-empty' if non_empty else ''} list, got {v!r}"
        for x in v:
            why = item(x)
            if why:
                return f"a list of {why}"
        if unique and len({json.dumps(x) for x in v}) != len(v):
            return f"a list without repeats, got {v!r}"
        return None

    return check


def optional(check: Check) -> Check:
    return lambda v: None if v is None else check(v)


def may_be_absent(check: Check) -> Check:
    """A key that older files do not have (absent or ``None``), checked when present."""

    def run(v):
        return None if v is None else check(v)

    run.may_be_absent = True
    return run


def check_meta(meta: dict, schema: dict[str, Check], where: str) -> None:
    """Raise :class:`CorruptFileError` naming ``where`` and the key when ``meta`` breaks ``schema``."""
    if not isinstance(meta, dict):
        raise CorruptFileError(f"{where}: metadata must be a JSON object")
    for key, check in schema.items():
        if key not in meta:
            if getattr(check, "may_be_absent", False):
                continue
            raise CorruptFileError(f"{where}: metadata has no {key!r}")
        why = check(meta[key])
        if why:
            raise CorruptFileError(f"{where}: {key!r} must be {why}")


def check_tensor(tensors: dict[str, torch.Tensor], name: str, where: str, shape: tuple | None = None,
                 floating: bool = True, finite: bool = True) -> torch.Tensor:
    """A tensor of the bundle, with its shape (``None`` entries: any size), kind and finiteness checked."""
    t = tensors.get(name)
    if t is None:
        raise CorruptFileError(f"{where}: tensor {name!r} is missing")
    if shape is not None and (t.ndim != len(shape) or any(s is not None and s != d for s, d in
                                                           zip(shape, t.shape, strict=True))):
        raise CorruptFileError(f"{where}: tensor {name!r} has shape {tuple(t.shape)}, expected {shape}")
    if floating and not t.is_floating_point():
        raise CorruptFileError(f"{where}: tensor {name!r} must be floating-point, got {t.dtype}")
    if not floating and t.dtype != torch.int64:
        raise CorruptFileError(f"{where}: tensor {name!r} must be int64, got {t.dtype}")
    if finite and floating and not bool(torch.isfinite(t).all()):
        raise CorruptFileError(f"{where}: tensor {name!r} holds NaN or Inf")
    return t


def safe_child(folder: Path, name: Any, where: str) -> Path:
    """``folder / name`` for a plain file name (no separators, no ``..``): paths stay inside the folder."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name \
            or "\x00" in name or Path(name).name != name:
        raise CorruptFileError(f"{where}: {name!r} is not a plain file name inside {folder}")
    return folder / name
