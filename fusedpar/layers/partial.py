"""Partial sums across ranks: the two autograd regions around a sharded computation that
runs inside a module fusedpar does not replace (MoE experts, DeepSeek's latent attention),
and the hook styles built on them.

    y_full = reduce_partial(y_partial)      forward all-reduce; backward identity
    x, w   = replicated_inputs(x, w)        forward identity;   backward ONE all-reduce of (dx, dw)

A computation that reads a replicated input and uses only this rank's shard of a weight
produces a partial sum (`y_partial`), and the gradient it sends back to the replicated input
is partial too: `reduce_partial` and `replicated_inputs` are the two halves of the
column→row pair in Megatron's naming (`f` and `g`), for modules that are not linears.

Hook styles (module → its forward changed in place, nothing replaced):
    install_reduce_output(module)              "all_reduce": the module's output is a partial sum
                                               (and so are its inputs' gradients)
    install_divide_input(module)               "moe_identity_expert": an identity expert inside
                                               a partial-sum experts block adds its input once,
                                               not once per rank
    install_mla_kv_a_proj(module, rope_dim)    "mla_kv_a_proj": the rope part of DeepSeek's joint
                                               kv projection goes to every local head directly
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..comm import get_communicator
from . import traced

__all__ = [
    "reduce_partial",
    "replicated_inputs",
    "install_reduce_output",
    "install_divide_input",
    "install_mla_kv_a_proj",
]


class _ReducePartialFn(torch.autograd.Function):
    """`y_partial → y_full = all_reduce(y_partial)`.

    forward   y_full [..] = Σ_ranks y_partial      all-reduce
    dgrad     dy_partial = dy_full                 no comm (every rank's share had the same weight)
    wgrad     —
    """

    @staticmethod
    def forward(ctx: Any, y: Tensor, group: dist.ProcessGroup, comm: str) -> Tensor:
        y = y.contiguous().clone()
        get_communicator(group, comm).all_reduce(y).wait()
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor, None, None]:
        return dy, None, None


class _ReplicatedInputsFn(torch.autograd.Function):
    """`(x_full, ...) → (x_full, ...)` for replicated tensors consumed by a partial computation.

    forward   identity                                              no comm
    dgrad     (dx, ...) = all_reduce(cat(dx_partial, ...))          one all-reduce for all of them
    wgrad     —
    """

    @staticmethod
    def forward(ctx: Any, group: dist.ProcessGroup, comm: str, *xs: Tensor) -> tuple[Tensor, ...]:
        ctx.group, ctx.comm = group, comm
        ctx.meta = [(x.shape, x.dtype) for x in xs]
        return tuple(x.view_as(x) for x in xs)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        present = [(i, g) for i, g in enumerate(grads) if g is not None]
        if not present:
            return (None, None, *grads)
        dtype = torch.promote_types(*(g.dtype for _, g in present)) if len(present) > 1 else present[0][1].dtype
        flat = torch.cat([g.reshape(-1).to(dtype) for _, g in present])
        get_communicator(ctx.group, ctx.comm).all_reduce(flat).wait()
        out: list[Tensor | None] = list(grads)
        offset = 0
        for i, g in present:
            out[i] = flat[offset:offset + g.numel()].view(g.shape).to(g.dtype)
            offset += g.numel()
        return (None, None, *out)


def reduce_partial(y_partial: Tensor, *, group: dist.ProcessGroup, comm: str = "torch") -> Tensor:
    """`all_reduce(y_partial)` (a sum over ranks) whose backward passes the gradient through."""
    if torch.compiler.is_compiling():  # the traceable path (traced.py)
        return traced.reduce_from_region(y_partial, group)
    return _ReducePartialFn.apply(y_partial, group, comm)


def replicated_inputs(*xs: Any, group: dist.ProcessGroup, comm: str = "torch") -> tuple[Any, ...]:
    """`xs` unchanged; in backward their gradients (partial sums) are summed over ranks with one
    all-reduce. Tensors that need no gradient, and anything not a tensor, pass through untouched."""
    picked = [i for i, x in enumerate(xs) if isinstance(x, Tensor) and x.requires_grad and torch.is_grad_enabled()]
    if not picked:
        return tuple(xs)
    if torch.compiler.is_compiling():  # one all-reduce each, traceable (traced.py)
        outs = tuple(traced.copy_to_region(xs[i], group) for i in picked)
    else:
        outs = _ReplicatedInputsFn.apply(group, comm, *(xs[i] for i in picked))
    result = list(xs)
    for i, y in zip(picked, outs):
        result[i] = y
    return tuple(result)


def _map_first_tensor(output: Any, fn: Any) -> Any:
    if isinstance(output, Tensor):
        return fn(output)
    if isinstance(output, tuple) and output and isinstance(output[0], Tensor):
        return (fn(output[0]), *output[1:])
    raise TypeError(f"expected the module to return a Tensor or a tuple starting with one, got {type(output).__name__}")


def install_reduce_output(module: nn.Module, *, group: dist.ProcessGroup, comm: str = "torch") -> None:
    """Style "all_reduce": the module computes a partial sum from replicated inputs with its
    sharded parameters (Inkling's shared experts). Its output (or first element) is
    all-reduced in forward; the gradients it sends to its tensor inputs, partial sums too,
    are all-reduced together in backward."""

    def pre_hook(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        keys = [k for k, v in kwargs.items() if isinstance(v, Tensor)]
        wrapped = replicated_inputs(*args, *(kwargs[k] for k in keys), group=group, comm=comm)
        return tuple(wrapped[:len(args)]), {**kwargs, **dict(zip(keys, wrapped[len(args):]))}

    def hook(mod: nn.Module, args: tuple, output: Any) -> Any:
        return _map_first_tensor(output, lambda y: reduce_partial(y, group=group, comm=comm))

    module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    module.register_forward_hook(hook)


def install_divide_input(module: nn.Module, *, world: int) -> None:
    """Style "moe_identity_expert": scale the input by 1/world, so an identity expert's output,
    summed over the ranks with the rest of the experts block, counts once."""

    def hook(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args and isinstance(args[0], Tensor):
            return (args[0] / world, *args[1:]), kwargs
        if isinstance(kwargs.get("hidden_states"), Tensor):
            return args, {**kwargs, "hidden_states": kwargs["hidden_states"] / world}
        raise TypeError(f"moe_identity_expert: expected {type(mod).__name__}'s first argument to be a Tensor")

    module.register_forward_pre_hook(hook, with_kwargs=True)


def install_mla_kv_a_proj(module: nn.Module, *, rope_dim: int, group: dist.ProcessGroup, comm: str = "torch") -> None:
    """Style "mla_kv_a_proj": DeepSeek's replicated joint projection `[kv_latent ; k_rope]`.

    The latent part goes through a norm into the column-parallel `kv_b_proj`, whose
    backward all-reduces its input gradient; the `rope_dim` rope features go straight to
    this rank's heads, so their gradient is partial and is all-reduced here.
    """

    def hook(mod: nn.Module, args: tuple, output: Any) -> Any:
        def split(y: Tensor) -> Tensor:
            latent, rope = y.split([y.shape[-1] - rope_dim, rope_dim], dim=-1)
            (rope,) = replicated_inputs(rope, group=group, comm=comm)
            return torch.cat([latent, rope], dim=-1)

        return _map_first_tensor(output, split)

    module.register_forward_hook(hook)
