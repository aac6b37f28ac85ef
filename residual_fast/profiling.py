"""Deterministic memory accounting on any device: live tensor bytes under a dispatch mode.

``with LiveBytes() as m: f(x)`` records every tensor storage created by an aten
op inside the block, the peak of the bytes alive at once (``m.peak``), and the
largest tensor shapes created. Tensors that existed before (weights, inputs) are
not counted, so the figure is the working memory of ``f``. Shared by the tests
(no (n, U, D) tensor in the fast paths) and the benchmarks.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, list[int]] = {}  # storage ptr -> [nbytes, wrappers alive]
        self.current = 0
        self.peak = 0
        self.max_numel = 0
        self.shapes: set[tuple[int, ...]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_storage_ptr(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t, inputs)
        return out

    def _track(self, t: torch.Tensor, inputs: set[int]) -> None:
        ptr = _storage_ptr(t)
        if ptr == 0:
            return
        entry = self._live.get(ptr)
        if entry is None and ptr in inputs:
            return  # a view or in-place result on memory that existed before the block
        if entry is None:
            st = t.untyped_storage()
            entry = self._live[ptr] = [st.nbytes(), 0]
            self.current += entry[0]
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        weakref.finalize(t, self._release, ptr)
        self.max_numel = max(self.max_numel, t.numel())
        self.shapes.add(tuple(t.shape))

    def _release(self, ptr: int) -> None:
        entry = self._live.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self._live[ptr]

    def has_shape_prefix(self, *dims: int) -> bool:
        """Whether any tensor created had ``dims`` as its leading dimensions."""
        k = len(dims)
        return any(s[:k] == dims for s in self.shapes)


def _storage_ptr(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return 0


def reachable_storages(root: object) -> dict[int, int]:
    """Every tensor storage reachable from ``root`` through attributes, containers and closures.

    Returns ``{storage pointer: bytes}``. Walks the object graph with
    :func:`gc.get_referents`, not into classes, modules or functions' globals, so
    it counts what ``root`` keeps alive between calls (buffers, caches, specs),
    not the library.
    """
    import gc
    import types

    skip = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.CodeType,
            types.FrameType, types.MethodWrapperType, types.WrapperDescriptorType)
    seen: set[int] = set()
    out: dict[int, int] = {}
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, skip):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            ptr = _storage_ptr(obj)
            if ptr:
                out[ptr] = obj.untyped_storage().nbytes()
            grad = obj.grad if obj.is_leaf else None
            if grad is not None:
                stack.append(grad)
            continue
        if isinstance(obj, types.MethodType):
            stack.append(obj.__self__)
            continue
        stack.extend(gc.get_referents(obj))
    return out


def persistent_extra_bytes(module: torch.nn.Module, base: torch.nn.Module) -> int:
    """Bytes of tensor storage kept alive by ``module`` beyond what ``base`` (the plain model) holds."""
    own = reachable_storages(base)
    return sum(n for ptr, n in reachable_storages(module).items() if ptr not in own)


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of a model's parameters and buffers (each storage once)."""
    seen: dict[int, int] = {}
    for t in list(module.parameters()) + list(module.buffers()):
        seen[_storage_ptr(t)] = t.untyped_storage().nbytes()
    return sum(seen.values())
