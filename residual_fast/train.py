"""Fitting ResiDual (and the paper's baselines) from cached activations, and evaluation.

Every method is a small module mapping a batch of cached activations to output
embeddings, trained with one loop: schedule-free AdamW, cross-entropy against a
frozen :class:`~residual_fast.classifiers.Classifier`, early stopping on
validation accuracy with the best state restored, seeded and deterministic.
The image model never runs here.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .cache import CachedSplit
from .classifiers import Classifier
from .residual import ResiDual
from .spectral import SpectralBases

# learning rates of the paper: 0.8 for ResiDual's lambdas, 1e-3 for the output-space adapters
RESIDUAL_LR = 0.8
ADAPTER_LR = 1e-3


class LinearAdapter(nn.Module):
    """``y = out @ W.T + b`` on the output embedding, initialized to the identity."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        with torch.no_grad():
            self.linear.weight.copy_(torch.eye(dim))
            self.linear.bias.zero_()

    def forward(self, output: torch.Tensor) -> torch.Tensor:
        return self.linear(output)


class OutputSpectralAdapter(nn.Module):
    """Re-weighting of the principal components of the output embedding itself.

    In PCA space: ``y = ((out - m) @ V.T * lam) @ V + m`` with the mean ``m`` and the
    orthonormal components ``V`` of the train outputs; ``lam = 1`` is the identity.
    """

    def __init__(self, train_outputs: torch.Tensor):
        super().__init__()
        x = train_outputs.double()
        m = x.mean(0)
        _, _, vh = torch.linalg.svd(x - m, full_matrices=True)
        self.register_buffer("mean", m.float())
        self.register_buffer("components", vh.float())  # (D, D), complete
        self.lam = nn.Parameter(torch.ones(vh.shape[0]))

    def forward(self, output: torch.Tensor) -> torch.Tensor:
        centered = output.float() - self.mean
        return ((centered @ self.components.T) * self.lam) @ self.components + self.mean


@dataclass
class FitResult:
    method: str
    trainable_parameters: int
    best_epoch: int
    best_val_accuracy: float
    seconds: float
    history: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def method_forward(method: str, module: nn.Module | None) -> Callable[[CachedSplit, torch.Tensor | None], torch.Tensor]:
    """Output embeddings of a batch of cached samples under ``method``."""
    if method == "zeroshot":
        return lambda split, idx: split.output[idx if idx is not None else slice(None)].float()
    if isinstance(module, ResiDual):
        return lambda split, idx: module(split.activations(idx))
    return lambda split, idx: module(split.output[idx if idx is not None else slice(None)].float())


@torch.no_grad()
def evaluate(forward: Callable, split: CachedSplit, head: Classifier, batch_size: int = 1024,
             process_group=None) -> float:
    """Top-1 accuracy of ``head(forward(split))``.

    With ``process_group`` each rank scores a contiguous block of ``split`` and the counts are summed.
    """
    from .distributed import all_reduce_count, shard_range

    check_labels(split, head, "evaluated")
    lo, hi = shard_range(len(split), process_group, batch_size)
    correct = 0
    for start in range(lo, hi, batch_size):
        idx = torch.arange(start, min(start + batch_size, hi))
        pred = head(forward(split, idx)).argmax(-1)
        correct += int((pred == split.labels[idx].to(pred.device)).sum())
    return all_reduce_count(correct, process_group) / max(len(split), 1)


def fit(module: nn.Module, forward: Callable, train: CachedSplit, val: CachedSplit, head: Classifier, *,
        lr: float, epochs: int = 30, batch_size: int = 64, patience: int = 5, seed: int = 0,
        weight_decay: float = 0.0, progress: bool = True, method: str = "", process_group=None) -> FitResult:
    """Train ``module``'s parameters; keep the state with the best validation accuracy.

    With ``process_group`` (a ``torch.distributed`` group; every rank holds the same splits and module)
    each global batch is split over the ranks, the gradients are all-reduced (data parallel with the
    global batch of one process) and validation counts are summed: every rank ends with the same
    parameters, equal to a one-process fit up to float rounding.
    """
    import schedulefree

    from .distributed import all_reduce_gradients, all_reduce_sum, broadcast_parameters, rank_and_size

    if len(train) == 0 or len(val) == 0:
        raise ValueError("train and validation splits must be non-empty")
    check_finite_split(train, "train")
    check_finite_split(val, "validation")
    check_labels(train, head, "train")
    check_labels(val, head, "validation")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    rank, world = rank_and_size(process_group)
    broadcast_parameters(module, process_group)
    params = [p for p in module.parameters() if p.requires_grad]
    opt = schedulefree.AdamWScheduleFree(params, lr=lr, weight_decay=weight_decay)
    start = time.perf_counter()
    opt.eval()
    module.eval()
    best_acc, best_epoch = evaluate(forward, val, head, process_group=process_group), 0
    best_state = copy.deepcopy(module.state_dict())
    history = [{"epoch": 0, "train_loss": None, "val_accuracy": best_acc}]
    stale = 0
    bar = tqdm(range(1, epochs + 1), desc=f"fitting {method}".strip(), disable=not progress or rank != 0)
    for epoch in bar:
        module.train()
        opt.train()
        total, count = 0.0, 0
        for batch in torch.randperm(len(train), generator=gen).split(batch_size):
            # this rank's share of the global batch; the loss is its share of the batch mean
            idx = batch.tensor_split(world)[rank]
            logits = head(forward(train, idx))
            loss = F.cross_entropy(logits, train.labels[idx].to(logits.device), reduction="sum") / batch.numel()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            all_reduce_gradients(params, process_group)
            loss = all_reduce_sum(loss.detach(), process_group)
            if not bool(torch.isfinite(loss)):
                raise FloatingPointError(f"{method or 'training'}: the loss became {loss.item()} at epoch {epoch}; "
                                         "lower the learning rate or check the inputs")
            opt.step()
            total += loss.item() * batch.numel()
            count += batch.numel()
        module.eval()
        opt.eval()
        acc = evaluate(forward, val, head, process_group=process_group)
        history.append({"epoch": epoch, "train_loss": total / count, "val_accuracy": acc})
        bar.set_postfix(loss=f"{total / count:.4f}", val=f"{acc:.4f}")
        if acc > best_acc:
            best_acc, best_epoch, stale = acc, epoch, 0
            best_state = copy.deepcopy(module.state_dict())
        else:
            stale += 1
            if stale >= patience:
                break
    bar.close()  # an early stop leaves the bar short of `epochs`: close it so it does not hang there
    module.load_state_dict(best_state)
    module.eval()
    n_params = sum(p.numel() for p in params)
    return FitResult(method, n_params, best_epoch, best_acc, time.perf_counter() - start, history)


def check_labels(split: CachedSplit, head: Classifier, name: str) -> None:
    """Labels must be class indices of the head (a -1 or an index past the classes is a data error)."""
    if len(split) and (int(split.labels.min()) < 0 or int(split.labels.max()) >= head.num_classes):
        raise ValueError(f"the {name} split has labels in [{int(split.labels.min())}, {int(split.labels.max())}] but "
                         f"the head has {head.num_classes} classes: labels and classes do not match")


def check_finite_split(split: CachedSplit, name: str) -> None:
    """Raise naming the images of a cached split whose activations hold NaN or Inf."""
    bad = torch.zeros(len(split), dtype=torch.bool)
    for t in (split.emb, split.attn, split.mlp, split.z, split.output):
        bad |= ~torch.isfinite(t.reshape(len(split), -1)).all(1).cpu()
    if bool(bad.any()):
        idx = bad.nonzero().flatten().tolist()
        raise ValueError(f"the {name} split has non-finite activations at image(s) {idx[:10]} "
                         f"({len(idx)} in all): rebuild its cache from finite images")


METHODS = ("zeroshot", "linear", "spectral_output", "coarse", "fine", "full")


def fit_method(method: str, train: CachedSplit, val: CachedSplit, head: Classifier, *,
               bases: SpectralBases | None = None, epochs: int = 30, batch_size: int = 64, patience: int = 5,
               seed: int = 0, progress: bool = True, lr: float | None = None, process_group=None,
               **residual_kwargs) -> tuple[nn.Module | None, FitResult]:
    """Build and fit one method: a ResiDual variant (``coarse``/``fine``/``full``) or a baseline.

    ``process_group``: train data-parallel over a ``torch.distributed`` group (see :func:`fit`).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    if method == "zeroshot":
        start = time.perf_counter()
        fwd = method_forward("zeroshot", None)
        acc = evaluate(fwd, val, head, process_group=process_group)
        return None, FitResult("zeroshot", 0, 0, acc, time.perf_counter() - start)
    if method in ("coarse", "fine", "full"):
        if bases is None:
            raise ValueError(f"method {method!r} needs fitted bases")
        module = ResiDual.from_bases(bases, method, seed=seed, **residual_kwargs)
        lr = RESIDUAL_LR if lr is None else lr
    elif method == "linear":
        module, lr = LinearAdapter(train.output.shape[1]), ADAPTER_LR if lr is None else lr
    else:
        module, lr = OutputSpectralAdapter(train.output), ADAPTER_LR if lr is None else lr
    result = fit(module, method_forward(method, module), train, val, head, lr=lr, epochs=epochs,
                 batch_size=batch_size, patience=patience, seed=seed, progress=progress, method=method,
                 process_group=process_group)
    return module, result
