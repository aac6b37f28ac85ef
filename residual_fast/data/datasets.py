"""Datasets by name, image folders, in-memory tensors, and the offline default (sklearn digits)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from . import prompts

DEFAULT_ROOT = os.environ.get("RESIDUAL_FAST_DATA", str(Path.home() / ".cache" / "residual_fast" / "data"))


@dataclass
class LabeledImages:
    """A dataset yielding ``(image, label)`` with its class names and prompt templates."""

    name: str
    dataset: Dataset
    classnames: list[str]
    templates: list
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.dataset)


class _Digits(Dataset):
    """scikit-learn's 8x8 digits (1,797 real scanned images, shipped with the package) as RGB PIL images."""

    def __init__(self, transform: Callable | None):
        from sklearn.datasets import load_digits

        d = load_digits()
        self.images = torch.from_numpy(d.images).float() * (255.0 / 16.0)
        self.targets = torch.from_numpy(d.target).long()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        from PIL import Image

        img = Image.fromarray(self.images[i].round().to(torch.uint8).numpy(), mode="L").convert("RGB")
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.targets[i])


class TensorImages(Dataset):
    """``(images, labels)`` tensors the user already has."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable | None = None):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.targets, self.transform = images, torch.as_tensor(labels).long(), transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        img = self.images[i]
        return (self.transform(img) if self.transform else img), int(self.targets[i])


def _torchvision(name: str, split: str, root: str, download: bool, transform):
    import torchvision.datasets as tvd

    train = split == "train"
    table = {
        "cifar10": lambda: tvd.CIFAR10(root, train=train, transform=transform, download=download),
        "cifar100": lambda: tvd.CIFAR100(root, train=train, transform=transform, download=download),
        "mnist": lambda: tvd.MNIST(root, train=train, transform=transform, download=download),
        "svhn": lambda: tvd.SVHN(root, split="train" if train else "test", transform=transform, download=download),
        "gtsrb": lambda: tvd.GTSRB(root, split="train" if train else "test", transform=transform, download=download),
        "dtd": lambda: tvd.DTD(root, split="train" if train else "test", transform=transform, download=download),
        "stanford_cars": lambda: tvd.StanfordCars(root, split="train" if train else "test", transform=transform,
                                                  download=download),
        "eurosat": lambda: tvd.EuroSAT(root, transform=transform, download=download),
        "sun397": lambda: tvd.SUN397(root, transform=transform, download=download),
        "imagenet": lambda: tvd.ImageNet(os.path.join(root, "imagenet"), split="train" if train else "val",
                                         transform=transform),
    }
    return table[name]()


TORCHVISION = ("cifar10", "cifar100", "mnist", "svhn", "gtsrb", "dtd", "stanford_cars", "eurosat", "sun397",
               "imagenet")
DATASETS = ("digits", *TORCHVISION, "resisc45")
# datasets with an official test split (the others are split here, see residual_fast.pipeline.load_splits)
HAS_TEST = ("cifar10", "cifar100", "mnist", "svhn", "gtsrb", "dtd", "stanford_cars", "imagenet", "resisc45")


def _labels_of(ds) -> torch.Tensor:
    for attr in ("targets", "_labels", "labels", "_samples"):
        val = getattr(ds, attr, None)
        if val is None:
            continue
        if attr == "_samples":
            return torch.tensor([s[1] for s in val])
        return torch.as_tensor(val).long()
    return torch.tensor([ds[i][1] for i in range(len(ds))])


def _clean(name: str) -> str:
    return name.replace("_", " ").strip()


def load_dataset(name: str, split: str = "train", *, root: str | None = None, download: bool = True,
                 transform: Callable | None = None) -> LabeledImages:
    """A dataset by name (see ``DATASETS``), a folder of class subfolders, or the offline ``digits``.

    ``split`` is ``"train"`` or ``"test"`` for datasets that have them; ``digits``,
    ``eurosat`` and ``sun397`` come whole (split them with
    :func:`residual_fast.data.stratified_split`). Downloads need network access.
    """
    root = root or DEFAULT_ROOT
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if split == "test" and (name in DATASETS and name not in HAS_TEST or os.path.isdir(name)):
        raise ValueError(f"{name!r} has no official test split; split it with residual_fast.pipeline.load_splits")
    if name == "digits":
        ds = _Digits(transform)
        return LabeledImages(name, ds, prompts.classnames("digits"), prompts.templates("digits"), ds.targets)
    if os.path.isdir(name):
        from torchvision.datasets import ImageFolder

        ds = ImageFolder(name, transform=transform)
        return LabeledImages(Path(name).name, ds, [_clean(c) for c in ds.classes], prompts.templates("imagenet"),
                             torch.as_tensor(ds.targets))
    if name == "resisc45":
        try:
            import datasets as hf
        except ImportError as e:
            raise ModuleNotFoundError("resisc45 is read through HF datasets: pip install datasets") from e
        raw = hf.load_dataset("timm/resisc45", split="train" if split == "train" else "test")
        names = [_clean(c) for c in raw.features["label"].names]
        ds = _HFImages(raw, transform)
        return LabeledImages(name, ds, names, prompts.templates(name), torch.as_tensor(raw["label"]))
    if name not in TORCHVISION:
        raise ValueError(f"unknown dataset {name!r}: use one of {DATASETS} or a folder of class subfolders")
    try:
        ds = _torchvision(name, split, root, download, transform)
    except (RuntimeError, OSError) as e:
        raise RuntimeError(f"could not load {name!r} under {root} (download={download}): {e}") from e
    names = prompts.classnames(name) or [_clean(c) for c in ds.classes]
    return LabeledImages(name, ds, names, prompts.templates(name), _labels_of(ds))


class _HFImages(Dataset):
    def __init__(self, raw, transform):
        self.raw, self.transform = raw, transform

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, i: int):
        row = self.raw[i]
        img = row["image"].convert("RGB")
        return (self.transform(img) if self.transform else img), int(row["label"])


def from_tensors(images: torch.Tensor, labels: torch.Tensor, classnames: Sequence[str],
                 templates: Sequence | None = None,
                 transform: Callable | None = None, name: str = "tensors") -> LabeledImages:
    """Wrap ``(images, labels)`` the user already has."""
    ds = TensorImages(images, labels, transform)
    return LabeledImages(name, ds, list(classnames), list(templates or prompts.templates("imagenet")), ds.targets)


def dataset_slug(name: str) -> str:
    """A file-name-safe name for a dataset's outputs: the name itself, or for a folder (any path, absolute
    or relative) its base name and a short hash of its resolved path, so outputs never land in the data."""
    import hashlib
    import re
    from pathlib import Path

    if re.fullmatch(r"[A-Za-z0-9_.-]+", name) and name not in (".", "..") and not Path(name).is_dir():
        return name
    resolved = str(Path(name).expanduser().resolve())
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(resolved).name) or "data"
    return f"{base}-{hashlib.sha256(resolved.encode()).hexdigest()[:8]}"
