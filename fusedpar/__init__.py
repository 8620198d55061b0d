"""fusedpar: tensor-parallel layers whose matmuls overlap their collectives.

Pure pip on stock torch and triton; eager; correct on CPU (gloo, interpreted Triton)
and fast on GPU (NCCL, compiled Triton).
"""
from __future__ import annotations

__version__ = "0.1.0"
