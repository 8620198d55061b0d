"""`python -m fusedpar kernels`: the GEMM family compiled for sm_90a and sm_80, no GPU needed.

A table per compiled case (registers, spills, shared memory, wgmma/mma, pipelining, TMA);
``--check`` exits 1 when anything the rules or the autotuner may pick fails to compile,
spills, overflows shared memory, or (sm_90a, 16-bit and tf32 tiles of >= 64 rows) misses
wgmma or a pipelined K loop. See fusedpar/kernels/compile_report.py.
"""
from __future__ import annotations

import argparse

from fusedpar.kernels import compile_report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    compile_report.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    return compile_report.run(args)
