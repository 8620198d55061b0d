"""Region ops: autograd Functions that move a tensor between layouts, with the dual
collective in backward (used around the linears by `parallelize` and the blocks).

    split_to_shard            x_full    -> x_shard  (local slice)     backward: all-gather
    gather_from_shard         x_shard   -> x_full   (all-gather)      backward: local slice
    reduce_scatter_to_shard   x_partial -> x_shard  (reduce-scatter)  backward: all-gather

`x_shard` is split across ranks on `dim` (the sequence dim, -2, by default; the feature dim
-1 for a row layer's unsplit input), `x_full` replicated, `x_partial` a per-rank partial
sum. Under `torch.compile` each takes its traceable twin in traced.py.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from . import traced
from ..comm import Communicator, check_group
from .linear_spec import LinearSpec

__all__ = ["split_to_shard", "gather_from_shard", "reduce_scatter_to_shard"]


def _all_gather_dim(x: Tensor, comm: Communicator, dim: int) -> Tensor:
    """`torch.cat([x of every rank], dim)` through the communicator (flat buffer, one gather)."""
    world = comm.world_size
    dim = dim % x.ndim
    moved = x.movedim(dim, 0).contiguous()
    out = moved.new_empty(world * moved.numel())
    comm.all_gather(out, moved.view(-1)).wait()
    full = out.view(world * moved.shape[0], *moved.shape[1:])
    return full.movedim(0, dim).contiguous() if dim else full


def _check_divisible(x: Tensor, dim: int, world: int, *, what: str) -> None:
    if x.shape[dim] % world:
        raise ValueError(
            f"{what}: expected x.shape[{dim}] (of {list(x.shape)}) to be a multiple of the world "
            f"size {world}, got {x.shape[dim]}"
        )



class _SplitFn(torch.autograd.Function):
    """`x_full → x_shard = x_full.chunk(world, dim)[rank]`.

    forward   x_full [.., M, ..] → x_shard [.., M/world, ..]   no comm (local slice)
    dgrad     dx_full = all_gather(dx_shard, dim)               all-gather
    wgrad     —
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, spec: LinearSpec, dim: int) -> Tensor:
        comm = spec.communicator()
        ctx.spec, ctx.dim = spec, dim
        return x.chunk(comm.world_size, dim)[comm.rank].contiguous()

    @staticmethod
    def backward(ctx: Any, dx_shard: Tensor) -> tuple[Tensor, None, None]:
        return _all_gather_dim(dx_shard, ctx.spec.communicator(), ctx.dim), None, None


class _GatherFn(torch.autograd.Function):
    """`x_shard → x_full = all_gather(x_shard, dim)`, whose consumers are replicated.

    forward   x_shard [.., m, ..] → x_full [.., world*m, ..]   all-gather
    dgrad     dx_shard = dx_full.chunk(world, dim)[rank]        no comm (dx_full is the same on every rank)
    wgrad     —
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, spec: LinearSpec, dim: int) -> Tensor:
        ctx.spec, ctx.dim = spec, dim
        return _all_gather_dim(x, spec.communicator(), dim)

    @staticmethod
    def backward(ctx: Any, dx_full: Tensor) -> tuple[Tensor, None, None]:
        comm = ctx.spec.communicator()
        return dx_full.chunk(comm.world_size, ctx.dim)[comm.rank].contiguous(), None, None


def _to_shard(x: Tensor, group: Any, dim: int, comm: str, fn: type[torch.autograd.Function],
              traceable: Any, what: str) -> Tensor:
    """`fn` (eager) or `traceable` (under `torch.compile`, traced.py) on `x`, once `dim` is
    known to divide evenly across the group."""
    if torch.compiler.is_compiling():
        group = check_group(group)
        _check_divisible(x, dim, dist.get_world_size(group), what=what)
        return traceable(x, dim, group)
    spec = LinearSpec(check_group(group), comm=comm)
    _check_divisible(x, dim, spec.communicator().world_size, what=what)
    return fn.apply(x, spec, dim)


def split_to_shard(x: Tensor, *, group: Any, dim: int = -2, comm: str = "torch") -> Tensor:
    """This rank's `x.chunk(world, dim)` piece (backward all-gathers). `dim` must divide evenly."""
    return _to_shard(x, group, dim, comm, _SplitFn, traced.split, "split_to_shard")


class _ReduceScatterFn(torch.autograd.Function):
    """`x_partial → x_shard = reduce_scatter(x_partial, dim)`: the sum over ranks, this rank's piece.

    forward   x_partial [.., M, ..] → x_shard [.., M/world, ..]   reduce-scatter
    dgrad     dx_partial = all_gather(dx_shard, dim)              all-gather
    wgrad     —
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, spec: LinearSpec, dim: int) -> Tensor:
        comm = spec.communicator()
        ctx.spec, ctx.dim = spec, dim
        rows = x.movedim(dim, 0).contiguous()
        out = rows.new_empty(rows.shape[0] // comm.world_size, *rows.shape[1:])
        comm.reduce_scatter(out, rows).wait()
        return out.movedim(0, dim).contiguous()

    @staticmethod
    def backward(ctx: Any, dx_shard: Tensor) -> tuple[Tensor, None, None]:
        return _all_gather_dim(dx_shard.contiguous(), ctx.spec.communicator(), ctx.dim), None, None


def reduce_scatter_to_shard(x: Tensor, *, group: Any, dim: int = -2, comm: str = "torch") -> Tensor:
    """This rank's `dim`-piece of the sum over ranks of the partial sums `x` (backward
    all-gathers). `dim` must divide evenly."""
    return _to_shard(x, group, dim, comm, _ReduceScatterFn, traced.reduce_scatter_to_shard, "reduce_scatter_to_shard")


def gather_from_shard(x_shard: Tensor, *, group: Any, dim: int = -2, comm: str = "torch") -> Tensor:
    """`all_gather(x_shard, dim)` for replicated consumers (backward keeps this rank's piece)."""
    if torch.compiler.is_compiling():
        return traced.gather(x_shard, dim, check_group(group))
    return _GatherFn.apply(x_shard, LinearSpec(check_group(group), comm=comm), dim)
