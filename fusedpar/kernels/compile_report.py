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
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["Case", "Epilogue", "Result", "TARGETS", "check_cases", "default_cases", "epilogue_cases", "epilogues",
           "format_table", "parse_epilogue", "problems", "run_cases", "toolchain_missing"]

# name -> (compute capability, SMs, shared memory a block may opt into, bytes)
TARGETS: dict[str, tuple[tuple[int, int], int, int]] = {
    "sm_90a": ((9, 0), 132, 227 * 1024),
    "sm_80": ((8, 0), 108, 163 * 1024),
}
# fp8: "float8_e4m3fn" (forward: e4m3 activations x e4m3 weights), "float8_e5m2-e4m3fn"
# (dgrad: an e5m2 gradient x an e4m3 weight); row-wise scales, bf16 output
DTYPES = ("bfloat16", "float16", "float32-tf32", "float32-ieee", "float8_e4m3fn", "float8_e5m2-e4m3fn")
FP8_DTYPES = ("float8_e4m3fn", "float8_e5m2-e4m3fn")
# how the library launches a GEMM: the Linear forward, the dgrad, the wgrad, a strided out
# slice that TMA cannot take, and the overlap schedules' chunk consumer
LAYOUTS = ("x@w.T", "dy@w", "dy.T@x", "out_slice", "batched")
# the grouped (MoE experts) kernels: forward/dgrad over expert weights [G, N, K], and the wgrad
GROUPED_LAYOUTS = ("grouped", "grouped_wgrad")
# --full's epilogues (every layout x dtype x these); the check itself compiles every epilogue
# of :func:`epilogues` on every candidate tile (:func:`epilogue_cases`)
EPILOGUES = ("none", "bias_silu", "bias_gelu", "accumulate_fp32", "gated_silu", "gated_preact")
# the problem each case plans for (M, N, K): large, so the rules pick their biggest tile
SHAPE = (4096, 4096, 4096)


@dataclasses.dataclass(frozen=True)
class Case:
    """One compile: ``config`` None means the tile the rules pick for ``shape``; a config
    given is one of the candidates (all may be picked, by the rules or the autotuner)."""

    target: str
    dtype: str
    layout: str
    epilogue: str
    shape: tuple[int, int, int] = SHAPE
    config: object = None  # GemmConfig | None (object: keeps this module import-light)
    fast_accum: bool = False  # fp8: leave the K sum in the tensor cores' accumulator


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


# ----------------------------------------------------------------------------------------
# Epilogues: a case's name for what the launcher's epilogue arguments switch on
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Epilogue:
    """The launcher arguments an epilogue name stands for: ``op`` "matmul" or "gated";
    ``bias``, ``activation`` and ``accumulate`` (into an fp32 ``out``, as the wgrad adds into
    its fp32 sum) of :func:`~fusedpar.kernels.matmul`; ``return_preact`` of
    :func:`~fusedpar.kernels.gated_matmul`."""

    op: str
    bias: bool = False
    activation: str | None = None
    accumulate: bool = False
    return_preact: bool = False


def _activations() -> tuple[str, ...]:
    from fusedpar.kernels.common import ACTIVATIONS

    return tuple(a for a in ACTIVATIONS if a is not None)


def parse_epilogue(name: str) -> Epilogue:
    """``"none"``, ``"bias"``, ``"<act>"``, ``"bias_<act>"``, ``"accumulate_fp32"`` (matmul);
    ``"gated_<act>"`` (SwiGLU is ``"gated_silu"``), ``"gated_preact"`` (silu, storing gate and up)."""
    acts = _activations()
    if name == "gated_preact":
        return Epilogue("gated", activation="silu", return_preact=True)
    if name.startswith("gated_") and name[len("gated_"):] in acts:
        return Epilogue("gated", activation=name[len("gated_"):])
    if name == "accumulate_fp32":
        return Epilogue("matmul", accumulate=True)
    if name in ("none", "bias"):
        return Epilogue("matmul", bias=name == "bias")
    act = name[len("bias_"):] if name.startswith("bias_") else name
    if act in acts:
        return Epilogue("matmul", bias=name.startswith("bias_"), activation=act)
    raise ValueError(f"unknown epilogue {name!r}: expected one of {epilogues('matmul') + epilogues('gated')}")


def epilogues(op: str) -> tuple[str, ...]:
    """Every epilogue the layers and the overlap schedules can ask ``op``'s launcher for:
    matmul's bias or none, each with no activation or any of
    :data:`~fusedpar.kernels.common.ACTIVATIONS` (the overlap ops take both), and accumulating
    into an fp32 ``out`` (the wgrad's sum over ring pieces); the gated kernel's activations
    (ParallelMLP's gate: SwiGLU, GeGLU, ...). tests/kernels/test_compile_report.py derives
    what the layers request from their calls and checks this covers it."""
    acts = _activations()
    if op == "gated":
        return tuple(f"gated_{a}" for a in acts)
    if op == "matmul":
        return ("none", "bias", *acts, *(f"bias_{a}" for a in acts), "accumulate_fp32")
    raise ValueError(f"op: expected 'matmul' or 'gated', got {op!r}")


# ----------------------------------------------------------------------------------------
# Building the library's own launch for a case (CPU tensors; nothing runs)
# ----------------------------------------------------------------------------------------

def _operands(case: Case):
    import torch

    if case.dtype.startswith("float8"):  # "float8_e5m2-e4m3fn": a's format, then b's
        a_name, _, b_name = case.dtype.partition("-")
        dtype, b_dtype = getattr(torch, a_name), getattr(torch, "float8_" + (b_name or a_name.split("_")[1]))
    else:
        dtype = b_dtype = getattr(torch, case.dtype.split("-")[0])
    M, N, K = case.shape
    gated = parse_epilogue(case.epilogue).op == "gated"
    if case.layout == "x@w.T":  # x [M, K] @ w.T, w [N, K]: the Linear forward
        a = torch.empty(M, K, dtype=dtype)
        bs = [torch.empty(N, K, dtype=b_dtype).T for _ in range(1 + gated)]
    elif case.layout == "dy@w":  # dgrad: dy [M, K] @ w [K, N] (w row-major)
        a = torch.empty(M, K, dtype=dtype)
        bs = [torch.empty(K, N, dtype=b_dtype) for _ in range(1 + gated)]
    elif case.layout == "dy.T@x":  # wgrad: dy.T [M, K] (unit stride on M) @ x [K, N]
        a = torch.empty(K, M, dtype=dtype).T
        bs = [torch.empty(K, N, dtype=b_dtype) for _ in range(1 + gated)]
    elif case.layout in ("out_slice", "batched"):
        a = torch.empty(M, K, dtype=dtype)
        bs = [torch.empty(N, K, dtype=b_dtype).T for _ in range(1 + gated)]
        if case.layout == "batched":  # [B, m, K] rows of a received chunk, out rows of each block
            a = torch.empty(4, M // 4 + 8, K, dtype=dtype)[:, 8:]
    else:
        raise ValueError(f"unknown layout {case.layout!r}")
    out_dtype = torch.float32 if parse_epilogue(case.epilogue).accumulate else (
        torch.bfloat16 if dtype.itemsize == 1 else dtype)
    rows = a.shape[:-1]
    if case.layout == "out_slice":  # an odd column offset: TMA cannot take it
        out = torch.empty(*rows[:-1], rows[-1], N + 8, dtype=out_dtype)[..., 1:N + 1]
    elif case.layout == "batched":
        out = torch.empty(rows[0], rows[1] * 2, N, dtype=out_dtype)[:, rows[1]:]
    else:
        out = torch.empty(*rows, N, dtype=out_dtype)
    return a, bs, out


def _grouped_launch(case: Case):
    """The launch :func:`~fusedpar.kernels.grouped.grouped_matmul` (or its wgrad) would make."""
    import types

    import torch

    from fusedpar.kernels import grouped
    from fusedpar.kernels.common import _input_precision

    dtype = getattr(torch, case.dtype.split("-")[0])
    torch.backends.cuda.matmul.allow_tf32 = case.dtype == "float32-tf32"
    (M, N, K), G = case.shape, 8
    fp8 = dtype.itemsize == 1
    x, ends = torch.empty(M, K, dtype=dtype), torch.empty(G, dtype=torch.int64)
    kind = "wgrad" if case.layout == "grouped_wgrad" else "fwd"
    precision = _input_precision(dtype, False)
    blocks = grouped._blocks(kind, precision, fp8=fp8)
    scaled = {}
    if kind == "fwd":
        w, y = torch.empty(G, N, K, dtype=dtype).transpose(1, 2), torch.empty(M, N, dtype=torch.bfloat16 if fp8
                                                                              else dtype)  # nn.Linear layout
        tiles = torch.empty(M // blocks["BLOCK_M"], dtype=torch.int32), torch.empty(M // blocks["BLOCK_M"],
                                                                                    dtype=torch.int64)
        xs, ws = (torch.empty(M, 1), torch.empty(G, N)) if fp8 else (y, y)
        fn, args = grouped._grouped_kernel, (x, w, y, xs, ws, *tiles, ends, N, K, *x.stride(), *w.stride(),
                                             *y.stride(), *((1, N, 1) if fp8 else (0, 0, 0)))
        scaled = dict(SCALED=fp8, MAX_IMPRECISE_ACC=blocks["BLOCK_K"] if fp8 else None)
    else:
        dy, dw = torch.empty(M, N, dtype=dtype), torch.empty(G, K, N, dtype=dtype)
        fn, args = grouped._grouped_wgrad_kernel, (x, dy, dw, ends, K, N, *x.stride(), *dy.stride(), *dw.stride())
    short = f"grp:{blocks['BLOCK_M']}x{blocks['BLOCK_N']}x{blocks['BLOCK_K']}/w4"
    plan = types.SimpleNamespace(path="grouped", config=types.SimpleNamespace(short=lambda: short))
    kwargs = dict(UPCAST_TO_FP32=False, INPUT_PRECISION=precision, **scaled, **blocks)
    return types.SimpleNamespace(fn=fn, args=args, kwargs=kwargs, plan=plan)


def build_launch(case: Case):
    """The launch :func:`~fusedpar.kernels.matmul.matmul` / ``gated_matmul`` / ``grouped_matmul`` would make."""
    import torch

    if case.layout in GROUPED_LAYOUTS:
        return _grouped_launch(case)

    import importlib

    from fusedpar.kernels import common, gated, plan

    mm = importlib.import_module("fusedpar.kernels.matmul")  # the module (the package exports the function)

    capability, sms, _ = TARGETS[case.target]
    torch.backends.cuda.matmul.allow_tf32 = case.dtype == "float32-tf32"
    a, bs, out = _operands(case)
    plan._PLAN_TARGET = (capability, sms)
    try:
        a3, out3 = common._as_batched(a, out)
        fp8 = a.dtype.itemsize == 1  # row-wise scales, as the layers use them
        a_scale = torch.empty((*a.shape[:-1], 1)) if fp8 else None
        b_scale = torch.empty(1, out.shape[-1]) if fp8 else None
        epi = parse_epilogue(case.epilogue)
        if epi.op == "gated":
            pre = epi.return_preact
            gate3 = torch.empty(out3.shape, dtype=out.dtype) if pre else out3
            up3 = torch.empty(out3.shape, dtype=out.dtype) if pre else out3
            return gated._gated_launch(a3, bs[0], bs[1], out3, gate3, up3, epi.activation, pre, None, case.config,
                                       scales=(a_scale, b_scale, b_scale) if fp8 else None,
                                       fast_accum=case.fast_accum)
        bias = torch.empty(out.shape[-1], dtype=out.dtype) if epi.bias else None
        return mm._matmul_launch(a3, bs[0], bias, out3, epi.activation, epi.accumulate, None, case.config,
                                 scales=(a_scale, b_scale) if fp8 else None, fast_accum=case.fast_accum)
    finally:
        plan._PLAN_TARGET = None


# ----------------------------------------------------------------------------------------
# Compiling a launch as the JIT would, and reading the result
# ----------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------
# Which cases, and what counts as a problem
# ----------------------------------------------------------------------------------------

# What the rules' pick is compiled with in every dtype (default report): one case per
# layout, each with the epilogue that stresses it most.
RULE_CASES = (("x@w.T", "bias_silu"), ("x@w.T", "gated_preact"), ("dy@w", "none"), ("dy.T@x", "accumulate_fp32"),
              ("out_slice", "bias_silu"), ("batched", "gated_silu"))


def default_cases(full: bool = False) -> list[Case]:
    """The kernels, layouts and dtypes of a report (``--quick``; the epilogues are
    :func:`epilogue_cases`).

    Default (what tests/kernels/test_compile_report.py compiles, ~80 s on 2 cores): every
    candidate tile of every kernel on each target whose path it serves (TMA tiles on sm_90a,
    pointer tiles on both) in bf16 with bias+SiLU (gated: with its pre-activations), and the
    fp8 tiles (BLOCK_K doubled) in e4m3 on sm_90a; the grouped (MoE) kernels in bf16, tf32
    and e4m3 (forward only: the wgrad stays high precision) on sm_90a, bf16 on sm_80; then
    the rules' pick for a large problem in every dtype and layout (:data:`RULE_CASES`) on
    sm_90a, and in bf16 and e4m3 on sm_80 (where fp8 is refused: the case is reported as not
    applicable). The tile sets the register and shared-memory budget; the dtype, layout and
    epilogue change the code around it, which the rule cases and :func:`epilogue_cases` cover.
    ``full``: every candidate in every dtype, layout and epilogue on both targets.
    """
    import torch

    from fusedpar.kernels.configs import candidate_configs

    cases: list[Case] = []
    seen = set()

    def add(case: Case) -> None:
        if case not in seen:
            seen.add(case)
            cases.append(case)

    dtype_of = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32-tf32": torch.float32,
                "float32-ieee": torch.float32, "float8_e4m3fn": torch.float8_e4m3fn,
                "float8_e5m2-e4m3fn": torch.float8_e5m2}
    for target in TARGETS:
        tma_target = TARGETS[target][0] >= (9, 0)
        for op, epi in (("matmul", "bias_silu"), ("gated", "gated_preact")):
            for tma in ((True, False) if tma_target else (False,)):
                dtypes = DTYPES if full else ("bfloat16", "float8_e4m3fn") if tma_target else ("bfloat16",)
                for dt in (dtypes if tma_target else [d for d in dtypes if d not in FP8_DTYPES]):
                    cands = candidate_configs(op, dtype_of[dt], tma, tensor_cores=dt != "float32-ieee")
                    for cfg in cands:
                        for layout in (LAYOUTS if full else ("x@w.T" if tma else "out_slice",)):
                            if tma and layout == "out_slice":
                                continue  # TMA cannot take it: the pointer tiles cover it
                            if epi.startswith("gated") and layout in ("dy@w", "dy.T@x"):
                                continue
                            add(Case(target, dt, layout, epi, config=cfg))
    for target in TARGETS:  # the grouped kernels have one tile each
        hopper = TARGETS[target][0] >= (9, 0)
        grouped_dtypes = [d for d in DTYPES if d not in FP8_DTYPES or hopper]
        for dt in (grouped_dtypes if full else ("bfloat16", "float32-tf32", "float8_e4m3fn") if hopper
                   else ("bfloat16",)):
            for layout in GROUPED_LAYOUTS:
                if dt in FP8_DTYPES and layout == "grouped_wgrad":
                    continue  # the wgrad stays high precision
                add(Case(target, dt, layout, "none"))
    for target in TARGETS:
        for dt in (DTYPES if TARGETS[target][0] >= (9, 0) else ("bfloat16", "float8_e4m3fn")):
            if full:
                combos = [(lay, epi) for lay in LAYOUTS for epi in EPILOGUES
                          if not (epi.startswith("gated") and lay in ("dy@w", "dy.T@x"))]
            else:
                combos = RULE_CASES if TARGETS[target][0] >= (9, 0) or dt not in FP8_DTYPES else RULE_CASES[:1]
            for layout, epi in combos:
                add(Case(target, dt, layout, epi))
    return cases


# the dtypes every epilogue is compiled in: fp8 is the forward's e4m3 x e4m3 (its dgrad,
# e5m2 x e4m3, takes no epilogue and is compiled with "none")
EPILOGUE_DTYPES = ("bfloat16", "float16", "float32-tf32", "float8_e4m3fn")


def epilogue_cases() -> list[Case]:
    """Every epilogue of :func:`epilogues` on every candidate tile the rules or the
    autotuner may pick for it (``candidate_configs``; accumulating ones from the
    ``reads_out`` list), per target and path (TMA tiles on sm_90a, pointer tiles on both),
    in each of :data:`EPILOGUE_DTYPES` (fp8 on sm_90a only: sm_80 has no fp8 tensor cores),
    and the fp8 dgrad's tiles with no epilogue. Layouts as the library launches them: TMA
    tiles on ``x @ w.T``, pointer tiles on a strided out slice (what sends a launch to them
    on Hopper), accumulate on the wgrad's ``dy.T @ x`` (the fp8 wgrad stays high precision,
    so fp8 has no accumulate). ~1,000 compiles: minutes on 2 cores the first time, then
    Triton's on-disk cache serves them."""
    import torch

    from fusedpar.kernels.configs import candidate_configs

    dtype_of = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32-tf32": torch.float32,
                "float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2-e4m3fn": torch.float8_e5m2}
    cases = []
    for target, (capability, _, _) in TARGETS.items():
        hopper = capability >= (9, 0)
        for tma in ((True, False) if hopper else (False,)):
            for op in ("matmul", "gated"):
                for dt in (*EPILOGUE_DTYPES, "float8_e5m2-e4m3fn"):
                    if dt in FP8_DTYPES and not hopper:
                        continue
                    names = ("none",) if dt == "float8_e5m2-e4m3fn" else epilogues(op)
                    if dt == "float8_e5m2-e4m3fn" and op == "gated":
                        continue
                    for name in names:
                        epi = parse_epilogue(name)
                        if epi.accumulate and dt in FP8_DTYPES:
                            continue
                        layout = "dy.T@x" if epi.accumulate else "x@w.T" if tma else "out_slice"
                        for cfg in candidate_configs(op, dtype_of[dt], tma, reads_out=epi.accumulate):
                            cases.append(Case(target, dt, layout, name, config=cfg))
    return cases


def check_cases(full: bool = False) -> list[Case]:
    """What ``--check`` compiles: :func:`default_cases` (every kernel, layout and dtype, the
    rules' picks) and :func:`epilogue_cases` (every epilogue on every candidate tile)."""
    return list(dict.fromkeys([*default_cases(full), *epilogue_cases()]))


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
