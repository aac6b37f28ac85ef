"""Class names and prompt templates, taken from maintained sources, never typed here.

* ImageNet: ``open_clip.zero_shot_metadata`` (names and the OpenAI templates);
* the paper's other datasets: the ``clip_benchmark`` package's JSON files
  (``en_classnames.json``, ``en_zeroshot_classification_templates.json``),
  located on disk without importing the package (its imports are heavy);
* datasets whose names clip_benchmark takes from torchvision at load time
  (CIFAR, DTD, SUN397, Stanford Cars, RESISC45): the loaded dataset's
  ``classes``.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

# our dataset name -> clip_benchmark's key
CLIP_BENCHMARK_KEYS = {
    "imagenet": "imagenet1k",
    "cifar10": "cifar10",
    "cifar100": "cifar100",
    "mnist": "mnist",
    "digits": "mnist",  # sklearn's 8x8 digits: the same ten classes as MNIST
    "svhn": "svhn",
    "gtsrb": "gtsrb",
    "dtd": "dtd",
    "eurosat": "eurosat",
    "stanford_cars": "cars",
    "sun397": "sun397",
    "resisc45": "resisc45",
}


@functools.cache
def _clip_benchmark_json(name: str) -> dict:
    spec = importlib.util.find_spec("clip_benchmark")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "class names / templates come from the clip_benchmark package: pip install --no-deps clip-benchmark"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / name
    return json.loads(path.read_text())


def templates(dataset: str) -> list:
    """Prompt templates for ``dataset`` (strings with ``{c}``, or callables for ImageNet)."""
    if dataset == "imagenet":
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

        return list(OPENAI_IMAGENET_TEMPLATES)
    key = CLIP_BENCHMARK_KEYS.get(dataset)
    data = _clip_benchmark_json("en_zeroshot_classification_templates.json")
    if key not in data:
        raise KeyError(f"no prompt templates known for dataset {dataset!r}")
    return list(data[key])


def classnames(dataset: str) -> list[str] | None:
    """Class names from a maintained list, or None when they come from the dataset itself."""
    if dataset == "imagenet":
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        return list(IMAGENET_CLASSNAMES)
    key = CLIP_BENCHMARK_KEYS.get(dataset)
    names = _clip_benchmark_json("en_classnames.json")
    return list(names[key]) if key in names else None


def fill(template, classname: str) -> str:
    if callable(template):
        return template(classname)
    return template.format(c=classname) if "{c}" in template else template.format(classname)
