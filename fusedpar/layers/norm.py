"""Sequence-parallel norms: LayerNorm / RMSNorm on the local sequence shard.

A norm works token by token, so on a sequence shard it needs no communication in forward.
Its weight (and bias) are replicated, but each rank's gradient covers only its own tokens:
backward all-reduces them over the group so every rank steps with the full gradient.

    forward   y_shard = norm(x_shard) * w (+ b)           no comm
    dgrad     dx_shard from dy_shard                       no comm
    wgrad     dw = all_reduce(Σ_shard dy·x̂)                all-reduce (one per parameter)

`all_reduce_grads(module, group=...)` gives any existing module (e.g. a Hugging Face
`LlamaRMSNorm`) the same backward, through gradient hooks on its parameters.
"""
from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..comm import Communicator, check_group, get_communicator
from . import traced
from .sharding import is_dtensor, local_tensor

__all__ = ["SequenceParallelLayerNorm", "SequenceParallelRMSNorm", "all_reduce_grads", "grad_all_reduce"]


class _GradAllReduceFn(torch.autograd.Function):
    """Identity on a replicated parameter whose gradient is a per-rank partial sum.

    forward   w → w                         no comm
    dgrad     dw = all_reduce(dw_partial)   all-reduce
    wgrad     —
    """

    @staticmethod
    def forward(ctx: Any, w: Tensor, group: dist.ProcessGroup, comm: str) -> Tensor:
        ctx.group, ctx.comm = group, comm
        return w.view_as(w)

    @staticmethod
    def backward(ctx: Any, dw: Tensor) -> tuple[Tensor, None, None]:
        dw = dw.contiguous().clone()
        get_communicator(ctx.group, ctx.comm).all_reduce(dw).wait()
        return dw, None, None


def all_reduced_grad(grad: Tensor, communicator: Communicator) -> Tensor:
    """A new `grad` summed over the group (a DTensor gradient: its local tensor, rewrapped)."""
    summed = local_tensor(grad).contiguous().clone()
    communicator.all_reduce(summed).wait()
    if is_dtensor(grad):
        from torch.distributed.tensor import DTensor

        return DTensor(summed.view(grad._local_tensor.shape), grad._spec, requires_grad=False)
    return summed


def grad_all_reduce(w: Tensor, *, group: dist.ProcessGroup, comm: str = "torch") -> Tensor:
    """`w` itself in forward; its gradient all-reduced over `group` in backward."""
    if torch.compiler.is_compiling():  # the traceable path (traced.py)
        return traced.copy_to_region(w, group)
    return _GradAllReduceFn.apply(w, group, comm)


def all_reduce_grads(module: nn.Module, *, group: dist.ProcessGroup, comm: str = "torch",
                     region: Any = None) -> list[RemovableHandle]:
    """Make `module`'s parameters (recursively) all-reduce their gradients over `group`.

    For replicated parameters whose gradient each rank only partly computes: norms on
    sequence shards, per-head norms on head shards (Hugging Face's
    "replicated_with_grad_allreduce"), replicated kv heads. The hook runs once per backward,
    on the gradient summed over all uses, before it is accumulated into `.grad`. The
    handles are also kept on `module._fusedpar_grad_hooks` (remove them to undo).
    With `region` (a `SequenceRegion`), the all-reduce is skipped when the region's last
    forward ran unsplit: every rank then computed the whole gradient.
    """
    group = check_group(group)
    communicator = get_communicator(group, comm)

    def hook(grad: Tensor) -> Tensor:
        if region is not None and not region.split:
            return grad
        return all_reduced_grad(grad, communicator)

    hooked: dict[int, weakref.ref] = {}  # id -> the tensor (weakly): tensors compare elementwise

    def hook_parameters(*_: Any) -> None:
        # FSDP2 (and anything else that swaps a module's parameters for new tensors) makes
        # the forward use other Parameter objects than the ones seen here at first: hook
        # whatever the module holds when it runs, once per tensor.
        if torch.compiler.is_compiling():
            # traced, `id(p)` would guard each compiled block on its own parameters' ids (a
            # recompile per decoder layer); the parameters hooked at install time are kept.
            # Parameters swapped in since (FSDP2's unsharded ones) get the all-reduce from
            # their views where the module has views (local_views._push_views); elsewhere they
            # would lose it, a silently wrong gradient, so that is refused
            for m in module.modules():
                if m.__dict__.get("_fusedpar_has_views"):
                    continue  # its views all-reduce the gradients of unhooked parameters (local_views._push_views)
                for p in m._parameters.values():
                    if p is None or not p.requires_grad or getattr(p, "_fusedpar_grad_hooked", False):
                        continue
                    raise RuntimeError(
                        "fusedpar: torch.compile of a block whose replicated parameters' gradients are all-reduced "
                        "(sequence-parallel norms) found parameters swapped in after parallelize (FSDP2's "
                        "fully_shard): their all-reduce cannot be hooked in a compiled forward. Expected "
                        "per-block compile without FSDP2, or FSDP2 without compile, got both")
            return
        for p in module.parameters():
            seen = hooked.get(id(p))
            if p.requires_grad and (seen is None or seen() is not p):
                hooked[id(p)] = weakref.ref(p)
                handles.append(p.register_hook(hook))
                p._fusedpar_grad_hooked = True

    handles: list[RemovableHandle] = []
    for m in module.modules():  # for the views of parameters swapped in later (local_views._push_views)
        m.__dict__["_fusedpar_grad_reduce"] = (group, region)
    hook_parameters()
    handles.append(module.register_forward_pre_hook(hook_parameters))
    module._fusedpar_grad_hooks = getattr(module, "_fusedpar_grad_hooks", []) + handles
    return handles


class SequenceParallelLayerNorm(nn.LayerNorm):
    """`nn.LayerNorm` on a sequence shard; weight and bias gradients all-reduced over `group`."""

    def __init__(self, normalized_shape: int | tuple[int, ...], *, group: dist.ProcessGroup, eps: float = 1e-5,
                 elementwise_affine: bool = True, bias: bool = True, comm: str = "torch",
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, bias=bias,
                         dtype=dtype, device=device)
        self.group, self.comm = check_group(group), comm

    @classmethod
    def from_module(cls, norm: nn.LayerNorm, *, group: dist.ProcessGroup, comm: str = "torch") -> SequenceParallelLayerNorm:
        """The same norm (weights copied) with sequence-parallel gradients."""
        w = norm.weight
        new = cls(norm.normalized_shape, group=group, eps=norm.eps, elementwise_affine=w is not None,
                  bias=norm.bias is not None, comm=comm,
                  dtype=w.dtype if w is not None else None, device=w.device if w is not None else None)
        new.load_state_dict(norm.state_dict())
        return new

    def forward(self, x_shard: Tensor) -> Tensor:
        w = grad_all_reduce(self.weight, group=self.group, comm=self.comm) if self.weight is not None else None
        b = grad_all_reduce(self.bias, group=self.group, comm=self.comm) if self.bias is not None else None
        return F.layer_norm(x_shard, self.normalized_shape, w, b, self.eps)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", sequence_parallel=True, comm={self.comm}"


class SequenceParallelRMSNorm(nn.Module):
    """RMSNorm (`w * x / sqrt(mean(x²) + eps)`, computed in at least fp32 like Llama's) on a sequence shard."""

    def __init__(self, hidden_size: int, *, group: dist.ProcessGroup, eps: float = 1e-6, comm: str = "torch",
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device))
        self.eps = eps
        self.group, self.comm = check_group(group), comm

    @classmethod
    def from_module(cls, norm: nn.Module, *, group: dist.ProcessGroup, comm: str = "torch") -> SequenceParallelRMSNorm:
        """From any RMSNorm with `weight` and `eps` / `variance_epsilon` (nn.RMSNorm, LlamaRMSNorm)."""
        eps = getattr(norm, "eps", None)
        if eps is None:
            eps = getattr(norm, "variance_epsilon", 1e-6)
        w = norm.weight
        new = cls(w.shape[0], group=group, eps=eps, comm=comm, dtype=w.dtype, device=w.device)
        with torch.no_grad():
            new.weight.copy_(w)
        return new

    def forward(self, x_shard: Tensor) -> Tensor:
        w = grad_all_reduce(self.weight, group=self.group, comm=self.comm)
        x32 = x_shard.to(torch.promote_types(x_shard.dtype, torch.float32))  # at least fp32
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return w * y.to(x_shard.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, sequence_parallel=True, comm={self.comm}"
