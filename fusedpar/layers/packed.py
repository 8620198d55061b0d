"""Linears whose weight packs several projections along one dim (`[gate; up]`, `[q; k; v]`).

A plain column split of a packed `[gate; up]` weight would give rank 0 all of `gate` and
rank 1 all of `up`. Hugging Face's "packed_colwise" / "packed_rowwise" split each part on
its own, so every rank holds its slice of every part and the model's own
`gate, up = y.chunk(2, -1)` sees `[gate_r, up_r]`:

    full weight rows (packed_colwise)   [gate_0 gate_1 | up_0 up_1]      (world 2)
    rank r holds                        [gate_r | up_r]

`PackedColumnParallelLinear` is a ColumnParallelLinear over that local weight, so it runs
the same fused GEMM, joins the same column groups (one gather, one backward reduction with
its siblings) and overlaps the same way; only the sharding differs (`tp_shard_parts`, which
`full_state_dict` and the checkpoint code read).
`PackedRowParallelLinear` is the row-parallel counterpart (input features packed).
"""
from __future__ import annotations

from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from ..comm import check_group
from .linear import ColumnParallelLinear, RowParallelLinear
from .sharding import ParamShard, local_tensor, tp_parameter

__all__ = ["PackedColumnParallelLinear", "PackedRowParallelLinear"]

_T = TypeVar("_T")


def _packed_copy(linear: nn.Linear, dim: int, parts: int, *, group: dist.ProcessGroup, name: str
                 ) -> tuple[nn.Linear, dist.ProcessGroup]:
    """A stand-in linear whose weight rows (dim 0) / columns (dim 1) are reordered rank-major,
    so the plain `from_linear` chunking hands each rank `[part_0[r]; part_1[r]; ...]`; and the
    checked group."""
    how = ("column-wise", "row-wise")[dim]
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"{name}: expected an nn.Linear to shard packed {how}, got {type(linear).__name__}")
    group = check_group(group, arg=f"{name}: group")
    world = dist.get_world_size(group)
    shard = ParamShard(dim, parts)
    shard.check(linear.weight.shape, world, where=f"{name}: weight")
    with torch.no_grad():
        weight = torch.cat([shard.local(linear.weight, r, world) for r in range(world)], dim)
        bias = linear.bias.detach() if linear.bias is not None else None
        if bias is not None and dim == 0:  # a row-parallel bias is replicated: kept as is
            bias = torch.cat([ParamShard(0, parts).local(bias, r, world) for r in range(world)])
    stand_in = nn.Linear(linear.in_features, linear.out_features, bias=bias is not None, device="meta")
    stand_in.weight = nn.Parameter(weight, requires_grad=linear.weight.requires_grad)
    if bias is not None:
        stand_in.bias = nn.Parameter(bias, requires_grad=linear.bias.requires_grad)
    return stand_in, group


def _as_packed(layer: nn.Module, parts: int) -> nn.Module:
    """Re-describe the layer's split DTensor parameters (`tp_shard_dims`) as packed
    (sharding.py: the parts unflattened), same local tensors: the plain column / row split it
    was built with says the wrong rows. `tp_shard_parts`, read with `tp_shard_dims` by the
    checkpoint code and `full_state_dict`, says so too."""
    layer.parts = parts
    layer.tp_shard_parts = {name: parts for name in layer.tp_shard_dims}
    for name, dim in layer.tp_shard_dims.items():
        p = layer._parameters.get(name)
        if p is not None:
            layer._parameters[name] = tp_parameter(local_tensor(p), ParamShard(dim, parts), group=layer.spec.group,
                                                   requires_grad=p.requires_grad)
    return layer


class _Packed:
    """What both packed linears add to their plain parent (the next class in the MRO): sharding
    an `nn.Linear` per packed block along the parent's split dim (`tp_shard_dims["weight"]`:
    0, the output features, for the column layer; 1, the input features, for the row layer)."""

    parts: int = 2
    tp_shard_dims: dict[str, int]

    @classmethod
    def from_linear(cls: type[_T], linear: nn.Linear, *, group: dist.ProcessGroup, name: str = "linear",
                    parts: int = 2, **kwargs: Any) -> _T:
        """Shard an existing packed `nn.Linear`: `parts` blocks of equal size along the split dim."""
        stand_in, group = _packed_copy(linear, cls.tp_shard_dims["weight"], parts, group=group, name=name)  # type: ignore[attr-defined]
        return _as_packed(super().from_linear(stand_in, group=group, name=name, **kwargs), parts)  # type: ignore[misc]

    def extra_repr(self) -> str:
        return super().extra_repr() + f", packed parts={self.parts}"  # type: ignore[misc]


class PackedColumnParallelLinear(_Packed, ColumnParallelLinear):
    """ColumnParallelLinear over a weight of `parts` packed output blocks, each split across ranks."""


class PackedRowParallelLinear(_Packed, RowParallelLinear):
    """RowParallelLinear over a weight of `parts` packed input blocks, each split across ranks."""
