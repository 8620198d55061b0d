"""Cost model: how long a chunked GEMM + collective takes, and how many chunks to use.

Two resources run side by side, a compute stream and a comm stream. Every GEMM piece
and every collective piece is a task on one of them; a task starts when its resource
is free and its inputs are ready. The model prices tasks with three formulas.

GEMM (a roofline with tile padding and launch overhead)::

    rows_eff = ceil(m / tile_m) * tile_m                  # a partial tile costs a full one
    gemm_s   = launch + max(2 * rows_eff * n * k / flops_per_s,
                            (m*k + k*n + m*n) * elem_bytes / mem_bytes_per_s)

So a piece with few rows is inefficient twice over: it pads to a tile and it re-reads the
whole ``k x n`` weight, which is why too many chunks lose.

Collectives (ring algorithm, "bus bandwidth" as nccl-tests report it), with ``nbytes`` the
whole gathered tensor for all-gather, the whole input for reduce-scatter / all-reduce::

    all_gather, reduce_scatter: launch + latency + (w - 1) / w * nbytes / link_bytes_per_s
    all_reduce:                 launch + latency + 2 * (w - 1) / w * nbytes / link_bytes_per_s

all_gather_matmul's chunked schedule is a ring of point-to-point hops (fusedpar.overlap):
a hop of ``nbytes`` costs ``launch + latency + nbytes / link_bytes_per_s``, and the world - 1
hops of a shard add up to the all-gather formula above.

``C`` and ``M`` below are the unchunked GEMM and collective times; ``C + M`` is the
serial time and ``(C + M) / max(C, M)`` the best speed-up any overlap can reach.

Not modelled: the slow-down a GEMM suffers while a collective shares its SMs and memory
bandwidth, and host-side launch pipelining (launch cost is charged to the stream).
Numbers in ``DEVICES`` are round figures; ``calibrate`` measures the GEMM table.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

OPS = ("all_gather_matmul", "matmul_reduce_scatter", "matmul_all_reduce")

# Predictions closer than this (relative) count as a tie, and ties go to fewer chunks:
# more chunks mean more launches and more ways to be wrong for no modelled gain.
_TIE_RTOL = 1e-3


@dataclass(frozen=True)
class DeviceSpec:
    """What the model knows of one device kind and its interconnect."""

    name: str
    gemm_tflops: dict[str, float]  # achieved dense TFLOP/s by dtype name ("bfloat16", ...)
    link_gbps: float  # collective bus bandwidth, GB/s (1e9 bytes/s)
    link_latency_us: float  # fixed cost of one collective
    launch_us: float  # per kernel / collective launch overhead
    mem_gbps: float = 1000.0  # achieved memory bandwidth, for small-GEMM roofline
    tile_m: int = 1  # GEMM rows are padded to a multiple of this (tile quantisation)
    min_piece_rows: int = 1  # choose_chunks never cuts a rank's shard finer than this
    # Whether comm and GEMMs run on separate hardware. On a GPU, NCCL (or a copy engine)
    # moves data while the SMs compute; gloo on a CPU moves data with the same cores the
    # GEMM uses, so nothing hides (FACTS.md) and pieces only add per-call costs.
    comm_overlaps_compute: bool = True

    def tflops(self, dtype: torch.dtype | str) -> float:
        """Achieved dense TFLOP/s for ``dtype``; ValueError if the table lacks it."""
        key = dtype_name(dtype)
        try:
            return self.gemm_tflops[key]
        except KeyError:
            raise ValueError(
                f"DeviceSpec {self.name!r} has no GEMM throughput for {key!r}; "
                f"known: {sorted(self.gemm_tflops)}"
            ) from None


def _fp8(tflops: float) -> dict[str, float]:
    """One figure for both fp8 formats (and their mix): the tensor cores run e4m3 and e5m2
    at the same rate."""
    return {"float8_e4m3fn": tflops, "float8_e5m2": tflops}


# Round figures. GPU rows: vendor peaks scaled to what cuBLAS / nccl-tests typically
# reach; cpu-gloo: measured on the 2-core dev machine (torch.matmul, 256..1024 squares)
# and fitted to the gloo timings in shared/FACTS.md (4 MiB fp32, 2 ranks: all_reduce
# 7.0 ms, all_gather 5.5 ms, reduce_scatter 3.8 ms -> ~0.6 GB/s bus bandwidth). fp8 rows:
# twice bf16 on Hopper (the vendor's dense fp8 peak is twice its bf16 one; unmeasured
# until bench/gpu/gemm_sweep.py --parts fp8 runs), none on the A100 (no fp8 tensor cores:
# fusedpar refuses fp8 there), the CPU's is its fp32 rate (fp8 is emulated through fp32).
_H100_SXM = DeviceSpec(
    name="h100-sxm",
    gemm_tflops={"bfloat16": 790.0, "float16": 790.0, "tfloat32": 400.0,
                 "float32": 51.0, "float64": 55.0, **_fp8(1580.0)},
    link_gbps=370.0, link_latency_us=10.0, launch_us=4.0,
    mem_gbps=3000.0, tile_m=128, min_piece_rows=64,
)
DEVICES: dict[str, DeviceSpec] = {
    spec.name: spec
    for spec in (
        _H100_SXM,
        # the H100 SXM's compute and NVLink with faster, bigger HBM3e
        dataclasses.replace(_H100_SXM, name="h200", mem_gbps=4300.0),
        DeviceSpec(
            name="h100-pcie",
            gemm_tflops={"bfloat16": 600.0, "float16": 600.0, "tfloat32": 300.0,
                         "float32": 40.0, "float64": 40.0, **_fp8(1200.0)},
            link_gbps=50.0, link_latency_us=20.0, launch_us=4.0,
            mem_gbps=1700.0, tile_m=128, min_piece_rows=64,
        ),
        DeviceSpec(
            name="a100-sxm",
            gemm_tflops={"bfloat16": 280.0, "float16": 280.0, "tfloat32": 140.0,
                         "float32": 19.0, "float64": 18.0},
            link_gbps=230.0, link_latency_us=10.0, launch_us=5.0,
            mem_gbps=1800.0, tile_m=128, min_piece_rows=64,
        ),
        DeviceSpec(
            name="gpu-generic",  # unknown GPU over PCIe: deliberately modest
            gemm_tflops={"bfloat16": 100.0, "float16": 100.0, "tfloat32": 50.0,
                         "float32": 15.0, "float64": 5.0, **_fp8(200.0)},
            link_gbps=20.0, link_latency_us=20.0, launch_us=5.0,
            mem_gbps=500.0, tile_m=128, min_piece_rows=64,
        ),
        DeviceSpec(
            name="cpu-gloo",
            gemm_tflops={"bfloat16": 0.25, "float16": 0.002, "float32": 0.08,
                         "float64": 0.04, **_fp8(0.08)},
            link_gbps=0.6, link_latency_us=100.0, launch_us=20.0,
            mem_gbps=10.0, tile_m=1, min_piece_rows=8, comm_overlaps_compute=False,
        ),
    )
}

_override: DeviceSpec | None = None
_generation = 0  # moves with every set_device_spec: plans cached elsewhere (overlap/spec.py) key on it


def dtype_name(dtype: torch.dtype | str) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``; strings pass through."""
    return dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")


def _elem_bytes(dtype: torch.dtype | str) -> int:
    name = dtype_name(dtype)
    if name == "tfloat32":
        return 4
    return getattr(torch, name).itemsize


def set_device_spec(spec: DeviceSpec | str | None) -> None:
    """Make ``device_spec_for`` return ``spec`` (a DeviceSpec or a DEVICES key) in this
    process; ``None`` restores the defaults. Set it identically on every rank."""
    global _override, _generation
    if isinstance(spec, str):
        if spec not in DEVICES:
            raise ValueError(f"unknown device spec {spec!r}; known: {sorted(DEVICES)}")
        spec = DEVICES[spec]
    _override = spec
    _generation += 1


def spec_name_for_gpu(gpu_name: str) -> str:
    """Map ``torch.cuda.get_device_name()`` to a DEVICES key."""
    upper = gpu_name.upper()
    if "H200" in upper:
        return "h200"
    if "H100" in upper:
        return "h100-pcie" if "PCIE" in upper else "h100-sxm"
    if "A100" in upper:
        return "a100-sxm"
    return "gpu-generic"


def device_spec_for(device: torch.device | str | None = None) -> DeviceSpec:
    """The spec for ``device`` (default: the current CUDA device if any, else CPU),
    unless ``set_device_spec`` installed an override."""
    if _override is not None:
        return _override
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        return DEVICES[spec_name_for_gpu(torch.cuda.get_device_name(device))]
    return DEVICES["cpu-gloo"]


# --------------------------------------------------------------------------- formulas


def gemm_time(m: int, n: int, k: int, dtype: torch.dtype | str, spec: DeviceSpec) -> float:
    """Seconds for one ``[m, k] @ [k, n]`` launch (roofline, tile padding, launch)."""
    if m <= 0:
        return 0.0
    rows_eff = math.ceil(m / spec.tile_m) * spec.tile_m
    flop_s = 2.0 * rows_eff * n * k / (spec.tflops(dtype) * 1e12)
    mem_s = (m * k + k * n + m * n) * _elem_bytes(dtype) / (spec.mem_gbps * 1e9)
    return spec.launch_us * 1e-6 + max(flop_s, mem_s)


def collective_time(kind: str, nbytes: float, world_size: int, spec: DeviceSpec) -> float:
    """Seconds for one ring collective over ``nbytes`` (the whole tensor, see module doc)."""
    if world_size <= 1 or nbytes <= 0:
        return 0.0
    factor = {"all_gather": 1.0, "reduce_scatter": 1.0, "all_reduce": 2.0}[kind]
    wire_s = factor * (world_size - 1) / world_size * nbytes / (spec.link_gbps * 1e9)
    return (spec.launch_us + spec.link_latency_us) * 1e-6 + wire_s


def p2p_time(nbytes: float, spec: DeviceSpec) -> float:
    """Seconds for one ring hop (send to the next rank while receiving from the previous)
    of ``nbytes``. world - 1 hops of a shard cost what the ring all-gather's formula says."""
    if nbytes <= 0:
        return 0.0
    return (spec.launch_us + spec.link_latency_us) * 1e-6 + nbytes / (spec.link_gbps * 1e9)


def split_rows(rows: int, chunks: int) -> list[int]:
    """Sizes of ``rows`` split into ``chunks`` near-equal parts, larger first
    (as ``torch.tensor_split`` does)."""
    base, extra = divmod(rows, chunks)
    return [base + (i < extra) for i in range(chunks)]


# ------------------------------------------------------------------------- prediction

# Piece buffers the implemented schedules keep alive at once (fusedpar.overlap.MAX_IN_FLIGHT
# for reduce-scatter; the others write into their output and are unbounded).
SCHEDULE_MAX_IN_FLIGHT: dict[str, int | None] = {
    "all_gather_matmul": None, "matmul_reduce_scatter": 2, "matmul_all_reduce": None,
}


@dataclass(frozen=True)
class Prediction:
    """Predicted times (seconds) of one op at one chunk count."""

    op: str
    chunks: int
    compute_s: float  # C: the unchunked GEMM
    comm_s: float  # M: the unchunked collective
    serial_s: float  # C + M
    overlapped_s: float  # the chunked schedule, simulated
    bound: float  # (C + M) / max(C, M): no schedule beats this speed-up
    speedup: float  # serial_s / overlapped_s


def _check(op: str, m: int, n: int, k: int, world_size: int) -> None:
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    if min(m, n, k) < 1 or world_size < 1:
        raise ValueError(f"need m, n, k, world_size >= 1, got {m=} {n=} {k=} {world_size=}")


def ring_pieces(chunks: int, world_size: int) -> int:
    """Pieces per shard of all_gather_matmul's ring: the ring moves whole shards, so
    ``chunks`` is rounded up to a multiple of the world size (fusedpar.overlap)."""
    return -(-chunks // world_size)


def piece_rows(op: str, *, m: int, world_size: int, chunks: int) -> int:
    """Rows of the smallest piece a schedule cuts from one rank's shard (all-reduce:
    from the whole ``m``)."""
    if op == "all_gather_matmul":
        return (m // world_size) // ring_pieces(chunks, world_size)
    if op == "matmul_reduce_scatter":
        return (m // world_size) // chunks
    return m // chunks


def _tasks(op: str, m: int, n: int, k: int, world_size: int, dtype: torch.dtype | str,
           chunks: int, spec: DeviceSpec) -> tuple[float, list[float], list[float]]:
    """(local GEMM time, per-piece GEMM times, per-piece comm times) of a chunked schedule."""
    eb = _elem_bytes(dtype)
    w = world_size
    if op == "all_gather_matmul":
        # Ring: the local shard's GEMM needs no comm; then world - 1 hops, each moving one
        # shard in `p` pieces, each piece's GEMM waiting for its hop.
        shard = m // w
        rows = split_rows(shard, ring_pieces(chunks, w)) * (w - 1)
        mm = [gemm_time(r, n, k, dtype, spec) for r in rows]
        comm = [p2p_time(r * k * eb, spec) for r in rows]
        return gemm_time(shard, n, k, dtype, spec), mm, comm
    if op == "matmul_reduce_scatter":
        # Piece j takes rows j of every rank's destination block: w * (shard / c) rows.
        rows = [w * r for r in split_rows(m // w, chunks)]
        kind = "reduce_scatter"
    else:
        rows = split_rows(m, chunks)
        kind = "all_reduce"
    mm = [gemm_time(r, n, k, dtype, spec) for r in rows]
    comm = [collective_time(kind, r * n * eb, w, spec) for r in rows]
    return 0.0, mm, comm


def simulate(op: str, local_s: float, mm_s: Sequence[float], comm_s: Sequence[float],
             *, max_in_flight: int | None = None) -> float:
    """Makespan of the two-stream schedule for ``op`` given its task times.

    all_gather_matmul (a ring: comm runs ahead, the local shard needs no comm)::

        comm:    [hop 1][hop 2][hop 3]
        compute: [mm local][mm 1][mm 2][mm 3]

    matmul_reduce_scatter / matmul_all_reduce (comm trails compute)::

        comm:          [rs 0][rs 1][rs 2]
        compute: [mm 0][mm 1][mm 2]

    ``max_in_flight`` bounds the piece buffers alive at once: hop j waits for GEMM
    j - max_in_flight to release its buffer; GEMM j waits for collective
    j - max_in_flight to release its buffer.
    """
    c = len(mm_s)
    mm_end = [0.0] * c
    comm_end = [0.0] * c
    if op == "all_gather_matmul":
        compute_free, comm_free = local_s, 0.0
        for j in range(c):
            start = comm_free
            if max_in_flight is not None and j >= max_in_flight:
                start = max(start, mm_end[j - max_in_flight])
            comm_end[j] = comm_free = start + comm_s[j]
            mm_end[j] = compute_free = max(compute_free, comm_end[j]) + mm_s[j]
        return compute_free
    compute_free = comm_free = 0.0
    for j in range(c):
        start = compute_free
        if max_in_flight is not None and j >= max_in_flight:
            start = max(start, comm_end[j - max_in_flight])
        mm_end[j] = compute_free = start + mm_s[j]
        comm_end[j] = comm_free = max(comm_free, mm_end[j]) + comm_s[j]
    return max(compute_free, comm_free)


def predict(op: str, *, m: int, n: int, k: int, world_size: int, dtype: torch.dtype | str,
            chunks: int, device: DeviceSpec | None = None,
            max_in_flight: int | None = None) -> Prediction:
    """Predict ``op`` on global shapes (per-rank GEMM ``[m, k] @ [k, n]``) at ``chunks``.

    ``chunks=1`` is the unfused op (collective, then GEMM, or the reverse), so its
    overlapped time is C + M. For all_gather_matmul any ``chunks >= 2`` runs the ring with
    ``ceil(chunks / world_size)`` pieces per shard. ``max_in_flight=None`` uses the
    implemented schedule's buffer bound (SCHEDULE_MAX_IN_FLIGHT).
    """
    _check(op, m, n, k, world_size)
    if chunks < 1:
        raise ValueError(f"chunks must be >= 1, got {chunks}")
    spec = device if device is not None else device_spec_for(None)
    eb = _elem_bytes(dtype)
    kind, nbytes = {
        "all_gather_matmul": ("all_gather", m * k * eb),
        "matmul_reduce_scatter": ("reduce_scatter", m * n * eb),
        "matmul_all_reduce": ("all_reduce", m * n * eb),
    }[op]
    big_c = gemm_time(m, n, k, dtype, spec)
    big_m = collective_time(kind, nbytes, world_size, spec)
    serial = big_c + big_m
    if world_size == 1 or chunks == 1:
        overlapped = serial  # one GEMM and one collective, one after the other
    else:
        local, mm, comm = _tasks(op, m, n, k, world_size, dtype, chunks, spec)
        bound_in_flight = max_in_flight if max_in_flight is not None \
            else SCHEDULE_MAX_IN_FLIGHT[op]
        if spec.comm_overlaps_compute:
            overlapped = simulate(op, local, mm, comm, max_in_flight=bound_in_flight)
        else:  # one resource: every piece's GEMM and collective back to back
            overlapped = local + sum(mm) + sum(comm)
    return Prediction(
        op=op, chunks=chunks, compute_s=big_c, comm_s=big_m, serial_s=serial,
        overlapped_s=overlapped, bound=serial / max(big_c, big_m),
        speedup=serial / overlapped,
    )


def choose_chunks(op: str, *, m: int, n: int, k: int, world_size: int,
                  dtype: torch.dtype | str, device: DeviceSpec | None = None,
                  max_chunks: int = 8, max_in_flight: int | None = None) -> int:
    """The chunk count in ``1..max_chunks`` with the least predicted time.

    A pure function of its arguments (with ``device`` given; otherwise of the device
    spec too) that reads no clock, so every rank passing the same global shapes gets the
    same answer. Decode-sized ``m`` (under two pieces of ``spec.min_piece_rows`` rows per
    rank) gets 1, and counts whose pieces would be smaller than that are not considered;
    ties go to fewer chunks.
    """
    _check(op, m, n, k, world_size)
    spec = device if device is not None else device_spec_for(None)
    if world_size == 1 or m < 2 * world_size * spec.min_piece_rows:
        return 1
    best_c, best_t = 1, math.inf
    for c in range(1, max_chunks + 1):
        if c > 1 and piece_rows(op, m=m, world_size=world_size, chunks=c) < spec.min_piece_rows:
            break  # pieces only get smaller from here
        t = predict(op, m=m, n=n, k=k, world_size=world_size, dtype=dtype, chunks=c,
                    device=spec, max_in_flight=max_in_flight).overlapped_s
        if t < best_t * (1.0 - _TIE_RTOL):
            best_c, best_t = c, t
    return best_c


# ------------------------------------------------------------------------ calibration


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_gemm(device: torch.device | str | None = None, *,
                 dtypes: Sequence[torch.dtype] = (torch.float32,),
                 shapes: Sequence[tuple[int, int, int]] = ((256, 256, 256),),
                 backend: str = "torch", reps: int = 5) -> list[dict]:
    """Time per call (median of 3 trials of ``reps`` calls) and TFLOP/s of
    ``[m, k] @ [k, n]`` for each dtype and shape.

    ``backend`` is "torch" (torch.matmul) or "fusedpar" (fusedpar.kernels.matmul).
    """
    device = torch.device(device if device is not None else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    if backend == "fusedpar":
        from fusedpar.kernels import matmul as mm  # not there before the kernels land
    elif backend == "torch":
        mm = torch.matmul
    else:
        raise ValueError(f"backend must be 'torch' or 'fusedpar', got {backend!r}")
    rows = []
    gen = torch.Generator().manual_seed(0)
    for dtype in dtypes:
        for m, n, k in shapes:
            a = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)
            b = torch.randn(k, n, generator=gen).to(device=device, dtype=dtype)
            mm(a, b)  # warm-up: compile / autotune / allocator
            _sync(device)
            # `reps` calls back to back per trial so that one host sync does not dominate
            # a short GPU GEMM; the median trial smooths out noise.
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                for _ in range(reps):
                    mm(a, b)
                _sync(device)
                times.append((time.perf_counter() - t0) / reps)
            med = statistics.median(times)
            rows.append({"backend": backend, "dtype": dtype_name(dtype), "m": m, "n": n,
                         "k": k, "median_s": med, "tflops": 2.0 * m * n * k / med / 1e12})
    return rows


def calibrate(device: torch.device | str | None = None, *,
              dtypes: Sequence[torch.dtype] = (torch.float32,),
              shapes: Sequence[tuple[int, int, int]] = ((256, 256, 256),),
              backend: str = "torch", reps: int = 5) -> DeviceSpec:
    """A copy of ``device``'s spec whose GEMM table holds the best measured TFLOP/s per
    dtype (link figures are kept). Install it with ``set_device_spec`` on every rank."""
    base = device_spec_for(device)
    rows = measure_gemm(device, dtypes=dtypes, shapes=shapes, backend=backend, reps=reps)
    measured: dict[str, float] = {}
    for row in rows:
        measured[row["dtype"]] = max(measured.get(row["dtype"], 0.0), row["tflops"])
    return dataclasses.replace(
        base, name=f"{base.name}-calibrated",
        gemm_tflops={**base.gemm_tflops,
                     **{d: float(f"{t:.4g}") for d, t in measured.items()}},
    )
