"""Scale-out on ``torch.distributed``: exact sharding and exact reductions.

Every collective here is one of ``torch.distributed``'s own (``all_reduce``,
``all_gather_object``, ``broadcast``, ``barrier``) on the group the caller
passes; launching is ``torchrun``'s job (``torchrun --nproc_per_node N -m
residual_fast ...``). Data is split into contiguous blocks in rank order, so
every item is read exactly once (nothing padded in, nothing dropped) and the
concatenation of the ranks' blocks is the dataset's own order.

Python API::

    import torch.distributed as dist
    import residual_fast as rf
    from residual_fast.distributed import shard_loader

    dist.init_process_group("gloo")          # or "nccl", one GPU per rank
    loader = shard_loader(dataset, torch.arange(len(dataset)), 128, dist.group.WORLD)
    bases = rf.fit_bases(visual, loader, process_group=dist.group.WORLD)   # equal on every rank
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

Group = Any  # a torch.distributed ProcessGroup (its class is private API)


def active(group: Group | None) -> bool:
    """Whether ``group`` asks for collectives (an initialized group of more than one process)."""
    return group is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def rank_and_size(group: Group | None) -> tuple[int, int]:
    """``(rank, world size)`` in ``group``; ``(0, 1)`` when not distributed."""
    if not active(group):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def is_main(group: Group | None) -> bool:
    return rank_and_size(group)[0] == 0


def block(n: int, rank: int, world: int) -> tuple[int, int]:
    """The contiguous block ``[lo, hi)`` of ``range(n)`` that ``rank`` of ``world`` owns (sizes differ by <= 1)."""
    if n < 0 or world < 1 or not 0 <= rank < world:
        raise ValueError(f"bad sharding: n={n}, rank={rank}, world={world}")
    return n * rank // world, n * (rank + 1) // world


def shard_loader(dataset, idx: torch.Tensor, batch_size: int, group: Group | None, workers: int = 0):
    """A DataLoader over this rank's block (whole batches, see :func:`shard_range`) of ``dataset[idx]``."""
    from torch.utils.data import DataLoader, Subset

    lo, hi = shard_range(idx.numel(), group, batch_size)
    return DataLoader(Subset(dataset, idx[lo:hi].tolist()), batch_size=batch_size, shuffle=False,
                      num_workers=workers)


def check_same_model(fingerprint: dict, group: Group | None) -> None:
    """Raise on every rank if any rank holds another model (a collective: every rank must call it)."""
    from .models import fingerprint_mismatch

    for rank, other in enumerate(gather_objects(fingerprint, group)):
        why = fingerprint_mismatch(other, fingerprint)
        if why:
            raise ValueError(f"the ranks hold different models (rank {rank}: {why})")


def shard_range(n: int, group: Group | None, batch_size: int = 1) -> tuple[int, int]:
    """This rank's block ``[lo, hi)`` of ``n`` items: disjoint, covering, in rank order.

    With ``batch_size`` the blocks are made of whole batches of the one-process split, so every image
    is computed in the same batch as in one process (float results then match bit for bit where the
    kernels are deterministic, not only to rounding).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    lo, hi = block(-(-n // batch_size), *rank_and_size(group))
    return min(lo * batch_size, n), min(hi * batch_size, n)


def collective_device(group: Group | None, device: torch.device | str) -> torch.device:
    """NCCL reduces CUDA tensors only; gloo CPU tensors."""
    backend = dist.get_backend(group) if active(group) else "gloo"
    return torch.device(device) if backend == "nccl" else torch.device("cpu")


def all_reduce_sum(t: torch.Tensor, group: Group | None) -> torch.Tensor:
    """Sum of ``t`` over the ranks (``t`` itself when not distributed); returns a new tensor on ``t``'s device."""
    if not active(group):
        return t
    dev = collective_device(group, t.device)
    buf = t.detach().to(dev, copy=True)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    return buf.to(t.device)


def all_reduce_count(x: int, group: Group | None) -> int:
    return int(all_reduce_sum(torch.tensor([x], dtype=torch.int64), group).item())


def gather_objects(obj: Any, group: Group | None) -> list[Any]:
    """Every rank's ``obj`` in rank order, on every rank."""
    if not active(group):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def barrier(group: Group | None) -> None:
    if active(group):
        dist.barrier(group=group)


def raise_if_any(error: BaseException | None, group: Group | None) -> None:
    """Collective error check: if any rank failed, every rank raises (none is left waiting in a collective)."""
    msgs = gather_objects(None if error is None else f"{type(error).__name__}: {error}", group)
    if error is not None:
        raise error
    bad = [(r, m) for r, m in enumerate(msgs) if m is not None]
    if bad:
        raise RuntimeError(f"rank {bad[0][0]} failed: {bad[0][1]}")


def broadcast_parameters(module: nn.Module, group: Group | None) -> None:
    """Make every rank start from rank 0's parameters and buffers."""
    if not active(group):
        return
    with torch.no_grad():
        for t in (*module.parameters(), *module.buffers()):
            t.copy_(broadcast_tensor(t, group))


def all_reduce_gradients(params: list[nn.Parameter], group: Group | None) -> None:
    """Sum the gradients over the ranks, in one flat float64 buffer (each rank holds a share of one batch's
    mean, so the sum is the one-process gradient up to float rounding)."""
    if not active(group):
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).to(torch.float64) for g in grads])
    flat = all_reduce_sum(flat, group)
    start = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[start:start + n].view_as(g).to(g.dtype)
        start += n


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init_from_env(device: str) -> tuple[Group | None, str]:
    """Initialize the default group from torchrun's environment (nccl for CUDA, gloo for CPU).

    Returns ``(group, device)`` with one device per rank (``cuda:LOCAL_RANK``); ``(None, device)``
    when not launched by torchrun.
    """
    if not launched_by_torchrun():
        return None, device
    cuda = torch.device(device).type == "cuda"
    if cuda:
        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {device} but CUDA is not available on this node")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"local rank {local} has no GPU: this node has {torch.cuda.device_count()}; "
                               "use --nproc_per_node <= the GPU count")
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.group.WORLD, device



def broadcast_tensor(t: torch.Tensor, group: Group | None, src_rank: int = 0) -> torch.Tensor:
    """Rank ``src_rank``'s ``t`` (same shape and dtype on every rank) on every rank."""
    if not active(group):
        return t
    buf = t.detach().to(collective_device(group, t.device), copy=True)
    dist.broadcast(buf, src=dist.get_global_rank(group, src_rank), group=group)
    return buf.to(t.device)
