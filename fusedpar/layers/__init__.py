"""Tensor-parallel layers built on the overlap schedules, and `parallelize` for whole models.

    ColumnParallelLinear, RowParallelLinear   the two halves of every tensor-parallel block
    ReplicatedColumnLinear                    kv heads when there are fewer than ranks
    ParallelMLP, ParallelAttention            blocks (gated / plain MLP; MHA / GQA + SDPA)
    SequenceParallelLayerNorm / RMSNorm       norms on sequence shards, gradients all-reduced
    parallelize(model, plan, group=...)       convert a model in place from a plain-data plan
    full_state_dict(model)                    gather the unsharded weights back for saving
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
from .mlp import ParallelMLP
from .norm import SequenceParallelLayerNorm, SequenceParallelRMSNorm, all_reduce_grads, grad_all_reduce
from .parallelize import STYLES, full_state_dict, parallelize, resolve_plan

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
    "parallelize",
    "full_state_dict",
    "resolve_plan",
    "STYLES",
    "Float8Recipe",
    "enable_fp8",
]
