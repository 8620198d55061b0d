"""Streams and events by role: CUDA streams on GPU, a stand-in that keeps program order on CPU.

The overlap schedules talk to one `StreamSet` per device:

    compute  the stream the caller is on (GEMMs run here)
    comm     collectives issued by a communicator that owns its stream (CuPy NCCL)
    copy     staging copies (e.g. filling a gathered buffer) that should not queue behind GEMMs

On CPU every "stream" is the host thread, so each call below is a no-op and order is simply
program order; gloo's async work runs on its own threads and is ordered by `Handle.wait()`.

Lifetime of tensors used on a side stream (caching-allocator safety): we do NOT use
`Tensor.record_stream`. Every `CollectiveHandle` holds references to the tensors its
collective touches, and a schedule drops its handles only after the compute stream has
waited on each of them. From then on any reuse of the memory by the allocator is ordered
after the side stream's work. `record_stream` would also be safe but defers reuse to an
unpredictable later point, which inflates peak memory under a steady stream of chunks.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["StreamSet", "nvtx_range", "emit_nvtx", "current_stream"]


class _HostStream:
    """CPU stand-in for a CUDA stream: work runs when issued, so ordering is program order."""

    device = torch.device("cpu")

    def wait_stream(self, other: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> "_HostEvent":
        return _HostEvent()

    def synchronize(self) -> None:
        pass

    def __repr__(self) -> str:
        return "HostStream()"


class _HostEvent:
    """CPU stand-in for a CUDA event: always complete, since host work is synchronous."""

    def record(self, stream: Any = None) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


_HOST_STREAM = _HostStream()


def current_stream(device: torch.device) -> Any:
    """The stream new work on `device` is queued on (the host stand-in on CPU)."""
    if device.type == "cuda":
        return torch.cuda.current_stream(device)
    return _HOST_STREAM


@dataclass
class StreamSet:
    """The streams of one device, named by role. Create with `StreamSet.for_device`."""

    device: torch.device
    comm: Any
    copy: Any

    @property
    def compute(self) -> Any:
        # The caller's current stream, read at use time: users may run us under their own
        # `torch.cuda.stream(...)` context, and the schedule must follow it.
        return current_stream(self.device)

    @staticmethod
    def for_device(device: torch.device) -> "StreamSet":
        """One cached set per device: creating CUDA streams per call would leak them."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        cached = _STREAM_SETS.get(device)
        if cached is None:
            if device.type == "cuda":
                cached = StreamSet(
                    device,
                    comm=torch.cuda.Stream(device, priority=-1),  # comm first: it gates compute
                    copy=torch.cuda.Stream(device),
                )
            else:
                cached = StreamSet(device, comm=_HOST_STREAM, copy=_HOST_STREAM)
            _STREAM_SETS[device] = cached
        return cached

    def new_event(self) -> Any:
        if self.device.type == "cuda":
            return torch.cuda.Event()
        return _HostEvent()

    @contextlib.contextmanager
    def on(self, stream: Any) -> Iterator[None]:
        """Run the body with `stream` current (fork: it first waits for the compute stream)."""
        if self.device.type != "cuda":
            yield
            return
        stream.wait_stream(self.compute)
        with torch.cuda.stream(stream):
            yield


_STREAM_SETS: dict[torch.device, StreamSet] = {}


# NVTX ranges for Nsight Systems, which does not turn torch's profiler on: set
# FUSEDPAR_NVTX=1 before fusedpar is imported (read once), or call `emit_nvtx(True)`.
_NVTX = [os.environ.get("FUSEDPAR_NVTX", "").strip().lower() not in ("", "0", "false", "no", "off")]
_NO_RANGE = contextlib.nullcontext()


def emit_nvtx(enabled: bool = True) -> None:
    """Emit NVTX ranges from `nvtx_range` (for an nsys capture) even while torch's profiler is off."""
    _NVTX[0] = bool(enabled)


def nvtx_range(name: str) -> contextlib.AbstractContextManager[None]:
    """Label the body: a torch.profiler range while a profiler is running (Chrome / Perfetto
    traces, CPU included; also under `torch.autograd.profiler.emit_nvtx`), and an NVTX range
    on CUDA builds while `emit_nvtx` (or FUSEDPAR_NVTX=1) is on. Otherwise a shared no-op
    context, so the schedules can mark every chunk at the cost of one flag test."""
    if not (torch.autograd.profiler._is_profiler_enabled or _NVTX[0]):
        return _NO_RANGE
    return _labelled(name)


@contextlib.contextmanager
def _labelled(name: str) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        if torch.autograd.profiler._is_profiler_enabled:
            stack.enter_context(torch.profiler.record_function(name))
        if _NVTX[0] and torch.cuda.is_available():
            try:
                torch.cuda.nvtx.range_push(name)
            except (RuntimeError, AttributeError):  # NVTX missing from this build
                pass
            else:
                stack.callback(torch.cuda.nvtx.range_pop)
        yield
