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

from collections.abc import Callable
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


def check_sequence_output(y: Tensor, dim: int, world: int, *, where: str) -> None:
    """Raise (no comm) unless a module's output `y` can be cut into `world` pieces of `dim`
    (the sequence) where a plan's Shard layout starts sequence parallelism."""
    if y.ndim <= dim % y.ndim or y.shape[dim] % world:
        raise ValueError(f"{where}: output: expected dim {dim} (the sequence) of shape {list(y.shape)} to be a "
                         f"multiple of the world size {world} (a Shard layout in the plan splits it evenly)")


def _piece(x: Tensor, comm: Communicator, dim: int) -> Tensor:
    """This rank's `x.chunk(world, dim)` piece (no comm)."""
    return x.chunk(comm.world_size, dim)[comm.rank].contiguous()


def _reduce_scatter_dim(x: Tensor, comm: Communicator, dim: int) -> Tensor:
    """This rank's `dim`-piece of the sum over ranks of `x` (reduce-scattered on dim 0, `dim` moved first)."""
    rows = x.movedim(dim, 0).contiguous()
    out = rows.new_empty(rows.shape[0] // comm.world_size, *rows.shape[1:])
    comm.reduce_scatter(out, rows).wait()
    return out.movedim(0, dim).contiguous()


def _region_op(name: str, doc: str, forward_op: Callable[[Tensor, Communicator, int], Tensor],
               backward_op: Callable[[Tensor, Communicator, int], Tensor]) -> type[torch.autograd.Function]:
    """An autograd Function `(x, spec, dim) -> forward_op(x, comm, dim)` whose backward is
    `backward_op(dy, comm, dim)`, `comm` the spec's communicator: the layout changes below
    are these pairs (traced.py makes their traceable twins the same way)."""

    def forward(ctx: Any, x: Tensor, spec: LinearSpec, dim: int) -> Tensor:
        ctx.spec, ctx.dim = spec, dim
        return forward_op(x, spec.communicator(), dim)

    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor, None, None]:
        return backward_op(dy, ctx.spec.communicator(), ctx.dim), None, None

    # made by type() with its own name, so that its grad_fn class is `<name>Backward`
    return type(name, (torch.autograd.Function,), {
        "__doc__": doc, "__module__": __name__, "__qualname__": name,
        "forward": staticmethod(forward), "backward": staticmethod(backward),
    })


_SplitFn = _region_op("_SplitFn", """`x_full → x_shard = x_full.chunk(world, dim)[rank]`.

    forward   x_full [.., M, ..] → x_shard [.., M/world, ..]   no comm (local slice)
    dgrad     dx_full = all_gather(dx_shard, dim)               all-gather
    wgrad     —
    """, _piece, _all_gather_dim)

_GatherFn = _region_op("_GatherFn", """`x_shard → x_full = all_gather(x_shard, dim)`, whose consumers are replicated.

    forward   x_shard [.., m, ..] → x_full [.., world*m, ..]   all-gather
    dgrad     dx_shard = dx_full.chunk(world, dim)[rank]        no comm (dx_full is the same on every rank)
    wgrad     —
    """, _all_gather_dim, _piece)

_ReduceScatterFn = _region_op("_ReduceScatterFn", """`x_partial → x_shard = reduce_scatter(x_partial, dim)`: the sum
    over ranks, this rank's piece.

    forward   x_partial [.., M, ..] → x_shard [.., M/world, ..]   reduce-scatter
    dgrad     dx_partial = all_gather(dx_shard, dim)              all-gather
    wgrad     —
    """, _reduce_scatter_dim, _all_gather_dim)


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


def reduce_scatter_to_shard(x: Tensor, *, group: Any, dim: int = -2, comm: str = "torch") -> Tensor:
    """This rank's `dim`-piece of the sum over ranks of the partial sums `x` (backward
    all-gathers). `dim` must divide evenly."""
    return _to_shard(x, group, dim, comm, _ReduceScatterFn, traced.reduce_scatter_to_shard, "reduce_scatter_to_shard")


def gather_from_shard(x_shard: Tensor, *, group: Any, dim: int = -2, comm: str = "torch") -> Tensor:
    """`all_gather(x_shard, dim)` for replicated consumers (backward keeps this rank's piece)."""
    if torch.compiler.is_compiling():
        return traced.gather(x_shard, dim, check_group(group))
    return _GatherFn.apply(x_shard, LinearSpec(check_group(group), comm=comm), dim)
