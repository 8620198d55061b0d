"""Compiling a case's launch as the JIT would, for a GPU target this machine need not have,
and reading the result: registers and stack (spills) from the cubin through the
``cuobjdump`` Triton ships, shared memory from the compile metadata, and from the PTX the
tensor-core instructions (``wgmma`` on sm_90, ``mma.sync`` on sm_80), whether the K loop's
loads are asynchronous (TMA ``cp.async.bulk.tensor`` or ``cp.async``) and whether TMA is
used. :func:`run_cases` compiles many cases in worker processes with the interpreter off.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

from fusedpar.kernels.compile_cases import TARGETS, Case
from fusedpar.kernels.compile_launch import build_launch

__all__ = ["Result", "compile_case", "run_cases", "toolchain_missing"]


@dataclasses.dataclass
class Result:
    case: Case
    path: str = ""
    config: str = ""
    ok: bool = False
    error: str = ""
    shared: int = 0
    registers: int = 0
    stack: int = 0
    local: int = 0
    fp32_adds: int = 0  # add.f32 in the PTX: fp8's promotion of each K step's partial sum shows here
    mma: str = ""
    pipelined: bool = False
    tma: bool = False
    seconds: float = 0.0
    skipped: str = ""  # why a case was not compiled (its path cannot take the layout)

    @property
    def smem_limit(self) -> int:
        return TARGETS[self.case.target][2]

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["case"] = {**dataclasses.asdict(self.case), "config": self.config}
        return d



def _compile(launch, target_name: str):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.fn
    if not hasattr(fn, "_pack_args"):
        raise RuntimeError("kernels are interpreted (TRITON_INTERPRET=1): compile in a fresh process")
    capability = TARGETS[target_name][0]
    target = GPUTarget("cuda", capability[0] * 10 + capability[1], 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(launch.kwargs)
    kwargs.setdefault("debug", False)
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:  # what JITFunction.run adds before binding (triton 3.6-3.9)
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        if hasattr(knobs.compilation, "fpsan_homomorphic_casts"):
            kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=target, options=options.__dict__)


def _cuobjdump() -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def toolchain_missing() -> str | None:
    """Why kernels cannot be compiled and read here, or None: Triton's NVIDIA backend
    compiles PTX with its bundled ``ptxas`` and the report reads the cubin with its
    ``cuobjdump``."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError as e:
        return f"triton's NVIDIA backend does not import: {e}"
    tools = {"ptxas": get_ptxas(90).path, "cuobjdump": _cuobjdump()}
    for name, path in tools.items():
        if not path or not os.access(path, os.X_OK):
            return f"no executable {name} (looked for {path})"
    return None


def _resource_usage(cubin: bytes) -> dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True,
                             text=True, timeout=60)
    text = out.stdout + out.stderr
    usage = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        m = re.search(rf"\b{key}:(\d+)", text)
        if m is None:
            raise RuntimeError(f"cuobjdump printed no {key}: {text.strip()[:300]}")
        usage[key] = int(m.group(1))
    return usage


def compile_case(case: Case) -> Result:
    """Compile one case in this process (which must not be interpreting) and read it."""
    t0 = time.perf_counter()
    result = Result(case)
    try:
        launch = build_launch(case)
        result.path = launch.plan.path
        result.config = launch.plan.config.short()
        compiled = _compile(launch, case.target)
        ptx = compiled.asm["ptx"]
        usage = _resource_usage(compiled.asm["cubin"])
        result.registers, result.stack, result.local = usage["REG"], usage["STACK"], usage["LOCAL"]
        result.shared = int(getattr(compiled.metadata, "shared", 0))
        result.mma = "wgmma" if "wgmma.mma_async" in ptx else ("mma" if "mma.sync" in ptx else "")
        result.tma = "cp.async.bulk.tensor" in ptx
        result.fp32_adds = ptx.count("add.f32")
        result.pipelined = result.tma or "cp.async.commit_group" in ptx or "cp.async.ca" in ptx \
            or "cp.async.cg" in ptx
        result.ok = True
    except Exception as e:  # noqa: BLE001 - the report records every failure as a row
        if isinstance(e, ValueError) and "which cannot run here" in str(e):
            # a candidate forced onto a path the planner refuses for this layout (tf32 or fp8
            # with an M-major operand on TMA), or fp8 on sm_80: never launched, nothing to check
            result.path, result.skipped = "n/a", str(e).split("cannot run here: ")[-1]
            result.seconds = time.perf_counter() - t0
            return result
        result.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
    result.seconds = time.perf_counter() - t0
    return result


def _worker_init() -> None:
    import warnings

    os.environ["TRITON_INTERPRET"] = "0"
    # triton 3.9 warns once per process that its fp-fusion default will change in 3.10
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")


def run_cases(cases: list[Case], jobs: int | None = None) -> list[Result]:
    """Compile every case, in ``jobs`` fresh processes (the kernels must be imported with
    the interpreter off), results in the order of ``cases``."""
    jobs = jobs or min(len(cases), os.cpu_count() or 1)
    ctx = multiprocessing.get_context("spawn")
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"  # spawned workers inherit it before importing triton
    try:
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_worker_init) as pool:
            return list(pool.map(compile_case, cases))
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old
