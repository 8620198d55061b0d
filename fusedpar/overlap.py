"""Chunked collective + matmul schedules, forward and backward, and the unfused reference of each.

Layouts, in one vocabulary everywhere: *shard* = split across ranks on the row (token)
dim, *full* = replicated / gathered, *partial* = a partial sum that a reduction completes.
`w` is always the caller's local `[K, N]` operand (`linear.weight.T` of a sharded linear,
a view, no copy).

    all_gather_matmul      all_gather(x_shard, dim) @ w                  ring of P2P sends
    matmul_reduce_scatter  reduce_scatter(x @ w, dim)                    chunked reduce-scatter
    matmul_all_reduce      all_reduce(x @ w)                             chunked all-reduce

and the backward blocks the tensor-parallel layers use, each overlapping a dgrad collective
with the wgrad GEMM:

    matmul_reduce_scatter_with_wgrad   column-parallel, sequence-parallel backward
    matmul_all_reduce_with_wgrad       column-parallel backward
    all_gather_matmul_with_wgrad       row-parallel, sequence-parallel backward

`chunks` is the number of pieces the schedule pipelines; 1 means no pipelining (one
collective and one GEMM, the right choice for decode-sized inputs). `chunks=None` asks the
cost model (fusedpar.costmodel), which decides from global shapes, world size, dtype and
device kind only, so every rank issues the same collectives in the same order.

fp8 (`x` and `w` in float8_e4m3fn / float8_e5m2, with `x_scale` / `w_scale` as for
`kernels.matmul`): the GEMMs run in fp8 and write `out_dtype` (bf16 by default).
`all_gather_matmul` gathers the fp8 rows with their per-row scales, half the bytes of bf16;
`matmul_reduce_scatter` and `matmul_all_reduce` reduce in `out_dtype`, never in fp8, because
the partial sums of different ranks have different ranges: summing them in fp8 would need a
common scale (one more collective, for the amax, before any data can move) and would round
every partial and every hop of the ring to 3 mantissa bits, where bf16/fp32 partials lose
nothing the fp8 GEMM had not already. The backward blocks take `dgrad_fp8=(wt_q, w_scale)`
to run the dgrad in fp8 (dy quantized to e5m2 per row) while the wgrad stays in dy's dtype.

Validation happens before the first collective is issued, so a bad argument raises on the
rank that has it instead of leaving its peers waiting. With `FUSEDPAR_DEBUG=1` (or
`debug=True`) ranks also compare a fingerprint of the call first (fusedpar.checks).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from . import checks, costmodel
from .comm import CollectiveHandle, Communicator, get_communicator
from .kernels import ACTIVATIONS, matmul
from .kernels.fp8 import FP8_OUT_DTYPES, is_fp8, torch_scaled_product
from .kernels.quantize import quantize_rowwise
from .streams import StreamSet, nvtx_range

__all__ = [
    "all_gather_matmul",
    "all_gather_matmul_reference",
    "matmul_reduce_scatter",
    "matmul_reduce_scatter_reference",
    "matmul_all_reduce",
    "matmul_all_reduce_reference",
    "matmul_reduce_scatter_with_wgrad",
    "matmul_all_reduce_with_wgrad",
    "all_gather_matmul_with_wgrad",
    "PendingOutput",
    "split_rows",
]

MAX_IN_FLIGHT = 2  # reduce-scatter buffers alive at once: double buffering bounds extra memory


# --------------------------------------------------------------------------------------------
# Shared plumbing
# --------------------------------------------------------------------------------------------


def split_rows(n: int, chunks: int) -> list[tuple[int, int]]:
    """`n` rows cut into `chunks` contiguous (start, stop) pieces of sizes differing by ≤ 1.

    Empty pieces are dropped, so `chunks > n` (few tokens) just yields fewer pieces.
    """
    base, extra = divmod(n, chunks)
    pieces, start = [], 0
    for i in range(chunks):
        stop = start + base + (1 if i < extra else 0)
        if stop > start:
            pieces.append((start, stop))
        start = stop
    return pieces


def _fmt(t: Tensor) -> str:
    return f"{list(t.shape)} {str(t.dtype).removeprefix('torch.')} on {t.device}"


def _check_operands(
    x: Tensor, w: Tensor, bias: Tensor | None, activation: str | None, *, x_name: str, dim: int | None
) -> int:
    """Check the local operands of `x @ w (+ bias)`; return `dim` normalised (or -1)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{x_name}: expected a torch.Tensor, got {type(x).__name__}")
    if not isinstance(w, Tensor):
        raise TypeError(f"w: expected a torch.Tensor, got {type(w).__name__}")
    if x.ndim < 2:
        raise ValueError(f"{x_name}: expected at least 2 dims [..., K], got shape {list(x.shape)}")
    if w.ndim != 2:
        raise ValueError(f"w: expected 2 dims [K, N], got shape {list(w.shape)}")
    if x.shape[-1] != w.shape[0]:
        raise ValueError(
            f"w: expected shape [K, N] with K = {x_name}.shape[-1] = {x.shape[-1]}, got {list(w.shape)}"
        )
    fp8 = is_fp8(x.dtype)
    if x.dtype != w.dtype and not (fp8 and is_fp8(w.dtype)):
        also = " or another fp8 dtype" if fp8 else ""
        raise TypeError(f"w: expected dtype {x.dtype} (the dtype of {x_name}){also}, got {w.dtype}")
    if x.device != w.device:
        raise ValueError(f"w: expected device {x.device} (the device of {x_name}), got {w.device}")
    if bias is not None:
        if bias.shape != (w.shape[1],):
            raise ValueError(f"bias: expected shape [{w.shape[1]}] (N of w), got {list(bias.shape)}")
        ok = bias.dtype in FP8_OUT_DTYPES if fp8 else bias.dtype == x.dtype
        if not ok or bias.device != x.device:
            want = f"one of {FP8_OUT_DTYPES}" if fp8 else str(x.dtype)
            raise TypeError(f"bias: expected {want} on {x.device}, got {bias.dtype} on {bias.device}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
    if dim is None:
        return -1
    if not -x.ndim <= dim < x.ndim - 1:
        raise ValueError(f"dim: expected a row dim of {x_name} (not the last, K), in [-{x.ndim}, {x.ndim - 2}], got {dim}")
    return dim % x.ndim


def _check_out(out: Tensor | None, shape: Sequence[int], like: Tensor, *, name: str = "out",
               dtype: torch.dtype | None = None) -> None:
    if out is None:
        return
    if list(out.shape) != list(shape):
        raise ValueError(f"{name}: expected shape {list(shape)}, got {list(out.shape)}")
    if out.dtype != (dtype or like.dtype):
        raise TypeError(f"{name}: expected dtype {dtype or like.dtype}, got {out.dtype}")
    if out.device != like.device:
        raise ValueError(f"{name}: expected device {like.device}, got {out.device}")


def _check_fp8(x: Tensor, w: Tensor, x_scale: Tensor | None, w_scale: Tensor | None, out_dtype: torch.dtype | None,
               *, x_name: str, out: Tensor | None = None) -> torch.dtype:
    """Check the fp8 arguments of a schedule; return the output dtype: x's own without fp8;
    with fp8 `out_dtype`, else `out`'s, else bf16."""
    if not is_fp8(x.dtype):
        for name, v in (("x_scale", x_scale), ("w_scale", w_scale)):
            if v is not None:
                raise TypeError(f"{name}: applies to fp8 operands only, but {x_name} has dtype {x.dtype}")
        if out_dtype is not None and out_dtype != x.dtype:
            raise TypeError(f"out_dtype: expected None or {x.dtype} (the dtype of {x_name}), got {out_dtype}")
        return x.dtype
    for name, v, shape in (("x_scale", x_scale, [*x.shape[:-1], 1]), ("w_scale", w_scale, [1, w.shape[1]])):
        if v is None:
            continue
        if not isinstance(v, Tensor) or v.dtype != torch.float32 or v.device != x.device:
            got = f"{v.dtype} on {v.device}" if isinstance(v, Tensor) else type(v).__name__
            raise TypeError(f"{name}: expected a float32 tensor on {x.device}, got {got}")
        if v.numel() != 1 and list(v.shape) != shape:
            raise ValueError(f"{name}: expected one element (per tensor) or shape {shape}, got {list(v.shape)}")
    if out_dtype is not None and out_dtype not in FP8_OUT_DTYPES:
        raise TypeError(f"out_dtype: expected one of {FP8_OUT_DTYPES} for fp8 operands, got {out_dtype}")
    if out_dtype is None and isinstance(out, Tensor) and out.dtype in FP8_OUT_DTYPES:
        return out.dtype
    return out_dtype or torch.bfloat16


def _scale_rows(x_scale: Tensor | None, x: Tensor, dim: int) -> Tensor:
    """An fp8 operand's scales as one float32 per row of `_to_rows(x, dim)`, `[rows, 1]`
    contiguous (a per-tensor scale repeated: gathered rows of different ranks need their own)."""
    if x_scale is None:
        x_scale = torch.ones((), dtype=torch.float32, device=x.device)
    rows, _ = _to_rows(x_scale.reshape(()).expand(*x.shape[:-1], 1) if x_scale.numel() == 1 else x_scale, dim)
    return rows.contiguous()


def _fp8_kw(a_scale: Tensor | None, w_scale: Tensor | None, fp8: bool) -> dict[str, Tensor | None]:
    """The scale arguments of `kernels.matmul` for one piece (none without fp8)."""
    return {"a_scale": a_scale, "b_scale": w_scale} if fp8 else {}


def _as_bytes(t: Tensor) -> Tensor:
    """fp8 moves as bytes: gloo has no fp8 dtype, and a gather or send never does arithmetic."""
    return t.view(torch.uint8) if is_fp8(t.dtype) else t


def _fp8_row_layout(k: int) -> tuple[int, int]:
    """(scale offset, row bytes) of a packed fp8 row: its K fp8 bytes, its float32 scale at
    the next 4-byte boundary, padded to 16 bytes so that the gathered rows stay aligned for
    TMA. One message per piece carries rows and scales together (a second send per hop would
    add a collective's latency to every step of the ring)."""
    offset = -(-k // 4) * 4
    return offset, -(-(offset + 4) // 16) * 16


def _pack_fp8_rows(x_rows: Tensor, s_rows: Tensor) -> Tensor:
    """`x_rows` [m, K] fp8 and `s_rows` [m, 1] float32 as packed rows [m, row bytes] uint8."""
    m, k = x_rows.shape
    offset, row_bytes = _fp8_row_layout(k)
    packed = torch.empty(m, row_bytes, dtype=torch.uint8, device=x_rows.device)
    packed[:, :k].copy_(x_rows.view(torch.uint8))
    packed[:, offset:offset + 4].view(torch.float32).copy_(s_rows)
    packed[:, k:offset].zero_()  # padding: defined bytes on the wire
    packed[:, offset + 4:].zero_()
    return packed


def _unpack_fp8_rows(packed: Tensor, k: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Views of packed rows [r, row bytes]: the fp8 rows [r, K] and their scales [r, 1]."""
    offset, _ = _fp8_row_layout(k)
    return packed[:, :k].view(dtype), packed[:, offset:offset + 4].view(torch.float32)


def _check_scatter_dim(x: Tensor, dim: int, world: int) -> None:
    if x.shape[dim] % world:
        raise ValueError(
            f"x.shape[{dim}]: expected a multiple of the group's world size {world} "
            f"(reduce-scatter splits it evenly), got {x.shape[dim]}"
        )


def _check_chunks(chunks: int | None) -> None:
    if chunks is not None and (not isinstance(chunks, int) or isinstance(chunks, bool) or chunks < 1):
        raise ValueError(f"chunks: expected None or an int >= 1, got {chunks!r}")


def _to_rows(x: Tensor, dim: int) -> tuple[Tensor, tuple[int, ...]]:
    """View (or, for dim != 0, copy) `x` as `[rows, K]` with `dim` outermost; return the row shape."""
    moved = x.movedim(dim, 0) if dim != 0 else x
    return moved.reshape(-1, x.shape[-1]), tuple(moved.shape[:-1])


def _from_rows(y: Tensor, row_shape: Sequence[int], dim: int) -> Tensor:
    """Inverse of `_to_rows` for an output `[rows, N]`: contiguous, with `dim` back in place."""
    y = y.view(*row_shape, y.shape[-1])
    return y.movedim(0, dim).contiguous() if dim != 0 else y


def _epilogue(y: Tensor, bias: Tensor | None, activation: str | None) -> None:
    """Bias and activation applied in place after a reduction (they must not be summed twice)."""
    if bias is not None:
        y.add_(bias)
    if activation == "relu":
        y.relu_()
    elif activation == "silu":
        y.copy_(F.silu(y))
    elif activation == "gelu":
        y.copy_(F.gelu(y))
    elif activation == "gelu_tanh":
        y.copy_(F.gelu(y, approximate="tanh"))


def _resolve_chunks(
    chunks: int | None, op: str, *, m: int, n: int, k: int, world: int, x: Tensor, dtype: torch.dtype | None = None
) -> int:
    """The chunk count to run: the caller's, or the cost model's choice from global shapes
    (in `dtype`, default x's: an fp8 reduction passes its output dtype, whose bytes move)."""
    if chunks is not None:
        return chunks
    dtype = dtype or x.dtype
    # the plan is a pure function of the shapes and the device spec: chosen once per key
    key = (op, m, n, k, world, dtype, x.device, costmodel._generation)
    found = _CHUNK_PLANS.get(key)
    if found is None:
        if len(_CHUNK_PLANS) >= 4096:  # shapes that keep changing (varying batches): bound it
            _CHUNK_PLANS.clear()
        found = _CHUNK_PLANS[key] = costmodel.choose_chunks(
            op, m=m, n=n, k=k, world_size=world, dtype=dtype, device=costmodel.device_spec_for(x.device)
        )
    return found


_CHUNK_PLANS: dict[tuple, int] = {}


def _call_key(x: Any, w: Any, bias: Any, out: Any, activation: Any, chunks: Any, out_dtype: Any,
              world: int) -> tuple | None:
    """What a schedule's checks and chunk plan depend on, or None where that is not plain
    tensors and hashable knobs (then the call is checked in full, and raises if it must)."""
    if not (isinstance(x, Tensor) and isinstance(w, Tensor) and (bias is None or isinstance(bias, Tensor))
            and (out is None or isinstance(out, Tensor)) and isinstance(activation, (str, type(None)))
            and isinstance(chunks, (int, type(None))) and isinstance(out_dtype, (torch.dtype, type(None)))):
        return None
    return (x.shape, x.dtype, x.device, w.shape, w.dtype, w.device,
            None if bias is None else (bias.shape, bias.dtype, bias.device),
            None if out is None else (out.shape, out.dtype, out.device),
            activation, chunks, out_dtype, world, costmodel._generation)


_CALL_PLANS: dict[tuple, tuple] = {}


def _remember(key: tuple, plan: tuple) -> None:
    if len(_CALL_PLANS) >= 4096:  # shapes that keep changing (varying batches): bound it
        _CALL_PLANS.clear()
    _CALL_PLANS[key] = plan


class _Pipeline:
    """Fork/join between the compute stream and the comm stream for one schedule.

    On CPU both are the host thread and each call is a plain call; on GPU, collectives are
    issued with the comm stream current, so NCCL orders them after exactly what the comm
    stream waited on (not after every GEMM queued on the compute stream before them).
    """

    def __init__(self, device: torch.device) -> None:
        self.streams = StreamSet.for_device(device)
        self.cuda = device.type == "cuda"

    @staticmethod
    def for_device(device: torch.device) -> _Pipeline:
        """One per device (it holds only the device's streams, read at use time)."""
        found = _PIPELINES.get(device)
        if found is None:
            found = _PIPELINES[device] = _Pipeline(device)
        return found

    def issue(self, start: Callable[[], CollectiveHandle], *, after: CollectiveHandle | None = None) -> CollectiveHandle:
        """Issue a collective ordered after the compute stream so far, or only after `after`."""
        if not self.cuda:
            if after is not None:
                after.wait()
            return start()
        comm, compute = self.streams.comm, self.streams.compute
        if after is None:
            comm.wait_stream(compute)
        with torch.cuda.stream(comm):
            if after is not None:
                after.wait()
            return start()


_PIPELINES: dict[torch.device, _Pipeline] = {}


class PendingOutput:
    """The output of a schedule whose last collectives are still in flight (`async_op=True`).

    `wait()` orders the caller after them, applies the epilogue and returns the output.
    """

    def __init__(self, finish: Callable[[], Tensor]) -> None:
        self._finish: Callable[[], Tensor] | None = finish
        self._value: Tensor | None = None

    def wait(self) -> Tensor:
        if self._finish is not None:
            self._value, self._finish = self._finish(), None
        assert self._value is not None
        return self._value


# --------------------------------------------------------------------------------------------
# all_gather_matmul
# --------------------------------------------------------------------------------------------


def all_gather_matmul(
    x_shard: Tensor,
    w: Tensor,
    *,
    group: dist.ProcessGroup | Communicator,
    dim: int = 0,
    bias: Tensor | None = None,
    activation: str | None = None,
    chunks: int | None = None,
    out: Tensor | None = None,
    return_gathered: bool = False,
    kernel: str = "auto",
    comm: str = "torch",
    debug: bool | None = None,
    x_scale: Tensor | None = None,
    w_scale: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor | tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    """Computes `act(all_gather(x_shard, dim) @ w + bias)`, overlapping the gather with the GEMMs.

    x_shard `[..., m, ..., K]` split on `dim`; w `[K, N]` local (e.g. a column shard of a
    weight); returns `[..., world*m, ..., N]` (and, with `return_gathered`, the gathered
    input `[..., world*m, ..., K]`, which backward can keep instead of re-gathering).

    chunks=1: one all-gather, then one GEMM. chunks=c ≥ 2: a ring. Each rank computes its
    own shard's rows at once, while every shard travels one hop per step to the next rank;
    the GEMM on the shard that arrived at step t runs while step t+1 is in flight. Each
    shard is cut into ceil(c / world) pieces, so the pipeline has world*ceil(c/world) GEMMs
    (the ring moves whole shards, so c is rounded up to a multiple of the world size):

        comm:    [send/recv 1][send/recv 2][send/recv 3]
        compute: [mm local   ][mm from r-1][mm from r-2][mm from r-3]

    Each piece lands directly in its place in the gathered buffer `[world*m, K]`, so the
    extra memory over the unfused op is zero (both hold the gathered input and the output).

    fp8 (`x_shard` and `w` fp8, `x_scale` one per tensor or `[..., m, ..., 1]` per row,
    `w_scale` one or `[1, N]`): the ring moves the fp8 rows packed with one float32 scale
    each (a per-tensor scale is repeated per row, since each rank's differs), `K + 16`
    bytes a row (scale and 16-byte alignment) against bf16's `2K`, and each piece runs the
    fp8 GEMM with its rows' scales; the output is `out_dtype` (bf16 by default).
    `return_gathered` then returns `(y, x_full, x_scale_full)`, views of the packed rows.
    """
    dim = _check_operands(x_shard, w, bias, activation, x_name="x_shard", dim=dim)
    out_dtype = _check_fp8(x_shard, w, x_scale, w_scale, out_dtype, x_name="x_shard", out=out)
    fp8 = is_fp8(x_shard.dtype)
    _check_chunks(chunks)
    communicator = get_communicator(group, comm)
    world = communicator.world_size
    out_shape = list(x_shard.shape[:-1]) + [w.shape[1]]
    out_shape[dim] *= world
    _check_out(out, out_shape, x_shard, dtype=out_dtype)
    x_rows, row_shape = _to_rows(x_shard, dim)
    s_rows = _scale_rows(x_scale, x_shard, dim) if fp8 else None
    m, k, n = x_rows.shape[0], x_rows.shape[1], w.shape[1]
    chunks = _resolve_chunks(chunks, "all_gather_matmul", m=m * world, n=n, k=k, world=world, x=x_shard)
    if checks.debug_enabled(debug):  # the fingerprint's fields are built only when it runs
        checks.maybe_check_consistent(
            communicator, "all_gather_matmul", debug,
            x_shard=(list(x_shard.shape), str(x_shard.dtype)), w=list(w.shape), dim=dim, chunks=chunks,
            bias=bias is not None, activation=activation,
        )

    # Outputs in row layout; for dim == 0 these are views of `out` itself (written in place).
    direct = dim == 0 and out is not None
    y_rows = out.view(world * m, n) if direct and out.is_contiguous() else \
        torch.empty(world * m, n, dtype=out_dtype, device=x_rows.device)
    # A world of one gathers nothing: its "gathered" input is its own shard (no copy).
    # fp8 rows travel packed with their scales (one message per piece); `gathered` and
    # `s_gathered` are then views of the packed buffer.
    send = _pack_fp8_rows(x_rows, s_rows) if fp8 and world > 1 else x_rows
    wire = send if world == 1 else send.new_empty(world * m, send.shape[1])
    gathered, s_gathered = _unpack_fp8_rows(wire, k, x_rows.dtype) if fp8 and world > 1 else (wire, s_rows)

    with nvtx_range(f"all_gather_matmul c={chunks}"):
        if world == 1:
            matmul(x_rows, w, bias=bias, activation=activation, out=y_rows, kernel=kernel,
                   **_fp8_kw(s_rows, w_scale, fp8))
        elif chunks == 1:
            _pipeline_single_all_gather(communicator, send, wire)
            matmul(gathered, w, bias=bias, activation=activation, out=y_rows, kernel=kernel,
                   **_fp8_kw(s_gathered, w_scale, fp8))
        else:
            y3 = y_rows.view(world, m, n)

            def consume(src: int, rows: slice, block: Tensor) -> None:
                a, a_s = _unpack_fp8_rows(block, k, x_rows.dtype) if fp8 else (block, None)
                matmul(a, w, bias=bias, activation=activation, out=y3[src, rows], kernel=kernel,
                       **_fp8_kw(a_s, w_scale, fp8))

            _ring_all_gather(communicator, send, wire, pieces=-(-chunks // world), consume=consume)

    full_shape = _gathered_shape(row_shape, world)
    y = _from_rows_out(y_rows, full_shape, dim, out)
    if not return_gathered:
        return y
    if fp8:
        return y, _from_rows(gathered, full_shape, dim), _from_rows(s_gathered, full_shape, dim)
    return y, _from_rows(gathered, full_shape, dim)


def _gathered_shape(row_shape: Sequence[int], world: int) -> tuple[int, ...]:
    """The row shape (gathered dim first) of `world` shards gathered on their first dim."""
    return (row_shape[0] * world, *row_shape[1:])


def _into(out: Tensor | None, y: Tensor) -> Tensor:
    """Return `out` holding `y` (copying unless `y` was computed in place), or `y`."""
    if out is None:
        return y
    if y.data_ptr() != out.data_ptr() or y.stride() != out.stride():
        out.copy_(y)
    return out


def _from_rows_out(y_rows: Tensor, row_shape: Sequence[int], dim: int, out: Tensor | None) -> Tensor:
    return _into(out, _from_rows(y_rows, row_shape, dim))


def _pipeline_single_all_gather(communicator: Communicator, x_rows: Tensor, gathered: Tensor) -> None:
    pipe = _Pipeline.for_device(x_rows.device)
    x_send = x_rows.contiguous()
    handle = pipe.issue(lambda: communicator.all_gather(gathered, x_send))
    handle.wait()


def _ring_all_gather(
    communicator: Communicator,
    x_rows: Tensor,
    gathered: Tensor,
    *,
    pieces: int,
    consume: Callable[[int, slice, Tensor], None],
) -> None:
    """Gather `x_rows` of every rank into `gathered` by a ring, calling `consume` per piece.

    `consume(src, rows, block)` receives rank `src`'s rows `rows` (a slice of its shard) as
    `block`, in ring order starting from this rank's own shard, so the first call needs no
    communication at all. Step t receives from rank-1 the shard of rank-t and forwards it
    on the next step; pieces land in place in `gathered` (`[world*m, K]`, rank-major).
    """
    world, rank = communicator.world_size, communicator.rank
    m, k = x_rows.shape
    x_send = x_rows.contiguous()
    g3 = gathered.view(world, m, k)
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    piece_rows = split_rows(m, pieces)
    pipe = _Pipeline.for_device(x_rows.device)
    recv_done: dict[tuple[int, int], CollectiveHandle] = {}

    def src_at(step: int) -> int:
        return (rank - step) % world

    def issue(step: int, q: int, after: CollectiveHandle | None) -> None:
        s, e = piece_rows[q]
        send = x_send[s:e] if step == 1 else g3[src_at(step - 1), s:e]
        recv = g3[src_at(step), s:e]
        recv_done[step, q] = pipe.issue(lambda: communicator.send_recv(send, nxt, recv, prv), after=after)

    for q in range(len(piece_rows)):
        issue(1, q, None)
    g3[rank].copy_(x_send)  # our own rows of the gathered input, while step 1 is in flight
    with nvtx_range("consume local"):
        consume(rank, slice(0, m), x_send)
    for step in range(1, world):
        for q, (s, e) in enumerate(piece_rows):
            handle = recv_done.pop((step, q))
            if step + 1 < world:
                issue(step + 1, q, handle)  # forward what just arrived; waits only on its arrival
            handle.wait()
            with nvtx_range(f"consume step {step} piece {q}"):
                consume(src_at(step), slice(s, e), g3[src_at(step), s:e])


def all_gather_matmul_reference(
    x_shard: Tensor,
    w: Tensor,
    *,
    group: dist.ProcessGroup | Communicator,
    dim: int = 0,
    bias: Tensor | None = None,
    activation: str | None = None,
    chunks: int | None = None,
    out: Tensor | None = None,
    return_gathered: bool = False,
    kernel: str = "auto",
    comm: str = "torch",
    debug: bool | None = None,
    x_scale: Tensor | None = None,
    w_scale: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor | tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    """Unfused `all_gather_matmul`: a blocking all-gather, then `torch.matmul` (same signature;
    fp8: the fp8 rows and their scales gathered, the product computed in fp32 from them)."""
    dim = _check_operands(x_shard, w, bias, activation, x_name="x_shard", dim=dim)
    out_dtype = _check_fp8(x_shard, w, x_scale, w_scale, out_dtype, x_name="x_shard", out=out)
    fp8 = is_fp8(x_shard.dtype)
    communicator = get_communicator(group, comm)
    world = communicator.world_size
    x_rows, row_shape = _to_rows(x_shard, dim)
    gathered = x_rows.new_empty(world * x_rows.shape[0], x_rows.shape[1])
    communicator.all_gather(_as_bytes(gathered), _as_bytes(x_rows.contiguous())).wait()
    full_shape = _gathered_shape(row_shape, world)
    if fp8:
        s_gathered = torch.empty(world * x_rows.shape[0], 1, dtype=torch.float32, device=x_rows.device)
        communicator.all_gather(s_gathered, _scale_rows(x_scale, x_shard, dim)).wait()
        ws = w_scale if w_scale is not None else s_gathered.new_ones(())
        y_rows = torch_scaled_product(gathered, w, s_gathered, ws)
    else:
        y_rows = gathered @ w
    _epilogue(y_rows, bias, activation)
    y = _from_rows_out(y_rows.to(out_dtype), full_shape, dim, out)
    if not return_gathered:
        return y
    if fp8:
        return y, _from_rows(gathered, full_shape, dim), _from_rows(s_gathered, full_shape, dim)
    return y, _from_rows(gathered, full_shape, dim)


# --------------------------------------------------------------------------------------------
# matmul_reduce_scatter
# --------------------------------------------------------------------------------------------


def matmul_reduce_scatter(
    x: Tensor,
    w: Tensor,
    *,
    group: dist.ProcessGroup | Communicator,
    dim: int = 0,
    bias: Tensor | None = None,
    activation: str | None = None,
    chunks: int | None = None,
    out: Tensor | None = None,
    async_op: bool = False,
    kernel: str = "auto",
    comm: str = "torch",
    debug: bool | None = None,
    x_scale: Tensor | None = None,
    w_scale: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor | PendingOutput:
    """Computes `act(reduce_scatter(x @ w, dim) + bias)`, overlapping each piece's reduction.

    x `[..., M, ..., K]` full on `dim` (M divisible by the world size), w `[K, N]` local
    (e.g. a row shard of a weight, so `x @ w` is a partial sum); returns this rank's
    `[..., M/world, ..., N]` block of the sum, rows in rank order as the unfused op.
    Bias and activation are applied once, after the reduction.

    Each rank's destination block is cut into `chunks` row pieces; piece j of every block
    is computed by one (batched, strided) GEMM into a buffer and reduce-scattered while
    piece j+1 is computed. At most MAX_IN_FLIGHT=2 piece buffers exist at once, each
    `[world*M/(world*chunks), N]`: extra memory is 2/chunks of the unfused op's `[M, N]`
    partial-sum buffer, which this schedule never allocates (so for chunks ≥ 2 it needs no
    more memory than the unfused op):

        compute: [mm 0][mm 1][mm 2][mm 3]
        comm:          [rs 0][rs 1][rs 2][rs 3]

    With `async_op=True` the last reductions may still be in flight: a `PendingOutput` is
    returned and its `wait()` gives the result (backward overlaps its wgrad this way).

    fp8 (`x`, `w` fp8 with `x_scale` / `w_scale` as in `kernels.matmul`): the GEMMs run in
    fp8 and the partial sums are written and reduce-scattered in `out_dtype` (bf16 by
    default), never fp8 (module docstring).
    """
    dim = _check_operands(x, w, bias, activation, x_name="x", dim=dim)
    out_dtype = _check_fp8(x, w, x_scale, w_scale, out_dtype, x_name="x", out=out)
    fp8 = is_fp8(x.dtype)
    _check_chunks(chunks)
    communicator = get_communicator(group, comm)
    world = communicator.world_size
    _check_scatter_dim(x, dim, world)
    out_shape = list(x.shape[:-1]) + [w.shape[1]]
    out_shape[dim] //= world
    _check_out(out, out_shape, x, dtype=out_dtype)
    x_rows, row_shape = _to_rows(x, dim)
    s_rows = _scale_rows(x_scale, x, dim) if fp8 else None
    rows, k, n = x_rows.shape[0], x_rows.shape[1], w.shape[1]
    m = rows // world
    chunks = _resolve_chunks(chunks, "matmul_reduce_scatter", m=rows, n=n, k=k, world=world, x=x, dtype=out_dtype)
    if checks.debug_enabled(debug):  # the fingerprint's fields are built only when it runs
        checks.maybe_check_consistent(
            communicator, "matmul_reduce_scatter", debug,
            x=(list(x.shape), str(x.dtype)), w=list(w.shape), dim=dim, chunks=chunks,
            bias=bias is not None, activation=activation,
        )
    out_row_shape = (row_shape[0] // world, *row_shape[1:])
    direct = dim == 0 and out is not None and out.is_contiguous()
    y_rows = out.view(m, n) if direct else torch.empty(m, n, dtype=out_dtype, device=x.device)
    pipe = _Pipeline.for_device(x.device)
    handles: list[tuple[CollectiveHandle, tuple[int, int]]] = []

    with nvtx_range(f"matmul_reduce_scatter c={chunks}"):
        if world == 1:
            matmul(x_rows, w, bias=bias, activation=activation, out=y_rows, kernel=kernel,
                   **_fp8_kw(s_rows, w_scale, fp8))
            return _done(_from_rows_out(y_rows, out_row_shape, dim, out), async_op)
        x3 = x_rows.view(world, m, k)
        s3 = s_rows.view(world, m, 1) if fp8 else None
        pieces = split_rows(m, chunks)
        buffers: list[Tensor | None] = [None] * min(MAX_IN_FLIGHT, len(pieces))
        for j, (s, e) in enumerate(pieces):
            slot = j % len(buffers)
            if j >= len(buffers):
                handles[j - len(buffers)][0].wait()  # its buffer is about to be overwritten
            buf = buffers[slot]
            if buf is None or buf.shape[1] != e - s:
                buf = buffers[slot] = torch.empty(world, e - s, n, dtype=out_dtype, device=x.device)
            with nvtx_range(f"mm piece {j}"):
                matmul(x3[:, s:e], w, out=buf, kernel=kernel, **_fp8_kw(s3[:, s:e] if fp8 else None, w_scale, fp8))
            dst, src = y_rows[s:e], buf.view(world * (e - s), n)
            handles.append((pipe.issue(lambda dst=dst, src=src: communicator.reduce_scatter(dst, src)), (s, e)))

    def finish() -> Tensor:
        for handle, (s, e) in handles:
            handle.wait()
            _epilogue(y_rows[s:e], bias, activation)
        return _from_rows_out(y_rows, out_row_shape, dim, out)

    return PendingOutput(finish) if async_op else finish()


def _reference_product(x_rows: Tensor, w: Tensor, s_rows: Tensor, w_scale: Tensor | None,
                       out_dtype: torch.dtype) -> Tensor:
    """The references' fp8 product: fp32 from the scaled fp8 operands, in `out_dtype`."""
    ws = w_scale if w_scale is not None else s_rows.new_ones(())
    return torch_scaled_product(x_rows, w, s_rows, ws).to(out_dtype).contiguous()


def _done(y: Tensor, async_op: bool) -> Tensor | PendingOutput:
    return PendingOutput(lambda: y) if async_op else y


def matmul_reduce_scatter_reference(
    x: Tensor,
    w: Tensor,
    *,
    group: dist.ProcessGroup | Communicator,
    dim: int = 0,
    bias: Tensor | None = None,
    activation: str | None = None,
    chunks: int | None = None,
    out: Tensor | None = None,
    async_op: bool = False,
    kernel: str = "auto",
    comm: str = "torch",
    debug: bool | None = None,
    x_scale: Tensor | None = None,
    w_scale: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor | PendingOutput:
    """Unfused `matmul_reduce_scatter`: `torch.matmul`, then a blocking reduce-scatter (fp8:
    the product in fp32 from the scaled fp8 operands, reduced in `out_dtype`)."""
    dim = _check_operands(x, w, bias, activation, x_name="x", dim=dim)
    out_dtype = _check_fp8(x, w, x_scale, w_scale, out_dtype, x_name="x", out=out)
    communicator = get_communicator(group, comm)
    world = communicator.world_size
    _check_scatter_dim(x, dim, world)
    x_rows, row_shape = _to_rows(x, dim)
    partial = _reference_product(x_rows, w, _scale_rows(x_scale, x, dim), w_scale, out_dtype) \
        if is_fp8(x.dtype) else x_rows @ w
    y_rows = partial.new_empty(partial.shape[0] // world, partial.shape[1])
    communicator.reduce_scatter(y_rows, partial).wait()
    _epilogue(y_rows, bias, activation)
    y = _from_rows_out(y_rows, (row_shape[0] // world, *row_shape[1:]), dim, out)
    return _done(y, async_op)


# --------------------------------------------------------------------------------------------
# matmul_all_reduce
# --------------------------------------------------------------------------------------------


def matmul_all_reduce(
    x: Tensor,
    w: Tensor,
    *,
    group: dist.ProcessGroup | Communicator,
    bias: Tensor | None = None,
    activation: str | None = None,
    chunks: int | None = None,
    out: Tensor | None = None,
    async_op: bool = False,
    kernel: str = "auto",
    comm: str = "torch",
    debug: bool | None = None,
    x_scale: Tensor | None = None,
    w_scale: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor | PendingOutput:
    """Computes `act(all_reduce(x @ w) + bias)`, overlapping each row piece's all-reduce.

    x `[..., K]` (rows replicated, K split across ranks), w `[K, N]` local (a row shard),
    so `x @ w` is a partial sum; returns the full `[..., N]` on every rank. Bias and
    activation are applied once, after the reduction. Rows are cut into `chunks` pieces,
    each computed straight into the output and all-reduced in place while the next piece
    is computed, so the schedule needs no memory beyond the output:

        compute: [mm 0][mm 1][mm 2][mm 3]
        comm:          [ar 0][ar 1][ar 2][ar 3]

    fp8 as in `matmul_reduce_scatter`: fp8 GEMMs, partial sums all-reduced in `out_dtype`.
    """
    communicator = get_communicator(group, comm)
    world = communicator.world_size
    # the checks and the chunk plan depend only on shapes, dtypes, devices and knobs: made
    # once per key (a decode step repeats the same call), not per call
    key = _call_key(x, w, bias, out, activation, chunks, out_dtype, world) \
        if x_scale is None and w_scale is None else None
    plan = _CALL_PLANS.get(key) if key is not None else None
    if plan is None:
        _check_operands(x, w, bias, activation, x_name="x", dim=None)
        out_dtype = _check_fp8(x, w, x_scale, w_scale, out_dtype, x_name="x", out=out)
        _check_chunks(chunks)
        _check_out(out, list(x.shape[:-1]) + [w.shape[1]], x, dtype=out_dtype)
        rows = math.prod(x.shape[:-1])
        chunks = _resolve_chunks(chunks, "matmul_all_reduce", m=rows, n=w.shape[1], k=x.shape[-1], world=world,
                                 x=x, dtype=out_dtype)
        plan = (out_dtype, chunks)
        if key is not None:
            _remember(key, plan)
    out_dtype, chunks = plan
    fp8 = is_fp8(x.dtype)
    out_shape = list(x.shape[:-1]) + [w.shape[1]]
    x_rows = x.reshape(-1, x.shape[-1])
    s_rows = _scale_rows(x_scale, x, 0) if fp8 else None
    rows, k, n = x_rows.shape[0], x_rows.shape[1], w.shape[1]
    if checks.debug_enabled(debug):  # the fingerprint's fields are built only when it runs
        checks.maybe_check_consistent(
            communicator, "matmul_all_reduce", debug,
            x=(list(x.shape), str(x.dtype)), w=list(w.shape), chunks=chunks,
            bias=bias is not None, activation=activation,
        )
    y_rows = out.view(rows, n) if out is not None and out.is_contiguous() else \
        torch.empty(rows, n, dtype=out_dtype, device=x.device)
    pipe = _Pipeline.for_device(x.device)
    if chunks == 1 and world > 1 and not async_op and not fp8:  # decode sizes: one GEMM, one all-reduce
        with nvtx_range("matmul_all_reduce c=1"):
            matmul(x_rows, w, out=y_rows, kernel=kernel)
            pipe.issue(lambda: communicator.all_reduce(y_rows)).wait()
        _epilogue(y_rows, bias, activation)
        return _from_rows_out(y_rows, out_shape[:-1], 0, out)
    handles: list[tuple[CollectiveHandle, tuple[int, int]]] = []
    with nvtx_range(f"matmul_all_reduce c={chunks}"):
        if world == 1:
            matmul(x_rows, w, bias=bias, activation=activation, out=y_rows, kernel=kernel,
                   **_fp8_kw(s_rows, w_scale, fp8))
            return _done(_from_rows_out(y_rows, out_shape[:-1], 0, out), async_op)
        pieces = split_rows(rows, chunks)
        whole = len(pieces) == 1  # one piece (decode sizes): the whole tensors, no slices
        for j, (s, e) in enumerate(pieces):
            with nvtx_range(f"mm piece {j}"):
                matmul(x_rows if whole else x_rows[s:e], w, out=y_rows if whole else y_rows[s:e], kernel=kernel,
                       **_fp8_kw((s_rows if whole else s_rows[s:e]) if fp8 else None, w_scale, fp8))
            piece = y_rows if whole else y_rows[s:e]
            handles.append((pipe.issue(lambda piece=piece: communicator.all_reduce(piece)), (s, e)))

    def finish() -> Tensor:
        for handle, (s, e) in handles:
            handle.wait()
            _epilogue(y_rows if whole else y_rows[s:e], bias, activation)
        return _from_rows_out(y_rows, out_shape[:-1], 0, out)

    return PendingOutput(finish) if async_op else finish()


def matmul_all_reduce_reference(
    x: Tensor,
    w: Tensor,
    *,
    group: dist.ProcessGroup | Communicator,
    bias: Tensor | None = None,
    activation: str | None = None,
    chunks: int | None = None,
    out: Tensor | None = None,
    async_op: bool = False,
    kernel: str = "auto",
    comm: str = "torch",
    debug: bool | None = None,
    x_scale: Tensor | None = None,
    w_scale: Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> Tensor | PendingOutput:
    """Unfused `matmul_all_reduce`: `torch.matmul`, then a blocking all-reduce (fp8 as in
    `matmul_reduce_scatter_reference`)."""
    _check_operands(x, w, bias, activation, x_name="x", dim=None)
    out_dtype = _check_fp8(x, w, x_scale, w_scale, out_dtype, x_name="x", out=out)
    communicator = get_communicator(group, comm)
    x_rows = x.reshape(-1, x.shape[-1])
    y = _reference_product(x_rows, w, _scale_rows(x_scale, x, 0), w_scale, out_dtype) if is_fp8(x.dtype) \
        else (x_rows @ w).contiguous()
    communicator.all_reduce(y).wait()
    _epilogue(y, bias, activation)
    return _done(_from_rows_out(y, list(x.shape[:-1]), 0, out), async_op)


# --------------------------------------------------------------------------------------------
# Backward blocks: a dgrad collective overlapped with the wgrad GEMM
# --------------------------------------------------------------------------------------------


def _fp8_dgrad(dy_rows: Tensor, dgrad_fp8: tuple[Tensor, Tensor | None], kernel: str) -> tuple[Tensor, Tensor, Tensor]:
    """`(dy_q, dy_scale, wt_q)` so that `dy_q @ wt_q * dy_scale ≈ dy @ w.T`: the weight's
    per-N scales (along the dgrad's reduction, where an epilogue cannot apply them) are
    folded into dy's columns before it is quantized to e5m2 per row."""
    wt_q, w_s = dgrad_fp8
    col = w_s.reshape(-1) if w_s is not None else None
    dy_q, dy_s = quantize_rowwise(dy_rows, torch.float8_e5m2, col_scale=col, kernel=kernel)
    return dy_q, dy_s, wt_q


def _start_dgrad(schedule: Callable[..., Any], dy: Tensor, w: Tensor, dgrad_fp8: tuple[Tensor, Tensor | None] | None,
                 *, kernel: str, **knobs: Any) -> PendingOutput:
    """`schedule(dy @ w.T)` started asynchronously (a matmul + reduce-scatter or all-reduce),
    in fp8 (e5m2 dy, the forward's fp8 weight) when `dgrad_fp8` is given."""
    if dgrad_fp8 is not None:
        dy_q, dy_s, wt_q = _fp8_dgrad(dy, dgrad_fp8, kernel)
        return schedule(dy_q, wt_q, x_scale=dy_s, out_dtype=dy.dtype, async_op=True, kernel=kernel, **knobs)
    return schedule(dy, w.t(), async_op=True, kernel=kernel, **knobs)


def _new_wgrad(w: Tensor) -> Tensor:
    """A `[K, N]` gradient for `w` laid out so that `.T` (the nn.Linear weight layout) is contiguous."""
    return w.new_empty(w.shape[1], w.shape[0]).t()


def _check_backward(dy: Tensor, w: Tensor, x: Tensor, *, dy_name: str,
                    dgrad_fp8: tuple[Tensor, Tensor | None] | None = None) -> None:
    key = None
    if dgrad_fp8 is None and isinstance(dy, Tensor) and isinstance(w, Tensor) and isinstance(x, Tensor):
        # checked once per (shapes, dtypes, devices), like the forward schedules
        key = ("backward", dy_name, dy.shape, dy.dtype, dy.device, w.shape, w.dtype, w.device, x.shape, x.dtype,
               x.device)
        if key in _CALL_PLANS:
            return
    _check_backward_args(dy, w, x, dy_name=dy_name, dgrad_fp8=dgrad_fp8)
    if key is not None:
        _remember(key, ())


def _check_backward_args(dy: Tensor, w: Tensor, x: Tensor, *, dy_name: str,
                         dgrad_fp8: tuple[Tensor, Tensor | None] | None) -> None:
    if dy.shape[-1] != w.shape[1]:
        raise ValueError(f"{dy_name}: expected last dim N = w.shape[1] = {w.shape[1]}, got {list(dy.shape)}")
    if x.shape[-1] != w.shape[0]:
        raise ValueError(f"x: expected last dim K = w.shape[0] = {w.shape[0]}, got {list(x.shape)}")
    if dgrad_fp8 is not None:
        if not isinstance(dgrad_fp8, (tuple, list)) or len(dgrad_fp8) != 2 or not isinstance(dgrad_fp8[0], Tensor):
            raise TypeError(f"dgrad_fp8: expected (wt_q, w_scale), got {type(dgrad_fp8).__name__}")
        wt_q, w_s = dgrad_fp8
        if not is_fp8(wt_q.dtype) or list(wt_q.shape) != [w.shape[1], w.shape[0]]:
            raise TypeError(f"dgrad_fp8: expected wt_q of an fp8 dtype and shape {[w.shape[1], w.shape[0]]} (w.T), "
                            f"got {wt_q.dtype} {list(wt_q.shape)}")
        if w_s is not None and (not isinstance(w_s, Tensor) or w_s.dtype != torch.float32
                                or w_s.numel() not in (1, w.shape[1])):
            got = f"{w_s.dtype} {list(w_s.shape)}" if isinstance(w_s, Tensor) else type(w_s).__name__
            raise TypeError(f"dgrad_fp8: expected w_scale float32 with 1 or N = {w.shape[1]} elements, got {got}")
    # with an fp8 dgrad, w only gives the wgrad its shape and dtype (an fp32 master weight's)
    for name, t in (("x", x),) if dgrad_fp8 is not None else (("x", x), ("w", w)):
        if t.dtype != dy.dtype:
            raise TypeError(f"{name}: expected dtype {dy.dtype} (the dtype of {dy_name}), got {t.dtype}")
        if t.device != dy.device:
            raise ValueError(f"{name}: expected device {dy.device} (the device of {dy_name}), got {t.device}")


def matmul_reduce_scatter_with_wgrad(
    dy: Tensor,
    w: Tensor,
    x: Tensor,
    *,
    group: dist.ProcessGroup | Communicator,
    x_is_gathered: bool,
    dim: int = 0,
    chunks: int | None = None,
    need_wgrad: bool = True,
    kernel: str = "auto",
    comm: str = "torch",
    debug: bool | None = None,
    dgrad_fp8: tuple[Tensor, Tensor | None] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Backward of `y = all_gather(x_shard, dim) @ w` (column-parallel, sequence-parallel).

    Computes `dx_shard = reduce_scatter(dy @ w.T, dim)` and `dw = x_full.T @ dy`, where
    `x_full = x` if `x_is_gathered` (kept from forward: more memory, no comm) else
    `all_gather(x, dim)` (re-gathered here: less memory, one more collective, issued first
    so it hides under the dgrad GEMMs). The dgrad reduce-scatters are still in flight
    while the wgrad GEMM runs:

        comm:    [ag x][rs 0][rs 1]      [rs 2]
        compute:       [dgrad 0][dgrad 1][dgrad 2][wgrad ........]

    dy `[..., M, ..., N]` full, w `[K, N]`; returns dx_shard `[..., M/world, ..., K]` and
    dw `[K, N]` (`dw.T` contiguous, the nn.Linear weight layout), or None with
    `need_wgrad=False` (a frozen weight: no wgrad GEMM, no re-gather).

    `dgrad_fp8=(wt_q, w_scale)`: the dgrad in fp8, `wt_q` being w.T `[N, K]` in e4m3 (K-major,
    i.e. a `.t()` of a contiguous `[K, N]`, for the TMA kernel) with `w_scale` its per-N (or
    per-tensor) scale; dy is quantized to e5m2 per row with w_scale folded in, and dx comes
    out in dy's dtype. The wgrad still uses dy as given, and dw has w's dtype (w may then be
    an fp32 master weight: it only gives dw its shape and dtype).
    """
    _check_backward(dy, w, x, dy_name="dy", dgrad_fp8=dgrad_fp8)
    communicator = get_communicator(group, comm)
    dim = dim % dy.ndim
    x_gather: CollectiveHandle | None = None
    if not need_wgrad:
        x_full_rows = None
    elif x_is_gathered or communicator.world_size == 1:
        x_full_rows, _ = _to_rows(x, dim)
    else:
        x_rows, _ = _to_rows(x, dim)
        x_rows = x_rows.contiguous()
        x_full_rows = x_rows.new_empty(communicator.world_size * x_rows.shape[0], x_rows.shape[1])
        x_gather = _Pipeline.for_device(x.device).issue(lambda: communicator.all_gather(x_full_rows, x_rows))
    pending = _start_dgrad(matmul_reduce_scatter, dy, w, dgrad_fp8, kernel=kernel, group=communicator, dim=dim,
                           chunks=chunks, debug=debug)
    dw = None
    if x_full_rows is not None:
        if x_gather is not None:
            x_gather.wait()
        dy_rows, _ = _to_rows(dy, dim)
        dw = _new_wgrad(w)
        with nvtx_range("wgrad"):
            matmul(x_full_rows.t(), dy_rows, out=dw, kernel=kernel)
    assert isinstance(pending, PendingOutput)
    return pending.wait(), dw


def matmul_all_reduce_with_wgrad(
    dy: Tensor,
    w: Tensor,
    x: Tensor,
    *,
    group: dist.ProcessGroup | Communicator,
    chunks: int | None = None,
    need_wgrad: bool = True,
    kernel: str = "auto",
    comm: str = "torch",
    debug: bool | None = None,
    dgrad_fp8: tuple[Tensor, Tensor | None] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Backward of `y = x @ w` with x replicated and w a column shard (column-parallel).

    Computes `dx = all_reduce(dy @ w.T)` (chunked; the last all-reduces still in flight
    while the wgrad runs) and `dw = x.T @ dy`:

        comm:            [ar 0][ar 1][ar 2]
        compute: [dgrad 0][dgrad 1][dgrad 2][wgrad ........]

    dy `[..., N]`, w `[K, N]`, x `[..., K]`; returns dx `[..., K]` (full) and dw `[K, N]`
    (None with `need_wgrad=False`). `dgrad_fp8` as in `matmul_reduce_scatter_with_wgrad`.
    """
    _check_backward(dy, w, x, dy_name="dy", dgrad_fp8=dgrad_fp8)
    pending = _start_dgrad(matmul_all_reduce, dy, w, dgrad_fp8, kernel=kernel, group=group, chunks=chunks,
                           comm=comm, debug=debug)
    dw = None
    if need_wgrad:
        dw = _new_wgrad(w)
        with nvtx_range("wgrad"):
            matmul(x.reshape(-1, x.shape[-1]).t(), dy.reshape(-1, dy.shape[-1]), out=dw, kernel=kernel)
    assert isinstance(pending, PendingOutput)
    return pending.wait(), dw


def all_gather_matmul_with_wgrad(
    dy_shard: Tensor,
    w: Tensor,
    x: Tensor,
    *,
    group: dist.ProcessGroup | Communicator,
    dim: int = 0,
    chunks: int | None = None,
    need_wgrad: bool = True,
    kernel: str = "auto",
    comm: str = "torch",
    debug: bool | None = None,
    dgrad_fp8: tuple[Tensor, Tensor | None] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Backward of `y_shard = reduce_scatter(x @ w, dim)` (row-parallel, sequence-parallel).

    Computes `dx = all_gather(dy_shard, dim) @ w.T` and `dw = x.T @ all_gather(dy_shard, dim)`.
    Both GEMMs consume each gathered piece of dy as it arrives in the ring (the wgrad
    accumulates one `x[rows].T @ dy[rows]` term per piece), so the whole gather hides
    under dgrad and wgrad work:

        comm:    [send/recv 1        ][send/recv 2        ]
        compute: [dgrad local][wgrad local][dgrad r-1][wgrad r-1][dgrad r-2][wgrad r-2]

    dy_shard `[..., M/world, ..., N]`, w `[K, N]`, x `[..., M, ..., K]`; returns dx
    `[..., M, ..., K]` and dw `[K, N]` (None with `need_wgrad=False`: no wgrad GEMMs).

    `dgrad_fp8` as in `matmul_reduce_scatter_with_wgrad`: each gathered piece of dy is
    quantized to e5m2 as it arrives for the fp8 dgrad, while the ring still moves dy in its
    own dtype, because the wgrad needs it unquantized.
    """
    _check_backward(dy_shard, w, x, dy_name="dy_shard", dgrad_fp8=dgrad_fp8)
    communicator = get_communicator(group, comm)
    world = communicator.world_size
    dim = dim % dy_shard.ndim
    if x.shape[dim] != dy_shard.shape[dim] * world:
        raise ValueError(
            f"x.shape[{dim}]: expected world size {world} × dy_shard.shape[{dim}] = "
            f"{dy_shard.shape[dim] * world}, got {x.shape[dim]}"
        )
    dy_rows, _ = _to_rows(dy_shard, dim)
    x_rows, x_row_shape = _to_rows(x, dim)
    m, n = dy_rows.shape
    k = w.shape[0]
    chunks = _resolve_chunks(chunks, "all_gather_matmul", m=m * world, n=k, k=n, world=world, x=dy_shard)
    if checks.debug_enabled(debug):  # the fingerprint's fields are built only when it runs
        checks.maybe_check_consistent(
            communicator, "all_gather_matmul_with_wgrad", debug,
            dy_shard=(list(dy_shard.shape), str(dy_shard.dtype)), w=list(w.shape), dim=dim, chunks=chunks,
        )
    dx_rows = x_rows.new_empty(world * m, k)
    dw = _new_wgrad(w) if need_wgrad else None
    # The ring adds one wgrad term per piece: in fp16/bf16 each addition would round, so the
    # terms accumulate in fp32 and are rounded once at the end.
    ring = world > 1 and chunks > 1
    half = w.dtype in (torch.float16, torch.bfloat16)
    dw_acc = torch.empty(w.shape[1], w.shape[0], dtype=torch.float32, device=w.device).t() \
        if need_wgrad and ring and half else dw
    wt = w.t()
    dx3, x3 = dx_rows.view(world, m, k), x_rows.view(world, m, k)
    first = [True]

    def dgrad(dy_part: Tensor, out: Tensor) -> None:
        if dgrad_fp8 is None:
            matmul(dy_part, wt, out=out, kernel=kernel)
        else:  # the rows' own e5m2 scales: quantizing per piece equals quantizing the whole
            dy_q, dy_s, wt_q = _fp8_dgrad(dy_part, dgrad_fp8, kernel)
            matmul(dy_q, wt_q, a_scale=dy_s, out=out, kernel=kernel)

    def consume(src: int, rows: slice, block: Tensor) -> None:
        dgrad(block, dx3[src, rows])
        if need_wgrad:
            matmul(x3[src, rows].t(), block, out=dw_acc, accumulate=not first[0], kernel=kernel)
        first[0] = False

    with nvtx_range(f"all_gather_matmul_with_wgrad c={chunks}"):
        if world == 1:
            consume(0, slice(0, m), dy_rows)
        elif chunks == 1:
            dy_full = dy_rows.new_empty(world * m, n)
            _pipeline_single_all_gather(communicator, dy_rows, dy_full)
            dgrad(dy_full, dx_rows)
            if need_wgrad:
                matmul(x_rows.t(), dy_full, out=dw, kernel=kernel)
        else:
            dy_full = dy_rows.new_empty(world * m, n)
            _ring_all_gather(communicator, dy_rows, dy_full, pieces=-(-chunks // world), consume=consume)
    if not need_wgrad:
        return _from_rows(dx_rows, x_row_shape, dim), None
    if dw_acc is not dw:
        dw.copy_(dw_acc)
    return _from_rows(dx_rows, x_row_shape, dim), dw

