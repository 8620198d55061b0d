"""Linears whose weight packs several projections along one dim (`[gate; up]`, `[q; k; v]`).

A plain column split of a packed `[gate; up]` weight would give rank 0 all of `gate` and
rank 1 all of `up`. Hugging Face's "packed_colwise" / "packed_rowwise" split each part on
its own, so every rank holds its slice of every part and the model's own
`gate, up = y.chunk(2, -1)` sees `[gate_r, up_r]`:

    full weight rows (packed_colwise)   [gate_0 gate_1 | up_0 up_1]      (world 2)
    rank r holds                        [gate_r | up_r]

`PackedColumnParallelLinear` is a ColumnParallelLinear over that local weight, so it runs
the same fused GEMM, joins the same column groups (one gather, one backward reduction with
its siblings) and overlaps the same way; only sharding and `full_state_dict` differ.
`PackedRowParallelLinear` is the row-parallel counterpart (input features packed).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..comm import check_group
from .linear import ColumnParallelLinear, RowParallelLinear
from .sharding import ParamShard, local_tensor, tp_parameter

__all__ = ["PackedColumnParallelLinear", "PackedRowParallelLinear"]


def _packed_copy(linear: nn.Linear, dim: int, parts: int, *, group: dist.ProcessGroup, name: str) -> nn.Linear:
    """A stand-in linear whose weight rows (dim 0) / columns (dim 1) are reordered rank-major,
    so the plain `from_linear` chunking hands each rank `[part_0[r]; part_1[r]; ...]`."""
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
    return stand_in


def _as_packed(layer: nn.Module, names: tuple[str, ...], dim: int, parts: int) -> None:
    """Re-describe the layer's DTensor parameters as packed (sharding.py: the parts unflattened),
    same local tensors: the plain column / row split it was built with says the wrong rows."""
    for name in names:
        p = layer._parameters.get(name)
        if p is not None:
            layer._parameters[name] = tp_parameter(local_tensor(p), ParamShard(dim, parts), group=layer.spec.group,
                                                   requires_grad=p.requires_grad)


class PackedColumnParallelLinear(ColumnParallelLinear):
    """ColumnParallelLinear over a weight of `parts` packed output blocks, each split across ranks."""

    parts: int = 2

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, group: dist.ProcessGroup, name: str = "linear", parts: int = 2,
                    **kwargs: Any) -> PackedColumnParallelLinear:
        """Shard an existing packed `nn.Linear`; `parts` blocks of equal size along its output."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{name}: expected an nn.Linear to shard packed column-wise, got {type(linear).__name__}")
        group = check_group(group, arg=f"{name}: group")
        layer = super().from_linear(_packed_copy(linear, 0, parts, group=group, name=name), group=group, name=name,
                                    **kwargs)
        layer.parts = parts
        layer.tp_shard_parts = {"weight": parts, "bias": parts}  # read with tp_shard_dims by the checkpoint code
        _as_packed(layer, ("weight", "bias"), 0, parts)
        return layer

    def full_state_dict(self) -> dict[str, Tensor]:
        """The unsharded `{"weight", "bias"}` in the packed order (a collective)."""
        comm = self.spec.communicator()
        out = {"weight": ParamShard(0, self.parts).gather(local_tensor(self.weight), comm)}
        if self.bias is not None:
            out["bias"] = ParamShard(0, self.parts).gather(local_tensor(self.bias), comm)
        return out

    def extra_repr(self) -> str:
        return super().extra_repr() + f", packed parts={self.parts}"


class PackedRowParallelLinear(RowParallelLinear):
    """RowParallelLinear over a weight of `parts` packed input blocks, each split across ranks."""

    parts: int = 2

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, group: dist.ProcessGroup, name: str = "linear", parts: int = 2,
                    **kwargs: Any) -> PackedRowParallelLinear:
        """Shard an existing `nn.Linear` whose input features pack `parts` equal blocks."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{name}: expected an nn.Linear to shard packed row-wise, got {type(linear).__name__}")
        group = check_group(group, arg=f"{name}: group")
        layer = super().from_linear(_packed_copy(linear, 1, parts, group=group, name=name), group=group, name=name,
                                    **kwargs)
        layer.parts = parts
        layer.tp_shard_parts = {"weight": parts}
        _as_packed(layer, ("weight",), 1, parts)
        return layer

    def full_state_dict(self) -> dict[str, Tensor]:
        """The unsharded `{"weight", "bias"}` in the packed order (a collective)."""
        out = {"weight": ParamShard(1, self.parts).gather(local_tensor(self.weight), self.spec.communicator())}
        if self.bias is not None:
            out["bias"] = local_tensor(self.bias).detach().clone()
        return out

    def extra_repr(self) -> str:
        return super().extra_repr() + f", packed parts={self.parts}"
