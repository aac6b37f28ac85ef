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
from torch.utils.data import DataLoader, Subset

from .cache import ActivationCache, CachedSplit, build_cache, fit_bases_from_cache
from .classifiers import Classifier, prototype_head, text_head
from .data import LabeledImages, load_dataset, stratified_split
from .data.datasets import dataset_slug
from .decompose import eval_mode
from .loading import load, load_open_clip
from .report import plot_lambdas, plot_spectra, write_results
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
                 max_images: int | None = None, progress: bool = True, seed: int = 0) -> PreparedData:
    """One cache per split under ``folder``; ``max_images`` keeps a seeded, stratified subset of each."""
    from .data.splits import stratified_subset

    caches = {}
    for split, (data, idx) in parts.items():
        if max_images is not None:
            idx = stratified_subset(data.labels, idx, max_images, seed=seed)
        loader = DataLoader(Subset(data.dataset, idx.tolist()), batch_size=batch_size, shuffle=False,
                            num_workers=workers)
        source = {"dataset": data.name, "split": split, "seed": seed, "max_images": max_images,
                  "images": int(idx.numel()), "batch_size": batch_size}
        caches[split] = build_cache(visual, loader, folder / split, progress=progress, source=source)
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
                progress: bool, info: dict) -> tuple[list[dict], dict]:
    """Fit every method from the caches and evaluate it on the test split."""
    rows, modules = [], {}
    bases_cache = {}
    for method in methods:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
        start = time.perf_counter()
        bases = None
        if method in ("coarse", "fine", "full"):
            units = ("head", "mlp") if method == "full" else ("head",)
            if units not in bases_cache:
                bases_cache[units] = fit_bases_from_cache(data.caches["train"], visual, units, progress=progress)
            bases = bases_cache[units]
        calib = time.perf_counter() - start
        module, res = fit_method(method, data.splits["train"], data.splits["val"], head, bases=bases, epochs=epochs,
                                 seed=seed, progress=progress)
        acc = evaluate(method_forward(method, module), data.splits["test"], head)
        rows.append({**info, "method": method, "trainable_parameters": res.trainable_parameters, "accuracy": acc,
                     "val_accuracy": res.best_val_accuracy, "best_epoch": res.best_epoch,
                     "fit_seconds": calib + res.seconds, "calibration_seconds": calib,
                     "train_seconds": res.seconds, "cache_seconds": data.caches["train"].seconds})
        modules[method] = (module, bases)
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


def reproduce(models: list[str], datasets: list[str], methods: list[str], out: str | Path, *, root: str | None = None,
              epochs: int = 30, seed: int = 0, batch_size: int = 128, workers: int = 0,
              max_images: int | None = None, progress: bool = True) -> list[dict]:
    """The paper's grid for whatever models and datasets load here; failures are recorded, not fatal.

    ``models``: open_clip ``ARCH[/TAG]`` (no tag: random weights) or any :func:`residual_fast.load` name
    (``hf:...``, ``timm:...``, loaded pretrained). Models with a text tower get a zero-shot head, the others a
    prototype head.
    """
    out = Path(out)
    rows = []
    for spec in models:
        name, tag = (spec, "pretrained") if ":" in spec else (spec.partition("/")[0], spec.partition("/")[2])
        try:
            loaded = load(spec if ":" in spec else f"open_clip:{spec}", pretrained=":" in spec or bool(tag))
        except Exception as e:  # noqa: BLE001
            rows.append({"model": name, "weights": tag or "random", "dataset": "-", "method": "-",
                         "error": str(e)})
            write_results(rows, out)
            continue
        for dname in datasets:
            info = {"model": name, "weights": tag or "random", "dataset": dname}
            try:
                parts = load_splits(dname, root=root, transform=loaded.preprocess, seed=seed)
                train = parts["train"][0]
                data = cache_splits(loaded.visual, parts, out / "cache" / name.replace(":", "_").replace("/", "_")
                                    / (tag or "random") / dataset_slug(dname), batch_size=batch_size,
                                    workers=workers, max_images=max_images, progress=progress, seed=seed)
                if loaded.encode_text is not None:  # zero-shot head from the text tower
                    scale = getattr(loaded.model, "logit_scale", None)
                    with torch.no_grad():
                        head = text_head(loaded.encode_text, train.classnames, train.templates,
                                         logit_scale=scale.exp().item() if scale is not None else 100.0,
                                         progress=progress)
                else:  # no text tower (DINOv2, supervised ViT): class means of the train outputs
                    head = prototype_head(data.splits["train"].output, data.splits["train"].labels,
                                          len(train.classnames))
                info["head"] = "zeroshot" if loaded.encode_text is not None else "prototype"
                got, _ = run_methods(methods, data, head, loaded.visual, epochs=epochs, seed=seed,
                                     progress=progress, info=info)
                rows.extend(got)
            except Exception as e:  # noqa: BLE001 - keep going through the grid
                rows.append({**info, "method": "-", "error": f"{type(e).__name__}: {e}"})
            write_results(rows, out)
    write_results(rows, out)  # also when nothing ran: the printed path always exists
    return rows
