"""Tensor-parallel layers built on the overlap schedules: the nn.Modules and their autograd
functions (`parallelize`, which converts whole models, is fusedpar.plan's).

    ColumnParallelLinear, RowParallelLinear   the two halves of every tensor-parallel block
    ReplicatedColumnLinear                    kv heads when there are fewer than ranks
    PackedColumn/RowParallelLinear            fused [gate; up] / [q; k; v] weights split per part
    ParallelMLP, ParallelAttention            blocks (gated / plain MLP; MHA / GQA + SDPA)
    SequenceParallelLayerNorm / RMSNorm       norms on sequence shards, gradients all-reduced
    shard_experts, shard_embedding            MoE experts (grouped GEMMs), vocab/hidden-parallel embeddings
    vocab_parallel_cross_entropy              the loss of vocab-split logits
    reduce_partial, replicated_inputs         the partial-sum regions around sharded computations
    ParamShard, shard_parameter, local_shard  how a sharded parameter maps to its unsharded tensor
    Float8Recipe, enable_fp8                  fp8 GEMMs in the parallel linears (also parallelize(fp8=...))
"""
from __future__ import annotations

from .attention import ParallelAttention
from .fp8 import Float8Recipe, enable_fp8
from .linear import (
    ColumnParallelLinear,
    LinearSpec,
    ReplicatedColumnLinear,
    RowParallelLinear,
    column_parallel_group,
    gather_from_shard,
    split_to_shard,
)
from .embedding import shard_embedding, vocab_parallel_cross_entropy
from .mlp import ParallelMLP
from .moe import grouped_experts, shard_experts
from .packed import PackedColumnParallelLinear, PackedRowParallelLinear
from .partial import reduce_partial, replicated_inputs
from .norm import SequenceParallelLayerNorm, SequenceParallelRMSNorm, all_reduce_grads, grad_all_reduce
from .sharding import ParamShard, local_shard, shard_parameter

__all__ = [
    "ColumnParallelLinear",
    "RowParallelLinear",
    "ReplicatedColumnLinear",
    "LinearSpec",
    "column_parallel_group",
    "split_to_shard",
    "gather_from_shard",
    "ParallelMLP",
    "ParallelAttention",
    "SequenceParallelLayerNorm",
    "SequenceParallelRMSNorm",
    "all_reduce_grads",
    "grad_all_reduce",
    "ParamShard",
    "local_shard",
    "shard_parameter",
    "PackedColumnParallelLinear",
    "PackedRowParallelLinear",
    "shard_experts",
    "grouped_experts",
    "shard_embedding",
    "vocab_parallel_cross_entropy",
    "reduce_partial",
    "replicated_inputs",
    "Float8Recipe",
    "enable_fp8",
]
