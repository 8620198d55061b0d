"""fusedpar: tensor-parallel layers whose matmuls overlap their collectives.

Pure pip on stock torch and triton; eager; correct on CPU (gloo, interpreted Triton)
and fast on GPU (NCCL, compiled Triton).

Layers:      ColumnParallelLinear, RowParallelLinear, ParallelMLP, ParallelAttention, parallelize
             (every Hugging Face TP style: packed, embeddings, MoE experts, MLA), vocab_parallel_cross_entropy
fp8:         Float8Recipe, enable_fp8 (or parallelize(..., fp8=True)), quantize_rowwise, quantize_tensorwise
Schedules:   all_gather_matmul, matmul_reduce_scatter, matmul_all_reduce (+ *_reference, backward blocks)
Kernels:     matmul, gated_matmul, grouped_matmul (+ _wgrad), resolve_kernel
Comm:        get_communicator, init_distributed, new_group, CollectiveError, RanksDisagreeError
Cost model:  predict, choose_chunks, calibrate, device_spec_for, set_device_spec
Parameters:  every parameter of a parallelized model is a DTensor on the TP mesh (Shard or
             Replicate), so torch.distributed.checkpoint, get_state_dict / set_state_dict,
             torch.nn.utils.clip_grad_norm_ and FSDP2 see shards as shards
Training:    grad_norm, clip_grad_norm_ (the global norm under TP; also plain shards, FSDP2 2-D)
Checkpoints: from_pretrained, load_checkpoint (each rank reads its slices), save_pretrained (Hugging
             Face files); DCP for model + optimizer at any world size
"""
from __future__ import annotations

from fusedpar.checks import InconsistentCallError
from fusedpar.plan.agreement import RanksDisagreeError
from fusedpar.checkpoint import from_pretrained, load_checkpoint
from fusedpar.checkpoint_save import save_pretrained
from fusedpar.comm import (
    CollectiveError,
    Communicator,
    CupyCommunicator,
    TorchCommunicator,
    get_communicator,
    init_distributed,
    new_group,
)
from fusedpar.costmodel import (
    DEVICES,
    DeviceSpec,
    Prediction,
    calibrate,
    choose_chunks,
    device_spec_for,
    predict,
    set_device_spec,
)
from fusedpar.gradnorm import clip_grad_norm_, grad_norm
from fusedpar.kernels import ACTIVATIONS, gated_matmul, grouped_matmul, grouped_matmul_wgrad, matmul, resolve_kernel
from fusedpar.kernels.quantize import dequantize, quantize_rowwise, quantize_tensorwise
from fusedpar.layers import (
    ColumnParallelLinear,
    Float8Recipe,
    PackedColumnParallelLinear,
    PackedRowParallelLinear,
    ParallelAttention,
    ParallelMLP,
    ParamShard,
    ReplicatedColumnLinear,
    RowParallelLinear,
    SequenceParallelLayerNorm,
    SequenceParallelRMSNorm,
    all_reduce_grads,
    column_parallel_group,
    enable_fp8,
    local_shard,
    vocab_parallel_cross_entropy,
)
from fusedpar.plan import full_state_dict, parallelize, parallelize_module
from fusedpar.overlap import (
    PendingOutput,
    all_gather_matmul,
    all_gather_matmul_reference,
    all_gather_matmul_with_wgrad,
    matmul_all_reduce,
    matmul_all_reduce_reference,
    matmul_all_reduce_with_wgrad,
    matmul_reduce_scatter,
    matmul_reduce_scatter_reference,
    matmul_reduce_scatter_with_wgrad,
)

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS",
    "ColumnParallelLinear",
    "Float8Recipe",
    "PackedColumnParallelLinear",
    "PackedRowParallelLinear",
    "ParallelAttention",
    "ParallelMLP",
    "ParamShard",
    "ReplicatedColumnLinear",
    "RowParallelLinear",
    "SequenceParallelLayerNorm",
    "SequenceParallelRMSNorm",
    "all_reduce_grads",
    "column_parallel_group",
    "dequantize",
    "enable_fp8",
    "full_state_dict",
    "local_shard",
    "parallelize",
    "parallelize_module",
    "vocab_parallel_cross_entropy",
    "CollectiveError",
    "Communicator",
    "CupyCommunicator",
    "DEVICES",
    "DeviceSpec",
    "InconsistentCallError",
    "RanksDisagreeError",
    "PendingOutput",
    "Prediction",
    "TorchCommunicator",
    "all_gather_matmul",
    "all_gather_matmul_reference",
    "all_gather_matmul_with_wgrad",
    "calibrate",
    "choose_chunks",
    "clip_grad_norm_",
    "from_pretrained",
    "grad_norm",
    "load_checkpoint",
    "save_pretrained",
    "device_spec_for",
    "gated_matmul",
    "get_communicator",
    "grouped_matmul",
    "grouped_matmul_wgrad",
    "init_distributed",
    "matmul",
    "matmul_all_reduce",
    "matmul_all_reduce_reference",
    "matmul_all_reduce_with_wgrad",
    "matmul_reduce_scatter",
    "matmul_reduce_scatter_reference",
    "matmul_reduce_scatter_with_wgrad",
    "new_group",
    "predict",
    "quantize_rowwise",
    "quantize_tensorwise",
    "resolve_kernel",
    "set_device_spec",
]
