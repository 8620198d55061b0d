"""Triton GEMM kernels with fused epilogues, and their torch equivalents.

``matmul`` computes ``act(a @ b + bias)`` (optionally accumulating into ``out``) and
``gated_matmul`` computes ``act(a @ b_gate) * (a @ b_up)``; both read strided operands and
write into any strided ``out``, so tensor-parallel overlap schedules can feed them chunks.
"""
from __future__ import annotations

from fusedpar.kernels.matmul import ACTIVATIONS, gated_matmul, matmul, resolve_kernel

__all__ = ["ACTIVATIONS", "gated_matmul", "matmul", "resolve_kernel"]
