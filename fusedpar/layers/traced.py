"""The path fusedpar's layers take under `torch.compile`: the layouts and the math of the
overlapped autograd Functions in linear_autograd.py, written in ops the compiler traces.

Eager fusedpar runs chunked schedules (overlap/): GEMM pieces writing into slices of
preallocated outputs, collectives issued asynchronously and in place on a ProcessGroup,
stream and event objects, `data_ptr` checks, a log line naming the GEMM backend. None of
that traces (dynamo graph-breaks on each), so `torch.compile(block, fullgraph=True)`, as
torchtitan compiles each decoder block, would fail. Under `torch.compiler.is_compiling()`
the layers call the functions below instead: torch's functional collectives
(`torch.distributed._functional_collectives`, one graph op each, which the compiler
schedules and may overlap with GEMMs itself) and `F.linear`. The graph then holds the
compiler's own GEMMs (inductor's, or aten's under "aot_eager") rather than fusedpar's Triton
kernels, and the compiler's comm/compute ordering rather than fusedpar's chunked schedule;
the results and gradients are those of the eager path (tests/layers/test_compile_blocks.py).
Not covered yet, so a compiled graph breaks around them: fp8 layers (layers/fp8.py), the
grouped MoE expert GEMMs (layers/moe.py) and the vocab-parallel cross-entropy.

    column          y_part = x_full @ w_shard_n.T + b              dx_full = all_reduce(dy_part @ w_shard_n)
    column, SP      y_part = all_gather(x_shard) @ w_shard_n.T + b  dx_shard = reduce_scatter(dy_part @ w_shard_n)
    row             y_full = all_reduce(x_part @ w_shard_k.T) + b   dx_part = dy_full @ w_shard_k
    row, SP         y_shard = reduce_scatter(x_part @ w.T) + b      dx_part = all_gather(dy_shard) @ w; db all-reduced

Each region op below is an autograd Function whose backward is the dual collective, like
the eager ones in regions.py (the functional collectives have no gradients of their own
except all-gather / reduce-scatter, and those sum where replicated consumers need a slice).
Weights here are in `nn.Linear`'s `[N, K]` layout.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "all_gather", "reduce_scatter", "all_reduce",
    "split", "gather", "gather_reduce_scatter_grad", "reduce_scatter_to_shard", "reduce_from_region",
    "copy_to_region", "column_parallel", "row_parallel",
]

# torch 2.13 renamed the flat functional collectives (and warns on the old names); 2.11 has only the old.
_all_gather_single = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
_reduce_scatter_single = getattr(funcol, "reduce_scatter_single", None) or funcol.reduce_scatter_tensor


def _settled(t: Tensor) -> Tensor:
    """A functional collective's result as a plain tensor: in eager it is an
    `AsyncCollectiveTensor` (waited on first use); traced, the graph already holds the wait."""
    return t.wait() if isinstance(t, funcol.AsyncCollectiveTensor) else t


def all_gather(x: Tensor, dim: int, group: dist.ProcessGroup) -> Tensor:
    """`torch.cat([x of every rank], dim)` (no autograd). Gathered on dim 0 of `x` with `dim`
    moved first: torch 2.11's functional all-gather on another dim calls a helper dynamo
    does not trace (a graph break under fullgraph)."""
    dim = dim % x.ndim
    gathered = _settled(_all_gather_single(x.movedim(dim, 0).contiguous(), 0, group))
    return gathered.movedim(0, dim)


def reduce_scatter(x: Tensor, dim: int, group: dist.ProcessGroup) -> Tensor:
    """This rank's `dim`-piece of the sum over ranks of `x` (no autograd); on dim 0 with
    `dim` moved first, as `all_gather`."""
    dim = dim % x.ndim
    piece = _settled(_reduce_scatter_single(x.movedim(dim, 0).contiguous(), "sum", 0, group))
    return piece.movedim(0, dim)


def all_reduce(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """The sum over ranks of `x`, a new tensor (no autograd)."""
    return _settled(funcol.all_reduce(x.contiguous(), "sum", group))


def _piece(x: Tensor, dim: int, group: dist.ProcessGroup) -> Tensor:
    return x.chunk(dist.get_world_size(group), dim)[dist.get_rank(group)].contiguous()


def _region_op(name: str, doc: str, forward_op: Callable[[Tensor, int, dist.ProcessGroup], Tensor],
               backward_op: Callable[[Tensor, int, dist.ProcessGroup], Tensor]) -> type[torch.autograd.Function]:
    """An autograd Function `(x, dim, group) -> forward_op(x, dim, group)` whose backward is
    `backward_op(dy, dim, group)`: the four layout changes on `dim` below are these pairs."""

    def forward(ctx: Any, x: Tensor, dim: int, group: dist.ProcessGroup) -> Tensor:
        ctx.dim, ctx.group = dim, group
        return forward_op(x, dim, group)

    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor, None, None]:
        return backward_op(dy, ctx.dim, ctx.group), None, None

    # made by type() with its own name, so that its grad_fn class is `<name>Backward`
    return type(name, (torch.autograd.Function,), {
        "__doc__": doc, "__module__": __name__, "__qualname__": name,
        "forward": staticmethod(forward), "backward": staticmethod(backward),
    })


_Split = _region_op("_Split", """`x_full → x_shard = x_full.chunk(world, dim)[rank]`.

    forward   x_full [.., M, ..] → x_shard [.., M/world, ..]   no comm
    dgrad     dx_full = all_gather(dx_shard, dim)               all-gather
    """, _piece, all_gather)

_Gather = _region_op("_Gather", """`x_shard → x_full = all_gather(x_shard, dim)`, whose consumers are replicated.

    forward   x_shard [.., m, ..] → x_full [.., world*m, ..]   all-gather
    dgrad     dx_shard = dx_full.chunk(world, dim)[rank]        no comm (dx_full is the same on every rank)
    """, all_gather, _piece)

_GatherReduceScatterGrad = _region_op("_GatherReduceScatterGrad", """`x_shard → x_full = all_gather(x_shard, dim)`,
    whose consumer is split (a column-parallel GEMM).

    forward   x_shard [.., m, ..] → x_full [.., world*m, ..]   all-gather
    dgrad     dx_shard = reduce_scatter(dx_partial, dim)        reduce-scatter
    """, all_gather, reduce_scatter)

_ReduceScatter = _region_op("_ReduceScatter", """`x_partial → x_shard = reduce_scatter(x_partial, dim)`.

    forward   x_partial [.., M, ..] → x_shard [.., M/world, ..]   reduce-scatter
    dgrad     dx_partial = all_gather(dx_shard, dim)              all-gather
    """, reduce_scatter, all_gather)


class _ReduceFromRegion(torch.autograd.Function):
    """`x_partial → x_full = all_reduce(x_partial)`.

    forward   x_full = all_reduce(x_partial)   all-reduce
    dgrad     dx_partial = dx_full             no comm
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        return all_reduce(x, group)

    @staticmethod
    def backward(ctx: Any, dx_full: Tensor) -> tuple[Tensor, None]:
        return dx_full, None


class _CopyToRegion(torch.autograd.Function):
    """`x_full → x_full`, read by split consumers (each rank's gradient is a partial sum).

    forward   identity                        no comm
    dgrad     dx = all_reduce(dx_partial)     all-reduce
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, dx_partial: Tensor) -> tuple[Tensor, None]:
        return all_reduce(dx_partial, ctx.group), None


def split(x: Tensor, dim: int, group: dist.ProcessGroup) -> Tensor:
    """`linear.split_to_shard`, traceable."""
    return _Split.apply(x, dim, group)


def gather(x: Tensor, dim: int, group: dist.ProcessGroup) -> Tensor:
    """`linear.gather_from_shard`, traceable."""
    return _Gather.apply(x, dim, group)


def gather_reduce_scatter_grad(x: Tensor, dim: int, group: dist.ProcessGroup) -> Tensor:
    """`all_gather(x, dim)` whose gradient is reduce-scattered back (the input of a split GEMM)."""
    return _GatherReduceScatterGrad.apply(x, dim, group)


def reduce_scatter_to_shard(x: Tensor, dim: int, group: dist.ProcessGroup) -> Tensor:
    """`linear.reduce_scatter_to_shard`, traceable."""
    return _ReduceScatter.apply(x, dim, group)


def reduce_from_region(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """`all_reduce(x)` in forward, identity in backward."""
    return _ReduceFromRegion.apply(x, group)


def copy_to_region(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """`x` in forward, its gradient all-reduced in backward (`norm.grad_all_reduce`, traceable)."""
    return _CopyToRegion.apply(x, group)


def column_parallel(x: Tensor, w: Tensor, b: Tensor | None, *, group: dist.ProcessGroup, sequence_parallel: bool,
                    dim: int) -> tuple[Tensor, Tensor]:
    """`(y_part, x_full)`: `_ColumnParallelFn` (w `[N/world, K]`, b `[N/world]`), traceable.
    `x_full` is `x` without sequence parallelism, else the gathered input."""
    x_full = gather_reduce_scatter_grad(x, dim, group) if sequence_parallel else copy_to_region(x, group)
    return F.linear(x_full, w, b), (x_full if sequence_parallel else x)


def row_parallel(x: Tensor, w: Tensor, b: Tensor | None, *, group: dist.ProcessGroup, sequence_parallel: bool,
                 dim: int, partial_output: bool) -> Tensor:
    """`_RowParallelFn` (w `[N, K/world]`, b `[N]` replicated, added once after the
    reduction), traceable; with `partial_output` the per-rank partial sum, unreduced."""
    y_partial = F.linear(x, w)
    if partial_output:
        return y_partial
    if sequence_parallel:
        y = reduce_scatter_to_shard(y_partial, dim, group)
        # each rank's bias gradient covers its own tokens only: summed over the group
        return y if b is None else y + copy_to_region(b, group)
    y = reduce_from_region(y_partial, group)
    return y if b is None else y + b
