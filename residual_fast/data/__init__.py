"""Datasets, class names, prompt templates and splits."""

from .datasets import DATASETS, LabeledImages, from_tensors, load_dataset
from .prompts import classnames, fill, templates
from .splits import stratified_split

__all__ = ["DATASETS", "LabeledImages", "classnames", "fill", "from_tensors", "load_dataset", "stratified_split",
           "templates"]
