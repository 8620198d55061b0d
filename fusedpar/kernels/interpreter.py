"""The one place for Triton-interpreter (``TRITON_INTERPRET=1``) workarounds.

Under the interpreter every ``@triton.jit`` kernel runs on the CPU through numpy. That lets
the kernels be tested on GPU-less machines, with two differences from compiled Triton
(measured with triton 3.8/3.9, see ../shared/FACTS.md):

1. bfloat16 *arithmetic* is silently wrong (bf16 is held as uint16 and the raw bits are
   computed with; triton-lang/triton#11584). Loads, stores and ``.to()`` are right, so the
   kernels up-cast bf16 tiles to fp32 right after ``tl.load`` when :func:`upcast_to_fp32`
   says so, and only then.
2. Each program costs ~2.5 ms per K-step, whatever its block size: interpreted runs use
   one large-block config (:data:`INTERPRETER_BLOCKS`) rather than the GPU configs, and
   never autotune (timings would say nothing about a GPU).
"""
from __future__ import annotations

import os

import torch

__all__ = ["INTERPRETER_BLOCKS", "is_interpreting", "upcast_to_fp32"]

# Triton reads TRITON_INTERPRET once, when `@triton.jit` decorates a function. This module is
# imported just before the kernels are decorated, so reading it here at import time gives
# the mode the kernels actually run in; setting the variable later has no effect on them.
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")

# Block sizes for interpreted runs. Small blocks pay the per-program cost many times, big
# ones make numpy slow (measured on the 2-core CI machine, matmul + gated_matmul per call:
# 200x130x70 86 ms with 128x128x64, 186 ms 128x128x128, 252 ms 256x256x64, 314 ms 64^3;
# 512^3 0.56 s, 5.0 s, 3.3 s, 1.4 s). 128x128x64 was fastest on every shape tried.
INTERPRETER_BLOCKS: dict[str, int] = {"block_m": 128, "block_n": 128, "block_k": 64, "group_m": 8}


def is_interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1`` was set
    before the kernels were imported)."""
    return _INTERPRETING


def upcast_to_fp32(dtype: torch.dtype) -> bool:
    """Whether kernels must convert loaded tiles of ``dtype`` to fp32 before computing.

    True only for bfloat16 under the interpreter, whose bf16 arithmetic is wrong; compiled
    kernels keep bf16 tiles so ``tl.dot`` uses the tensor cores.
    """
    return _INTERPRETING and dtype == torch.bfloat16
