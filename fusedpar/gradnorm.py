"""The global gradient norm of a tensor-parallel model, and clipping by it.

`torch.nn.utils.clip_grad_norm_(model.parameters(), ...)` on one rank of a TP model sees
only that rank's shards of the sharded weights and counts nothing of the other ranks', so
its norm is wrong (too small) and every clipped step differs from single-GPU training.
Here each parameter counts once over the TP group:

    sharded over the group     (column-/row-parallel weights)   every rank's shard: summed
    replicated over the group  (embeddings, norms, row biases)  the same on every rank: once

    ||g||_p = ( all_reduce_sum_tp( Σ_sharded ||g_i||_p^p + Σ_replicated ||g_i||_p^p / world ) )^(1/p)
    ||g||_inf = all_reduce_max_tp( max_i ||g_i||_inf )

A module says which of its parameters are sharded over its group with a class attribute
`tp_shard_dims` ({name: the dim split across ranks}); everything else is replicated.
Gradients that are DTensors (every parameter of a parallelized model; FSDP2's `fully_shard`
over a data-parallel mesh dim) contribute their local shard: a shard placement on the TP
group's mesh dim makes them sharded, and they are also summed over the other mesh dims they
are sharded on. `torch.nn.utils.clip_grad_norm_` gets the same norm from the DTensors; this
one also covers plain shards and mixes torch refuses. DDP's
gradients are plain tensors, equal on every data-parallel rank after its all-reduce, so
nothing more is needed there.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .comm import check_group, get_communicator

__all__ = ["grad_norm", "clip_grad_norm_", "sharded_parameters"]


def sharded_parameters(model: nn.Module) -> set[int]:
    """ids of the parameters of `model` that are sharded over their tensor-parallel group."""
    ids: set[int] = set()
    for module in model.modules():
        for name in getattr(module, "tp_shard_dims", {}):
            p = getattr(module, name, None)
            if isinstance(p, Tensor):
                ids.add(id(p))
    return ids


def _dtensor_local(g: Tensor) -> tuple[Tensor, tuple[Any, ...]]:
    """(local tensor, process groups of the mesh dims it is sharded on) for a gradient."""
    try:
        from torch.distributed.tensor import DTensor, Replicate
    except ImportError:  # pragma: no cover
        return g, ()
    if not isinstance(g, DTensor):
        return g, ()
    if any(p.is_partial() for p in g.placements):  # a pending reduction: settle it first
        g = g.redistribute(g.device_mesh, [Replicate() if p.is_partial() else p for p in g.placements])
    groups = tuple(g.device_mesh.get_group(dim) for dim, p in enumerate(g.placements) if _is_shard(p))
    return g._local_tensor, groups


def _is_shard(placement: Any) -> bool:
    """Shard, or FSDP2's _StridedShard (dp over a dim TP already splits), which is no Shard
    subclass in torch 2.13 and answers is_shard() False."""
    if placement.is_shard():
        return True
    try:
        from torch.distributed.tensor.placement_types import _StridedShard
    except ImportError:  # pragma: no cover
        return False
    return isinstance(placement, _StridedShard)


def _same_group(a: Any, b: Any, b_ranks: list[int]) -> bool:
    return a is b or dist.get_process_group_ranks(a) == b_ranks


def _check_norm_type(norm_type: float, where: str) -> float:
    try:
        p = float(norm_type)
    except (TypeError, ValueError):
        raise TypeError(f"{where}: norm_type: expected a positive number or inf, got {norm_type!r}") from None
    if not (p > 0):
        raise ValueError(f"{where}: norm_type: expected a positive number or inf, got {norm_type!r}")
    return p


def _norms(grads: list[Tensor], p: float, foreach: bool | None) -> Tensor:
    """||g||_p of each gradient, as one fp32 vector."""
    if not grads:
        return torch.zeros(0)
    by_device: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for g in grads:
        by_device.setdefault((g.device, g.dtype), []).append(g)
    out = []
    for (device, _), gs in by_device.items():
        use_foreach = foreach if foreach is not None else device.type in ("cpu", "cuda")
        if use_foreach:
            out += [n.float() for n in torch._foreach_norm(gs, p)]
        else:
            out += [torch.linalg.vector_norm(g, p).float() for g in gs]
    device = out[0].device
    return torch.stack([n.to(device) for n in out])


def grad_norm(model: nn.Module, *, group: Any, norm_type: float = 2.0, foreach: bool | None = None) -> Tensor:
    """The p-norm of all of `model`'s gradients, each parameter counted once over the
    tensor-parallel `group` (a ProcessGroup or a 1-D DeviceMesh): equal on every rank, and
    equal to the norm one process computes for the unparallelized model.

    A collective over `group` (and over the data-parallel dims FSDP2 shards gradients on):
    every rank must call it. Parameters without a gradient (frozen) are skipped. Returns an
    fp32 scalar tensor on the gradients' device.
    """
    where = "grad_norm"
    group = check_group(group, arg=f"{where}: group")
    p = _check_norm_type(norm_type, where)
    world = dist.get_world_size(group)
    sharded = sharded_parameters(model)
    tp_ranks = dist.get_process_group_ranks(group)
    # bucket by (sharded over TP?, the extra groups a DTensor shard is summed over)
    buckets: dict[tuple[bool, tuple[Any, ...]], list[Tensor]] = {}
    for param in model.parameters():
        if param.grad is None:
            continue
        local, groups = _dtensor_local(param.grad)
        # sharded over the TP group: a DTensor placement on it (fusedpar's parameters), or a
        # plain shard a module declares (tp_shard_dims); the other mesh dims it is sharded on
        # (FSDP2's data-parallel dim) are summed over separately
        on_tp = [g for g in groups if _same_group(g, group, tp_ranks)]
        extra = tuple(g for g in groups if not _same_group(g, group, tp_ranks))
        buckets.setdefault((bool(on_tp) or id(param) in sharded, extra), []).append(local)
    device = next((g.device for gs in buckets.values() for g in gs), torch.device("cpu"))
    communicator = get_communicator(group)
    total = torch.zeros((), dtype=torch.float32, device=device)
    # every rank must issue the same collectives in the same order: sort the buckets by a key
    # that does not depend on which process groups this rank's objects are
    order = sorted(buckets, key=lambda k: (k[0], len(k[1])))
    if len({(k[0], len(k[1])) for k in order}) != len(order):
        raise ValueError(f"{where}: gradients sharded over different data-parallel meshes; expected one")
    for sharded_here, extra in order:
        norms = _norms(buckets[(sharded_here, extra)], p, foreach).to(device)
        if math.isinf(p):
            part = norms.max() if norms.numel() else total.new_zeros(())
        else:
            part = norms.pow(p).sum()
            if not sharded_here:
                part = part / world  # the same on every rank of the group: counted once
        part = part.reshape(1).contiguous()
        for g in extra:
            part = _reduce_partial_norm(part, p, g)
        total = torch.maximum(total, part[0]) if math.isinf(p) else total + part[0]  # both keep NaN
    total = _reduce_partial_norm(total.reshape(1).contiguous(), p, group, communicator)
    return total[0] if math.isinf(p) else total[0].pow(1.0 / p)


def _reduce_partial_norm(part: Tensor, p: float, group: Any, communicator: Any = None) -> Tensor:
    """``part`` (one fp32 element: this rank's max for p = inf, its sum of p-th powers
    otherwise) reduced over ``group`` so that a NaN or inf on any rank is one on every rank
    (then ``error_if_nonfinite`` raises, and clipping does the same, on all of them).

    A SUM needs nothing more: its terms are >= 0, so NaN and inf survive it (no inf - inf).
    A MAX does not: gloo's max (NCCL's too) of NaN and x gives whichever comparison order
    favours, so a NaN on rank 1 only came back finite on both ranks. NaN therefore travels
    as a second element of the same all-reduce, a flag; inf is ordered and needs no flag.
    """
    if not math.isinf(p):
        if communicator is not None:
            communicator.all_reduce(part).wait()
        else:
            dist.all_reduce(part, op=dist.ReduceOp.SUM, group=group)
        return part
    is_nan = torch.isnan(part)
    packed = torch.cat([torch.where(is_nan, torch.zeros_like(part), part), is_nan.to(part.dtype)])
    dist.all_reduce(packed, op=dist.ReduceOp.MAX, group=group)
    return torch.where(packed[1:] > 0, torch.full_like(part, math.nan), packed[:1])


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float, *, group: Any, norm_type: float = 2.0,
                    foreach: bool | None = None, error_if_nonfinite: bool = False) -> Tensor:
    """Scale `model`'s gradients in place so their global norm (:func:`grad_norm`) is at most
    `max_norm`; returns the norm before clipping. The tensor-parallel replacement for
    `torch.nn.utils.clip_grad_norm_`, which would see only this rank's shards.

    Every rank computes the same norm and the same scale, so replicated parameters stay
    equal across ranks. Composes with DDP / FSDP2 on another mesh dim.
    """
    total = grad_norm(model, group=group, norm_type=norm_type, foreach=foreach)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(f"clip_grad_norm_: the total norm of order {norm_type} is {total.item()} (non-finite); "
                           f"pass error_if_nonfinite=False to clip anyway")
    coef = torch.clamp(float(max_norm) / (total + 1e-6), max=1.0)
    grads: Iterable[Tensor] = (_dtensor_local(p.grad)[0] for p in model.parameters() if p.grad is not None)
    by_device: dict[torch.device, list[Tensor]] = {}
    for g in grads:
        by_device.setdefault(g.device, []).append(g)
    for device, gs in by_device.items():
        if foreach is not False and device.type in ("cpu", "cuda"):
            torch._foreach_mul_(gs, coef.to(device))
        else:
            for g in gs:
                g.mul_(coef.to(device))
    return total
