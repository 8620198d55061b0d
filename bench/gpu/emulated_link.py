"""A one-process communicator that pretends to be rank `rank` of `world_size` over a link.

One GPU means NCCL with one rank, which moves no data, so overlap cannot be measured with
real collectives. `EmulatedLinkCommunicator` stands in for them: each collective keeps the
real buffer shapes and semantics of `fusedpar.comm.Communicator` (so the overlap schedules
run unchanged) and takes, on fusedpar's comm stream, the time the real ring collective
would take over a link of `link_gbps` bus bandwidth plus `latency_us`:

    comm = EmulatedLinkCommunicator(world_size=8, rank=0, link_gbps=370.0)
    y = overlap.all_gather_matmul(x_shard, w, group=comm, chunks=8)

Bytes on the wire per rank (the ring formulas of fusedpar.costmodel), with `nbytes` the
whole gathered tensor for all-gather, the whole input for reduce-scatter and all-reduce,
the message for a P2P hop:

    all_gather, reduce_scatter   (world - 1) / world * nbytes
    all_reduce               2 * (world - 1) / world * nbytes
    send_recv                    nbytes                       (one hop moves its message once)
    seconds = latency_us * 1e-6 + wire_bytes / (link_gbps * 1e9)

How the time is spent (CUDA): the comm stream waits for the caller's stream (inputs are
ready), does the collective's own copies (below), then pads the rest of the time with
device-to-device copies of a scratch buffer (`fill="copy"`, the default: the transfer
really competes with the GEMM for HBM bandwidth) or with a one-block spin kernel
(`fill="spin"`: it holds one SM and no memory bandwidth). The copy rate and spin rate are
calibrated once at construction with CUDA events. A done event is recorded and the
returned handle makes the waiter's stream wait on it, as CupyCommunicator does.

Values: every emulated peer is a clone of this rank, i.e. holds exactly this rank's data.
So all_gather writes `input` into every rank's slot, reduce_scatter writes
`world * input[block rank]`, all_reduce multiplies by `world`, send_recv receives what it
sends. These are NOT the multi-rank results of distinct data; only the shapes, the
ordering and the timing are emulated.

Limits (state them with every number measured this way):
- NCCL's own SM use is not modelled: NCCL runs its ring on several SMs, the emulation on
  copy engines (`copy`) or one SM (`spin`), so a GEMM loses fewer SMs than with NCCL.
- `copy` moves more HBM bytes than a real transfer (a link far slower than a D2D copy is
  emulated by copying more), so it overstates memory contention; `spin` understates it.
  The two bracket the real contention.
- Under contention the copies slow down, so an emulated transfer overlapped with a GEMM
  takes longer than `transfer_seconds` says; M is measured alone.
- No NVLink/NVSwitch protocol effects (LL/LL128 latency, SHARP), no peer skew.

On CPU the collectives run synchronously with the same value semantics and, by default,
take no extra time (`timed=False`: timing is meaningless on CPU); `timed=True` sleeps for
the emulated time.
"""
from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Callable

import torch
from torch import Tensor

from fusedpar.comm import CollectiveHandle, Communicator
from fusedpar.streams import StreamSet

__all__ = ["EmulatedLinkCommunicator", "wire_bytes", "EMULATION_NOTE"]

EMULATION_NOTE = (
    "Emulated link: one GPU, one process; each collective runs on fusedpar's comm stream as "
    "device-to-device copies (or a spin kernel) lasting latency + ring wire bytes / link "
    "bandwidth ((w-1)/w x bytes for all-gather and reduce-scatter, 2x that for all-reduce, "
    "the message for a P2P hop). Limits: NCCL's SM use is not modelled; copy padding "
    "overstates HBM contention and spin padding understates it; output values are not the "
    "multi-rank results (every emulated peer holds this rank's data)."
)

_FACTOR = {"all_gather": 1.0, "reduce_scatter": 1.0, "all_reduce": 2.0}
_MIN_PAD_BYTES = 1024  # below this a padding copy costs more in launch than it emulates


def wire_bytes(kind: str, nbytes: float, world_size: int) -> float:
    """Bytes one rank puts on the wire for a ring collective (see module doc)."""
    if kind == "send_recv":
        return float(nbytes)
    if kind not in _FACTOR:
        raise ValueError(f"kind: expected one of {sorted(_FACTOR) + ['send_recv']}, got {kind!r}")
    if world_size <= 1:
        return 0.0
    return _FACTOR[kind] * (world_size - 1) / world_size * nbytes


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


class EmulatedLinkCommunicator(Communicator):
    """Collectives that keep real shapes and take a link's time, with no process group.

    See the module doc for the time each call takes and the values it writes.
    `bytes_on_wire`, `emulated_seconds` and `calls` (a Counter by kind) add up what was
    issued, for checks and reports.
    """

    kind = "emulated"

    def __init__(
        self,
        *,
        world_size: int,
        rank: int = 0,
        link_gbps: float = 370.0,
        latency_us: float = 10.0,
        device: torch.device | str | None = None,
        fill: str = "copy",
        timed: bool | None = None,
        scratch_mib: int = 64,
    ) -> None:
        # No process group: the base class's __init__ (check_group) is deliberately skipped.
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size: expected an int >= 1, got {world_size!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank: expected an int in [0, {world_size}), got {rank!r}")
        if link_gbps <= 0 or latency_us < 0:
            raise ValueError(f"need link_gbps > 0 and latency_us >= 0, got {link_gbps}, {latency_us}")
        if fill not in ("copy", "spin"):
            raise ValueError(f"fill: expected 'copy' or 'spin', got {fill!r}")
        self.group = None
        self.rank, self.world_size = rank, world_size
        self.link_gbps, self.latency_us, self.fill = float(link_gbps), float(latency_us), fill
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.cuda = self.device.type == "cuda"
        self.timed = self.cuda if timed is None else bool(timed)
        self.bytes_on_wire = 0.0
        self.emulated_seconds = 0.0
        self.calls: Counter[str] = Counter()
        self.copy_gbps: float | None = None  # measured D2D copy rate (bytes copied / s / 1e9)
        self.spin_cycles_per_s: float | None = None
        if self.cuda:
            self._streams = StreamSet.for_device(self.device)
            n = scratch_mib * 2**20
            self._scratch_src = torch.zeros(n, dtype=torch.uint8, device=self.device)
            self._scratch_dst = torch.empty_like(self._scratch_src)
            self._calibrate()

    # ------------------------------------------------------------------ accounting

    def wire_bytes(self, kind: str, nbytes: float) -> float:
        """Bytes this rank puts on the wire for `kind` over `nbytes` (module doc)."""
        return wire_bytes(kind, nbytes, self.world_size)

    def transfer_seconds(self, kind: str, nbytes: float) -> float:
        """Seconds the real link would take: latency + wire bytes / bandwidth."""
        return self.latency_us * 1e-6 + self.wire_bytes(kind, nbytes) / (self.link_gbps * 1e9)

    def describe(self) -> dict:
        """The emulation's parameters and calibration, for result files."""
        return {"world_size": self.world_size, "rank": self.rank, "link_gbps": self.link_gbps,
                "latency_us": self.latency_us, "fill": self.fill, "device": str(self.device),
                "timed": self.timed, "copy_gbps": self.copy_gbps,
                "spin_cycles_per_s": self.spin_cycles_per_s, "note": EMULATION_NOTE}

    # ------------------------------------------------------------------ calibration (CUDA)

    def _time_ms(self, fn: Callable[[], None], reps: int = 5) -> float:
        stream = torch.cuda.current_stream(self.device)
        fn()
        fn()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            fn()
            end.record(stream)
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    def _calibrate(self) -> None:
        n = self._scratch_src.numel()
        ms = self._time_ms(lambda: self._scratch_dst.copy_(self._scratch_src))
        self.copy_gbps = n / (ms * 1e-3) / 1e9
        cycles = 1_000_000
        ms = self._time_ms(lambda: torch.cuda._sleep(cycles))
        self.spin_cycles_per_s = cycles / (ms * 1e-3)

    # ------------------------------------------------------------------ the collectives

    def _run(self, op: str, kind: str, nbytes: int, body: Callable[[], int], *tensors: Tensor) -> CollectiveHandle:
        """Account for the call, run `body` (the value semantics; returns bytes it copied)
        and pad to the link's time: on the comm stream on CUDA, inline on CPU."""
        seconds = self.transfer_seconds(kind, nbytes)
        self.bytes_on_wire += self.wire_bytes(kind, nbytes)
        self.emulated_seconds += seconds
        self.calls[kind] += 1
        describe = self._describe(op, *tensors)
        if not self.cuda:
            body()
            if self.timed:
                time.sleep(seconds)
            return CollectiveHandle(keep=tensors, describe=describe)
        comm_stream = self._streams.comm
        comm_stream.wait_stream(torch.cuda.current_stream(self.device))  # inputs are ready
        with torch.cuda.stream(comm_stream):
            copied = body()
            if self.timed:
                self._pad(seconds, copied)
            done = torch.cuda.Event()
            done.record(comm_stream)
        return CollectiveHandle(event=done, keep=tensors, describe=describe)

    def _pad(self, seconds: float, copied: int) -> None:
        """Spend what is left of `seconds` after `copied` bytes of semantic copies."""
        assert self.copy_gbps is not None and self.spin_cycles_per_s is not None
        left_s = seconds - copied / (self.copy_gbps * 1e9)
        if left_s <= 0:
            return
        if self.fill == "spin":
            torch.cuda._sleep(max(1, int(left_s * self.spin_cycles_per_s)))
            return
        left = int(left_s * self.copy_gbps * 1e9)
        cap = self._scratch_src.numel()
        while left >= _MIN_PAD_BYTES:
            n = min(left, cap)
            self._scratch_dst[:n].copy_(self._scratch_src[:n])
            left -= n

    @staticmethod
    def _check_contiguous(**tensors: Tensor) -> None:
        for name, t in tensors.items():
            if not t.is_contiguous():
                raise ValueError(f"{name}: collectives need a contiguous buffer, got strides {t.stride()}")

    def all_gather(self, output: Tensor, input: Tensor) -> CollectiveHandle:
        self._check_contiguous(output=output, input=input)
        if output.numel() != self.world_size * input.numel() or output.dtype != input.dtype:
            raise ValueError(
                f"all_gather: output must hold world_size={self.world_size} x input "
                f"({input.numel()} {input.dtype}), got {output.numel()} {output.dtype}")

        def body() -> int:
            slots = output.view(self.world_size, -1)
            flat = input.reshape(-1)
            for r in range(self.world_size):
                slots[r].copy_(flat)
            return _nbytes(output)

        return self._run("all_gather", "all_gather", _nbytes(output), body, output, input)

    def reduce_scatter(self, output: Tensor, input: Tensor) -> CollectiveHandle:
        self._check_contiguous(output=output, input=input)
        if input.numel() != self.world_size * output.numel() or output.dtype != input.dtype:
            raise ValueError(
                f"reduce_scatter: input must hold world_size={self.world_size} x output "
                f"({output.numel()} {output.dtype}), got {input.numel()} {input.dtype}")

        def body() -> int:
            block = input.view(self.world_size, -1)[self.rank]
            torch.mul(block, self.world_size, out=output.view(-1))
            return _nbytes(output)

        return self._run("reduce_scatter", "reduce_scatter", _nbytes(input), body, output, input)

    def all_reduce(self, tensor: Tensor) -> CollectiveHandle:
        self._check_contiguous(tensor=tensor)

        def body() -> int:
            tensor.mul_(self.world_size)
            return _nbytes(tensor)

        return self._run("all_reduce", "all_reduce", _nbytes(tensor), body, tensor)

    def send_recv(self, send: Tensor, dst: int, recv: Tensor, src: int) -> CollectiveHandle:
        self._check_contiguous(send=send, recv=recv)
        for name, peer in (("dst", dst), ("src", src)):
            if not 0 <= peer < self.world_size:
                raise ValueError(f"send_recv: {name}={peer} is not a rank of a group of {self.world_size}")
        if send.numel() != recv.numel() or send.dtype != recv.dtype:
            raise ValueError(
                f"send_recv: send and recv must match (every peer is a clone of this rank), got "
                f"{send.numel()} {send.dtype} and {recv.numel()} {recv.dtype}")

        def body() -> int:
            recv.copy_(send)
            return _nbytes(send)

        return self._run("send_recv", "send_recv", _nbytes(send), body, send, recv)

    def all_gather_object(self, obj: object) -> list[object]:
        """Every emulated peer is a clone of this rank, so each holds `obj`."""
        return [obj] * self.world_size

    def __repr__(self) -> str:
        return (f"EmulatedLinkCommunicator(rank={self.rank}, world_size={self.world_size}, "
                f"link_gbps={self.link_gbps}, latency_us={self.latency_us}, fill={self.fill!r})")
