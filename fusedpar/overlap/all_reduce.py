"""Matmul + all-reduce: `all_reduce(x @ w)`, fused (row pieces all-reduced in place while the
next piece's GEMM runs) and unfused (`matmul_all_reduce_reference`).

Inputs: `x [..., K]` (rows replicated, K split across ranks), `w [K, N]` local (a row
shard), so `x @ w` is partial. Output: the full `[..., N]`, replicated on every rank.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..comm import CollectiveHandle, Communicator, get_communicator
from ..kernels import matmul
from ..kernels.fp8 import is_fp8
from ..streams import nvtx_range
from .spec import (_CALL_PLANS, OpSpec, PendingOutput, _call_key, _done, _epilogue, _finish, _fp8_kw, _from_rows_out,
                   _Pipeline, _reference_product, _remember, _resolve_chunks, _scale_rows, check_call,
                   check_consistent, reference_of, split_rows)


def matmul_all_reduce(
    x: Tensor, w: Tensor, *, group: dist.ProcessGroup | Communicator,
    bias: Tensor | None = None, activation: str | None = None,  # applied once, to the full output
    chunks: int | None = None, out: Tensor | None = None, async_op: bool = False,
    kernel: str = "auto", comm: str = "torch", debug: bool | None = None,
    x_scale: Tensor | None = None, w_scale: Tensor | None = None, out_dtype: torch.dtype | None = None,  # fp8
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
        out_dtype = check_call("matmul_all_reduce", x, w, communicator, comm, dim=None, bias=bias,
                               activation=activation, chunks=chunks, out=out, x_scale=x_scale, w_scale=w_scale,
                               out_dtype=out_dtype).out_dtype
        rows = math.prod(x.shape[:-1])
        chunks = _resolve_chunks(chunks, "matmul_all_reduce", m=rows, n=w.shape[1], k=x.shape[-1], world=world,
                                 x=x, dtype=out_dtype)
        plan = (out_dtype, chunks)
        if key is not None:
            _remember(key, plan)
    out_dtype, chunks = plan
    fp8 = is_fp8(x.dtype)
    if chunks == 1 and world > 1 and not fp8 and (out is None or out.is_contiguous()):
        # decode sizes (and small backward dgrads, async): one GEMM straight into the output
        # (any leading dims: no row views), one all-reduce of it in place; host time is what
        # bounds this call
        check_consistent(communicator, "matmul_all_reduce", debug, "x", x, w, chunks, bias=bias, activation=activation)
        with nvtx_range("matmul_all_reduce c=1"):
            if out is not None:
                y = matmul(x, w, out=out, kernel=kernel)
            else:  # the GEMM allocates it (a new tensor, never a view)
                y = matmul(x, w, out_dtype=out_dtype, kernel=kernel)
                if not y.is_contiguous():
                    y = y.contiguous()
            handle = _Pipeline.for_device(x.device).issue(lambda: communicator.all_reduce(y))

        def finish() -> Tensor:
            handle.wait()
            _epilogue(y, bias, activation)
            return y

        return PendingOutput(finish) if async_op else finish()
    out_shape = list(x.shape[:-1]) + [w.shape[1]]
    x_rows = x.reshape(-1, x.shape[-1])
    s_rows = _scale_rows(x_scale, x, 0) if fp8 else None
    rows, n = x_rows.shape[0], w.shape[1]
    check_consistent(communicator, "matmul_all_reduce", debug, "x", x, w, chunks, bias=bias, activation=activation)
    if out is None:  # the result is this tensor, never a view of a schedule buffer (callers may modify it in place)
        out = torch.empty(out_shape, dtype=out_dtype, device=x.device)
    y_rows = out.view(rows, n) if out.is_contiguous() else torch.empty(rows, n, dtype=out_dtype, device=x.device)
    pipe = _Pipeline.for_device(x.device)
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

    return _finish(handles, y_rows, bias, activation, out_shape[:-1], 0, out, async_op=async_op, whole=whole)


@reference_of(matmul_all_reduce)
def matmul_all_reduce_reference(x: Tensor, w: Tensor, spec: OpSpec, a: dict[str, Any]) -> Tensor | PendingOutput:
    """Unfused `matmul_all_reduce` (its signature and checks): `torch.matmul`, then a
    blocking all-reduce (fp8 as in `matmul_reduce_scatter_reference`)."""
    x_rows = x.reshape(-1, x.shape[-1])
    y = _reference_product(x_rows, w, _scale_rows(a["x_scale"], x, 0), a["w_scale"], spec.out_dtype) if spec.fp8 \
        else (x_rows @ w).contiguous()
    spec.communicator.all_reduce(y).wait()
    _epilogue(y, a["bias"], a["activation"])
    return _done(_from_rows_out(y, list(x.shape[:-1]), 0, a["out"]), a["async_op"])
