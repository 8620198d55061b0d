"""Static check of the GEMM family for Hopper and Ampere, on a machine without a GPU.

Triton compiles for a GPU target it does not have (``GPUTarget("cuda", 90, 32)``), so the
compiled kernels can be read here: registers and stack (spills) from the cubin through the
``cuobjdump`` Triton ships, shared memory from the compile metadata, and from the PTX
whether the tensor cores are used (``wgmma`` on sm_90, ``mma.sync`` on sm_80), whether
the K loop's loads are asynchronous (TMA ``cp.async.bulk.tensor`` or ``cp.async``) and
whether TMA is used.

Each case builds the launch the library itself would make (the same planner, the same
arguments, through :func:`~fusedpar.kernels.matmul._matmul_launch`) from CPU tensors of the
layout, then specializes and compiles it exactly as the JIT does at a launch (the JIT's own
binder, so unit strides and 16-divisible sizes are specialized as they are at run time).

    python -m fusedpar kernels [--check] [--quick] [--full] [--jobs N] [--json FILE]

What it compiles (:func:`check_cases`): every epilogue the layers and overlap ops can
request (:func:`epilogues`) on every candidate tile, per target, path and dtype
(:func:`epilogue_cases`), and every kernel, layout and dtype with the tile the rules pick
(:func:`default_cases`). Compiles run in worker processes with ``TRITON_INTERPRET=0`` (the
interpreter's kernels cannot be compiled), ~1-4 s each; Triton's on-disk cache
(``TRITON_CACHE_DIR``, keyed by the kernel's source, constexprs, target and options) serves
a rerun, so only the kernels an edit touched compile again.

The check is four files, one step each: :mod:`.compile_cases` (which cases),
:mod:`.compile_launch` (the library's launch for a case), :mod:`.compile_cubin` (compiling
it and reading the cubin and PTX) and this one (what counts as a problem, the tables and the
command line). Every name of the steps is importable from here too.
"""
from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

from fusedpar.kernels.compile_cases import (
    DTYPES, EPILOGUE_DTYPES, EPILOGUES, FP8_DTYPES, GROUPED_LAYOUTS, LAYOUTS, RULE_CASES, SHAPE, TARGETS, Case,
    Epilogue, check_cases, default_cases, epilogue_cases, epilogues, parse_epilogue)
from fusedpar.kernels.compile_cubin import Result, compile_case, run_cases, toolchain_missing
from fusedpar.kernels.compile_launch import build_launch

# the names of the steps' modules as well as this one's: they were all defined here once,
# and tests, bench/gpu/gemm_sweep.py and the command line import them from here
__all__ = ["Case", "DTYPES", "EPILOGUES", "EPILOGUE_DTYPES", "Epilogue", "FP8_DTYPES", "GROUPED_LAYOUTS",
           "LAYOUTS", "RULE_CASES", "Result", "SHAPE", "TARGETS", "add_arguments", "build_launch", "check_cases",
           "compile_case", "default_cases", "epilogue_cases", "epilogues", "format_summary", "format_table",
           "kernel_of", "main", "parse_epilogue", "problems", "run", "run_cases", "toolchain_missing"]


# ----------------------------------------------------------------------------------------
# What counts as a problem, and the tables
# ----------------------------------------------------------------------------------------

def kernel_of(r: Result) -> str:
    """The kernel a result compiled: ``matmul/tma``, ``gated/pointer``, ``grouped``..."""
    if r.case.layout in GROUPED_LAYOUTS:
        return "grouped_wgrad" if r.case.layout == "grouped_wgrad" else "grouped"
    return f"{parse_epilogue(r.case.epilogue).op}/{r.path}"


def format_summary(results: list[Result]) -> str:
    """Per target, kernel and dtype: the epilogues and tiles compiled, the cases not
    applicable there, and the largest register count and stack (spill) seen."""
    groups: dict[tuple[str, str, str], list[Result]] = {}
    for r in results:
        if not r.skipped:
            groups.setdefault((r.case.target, kernel_of(r), r.case.dtype), []).append(r)
    lines = []
    for (target, kernel, dtype), rs in sorted(groups.items()):
        epis = sorted({r.case.epilogue for r in rs})
        tiles = sorted({r.config for r in rs if r.config})
        spills = [r for r in rs if r.stack or r.local]
        failed = [r for r in rs if not r.ok]
        regs = max((r.registers for r in rs if r.ok), default=0)
        lines.append(f"{target:7} {kernel:15} {dtype:19} {len(rs):4} compiles, {len(tiles):2} tiles, "
                     f"max {regs} regs, {len(spills)} spilling, {len(failed)} failed; epilogues: {', '.join(epis)}")
        lines.append(" " * 8 + "tiles: " + ", ".join(tiles))
    skipped = sum(1 for r in results if r.skipped)
    lines.append(f"{skipped} case(s) not applicable (a path or target that cannot take the layout or dtype)")
    return "\n".join(lines)


def problems(results: list[Result]) -> list[str]:
    """What ``--check`` fails on: any case that did not compile, spills, overflows shared
    memory, or (16-bit and tf32 tiles of >= 64 rows on sm_90a) misses wgmma or pipelining."""
    found = []
    for r in results:
        c = r.case
        where = f"{c.target} {c.dtype} {c.layout} {c.epilogue} {r.config or c.config}"
        if r.skipped:
            continue
        if not r.ok:
            found.append(f"{where}: does not compile: {r.error}")
            continue
        if r.stack or r.local:
            found.append(f"{where}: spills (stack {r.stack} B, local {r.local} B, {r.registers} registers)")
        if r.shared > r.smem_limit:
            found.append(f"{where}: needs {r.shared} B of shared memory, the target has {r.smem_limit}")
        block_m = int(re.search(r":(\d+)x", r.config).group(1)) if r.config else 0
        if c.target == "sm_90a" and c.dtype != "float32-ieee" and block_m >= 64 and r.path == "tma":
            if r.mma != "wgmma":
                found.append(f"{where}: no wgmma (tensor cores via {r.mma or 'nothing'})")
            if not r.pipelined:
                found.append(f"{where}: K loop not pipelined (no TMA / cp.async)")
        if r.path == "grouped" and c.target == "sm_90a" and c.dtype != "float32-ieee" and \
                (r.mma != "wgmma" or not r.pipelined):
            found.append(f"{where}: grouped kernel without wgmma ({r.mma or 'nothing'}) or a pipelined K loop")
        if c.target == "sm_80" and c.dtype != "float32-ieee" and r.mma != "mma":
            found.append(f"{where}: no mma.sync on sm_80")
    return found


def format_table(results: list[Result]) -> str:
    head = ("target", "dtype", "layout", "epilogue", "path", "config", "smem KiB", "regs", "spill B", "mma",
            "pipelined", "tma", "s")
    rows = []
    for r in results:
        c = r.case
        if r.skipped:
            rows.append((c.target, c.dtype, c.layout, c.epilogue, r.path, c.config.short() if c.config else "", "-",
                         "-", "-", "n/a", r.skipped[:60], "", f"{r.seconds:.1f}"))
            continue
        if not r.ok:
            rows.append((c.target, c.dtype, c.layout, c.epilogue, r.path, r.config, "-", "-", "-", "ERROR",
                         r.error[:60], "", f"{r.seconds:.1f}"))
            continue
        rows.append((c.target, c.dtype, c.layout, c.epilogue, r.path, r.config, f"{r.shared / 1024:.0f}",
                     str(r.registers), str(r.stack + r.local), r.mma or "-", "yes" if r.pipelined else "no",
                     "yes" if r.tma else "no", f"{r.seconds:.1f}"))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda row: "  ".join(str(x).ljust(w) for x, w in zip(row, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows)])


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fusedpar kernels", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


def add_arguments(parser) -> None:
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if anything the rules or autotuner may pick fails to compile, spills, "
                             "overflows shared memory or misses wgmma/pipelining")
    parser.add_argument("--full", action="store_true", help="also every candidate x dtype x layout")
    parser.add_argument("--quick", action="store_true",
                        help="only default_cases (~100 compiles, what the test suite runs), not every epilogue on "
                             "every tile")
    parser.add_argument("--jobs", type=int, default=None, help="compile processes (default: CPU count)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")


def run(args) -> int:
    cases = default_cases(full=args.full) if args.quick else check_cases(full=args.full)
    t0 = time.perf_counter()
    results = run_cases(cases, args.jobs)
    print(format_table(results))
    print("\n" + format_summary(results))
    found = problems(results)
    import triton

    print(f"\n{len(results)} compiles in {time.perf_counter() - t0:.0f} s (triton {triton.__version__}); "
          f"{len(found)} problem(s)")
    for p in found:
        print("  " + p)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"triton": triton.__version__, "results": [r.to_json() for r in results],
                                         "problems": found}, indent=1))
    return 1 if (args.check and found) else 0


if __name__ == "__main__":
    sys.exit(main())
