"""End-to-end runs: cache the splits once, fit methods from the cache, evaluate, report.

Used by the command line (``residual-fast demo`` / ``reproduce``) and usable as a
library.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .cache import ActivationCache, CachedSplit, build_cache, fit_bases_from_cache
from .classifiers import Classifier, prototype_head, text_head
from .data import LabeledImages, load_dataset, stratified_split
from .data.datasets import dataset_slug
from .decompose import eval_mode
from .loading import load, load_open_clip
from .report import plot_lambdas, plot_spectra, write_results
from .residual import VARIANTS
from .spectral import SpectralBases, fit_bases
from .train import METHODS, evaluate, fit_method, method_forward

SPLIT_FRACTIONS = {"train": 0.6, "val": 0.1, "test": 0.3}


@dataclass
class PreparedData:
    caches: dict[str, ActivationCache]
    splits: dict[str, CachedSplit]
    sizes: dict[str, int]


def split_indices(train: LabeledImages, test: LabeledImages | None, seed: int, val_fraction: float = 0.1
                  ) -> dict[str, tuple[LabeledImages, torch.Tensor]]:
    """train/val/test index sets: val carved from train; test from the test split when there is one."""
    if test is None:
        parts = stratified_split(train.labels, SPLIT_FRACTIONS, seed)
        return {k: (train, v) for k, v in parts.items()}
    parts = stratified_split(train.labels, {"train": 1 - val_fraction, "val": val_fraction}, seed)
    return {"train": (train, parts["train"]), "val": (train, parts["val"]),
            "test": (test, torch.arange(len(test)))}


def load_splits(name: str, *, root: str | None = None, transform=None, seed: int = 0, download: bool = True
                ) -> dict[str, tuple[LabeledImages, torch.Tensor]]:
    """train / val / test of a dataset: the official test split where there is one (val carved from
    train), otherwise a seeded stratified 60/10/30 split."""
    from .data.datasets import HAS_TEST

    train = load_dataset(name, "train", root=root, transform=transform, download=download)
    test = load_dataset(name, "test", root=root, transform=transform, download=download) if name in HAS_TEST else None
    return split_indices(train, test, seed)


def cache_splits(visual: nn.Module, parts: dict, folder: Path, *, batch_size: int = 128, workers: int = 0,
                 max_images: int | None = None, progress: bool = True, seed: int = 0,
                 process_group=None) -> PreparedData:
    """One cache per split under ``folder``; ``max_images`` keeps a seeded, stratified subset of each.

    With ``process_group`` every rank caches its contiguous block of each split into the shared folder.
    """
    from .data.splits import stratified_subset
    from .distributed import shard_loader

    caches = {}
    for split, (data, idx) in parts.items():
        if max_images is not None:
            idx = stratified_subset(data.labels, idx, max_images, seed=seed)
        loader = shard_loader(data.dataset, idx, batch_size, process_group, workers)
        source = {"dataset": data.name, "split": split, "seed": seed, "max_images": max_images,
                  "images": int(idx.numel()), "batch_size": batch_size}
        caches[split] = build_cache(visual, loader, folder / split, progress=progress, source=source,
                                    classes=data.classnames, templates=data.templates, process_group=process_group)
    splits = {k: c.load() for k, c in caches.items()}
    return PreparedData(caches, splits, {k: len(v) for k, v in splits.items()})


@torch.no_grad()
def time_plain_pass(visual: nn.Module, images: torch.Tensor, batch_size: int) -> float:
    """Seconds of one plain forward over ``images`` (already preprocessed, in memory)."""
    with eval_mode(visual):
        start = time.perf_counter()
        for batch in images.split(batch_size):
            visual(batch)
        return time.perf_counter() - start


def run_methods(methods, data: PreparedData, head: Classifier, visual: nn.Module, *, epochs: int, seed: int,
                progress: bool, info: dict, bases=None, process_group=None) -> tuple[list[dict], dict]:
    """Fit every method from the caches and evaluate it on the test split.

    ``bases`` (fitted on a calibration set, as the paper does) are used by every ResiDual variant;
    without them each variant's bases are fitted on the train cache.
    """
    rows, modules = [], {}
    bases_cache = {}
    for method in methods:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
        start = time.perf_counter()
        bases_m = None
        if method in VARIANTS:
            units = VARIANTS[method]["units"]
            if bases is not None:
                if not set(units) <= set(bases.units):
                    raise ValueError(f"method {method!r} needs bases of {units}, the given ones cover {bases.units}")
                bases_m = bases
            else:
                if units not in bases_cache:
                    bases_cache[units] = fit_bases_from_cache(data.caches["train"], visual, units,
                                                              progress=progress, process_group=process_group)
                bases_m = bases_cache[units]
        calib = time.perf_counter() - start
        module, res = fit_method(method, data.splits["train"], data.splits["val"], head, bases=bases_m,
                                 epochs=epochs, seed=seed, progress=progress, process_group=process_group)
        acc = evaluate(method_forward(method, module), data.splits["test"], head, process_group=process_group)
        rows.append({**info, "method": method, "trainable_parameters": res.trainable_parameters, "accuracy": acc,
                     "val_accuracy": res.best_val_accuracy, "best_epoch": res.best_epoch,
                     "fit_seconds": calib + res.seconds, "calibration_seconds": calib,
                     "train_seconds": res.seconds, "cache_seconds": data.caches["train"].seconds})
        modules[method] = (module, bases_m)
    return rows, modules


def demo(out: str | Path = "residual_fast_demo", *, model: str = "ViT-B-32", pretrained: str | None = None,
         image_size: int = 64, variant: str = "fine", epochs: int = 30, seed: int = 0, batch_size: int = 128,
         progress: bool = True) -> dict:
    """The offline demo: a small open_clip ViT on scikit-learn's digits with a prototype head."""
    out = Path(out)
    torch.manual_seed(seed)
    visual_model, preprocess, _ = load_open_clip(model, pretrained, image_size=None if pretrained else image_size)
    visual = visual_model.visual
    parts = load_splits("digits", transform=preprocess, seed=seed)
    ds = parts["train"][0]
    images = {k: torch.stack([ds.dataset[i][0] for i in idx.tolist()]) for k, (_, idx) in parts.items()}
    labels = {k: ds.labels[idx] for k, (_, idx) in parts.items()}
    plain_seconds = time_plain_pass(visual, images["train"], batch_size)
    caches = {}
    for split in parts:
        batches = list(zip(images[split].split(batch_size), labels[split].split(batch_size), strict=True))
        caches[split] = build_cache(visual, batches, out / "cache" / split, progress=progress)
    data = PreparedData(caches, {k: c.load() for k, c in caches.items()}, {k: len(v) for k, v in labels.items()})
    head = prototype_head(data.splits["train"].output, data.splits["train"].labels, len(ds.classnames))
    info = {"model": model, "weights": pretrained or "random", "dataset": "digits"}
    rows, modules = run_methods(["zeroshot", variant], data, head, visual, epochs=epochs, seed=seed,
                                progress=progress, info=info)
    base, ours = rows
    ratio = ours["fit_seconds"] / plain_seconds
    for r in rows:
        r["plain_pass_seconds"] = plain_seconds
    write_results(rows, out)
    adapter, bases = modules[variant]
    plot_lambdas(adapter, out / "lambdas.png")
    plot_spectra(bases, out / "spectra.png")
    adapter.save(out / "adapter")
    size = image_size if not pretrained else visual.image_size[0]
    analysis = _demo_analysis(data, bases, head, seed)
    summary = [
        f"# residual-fast demo: {model} ({pretrained or 'random weights'}, {size} px) on scikit-learn digits",
        "",
        f"splits: train {data.sizes['train']} / val {data.sizes['val']} / test {data.sizes['test']} images "
        f"(seed {seed}); head: prototype (normalized class means of the train outputs)",
        "",
        "| method | trainable parameters | test accuracy | fit seconds |",
        "|---|---|---|---|",
        f"| base (model output) | 0 | {base['accuracy']:.4f} | - |",
        f"| ResiDual-{variant} | {ours['trainable_parameters']} | {ours['accuracy']:.4f} | "
        f"{ours['fit_seconds']:.2f} |",
        "",
        f"fit: {ours['fit_seconds']:.2f} s (bases from the cache {ours['calibration_seconds']:.2f} s + training "
        f"{ours['train_seconds']:.2f} s, best epoch {ours['best_epoch']}) = **{ratio:.2f}x** one plain inference "
        f"pass over the train split ({plain_seconds:.2f} s); the ViT never runs during the fit.",
        "",
        "![lambdas](lambdas.png) ![spectra](spectra.png)",
        "",
        *analysis,
    ]
    (out / "report.md").write_text("\n".join(summary) + "\n")
    return {"rows": rows, "plain_pass_seconds": plain_seconds, "fit_over_pass": ratio, "report": str(out)}


def _demo_analysis(data: PreparedData, bases, head: Classifier, seed: int) -> list[str]:
    """A few lines of `residual-fast analyze` on the demo's own caches."""
    from .analysis import HeadContributions, per_head_accuracy, spectral_summary, twonn

    summ = spectral_summary(bases, "head")
    heads = HeadContributions(data.splits["test"], bases.spec)
    acc = per_head_accuracy(heads, head)
    best = int(acc.argmax())
    H = bases.spec.num_heads
    sample = torch.randperm(len(data.splits["test"]), generator=torch.Generator().manual_seed(seed))[:200]
    two = twonn(heads(best)[sample])
    return [
        "## Analysis (see `residual-fast analyze` for the full report)",
        "",
        f"- linear intrinsic dimension of the heads (components for 99% of the variance): mean "
        f"{summ['linear_id'].float().mean():.1f}, range {int(summ['linear_id'].min())}-"
        f"{int(summ['linear_id'].max())}, out of at most head_dim + 2 = {bases.spec.head_dim + 2}",
        f"- best single head: layer {best // H}, head {best % H}, test accuracy {acc[best]:.4f} alone; "
        f"its TwoNN intrinsic dimension {two:.1f}",
    ]


BASES_DATASET = "imagenet"
BASES_IMAGES = 10_000  # 10 per ImageNet class, stratified and seeded; set bases_images to change it


def calibration_bases(loaded, units: tuple[str, ...], dataset: str, *, images: int | None, root: str | None,
                      seed: int, batch_size: int, workers: int, progress: bool, process_group=None
                      ) -> tuple[SpectralBases, dict]:
    """Bases streamed from ``dataset``'s train split (a seeded stratified subset of ``images``), sharded over
    ``process_group``; returns them and a description of the calibration set for the results."""
    from .data.splits import stratified_subset
    from .distributed import shard_loader

    data = load_dataset(dataset, "train", root=root, transform=loaded.preprocess, download=dataset != "imagenet")
    idx = torch.arange(len(data))
    if images is not None:
        idx = stratified_subset(data.labels, idx, images, seed=seed)
    loader = shard_loader(data.dataset, idx, batch_size, process_group, workers)
    bases = fit_bases(loaded.visual, loader, units, progress=progress, process_group=process_group)
    return bases, {"bases": f"{dataset} train", "bases_images": int(idx.numel())}


def reproduce(models: list[str], datasets: list[str], methods: list[str], out: str | Path, *, root: str | None = None,
              epochs: int = 30, seed: int = 0, batch_size: int = 128, workers: int = 0,
              max_images: int | None = None, progress: bool = True, bases_dataset: str | None = BASES_DATASET,
              bases_images: int | None = BASES_IMAGES, process_group=None,
              device: str | torch.device = "cpu") -> list[dict]:
    """The paper's grid for whatever models and datasets load here; failures are recorded, not fatal.

    ``models``: open_clip ``ARCH[/TAG]`` (no tag: random weights) or any :func:`residual_fast.load` name
    (``hf:...``, ``timm:...``, loaded pretrained). Models with a text tower get a zero-shot head, the others a
    prototype head.

    The paper's protocol: each model's spectral bases are fitted once, on ``bases_images`` images of
    ``bases_dataset``'s train split (default ImageNet train), and reused for every target dataset. When that
    dataset cannot be loaded here (ImageNet is never downloaded), the first target's train split is used
    instead; every row records which (``bases``, ``bases_images``, ``bases_note``). ``bases_dataset=None``
    fits them on each target's own train split.

    With ``process_group`` (``torchrun``) the caches and the calibration are sharded over the ranks, fits are
    data parallel, and only rank 0 writes the results.
    """
    from .distributed import is_main

    out = Path(out)
    rows = []
    main = is_main(process_group)
    write = (lambda: write_results(rows, out)) if main else (lambda: None)
    adapted = [m for m in methods if m in VARIANTS]
    units = tuple(k for k in ("head", "mlp") if any(k in VARIANTS[m]["units"] for m in adapted))
    for spec in models:
        name, tag = (spec, "pretrained") if ":" in spec else (spec.partition("/")[0], spec.partition("/")[2])
        try:
            loaded = load(spec if ":" in spec else f"open_clip:{spec}", pretrained=":" in spec or bool(tag),
                          device=device)
        except Exception as e:  # noqa: BLE001
            rows.append({"model": name, "weights": tag or "random", "dataset": "-", "method": "-",
                         "error": str(e)})
            write()
            continue
        bases, bases_info = None, {}
        if adapted and bases_dataset is not None:
            try:
                bases, bases_info = calibration_bases(loaded, units, bases_dataset, images=bases_images, root=root,
                                                      seed=seed, batch_size=batch_size, workers=workers,
                                                      progress=progress and main, process_group=process_group)
            except Exception as e:  # noqa: BLE001 - fall back to the first target, and say so
                bases_info = {"bases_note": f"{bases_dataset} unavailable ({type(e).__name__}: "
                                            f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}); "
                                            "fitted on the first target's train split instead"}
        for dname in datasets:
            info = {"model": name, "weights": tag or "random", "dataset": dname}
            try:
                parts = load_splits(dname, root=root, transform=loaded.preprocess, seed=seed)
                train = parts["train"][0]
                data = cache_splits(loaded.visual, parts, out / "cache" / name.replace(":", "_").replace("/", "_")
                                    / (tag or "random") / dataset_slug(dname), batch_size=batch_size,
                                    workers=workers, max_images=max_images, progress=progress and main, seed=seed,
                                    process_group=process_group)
                if adapted and bases is None and bases_dataset is not None:  # the fallback: first target's train
                    bases = fit_bases_from_cache(data.caches["train"], loaded.visual, units, progress=False,
                                                 process_group=process_group)
                    bases_info = {**bases_info, "bases": f"{dname} train", "bases_images": len(data.caches["train"])}
                if loaded.encode_text is not None:  # zero-shot head from the text tower
                    scale = getattr(loaded.model, "logit_scale", None)
                    with torch.no_grad():
                        head = text_head(loaded.encode_text, train.classnames, train.templates,
                                         logit_scale=scale.exp().item() if scale is not None else 100.0,
                                         progress=progress and main)
                else:  # no text tower (DINOv2, supervised ViT): class means of the train outputs
                    head = prototype_head(data.splits["train"].output, data.splits["train"].labels,
                                          len(train.classnames))
                info["head"] = "zeroshot" if loaded.encode_text is not None else "prototype"
                if adapted:
                    info.update(bases_info if bases_dataset is not None else
                                {"bases": f"{dname} train", "bases_images": len(data.caches["train"])})
                got, _ = run_methods(methods, data, head, loaded.visual, epochs=epochs, seed=seed,
                                     progress=progress and main, info=info, bases=bases,
                                     process_group=process_group)
                for r in got:  # only the ResiDual variants use bases
                    if r["method"] not in adapted:
                        for key in ("bases", "bases_images", "bases_note"):
                            r.pop(key, None)
                rows.extend(got)
            except Exception as e:  # noqa: BLE001 - keep going through the grid
                rows.append({**info, "method": "-", "error": f"{type(e).__name__}: {e}"})
            write()
    write()  # also when nothing ran: the printed path always exists
    return rows
