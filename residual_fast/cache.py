"""On-disk activation cache: one ViT pass, then fitting never runs the image model again.

Per image the cache keeps what DESIGN.md section 4.3 needs: the raw unit vectors
at the pooled position (``emb`` (w,), ``attn`` (L, w) heads before out-proj,
``mlp`` (L, w)), the pooled final residual ``z`` (w,) (for the LayerNorm stats),
the model's ``output`` (D,) and the label. A cache is a folder of
safetensors shards (memory-mapped when read) and a ``manifest.json``; each
shard and each manifest update is written to a temporary file and renamed, so
an interrupted build leaves only whole shards and resumes where it stopped.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from ._version import __version__
from .decompose import capture, eval_mode
from .models import fingerprint_mismatch, get_adapter
from .serialization import (
    CorruptFileError,
    check_meta,
    check_tensor,
    is_bool,
    is_dict,
    is_float,
    is_int,
    is_str,
    list_of,
    load_tensors,
    may_be_absent,
    optional,
    read_json,
    safe_child,
    sha256_file,
    write_json_atomic,
)
from .spectral import SpectralBases, UnitMoments, _check_kinds
from .units import Activations, check_finite_batch

FIELDS = ("emb", "attn", "mlp", "z", "output")
MANIFEST = "manifest.json"


@dataclass
class CachedSplit:
    """A cache read into memory: every field stacked over images, plus labels."""

    emb: torch.Tensor
    attn: torch.Tensor
    mlp: torch.Tensor
    z: torch.Tensor
    output: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]

    def activations(self, index: torch.Tensor | slice | None = None, dtype: torch.dtype | None = None) -> Activations:
        sel = slice(None) if index is None else index
        conv = (lambda t: t[sel].to(dtype)) if dtype is not None else (lambda t: t[sel])
        return Activations.from_tensors(conv(self.emb), conv(self.attn), conv(self.mlp), conv(self.z),
                                        conv(self.output))

    def to(self, device) -> CachedSplit:
        return CachedSplit(*(getattr(self, f).to(device) for f in (*FIELDS, "labels")))

    def subset(self, index: torch.Tensor) -> CachedSplit:
        return CachedSplit(*(getattr(self, f)[index] for f in (*FIELDS, "labels")))


SHARD_SCHEMA = {"file": is_str, "n": is_int(1), "sha256": is_str, "start": may_be_absent(is_int(0))}
PART_SCHEMA = {"rank": is_int(0), "world_size": is_int(2), "complete": is_bool, "seconds": is_float(0),
               "shards": list_of(is_dict)}


def part_name(rank: int, world: int) -> str:
    """The per-rank manifest of a cache being built by ``world`` processes."""
    return f"part-{rank:05d}-of-{world:05d}.json"


class ActivationCache:
    """A built (or partly built) cache folder."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        manifest = self.path / MANIFEST
        if not manifest.is_file():
            raise FileNotFoundError(f"no activation cache at {self.path} (missing {MANIFEST})")
        self.manifest = read_json(manifest, "cache manifest")
        if not isinstance(self.manifest, dict) or self.manifest.get("kind") != "activation_cache":
            raise CorruptFileError(f"{manifest} is not an activation-cache manifest")
        where = f"cache manifest {manifest}"
        check_meta(self.manifest, {"version": is_str, "fingerprint": is_dict, "complete": is_bool,
                                   "seconds": is_float(0), "source": optional(is_dict),
                                   "world_size": may_be_absent(is_int(1)), "shards": list_of(is_dict),
                                   "classes": may_be_absent(list_of(is_str)),
                                   "templates": may_be_absent(list_of(is_str))}, where)
        check_shards(self.manifest["shards"], self.path, where)
        if self.manifest["complete"] and not self.manifest["shards"]:
            raise CorruptFileError(f"{where}: marked complete but lists no shards")

    @property
    def classes(self) -> list[str] | None:
        """The class names of the labels (label ``i`` is ``classes[i]``), where the builder recorded them."""
        return self.manifest.get("classes")

    @property
    def templates(self) -> list[str] | None:
        """Prompt templates (``{c}`` for the class name) recorded with the class names."""
        return self.manifest.get("templates")

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    @property
    def num_images(self) -> int:
        return sum(s["n"] for s in self.manifest["shards"])

    def __len__(self) -> int:
        return self.num_images

    @property
    def seconds(self) -> float:
        """Wall time spent writing the cache (the one ViT pass)."""
        return float(self.manifest.get("seconds", 0.0))

    def check_model(self, visual: nn.Module) -> None:
        why = fingerprint_mismatch(self.manifest["fingerprint"], get_adapter(visual).spec().fingerprint())
        if why:
            raise ValueError(f"the cache at {self.path} was written by another model: {why}")

    def shard_tensors(self, i: int) -> dict[str, torch.Tensor]:
        """Shard ``i``, its checksum, fields, shapes and finiteness verified."""
        shard = self.manifest["shards"][i]
        path = safe_child(self.path, shard["file"], f"cache {self.path}")
        where = f"cache shard {path}"
        if not path.is_file():
            raise CorruptFileError(f"{where} is missing")
        if sha256_file(path) != shard["sha256"]:
            raise CorruptFileError(f"{where} does not match the checksum in the manifest (corrupt or tampered)")
        t = load_tensors(path)
        n = shard["n"]
        for f in FIELDS:
            check_tensor(t, f, where, (n,) + tuple(t[f].shape[1:]) if f in t else None)
        check_tensor(t, "labels", where, (n,), floating=False)
        return t

    def iter_shards(self) -> Iterable[tuple[Activations, torch.Tensor]]:
        for i in range(len(self.manifest["shards"])):
            t = self.shard_tensors(i)
            yield Activations.from_tensors(*(t[f] for f in FIELDS)), t["labels"]

    def load(self) -> CachedSplit:
        if not self.complete:
            raise RuntimeError(f"the cache at {self.path} is incomplete; build it again to resume")
        parts = [self.shard_tensors(i) for i in range(len(self.manifest["shards"]))]
        for f in FIELDS:
            shapes = {tuple(p[f].shape[1:]) for p in parts}
            if len(shapes) != 1:
                raise CorruptFileError(f"cache {self.path}: shards disagree on the shape of {f!r}: {sorted(shapes)}")
        return CachedSplit(*(torch.cat([p[f] for p in parts]) for f in (*FIELDS, "labels")))


def check_shards(shards: list[dict], folder: Path, where: str) -> None:
    """Schema, safe names, no duplicates; global ``start`` indices, where recorded, tile ``[0, N)`` in order."""
    for i, shard in enumerate(shards):
        check_meta(shard, SHARD_SCHEMA, f"{where}, shard {i}")
        safe_child(folder, shard["file"], f"{where}, shard {i}")
    names = [s["file"] for s in shards]
    if len(set(names)) != len(names):
        raise CorruptFileError(f"{where}: a shard is listed twice")
    starts = [s.get("start") for s in shards]
    if any(v is not None for v in starts):
        expected = 0
        for i, shard in enumerate(shards):
            if shard.get("start") != expected:
                raise CorruptFileError(f"{where}, shard {i}: starts at image {shard.get('start')}, expected "
                                       f"{expected} (shards must tile the dataset in order)")
            expected += shard["n"]


def _batch(batch) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], torch.as_tensor(batch[1])
    raise TypeError("cache batches must be (images, labels) pairs, as a DataLoader over a labeled dataset yields")


def source_difference(saved: dict | None, now: dict | None) -> str | None:
    if saved == now:
        return None
    saved, now = saved or {}, now or {}
    for key in sorted(set(saved) | set(now)):
        if saved.get(key) != now.get(key):
            return f"{key} was {saved.get(key)!r}, now {now.get(key)!r}"
    return "the data source differs"


@torch.no_grad()
def build_cache(visual: nn.Module, batches: Iterable, path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                resume: bool = True, progress: bool = True, source: dict | None = None,
                classes: Sequence[str] | None = None, templates: Sequence | None = None,
                process_group=None) -> ActivationCache:
    """One pass of ``visual`` over ``batches`` of ``(images, labels)``, written to the folder ``path``.

    The loader must yield the same batches in the same order on every run (no
    shuffling) for a resumed build to be exact. ``source`` (JSON-able: dataset,
    split, seed, image size, batch size, max images, preprocessing, ...) is
    recorded, and an existing cache built from another source is refused, naming
    the difference, instead of being resumed or returned. ``dtype`` stores
    activations in another precision (default: the model's). ``classes`` (the
    name of each label) and ``templates`` (prompt templates) are recorded, so a
    zero-shot head can be built from the cache alone and checked against it;
    labels past the class list are refused.

    With ``process_group`` (a ``torch.distributed`` group) every rank passes its
    own contiguous block of the data, in rank order (as
    :func:`residual_fast.distributed.shard_range` gives), and writes its shards
    into the same folder (shared by all nodes) with a per-rank manifest, so an
    interrupted build resumes rank by rank (with the same number of processes);
    rank 0 then writes one manifest whose shards carry their global index ranges,
    and :meth:`ActivationCache.load` returns the rows in the dataset's order.
    """
    from .distributed import active

    labeling = _labeling(classes, templates)
    if active(process_group):
        return _build_cache_distributed(visual, batches, Path(path), dtype=dtype, resume=resume, progress=progress,
                                        source=source, labeling=labeling, group=process_group)
    adapter = get_adapter(visual)
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    fingerprint = adapter.spec().fingerprint()
    manifest_path = folder / MANIFEST
    if manifest_path.is_file():
        existing = _check_existing(folder, fingerprint, source, world=1, labeling=labeling)
        if existing.complete:
            return existing
        if not resume:
            raise FileExistsError(f"{folder} holds a partial cache; pass resume=True or use a new folder")
        manifest = existing.manifest
    else:
        manifest = {"kind": "activation_cache", "version": __version__, "fingerprint": fingerprint,
                    "shards": [], "complete": False, "seconds": 0.0, "source": source, **labeling}
        write_json_atomic(manifest_path, manifest)
    _cache_batches(adapter, batches, folder, manifest, manifest_path, "shard-{i:06d}.safetensors", dtype, progress,
                   len(classes) if classes is not None else None)
    if not manifest["shards"]:
        raise ValueError("no batches: the data to cache is empty")
    manifest["complete"] = True
    write_json_atomic(manifest_path, manifest)
    return ActivationCache(folder)


def _labeling(classes: Sequence[str] | None, templates: Sequence | None) -> dict:
    """Class names and templates as the manifest stores them (templates as ``{c}`` strings)."""
    from .data.prompts import fill

    out = {}
    if classes is not None:
        classes = list(classes)
        if not classes or not all(isinstance(c, str) for c in classes):
            raise ValueError("classes must be a non-empty list of class-name strings")
        out["classes"] = classes
    if templates is not None:
        out["templates"] = [fill(t, "{c}") if callable(t) else str(t) for t in templates]
    return out


def _check_existing(folder: Path, fingerprint: dict, source: dict | None, world: int,
                    labeling: dict | None = None) -> ActivationCache:
    """An existing cache folder may be returned or resumed only for the same model, data, classes and process
    count."""
    existing = ActivationCache(folder)
    for key, value in (labeling or {}).items():
        if existing.manifest.get(key) is not None and existing.manifest[key] != value:
            raise ValueError(f"{folder} holds a cache with other {key} ({existing.manifest[key][:5]}...); "
                             "use a new folder")
    why = fingerprint_mismatch(existing.manifest["fingerprint"], fingerprint)
    if why:
        raise ValueError(f"{folder} holds a cache of another model ({why}); use a new folder")
    diff = source_difference(existing.manifest.get("source"), source)
    if diff:
        raise ValueError(f"{folder} holds a cache of other data or loader settings ({diff}); use a new folder")
    started = existing.manifest.get("world_size", 1)
    if not existing.complete and started != world:
        raise ValueError(f"{folder} holds a partial cache started by {started} process(es); resume it with "
                         f"{started} (this run has {world}) or use a new folder")
    return existing


def _cache_batches(adapter, batches: Iterable, folder: Path, record: dict, record_path: Path, pattern: str,
                   dtype: torch.dtype | None, progress: bool, num_classes: int | None = None) -> None:
    """Write one checksummed shard per batch, skipping the batches ``record`` already lists; ``record`` is
    rewritten atomically after every shard (so a kill leaves whole shards and a consistent record)."""
    done = len(record["shards"])
    device = next(adapter.visual.parameters()).device
    total = len(batches) if hasattr(batches, "__len__") else None
    start = time.perf_counter()
    with eval_mode(adapter.visual):
        for i, batch in enumerate(tqdm(batches, total=total, desc="caching", unit="batch", disable=not progress)):
            if i < done:
                continue  # written by an earlier, interrupted run
            images, labels = _batch(batch)
            if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
                raise ValueError(f"batch {i}: {images.shape[0]} images but labels of shape {tuple(labels.shape)}; "
                                 "every image needs one label")
            if labels.is_floating_point() or labels.is_complex() or (labels.numel() and int(labels.min()) < 0):
                raise ValueError(f"batch {i}: labels must be class indices >= 0, got {labels[:8].tolist()}")
            if num_classes is not None and labels.numel() and int(labels.max()) >= num_classes:
                raise ValueError(f"batch {i}: label {int(labels.max())} but only {num_classes} class names")
            if labels.numel() == 0:
                raise ValueError(f"batch {i} is empty")
            acts = capture(adapter, images.to(device, non_blocking=True))
            check_finite_batch(acts, i, "caching")
            tensors = {"emb": acts.emb_raw, "attn": acts.attn_raw, "mlp": acts.mlp_raw, "z": acts.z,
                       "output": acts.output}
            tensors = {k: (v.to(dtype) if dtype else v).contiguous().cpu() for k, v in tensors.items()}
            tensors["labels"] = labels.long().contiguous().cpu()
            name = pattern.format(i=i)
            tmp = folder / (name + ".tmp")
            save_file(tensors, str(tmp))
            digest = sha256_file(tmp)
            os.replace(tmp, folder / name)
            record["shards"].append({"file": name, "n": int(labels.shape[0]), "sha256": digest})
            record["seconds"] = record.get("seconds", 0.0) + (time.perf_counter() - start)
            start = time.perf_counter()
            write_json_atomic(record_path, record)


def _build_cache_distributed(visual: nn.Module, batches: Iterable, folder: Path, *, dtype, resume: bool,
                             progress: bool, source: dict | None, labeling: dict, group) -> ActivationCache:
    from .distributed import barrier, check_same_model, gather_objects, raise_if_any, rank_and_size

    rank, world = rank_and_size(group)
    adapter = get_adapter(visual)
    fingerprint = adapter.spec().fingerprint()
    check_same_model(fingerprint, group)
    manifest_path = folder / MANIFEST
    error, complete = None, False
    if rank == 0:  # the shared manifest: checked (or created) once, before any rank writes
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if manifest_path.is_file():
                existing = _check_existing(folder, fingerprint, source, world, labeling)
                complete = existing.complete
                if not complete and not resume:
                    raise FileExistsError(f"{folder} holds a partial cache; pass resume=True or use a new folder")
            else:
                for stale in folder.glob("part-*-of-*.json"):  # a new cache: parts of another run do not count
                    stale.unlink()
                write_json_atomic(manifest_path, {"kind": "activation_cache", "version": __version__,
                                                  "fingerprint": fingerprint, "shards": [], "complete": False,
                                                  "seconds": 0.0, "source": source, "world_size": world,
                                                  **labeling})
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            error = e
    raise_if_any(error, group)
    if gather_objects(complete, group)[0]:
        return ActivationCache(folder)
    part_path = folder / part_name(rank, world)
    try:
        if part_path.is_file():
            part = read_json(part_path, "cache part manifest")
            check_meta(part, PART_SCHEMA, f"cache part manifest {part_path}")
            check_shards(part["shards"], folder, f"cache part manifest {part_path}")
            if (part["rank"], part["world_size"]) != (rank, world):
                raise CorruptFileError(f"{part_path} belongs to rank {part['rank']} of {part['world_size']}")
        else:
            part = {"rank": rank, "world_size": world, "complete": False, "seconds": 0.0, "shards": []}
            write_json_atomic(part_path, part)
        if not part["complete"]:
            _cache_batches(adapter, batches, folder, part, part_path, f"shard-r{rank:05d}-{{i:06d}}.safetensors",
                           dtype, progress and rank == 0, len(labeling["classes"]) if "classes" in labeling else None)
            part["complete"] = True
            write_json_atomic(part_path, part)
        error = None
    except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
        error = e
    raise_if_any(error, group)
    parts = gather_objects(part, group)
    if rank == 0:
        try:
            shards, offset = [], 0
            for p in parts:
                for shard in p["shards"]:
                    shards.append({**shard, "start": offset})
                    offset += shard["n"]
            if not shards:
                raise ValueError("no batches: the data to cache is empty")
            manifest = read_json(manifest_path, "cache manifest")
            manifest.update(shards=shards, complete=True, seconds=max(p["seconds"] for p in parts))
            write_json_atomic(manifest_path, manifest)
            for r in range(world):
                (folder / part_name(r, world)).unlink(missing_ok=True)
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            error = e
    raise_if_any(error, group)
    barrier(group)
    return ActivationCache(folder)


def fit_bases_from_cache(cache: ActivationCache, visual: nn.Module, units=("head",), *, rtol: float = 1e-10,
                         progress: bool = True, process_group=None) -> SpectralBases:
    """Exact bases from a cache (the same moments as :func:`residual_fast.fit_bases`, no ViT pass).

    With ``process_group`` each rank reads a contiguous block of the shards and the moments are all-reduced.
    """
    from .distributed import shard_range

    cache.check_model(visual)
    moments = UnitMoments(get_adapter(visual).spec(), _check_kinds(units))
    lo, hi = shard_range(len(cache.manifest["shards"]), process_group)
    for i in tqdm(range(lo, hi), desc="calibrating from cache", disable=not progress):
        t = cache.shard_tensors(i)
        moments.update(Activations.from_tensors(*(t[f] for f in FIELDS)))
    return moments.all_reduce(process_group).bases(rtol)
