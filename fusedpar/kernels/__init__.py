"""Triton GEMM kernels with fused epilogues, and their torch equivalents.

``matmul`` computes ``act(a @ b + bias)`` (optionally accumulating into ``out``) and
``gated_matmul`` computes ``act(a @ b_gate) * (a @ b_up)``; both read strided operands and
write into any strided ``out``, so tensor-parallel overlap schedules can feed them chunks.
``plan_matmul`` / ``plan_gated_matmul`` say which kernel (TMA or pointer) and tile a call
would run, and why; ``GemmConfig`` forces one. ``python -m fusedpar kernels`` compiles every
tile for sm_90a and sm_80 and reports registers, spills, shared memory, wgmma and TMA. Both
take fp8 operands with their scales (``a_scale``, ``b_scale``; :mod:`.fp8`), which
``quantize_rowwise`` / ``quantize_tensorwise`` make (:mod:`.quantize`, with the scale rules).
"""
from __future__ import annotations

from fusedpar.kernels.common import ACTIVATIONS, resolve_kernel
from fusedpar.kernels.configs import GemmConfig, set_autotune
from fusedpar.kernels.gated import gated_matmul, plan_gated_matmul
from fusedpar.kernels.grouped import grouped_matmul, grouped_matmul_wgrad
from fusedpar.kernels.matmul import matmul, plan_matmul
from fusedpar.kernels.plan import GemmPlan
from fusedpar.kernels.quantize import dequantize, quantize_rowwise, quantize_tensorwise

__all__ = ["ACTIVATIONS", "GemmConfig", "GemmPlan", "dequantize", "gated_matmul", "grouped_matmul",
           "grouped_matmul_wgrad", "matmul", "plan_gated_matmul", "plan_matmul", "quantize_rowwise",
           "quantize_tensorwise", "resolve_kernel", "set_autotune"]
