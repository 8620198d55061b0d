"""Matmul + reduce-scatter: `reduce_scatter(x @ w, dim)`, fused (row pieces reduce-scattered
while the next piece's GEMM runs) and unfused (`matmul_reduce_scatter_reference`).

Inputs: `x [..., M, ..., K]` full on `dim`, `w [K, N]` local (so `x @ w` is partial).
Output: this rank's `[..., M/world, ..., N]` block of the sum, split on `dim`.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..comm import CollectiveHandle, Communicator
from ..kernels import matmul
from ..streams import nvtx_range
from .spec import (MAX_IN_FLIGHT, OpSpec, PendingOutput, _done, _epilogue, _finish, _fp8_kw, _from_rows_out,
                   _Pipeline, _reference_product, _resolve_chunks, _scale_rows, _to_rows, check_call,
                   check_consistent, reference_of, split_rows)


def matmul_reduce_scatter(
    x: Tensor, w: Tensor, *, group: dist.ProcessGroup | Communicator, dim: int = 0,
    bias: Tensor | None = None, activation: str | None = None,  # applied once, to the full output
    chunks: int | None = None, out: Tensor | None = None, async_op: bool = False,
    kernel: str = "auto", comm: str = "torch", debug: bool | None = None,
    x_scale: Tensor | None = None, w_scale: Tensor | None = None, out_dtype: torch.dtype | None = None,  # fp8
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
    spec = check_call("matmul_reduce_scatter", x, w, group, comm, dim=dim, bias=bias, activation=activation,
                      chunks=chunks, out=out, x_scale=x_scale, w_scale=w_scale, out_dtype=out_dtype)
    communicator, world, dim, out_dtype, fp8 = spec[:5]
    x_rows, row_shape = _to_rows(x, dim)
    s_rows = _scale_rows(x_scale, x, dim) if fp8 else None
    rows, k, n = x_rows.shape[0], x_rows.shape[1], w.shape[1]
    m = rows // world
    chunks = _resolve_chunks(chunks, "matmul_reduce_scatter", m=rows, n=n, k=k, world=world, x=x, dtype=out_dtype)
    check_consistent(communicator, "matmul_reduce_scatter", debug, "x", x, w, chunks, dim=dim, bias=bias,
                     activation=activation)
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

    return _finish(handles, y_rows, bias, activation, out_row_shape, dim, out, async_op=async_op)


@reference_of(matmul_reduce_scatter)
def matmul_reduce_scatter_reference(x: Tensor, w: Tensor, spec: OpSpec, a: dict[str, Any]) -> Tensor | PendingOutput:
    """Unfused `matmul_reduce_scatter` (its signature and checks): `torch.matmul`, then a
    blocking reduce-scatter (fp8: the product in fp32 from the scaled fp8 operands, reduced
    in `out_dtype`)."""
    dim, world = spec.dim, spec.world
    x_rows, row_shape = _to_rows(x, dim)
    partial = _reference_product(x_rows, w, _scale_rows(a["x_scale"], x, dim), a["w_scale"], spec.out_dtype) \
        if spec.fp8 else x_rows @ w
    y_rows = partial.new_empty(partial.shape[0] // world, partial.shape[1])
    spec.communicator.reduce_scatter(y_rows, partial).wait()
    _epilogue(y_rows, a["bias"], a["activation"])
    y = _from_rows_out(y_rows, (row_shape[0] // world, *row_shape[1:]), dim, a["out"])
    return _done(y, a["async_op"])
