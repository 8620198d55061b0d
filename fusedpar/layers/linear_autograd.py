"""The autograd Functions of the parallel linears and the helpers that prepare their operands.

`w` is always the local `[K, N]` operand, `weight.t()` (a view); layouts as in linear.py:

    _ColumnParallelFn   x_full / x_shard [.., K] @ w_shard_n [K, N/world] -> y_part [.., N/world]
    _RowParallelFn      x_part [.., K/world] @ w_shard_k [K/world, N] -> y_full / y_shard / y_partial [.., N]

`_column_apply` / `_row_apply` pick the path a call takes (fp8 recipe, the traceable path
under `torch.compile`, else these Functions); `_autocast_operands` / `_autocast_off` run
them under `torch.autocast` as `nn.Linear` would.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import torch
from torch import Tensor

from .. import overlap
from . import traced
from ..kernels import matmul
from .linear_spec import LinearSpec
from .local_views import GradTarget
from .regions import _all_gather_dim

# (weight, bias) GradTargets of a Function's parameter operands (`param_operand`), or None
_Targets = Optional[tuple[Optional[GradTarget], Optional[GradTarget]]]


def _sum_rows(dy: Tensor) -> Tensor:
    return dy.reshape(-1, dy.shape[-1]).sum(0)


def _autocast_operands(x: Tensor, w: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """Under `torch.autocast`, the GEMM runs in the autocast dtype, as `nn.Linear`'s would:
    the input, the (e.g. fp32 master) weight and the bias are cast here, and the casts'
    backward returns the gradients in each parameter's own dtype."""
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return x, w, b
    dtype = torch.get_autocast_dtype(device_type)
    return x.to(dtype), w.to(dtype), b.to(dtype) if b is not None else None


def _autocast_off(method: Any) -> Any:
    """Run an autograd Function's forward/backward with autocast off: its operands already
    have one dtype (`_autocast_operands`), and the kernels write into preallocated outputs,
    which autocast would refuse or re-cast."""

    @functools.wraps(method)
    def run(ctx: Any, x: Tensor, *args: Any) -> Any:
        device_type = x.device.type
        if not torch.is_autocast_enabled(device_type):  # the usual case: no context to enter
            return method(ctx, x, *args)
        with torch.autocast(device_type, enabled=False):
            return method(ctx, x, *args)

    return run



def _column_apply(x: Tensor, weights: list[Tensor], b: Tensor | None, spec: LinearSpec, holder: list | None,
                  targets: _Targets = None) -> Tensor:
    """The column-parallel product of ``x`` and the weights ``[N_i, K]`` (concatenated on N):
    in fp8 when the spec has a recipe (layers/fp8.py), else ``_ColumnParallelFn``. ``targets``:
    the (weight, bias) `GradTarget`s of operands from `param_operand` (one weight; not fp8)."""
    if spec.fp8 is not None:  # the recipe runs it: fp8.py builds on this module, not the reverse
        return spec.fp8.column_parallel(x, weights, b, spec, holder)
    w = weights[0] if len(weights) == 1 else torch.cat(weights, 0)
    if torch.compiler.is_compiling():  # the traceable path: functional collectives, the compiler's GEMM (traced.py)
        y, x_full = traced.column_parallel(x, w, b, group=spec.group, sequence_parallel=spec.sequence_parallel,
                                           dim=spec.sequence_dim)
        if holder is not None:
            holder.append(x_full)
        return y
    return _column_fn(x, w.t(), b, spec, holder, targets)


def _column_fn(x: Tensor, w_t: Tensor, b: Tensor | None, spec: LinearSpec, holder: list | None,
               targets: _Targets = None) -> Tensor:
    """``_ColumnParallelFn`` on ``x`` and ``w_t`` ``[K, N]``: through ``Function.apply``, or,
    in decode (no_grad, inference_mode; autocast off), its forward itself: nothing to record
    and nothing to cast, and no `apply` bookkeeping (a few µs of host time a call)."""
    if not torch.is_grad_enabled() and not torch.is_autocast_enabled(x.device.type):
        return _ColumnParallelFn.forward(_Unrecorded(), x, w_t, b, spec, holder, None)
    return _ColumnParallelFn.apply(*_autocast_operands(x, w_t, b), spec, holder, targets)


def _row_apply(x: Tensor, weight: Tensor, b: Tensor | None, spec: LinearSpec, targets: _Targets = None) -> Tensor:
    """The row-parallel product, in fp8 when the spec has a recipe, else ``_RowParallelFn``
    (``targets`` as in `_column_apply`)."""
    if spec.fp8 is not None:
        return spec.fp8.row_parallel(x, weight, b, spec)
    if torch.compiler.is_compiling():
        return traced.row_parallel(x, weight, b, group=spec.group, sequence_parallel=spec.sequence_parallel,
                                   dim=spec.sequence_dim, partial_output=spec.partial_output)
    if not torch.is_grad_enabled() and not torch.is_autocast_enabled(x.device.type):  # as in _column_fn
        return _RowParallelFn.forward(_Unrecorded(), x, weight.t(), b, spec, None)
    return _RowParallelFn.apply(*_autocast_operands(x, weight.t(), b), spec, targets)


def _wanted(ctx: Any) -> tuple[bool, bool, bool]:
    """(dx, dw, db) wanted by this backward: autograd's `needs_input_grad`, except that an
    operand whose gradient the Function hands to its parameter itself is wanted only when the
    running backward accumulates into that parameter (not under `autograd.grad(out, [x])`)."""
    need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
    targets = ctx.targets
    if targets is not None:
        tw, tb = targets
        if tw is not None:
            need_dw = need_dw and tw.wanted()
        if tb is not None:
            need_db = need_db and tb.wanted()
    return need_dx, need_dw, need_db


def _hand_on(ctx: Any, dw: Tensor | None, db: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """The (dw, db) the backward returns: gradients of targets go to their parameters here
    (dw `[K, N]` is w.t()'s, so the leaf's is `dw.t()`) and None to autograd."""
    targets = ctx.targets
    if targets is None:
        return dw, db
    tw, tb = targets
    if tw is not None:
        if dw is not None:
            tw.accumulate(dw.t())
        dw = None
    if tb is not None:
        if db is not None:
            tb.accumulate(db)
        db = None
    return dw, db


class _Unrecorded:
    """The autograd context of a Function forward run directly with grad mode off: what the
    forward keeps for backward goes nowhere (no backward can run)."""

    __slots__ = ("spec", "targets")

    def save_for_backward(self, *tensors: Tensor | None) -> None:
        pass


class _ColumnParallelFn(torch.autograd.Function):
    """Column-parallel `y_part = x @ w_shard_n + b_shard_n` (w `[K, N/world]`).

    sequence_parallel=False (x_full `[.., M, K]` replicated):
        forward   y_part [.., M, N/world] = x_full @ w_shard_n          no comm
        dgrad     dx_full = all_reduce(dy_part @ w_shard_n.T)           matmul_all_reduce, chunked
        wgrad     dw_shard_n [K, N/world] = x_full.T @ dy_part          overlapped with the dgrad all-reduce
    sequence_parallel=True (x_shard `[.., M/world, K]` split on the sequence dim):
        forward   y_part [.., M, N/world] = all_gather(x_shard) @ w     all_gather_matmul (ring)
        dgrad     dx_shard = reduce_scatter(dy_part @ w_shard_n.T)      matmul_reduce_scatter, chunked
        wgrad     dw_shard_n = x_full.T @ dy_part                       x_full kept from forward or re-gathered
    """

    @staticmethod
    @_autocast_off
    def forward(ctx: Any, x: Tensor, w: Tensor, bias: Tensor | None, spec: LinearSpec, holder: list | None,
                targets: _Targets) -> Tensor:
        ctx.spec, ctx.targets = spec, targets
        if spec.sequence_parallel:
            y, x_full = overlap.all_gather_matmul(
                x, w, dim=spec.sequence_dim, bias=bias, return_gathered=True, **spec.knobs()
            )
            keep = x_full if spec.save_gathered_input else x
        else:
            y = matmul(x, w, bias=bias, kernel=spec.kernel)
            x_full = keep = x
        if holder is not None:
            holder.append(x_full)
        ctx.save_for_backward(keep, w)
        return y

    @staticmethod
    @_autocast_off
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x_kept, w = ctx.saved_tensors
        spec: LinearSpec = ctx.spec
        need_dx, need_dw, need_db = _wanted(ctx)
        dx = dw = None
        if spec.sequence_parallel:
            if need_dx:
                dx, dw = overlap.matmul_reduce_scatter_with_wgrad(
                    dy, w, x_kept, x_is_gathered=spec.save_gathered_input, dim=spec.sequence_dim,
                    need_wgrad=need_dw, **spec.knobs()
                )
            elif need_dw:
                x_full = x_kept if spec.save_gathered_input else _all_gather_dim(x_kept, spec.communicator(), spec.sequence_dim)
                dw = overlap.weight_grad(x_full, dy, w, spec.kernel)
        elif need_dx:
            dx, dw = overlap.matmul_all_reduce_with_wgrad(dy, w, x_kept, need_wgrad=need_dw, **spec.knobs())
        elif need_dw:
            dw = overlap.weight_grad(x_kept, dy, w, spec.kernel)
        db = _sum_rows(dy) if need_db else None
        dw, db = _hand_on(ctx, dw if need_dw else None, db)
        return dx, dw, db, None, None, None


class _RowParallelFn(torch.autograd.Function):
    """Row-parallel `y = sum_ranks(x_part @ w_shard_k) + b` (w `[K/world, N]`, b replicated).

    sequence_parallel=False (x_part `[.., M, K/world]`):
        forward   y_full [.., M, N] = all_reduce(x_part @ w_shard_k) + b        matmul_all_reduce, chunked
        dgrad     dx_part = dy_full @ w_shard_k.T                               no comm
        wgrad     dw_shard_k [K/world, N] = x_part.T @ dy_full; db = Σ dy_full  no comm
    sequence_parallel=True:
        forward   y_shard [.., M/world, N] = reduce_scatter(x_part @ w) + b     matmul_reduce_scatter, chunked
        dgrad     dx_part = all_gather(dy_shard) @ w_shard_k.T                  all_gather_matmul_with_wgrad (ring)
        wgrad     dw_shard_k = x_part.T @ all_gather(dy_shard); db = all_reduce(Σ dy_shard)
    """

    @staticmethod
    @_autocast_off
    def forward(ctx: Any, x: Tensor, w: Tensor, bias: Tensor | None, spec: LinearSpec, targets: _Targets) -> Tensor:
        ctx.spec, ctx.targets = spec, targets
        ctx.save_for_backward(x, w)
        # the output must not be a view (of a schedule buffer, of a 2-D product): autograd forbids
        # in-place ops on a view made inside a Function, and models add into it (Llama 4:
        # `out.add_(...)`). matmul and matmul_all_reduce return new tensors; the reduce-scatter
        # is given its output here
        if spec.partial_output:  # the block reduces it; backward is the non-SP one (no comm)
            return matmul(x, w, kernel=spec.kernel)
        if spec.sequence_parallel:
            shape = list(x.shape[:-1]) + [w.shape[1]]
            shape[spec.sequence_dim] //= spec.communicator().world_size
            return overlap.matmul_reduce_scatter(x, w, dim=spec.sequence_dim, bias=bias, out=x.new_empty(shape),
                                                 **spec.knobs())
        return overlap.matmul_all_reduce(x, w, bias=bias, **spec.knobs())

    @staticmethod
    @_autocast_off
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, w = ctx.saved_tensors
        spec: LinearSpec = ctx.spec
        need_dx, need_dw, need_db = _wanted(ctx)
        dx = dw = db = None
        if spec.sequence_parallel:
            if need_dx or need_dw:
                dx, dw = overlap.all_gather_matmul_with_wgrad(dy, w, x, dim=spec.sequence_dim, need_wgrad=need_dw,
                                                              **spec.knobs())
            if need_db:
                db = _sum_rows(dy).contiguous()
                spec.communicator().all_reduce(db).wait()
        else:
            if need_dx:
                dx = matmul(dy, w.t(), kernel=spec.kernel)
            if need_dw:
                dw = overlap.weight_grad(x, dy, w, spec.kernel)
            if need_db:
                db = _sum_rows(dy)
        dw, db = _hand_on(ctx, dw if need_dw else None, db)
        return (dx if need_dx else None), dw, db, None, None
