"""Tensor-parallel multi-head / grouped-query attention: heads split across ranks.

    q, k, v = column-parallel(x)    one fused GEMM, heads split (sequence-parallel: one ring gather)
    o       = sdpa(q, k, v)         local heads, no communication
    y       = row-parallel(o)       all-reduce, or reduce-scatter with sequence parallelism

Query heads are split evenly (`num_heads % world == 0`). Key/value heads are split the same
way when `num_kv_heads % world == 0`; when there are fewer kv heads than ranks
(`world % num_kv_heads == 0`) each kv head is replicated on the `world // num_kv_heads`
consecutive ranks whose query heads use it, its weights stored whole on every rank and their
gradients all-reduced (`ReplicatedColumnLinear`).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import Unpack  # typing.Unpack needs Python 3.11; torch requires typing_extensions

from ..comm import check_group
from .linear import ColumnParallelLinear, ReplicatedColumnLinear, RowParallelLinear, column_parallel_group
from .linear_spec import LinearKnobs, _check_knobs, _row_knobs

__all__ = ["ParallelAttention", "kv_layout"]


def kv_layout(num_heads: int, num_kv_heads: int, world: int, *, where: str = "ParallelAttention") -> int:
    """How kv heads are laid out: 0 if split across ranks, else `parts` (= num_kv_heads) for replication.

    Raises if the query heads do not split evenly or the kv heads neither split nor replicate.
    """
    if num_heads % world:
        raise ValueError(f"{where}: num_heads: expected a multiple of the world size {world}, got {num_heads}")
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"{where}: num_kv_heads: expected a divisor of num_heads {num_heads}, got {num_kv_heads}")
    if num_kv_heads % world == 0:
        return 0
    if world % num_kv_heads == 0:
        return num_kv_heads
    raise ValueError(
        f"{where}: num_kv_heads: expected a multiple or a divisor of the world size {world} "
        f"(split or replicated across ranks), got {num_kv_heads}"
    )


class ParallelAttention(nn.Module):
    """Self-attention on `x [batch, seq, hidden]` with heads split across `group`.

    With `sequence_parallel=True` the input and output are `[batch, seq/world, hidden]`
    shards (split on dim 1); q/k/v gather the full sequence in their fused GEMM, so the
    attention itself always sees the whole sequence. `attn_mask` / `is_causal` go to
    `F.scaled_dot_product_attention`. The other keyword arguments (`LinearKnobs`:
    `chunks`, `kernel`, `comm`, `save_gathered_input`, `dtype`, `device`, ...) go to every
    linear, with the linears' defaults; all but `sequence_dim`, fixed at the sequence dim
    of `[batch, seq, hidden]`.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        *,
        group: dist.ProcessGroup,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        bias: bool = False,
        out_bias: bool = False,
        is_causal: bool = True,
        **knobs: Unpack[LinearKnobs],
    ) -> None:
        super().__init__()
        _check_knobs(knobs, "ParallelAttention", not_here=("sequence_dim",))
        group = check_group(group, arg="ParallelAttention: group")
        world = dist.get_world_size(group)
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        head_dim = hidden_size // num_heads if head_dim is None else head_dim
        kv_parts = kv_layout(num_heads, num_kv_heads, world)
        self.num_heads, self.num_kv_heads, self.head_dim, self.is_causal = num_heads, num_kv_heads, head_dim, is_causal
        self.local_heads = num_heads // world
        self.local_kv_heads = num_kv_heads // world if kv_parts == 0 else 1
        col: dict[str, Any] = dict(knobs, group=group, bias=bias)
        self.q_proj = ColumnParallelLinear(hidden_size, num_heads * head_dim, _name="ParallelAttention.q_proj", **col)
        for name in ("k_proj", "v_proj"):
            if kv_parts:
                layer = ReplicatedColumnLinear(hidden_size, num_kv_heads * head_dim, parts=kv_parts,
                                               _name=f"ParallelAttention.{name}", **col)
            else:
                layer = ColumnParallelLinear(hidden_size, num_kv_heads * head_dim, _name=f"ParallelAttention.{name}",
                                             **col)
            setattr(self, name, layer)
        self.o_proj = RowParallelLinear(num_heads * head_dim, hidden_size, _name="ParallelAttention.o_proj",
                                        **dict(_row_knobs(col), bias=out_bias))

    @classmethod
    def from_linears(
        cls, *, q: nn.Linear, k: nn.Linear, v: nn.Linear, o: nn.Linear, num_heads: int, num_kv_heads: int | None = None,
        group: dist.ProcessGroup, **kwargs: Any,
    ) -> ParallelAttention:
        """Shard existing projections (pretrained weights survive); `head_dim = q.out_features / num_heads`."""
        for name, lin in (("q", q), ("k", k), ("v", v), ("o", o)):
            if not isinstance(lin, nn.Linear):
                raise TypeError(f"ParallelAttention.from_linears: {name}: expected an nn.Linear, got {type(lin).__name__}")
        head_dim = q.out_features // num_heads
        attn = cls(q.in_features, num_heads, group=group, num_kv_heads=num_kv_heads, head_dim=head_dim,
                   bias=q.bias is not None, out_bias=o.bias is not None, dtype=q.weight.dtype,
                   device=q.weight.device, **kwargs)
        with torch.no_grad():
            for name, lin in (("q_proj", q), ("k_proj", k), ("v_proj", v), ("o_proj", o)):
                src = type(getattr(attn, name)).from_linear(lin, group=group, name=name, **_from_kwargs(attn, name))
                getattr(attn, name).load_state_dict(src.state_dict())
        return attn

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        (q, k, v), x_full = column_parallel_group([self.q_proj, self.k_proj, self.v_proj], x)
        b, s = x_full.shape[0], x_full.shape[1]
        q = q.view(b, s, self.local_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, s, self.local_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, s, self.local_kv_heads, self.head_dim).transpose(1, 2)
        if self.local_kv_heads != self.local_heads:  # grouped-query: each kv head serves a run of q heads
            rep = self.local_heads // self.local_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if attn_mask is not None and self.is_causal:
            attn_mask = _with_causal(attn_mask, q.shape[-2], k.shape[-2])
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=self.is_causal and attn_mask is None)
        return self.o_proj(o.transpose(1, 2).reshape(b, s, self.local_heads * self.head_dim))

    def full_state_dict(self) -> dict[str, Tensor]:
        """Unsharded weights keyed like the module's own state dict (a collective)."""
        out = {}
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out.update({f"{name}.{k}": v for k, v in getattr(self, name).full_state_dict().items()})
        return out

    def extra_repr(self) -> str:
        kv = "replicated" if isinstance(self.k_proj, ReplicatedColumnLinear) else "split"
        return (f"num_heads={self.num_heads} (local {self.local_heads}), num_kv_heads={self.num_kv_heads} "
                f"(local {self.local_kv_heads}, {kv}), head_dim={self.head_dim}, is_causal={self.is_causal}")


def _from_kwargs(attn: ParallelAttention, name: str) -> dict[str, Any]:
    layer = getattr(attn, name)
    spec = layer.spec
    kw: dict[str, Any] = dict(sequence_parallel=spec.sequence_parallel, sequence_dim=spec.sequence_dim,
                              chunks=spec.chunks, kernel=spec.kernel, comm=spec.comm)
    if isinstance(layer, ReplicatedColumnLinear):
        kw["parts"] = layer.parts
    if not isinstance(layer, RowParallelLinear):
        kw["save_gathered_input"] = spec.save_gathered_input
    return kw


def _with_causal(attn_mask: Tensor, q_len: int, kv_len: int) -> Tensor:
    """`attn_mask` (bool: True attends; or additive float) restricted to the causal triangle.

    SDPA refuses `attn_mask` together with `is_causal=True`; dropping causality when a
    padding mask is passed would silently let tokens see the future."""
    causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=attn_mask.device).tril(kv_len - q_len)
    if attn_mask.dtype == torch.bool:
        return attn_mask & causal
    return attn_mask.masked_fill(~causal, float("-inf"))
