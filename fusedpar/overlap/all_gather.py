"""All-gather + matmul: `all_gather(x_shard, dim) @ w`, fused (a ring of P2P sends whose
pieces feed the GEMMs as they arrive) and unfused (`all_gather_matmul_reference`).

Inputs: `x_shard [..., m, ..., K]` split across ranks on `dim`, `w [K, N]` local.
Output: `[..., world*m, ..., N]` full on `dim` (and the gathered input, full, on request).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..comm import CollectiveHandle, Communicator
from ..kernels import matmul
from ..kernels.fp8 import torch_scaled_product
from ..streams import nvtx_range
from .fp8_rows import _as_bytes, _pack_fp8_rows, _unpack_fp8_rows
from .spec import (OpSpec, _epilogue, _fp8_kw, _from_rows, _from_rows_out, _gathered_shape, _Pipeline,
                   _resolve_chunks, _scale_rows, _to_rows, check_call, check_consistent, reference_of, split_rows)


def all_gather_matmul(
    x_shard: Tensor, w: Tensor, *, group: dist.ProcessGroup | Communicator, dim: int = 0,
    bias: Tensor | None = None, activation: str | None = None,  # applied once, to the full output
    chunks: int | None = None, out: Tensor | None = None, return_gathered: bool = False,
    kernel: str = "auto", comm: str = "torch", debug: bool | None = None,
    x_scale: Tensor | None = None, w_scale: Tensor | None = None, out_dtype: torch.dtype | None = None,  # fp8
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
    spec = check_call("all_gather_matmul", x_shard, w, group, comm, dim=dim, bias=bias, activation=activation,
                      chunks=chunks, out=out, x_scale=x_scale, w_scale=w_scale, out_dtype=out_dtype)
    communicator, world, dim, out_dtype, fp8 = spec[:5]
    x_rows, row_shape = _to_rows(x_shard, dim)
    s_rows = _scale_rows(x_scale, x_shard, dim) if fp8 else None
    m, k, n = x_rows.shape[0], x_rows.shape[1], w.shape[1]
    chunks = _resolve_chunks(chunks, "all_gather_matmul", m=m * world, n=n, k=k, world=world, x=x_shard)
    check_consistent(communicator, "all_gather_matmul", debug, "x_shard", x_shard, w, chunks, dim=dim, bias=bias,
                     activation=activation)

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

    return _result(y_rows, gathered, s_gathered if fp8 else None, row_shape, world, dim, out, return_gathered)


def _result(y_rows: Tensor, gathered: Tensor, s_gathered: Tensor | None, row_shape: Sequence[int], world: int,
            dim: int, out: Tensor | None, return_gathered: bool
            ) -> Tensor | tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    """The output `[..., world*m, ..., N]` with `dim` in place (in `out` if given) and, with
    `return_gathered`, the gathered input (and, for fp8, its row scales) laid out as x."""
    full_shape = _gathered_shape(row_shape, world)
    y = _from_rows_out(y_rows, full_shape, dim, out)
    if not return_gathered:
        return y
    if s_gathered is not None:
        return y, _from_rows(gathered, full_shape, dim), _from_rows(s_gathered, full_shape, dim)
    return y, _from_rows(gathered, full_shape, dim)


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


@reference_of(all_gather_matmul)
def all_gather_matmul_reference(x_shard: Tensor, w: Tensor, spec: OpSpec, a: dict[str, Any]
                                ) -> Tensor | tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    """Unfused `all_gather_matmul` (its signature and checks): a blocking all-gather, then
    `torch.matmul` (fp8: the fp8 rows and their scales gathered, the product computed in
    fp32 from them)."""
    communicator, world, dim = spec.communicator, spec.world, spec.dim
    x_rows, row_shape = _to_rows(x_shard, dim)
    gathered = x_rows.new_empty(world * x_rows.shape[0], x_rows.shape[1])
    communicator.all_gather(_as_bytes(gathered), _as_bytes(x_rows.contiguous())).wait()
    s_gathered = None
    if spec.fp8:
        s_gathered = torch.empty(world * x_rows.shape[0], 1, dtype=torch.float32, device=x_rows.device)
        communicator.all_gather(s_gathered, _scale_rows(a["x_scale"], x_shard, dim)).wait()
        ws = a["w_scale"] if a["w_scale"] is not None else s_gathered.new_ones(())
        y_rows = torch_scaled_product(gathered, w, s_gathered, ws)
    else:
        y_rows = gathered @ w
    _epilogue(y_rows, a["bias"], a["activation"])
    return _result(y_rows.to(spec.out_dtype), gathered, s_gathered, row_shape, world, dim, a["out"],
                   a["return_gathered"])
