"""Peak bytes of tensor storage allocated inside a block of code, on any device (CPU included).

CPU tensors have no caching-allocator counters, so `PeakMemory` watches the dispatcher: an
op output whose storage is not one of the op's inputs' storages is a new allocation; every
tensor that refers to a tracked storage (the new one and later views or in-place results)
holds it alive until garbage-collected. Storages allocated before the block (inputs, a
caller's `out=`) are not counted. Buffers the communication backend allocates in C++ are
invisible here, for fused and unfused ops alike.
"""
from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    return (t.device.type, t.untyped_storage().data_ptr())


class PeakMemory(TorchDispatchMode):
    """`with PeakMemory() as mem: ...` then `mem.peak` (bytes) and `mem.live` (bytes at exit)."""

    def __init__(self) -> None:
        super().__init__()
        self._refs: dict[tuple[str, int], list[int]] = {}  # storage -> [nbytes, live tensor count]
        self.live = 0
        self.peak = 0

    def _release(self, key: tuple[str, int]) -> None:
        entry = self._refs.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self._refs[key]

    def _hold(self, t: torch.Tensor, key: tuple[str, int]) -> None:
        self._refs[key][1] += 1
        weakref.finalize(t, self._release, key)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {_storage_key(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            key = _storage_key(t)
            if key not in self._refs and key not in inputs and t.untyped_storage().nbytes() > 0:
                self._refs[key] = [t.untyped_storage().nbytes(), 0]
                self.live += self._refs[key][0]
                self.peak = max(self.peak, self.live)
            if key in self._refs:
                self._hold(t, key)
        return out
