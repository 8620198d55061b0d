"""Backward blocks: a dgrad collective overlapped with the wgrad GEMM, one per sharded-linear
backward (the `*_with_wgrad` functions).

    matmul_reduce_scatter_with_wgrad  dy full [..., M, ..., N] -> dx split on dim, dw [K, N]
    matmul_all_reduce_with_wgrad      dy [..., N], x [..., K] replicated -> dx full, dw [K, N]
    all_gather_matmul_with_wgrad      dy split on dim -> dx full [..., M, ..., K], dw [K, N]

`w` is the forward's local `[K, N]`; `dw` is laid out so that `dw.T` is contiguous.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .. import costmodel
from ..comm import CollectiveHandle, Communicator, get_communicator
from ..kernels import matmul
from ..kernels.fp8 import is_fp8
from ..kernels.quantize import quantize_rowwise
from ..streams import nvtx_range
from .all_gather import _pipeline_single_all_gather, _ring_all_gather
from .all_reduce import matmul_all_reduce
from .reduce_scatter import matmul_reduce_scatter
from .spec import (_CALL_PLANS, PendingOutput, _from_rows, _Pipeline, _remember, _resolve_chunks, _to_rows,
                   check_consistent)


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


def weight_grad(x: Tensor, dy: Tensor, w: Tensor, kernel: str) -> Tensor:
    """`dw = x_rows.T @ dy_rows` (x `[..., K]`, dy `[..., N]`, rows flattened), `[K, N]` in w's
    dtype, laid out so that `dw.T` (the nn.Linear weight layout) is contiguous: computed as
    `(dy_rows.T @ x_rows).T`, so the GEMM allocates its output and writes it row-major. No comm."""
    dy_rows = dy if dy.dim() == 2 else dy.reshape(-1, dy.shape[-1])
    x_rows = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    return matmul(dy_rows.t(), x_rows, out_dtype=w.dtype, kernel=kernel).t()


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
    dy: Tensor, w: Tensor, x: Tensor, *, group: dist.ProcessGroup | Communicator, x_is_gathered: bool, dim: int = 0,
    chunks: int | None = None, need_wgrad: bool = True,
    kernel: str = "auto", comm: str = "torch", debug: bool | None = None,
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
        with nvtx_range("wgrad"):
            dw = weight_grad(x_full_rows, dy_rows, w, kernel)
    assert isinstance(pending, PendingOutput)
    return pending.wait(), dw


def matmul_all_reduce_with_wgrad(
    dy: Tensor, w: Tensor, x: Tensor, *, group: dist.ProcessGroup | Communicator,
    chunks: int | None = None, need_wgrad: bool = True,
    kernel: str = "auto", comm: str = "torch", debug: bool | None = None,
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
    if dgrad_fp8 is None and _one_dgrad_piece(dy, w, group, comm, chunks):
        return _one_piece_all_reduce_with_wgrad(dy, w, x, get_communicator(group, comm), need_wgrad, kernel, debug)
    pending = _start_dgrad(matmul_all_reduce, dy, w, dgrad_fp8, kernel=kernel, group=group, chunks=chunks,
                           comm=comm, debug=debug)
    dw = None
    if need_wgrad:
        with nvtx_range("wgrad"):
            dw = weight_grad(x, dy, w, kernel)
    assert isinstance(pending, PendingOutput)
    return pending.wait(), dw


def _one_dgrad_piece(dy: Tensor, w: Tensor, group: dist.ProcessGroup | Communicator, comm: str,
                     chunks: int | None) -> bool:
    """Whether `matmul_all_reduce` would run this dgrad (`dy @ w.T`) as one piece over more than
    one rank (decode and other small backwards), decided once per shape and cost-model state."""
    if chunks is not None and chunks != 1:
        return False
    key = ("one dgrad piece", dy.shape, dy.dtype, dy.device, w.shape, comm, chunks, id(group), costmodel._generation)
    found = _CALL_PLANS.get(key)
    if found is None:
        world = get_communicator(group, comm).world_size
        n_chunks = _resolve_chunks(chunks, "matmul_all_reduce", m=math.prod(dy.shape[:-1]), n=w.shape[0],
                                   k=dy.shape[-1], world=world, x=dy)
        found = (n_chunks == 1 and world > 1,)
        _remember(key, found)
    return found[0]


def _one_piece_all_reduce_with_wgrad(dy: Tensor, w: Tensor, x: Tensor, communicator: Communicator,
                                     need_wgrad: bool, kernel: str, debug: bool | None) -> tuple[Tensor, Tensor | None]:
    """`matmul_all_reduce_with_wgrad` when the dgrad is one piece: `dx = dy @ w.T` into a new
    tensor, its all-reduce issued at once and in flight while the wgrad GEMM runs; the same
    schedule as the chunked one with a single chunk, minus its per-piece bookkeeping (this is
    the backward a host-bound step repeats)."""
    check_consistent(communicator, "matmul_all_reduce", debug, "x", dy, w.t(), 1, bias=None, activation=None)
    dx = matmul(dy, w.t(), kernel=kernel)
    if not dx.is_contiguous():  # a backend's output that is a strided view: the collective needs a flat buffer
        dx = dx.contiguous()
    pipe = _Pipeline.for_device(dy.device)
    handle = pipe.issue(lambda: communicator.all_reduce(dx))
    dw = None
    if need_wgrad:
        with nvtx_range("wgrad"):
            dw = weight_grad(x, dy, w, kernel)
    handle.wait()
    return dx, dw


def all_gather_matmul_with_wgrad(
    dy_shard: Tensor, w: Tensor, x: Tensor, *, group: dist.ProcessGroup | Communicator, dim: int = 0,
    chunks: int | None = None, need_wgrad: bool = True,
    kernel: str = "auto", comm: str = "torch", debug: bool | None = None,
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
    check_consistent(communicator, "all_gather_matmul_with_wgrad", debug, "dy_shard", dy_shard, w, chunks, dim=dim,
                     epilogue=False)
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
