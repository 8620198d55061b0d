"""`python -m fusedpar kernels`: the GEMM family compiled for sm_90a and sm_80, no GPU needed.

Every epilogue the layers can request (none, bias, each activation with and without bias,
accumulate, the gated SwiGLU/GeGLU family) on every candidate tile, in bf16, fp16, tf32 and
fp8 (sm_90a), plus every kernel, layout and dtype the rules pick: a table per compiled case
(registers, spills, shared memory, wgmma/mma, pipelining, TMA) and a summary of what was
compiled per target, kernel and dtype. ``--check`` exits 1 when any of it fails to compile,
spills, overflows shared memory, or (sm_90a, 16-bit and tf32 tiles of >= 64 rows) misses
wgmma or a pipelined K loop; ``--quick`` compiles only the kernels, layouts and dtypes (~100
cases). See fusedpar/kernels/compile_report.py.
"""
from __future__ import annotations

import argparse

from fusedpar.kernels import compile_report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    compile_report.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    return compile_report.run(args)
