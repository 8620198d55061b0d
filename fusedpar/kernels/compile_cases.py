"""Which compiles the static kernel check makes (:mod:`.compile_report`): the targets, dtypes,
layouts and epilogue names a :class:`Case` is made of, and the lists of cases --
:func:`default_cases` (every kernel, layout and dtype with the rules' tile),
:func:`epilogue_cases` (every epilogue a layer can request on every candidate tile) and
:func:`check_cases` (both, what ``--check`` compiles).

Import-light: torch and the kernels are imported inside the functions that need them, so
the command line's parser and the compile workers' case objects cost nothing to build.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["Case", "Epilogue", "TARGETS", "check_cases", "default_cases", "epilogue_cases", "epilogues",
           "parse_epilogue", "torch_dtype"]


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


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a case's dtype name, its A operand's: ``"float32-tf32"`` ->
    ``torch.float32``, ``"float8_e5m2-e4m3fn"`` (e5m2 A, e4m3 B) -> ``torch.float8_e5m2``."""
    import torch

    return getattr(torch, name.split("-")[0])


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
# Which cases
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
    from fusedpar.kernels.configs import candidate_configs

    cases: list[Case] = []
    seen = set()

    def add(case: Case) -> None:
        if case not in seen:
            seen.add(case)
            cases.append(case)

    for target in TARGETS:
        tma_target = TARGETS[target][0] >= (9, 0)
        for op, epi in (("matmul", "bias_silu"), ("gated", "gated_preact")):
            for tma in ((True, False) if tma_target else (False,)):
                dtypes = DTYPES if full else ("bfloat16", "float8_e4m3fn") if tma_target else ("bfloat16",)
                for dt in (dtypes if tma_target else [d for d in dtypes if d not in FP8_DTYPES]):
                    cands = candidate_configs(op, torch_dtype(dt), tma, tensor_cores=dt != "float32-ieee")
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
    from fusedpar.kernels.configs import candidate_configs

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
                        for cfg in candidate_configs(op, torch_dtype(dt), tma, reads_out=epi.accumulate):
                            cases.append(Case(target, dt, layout, name, config=cfg))
    return cases


def check_cases(full: bool = False) -> list[Case]:
    """What ``--check`` compiles: :func:`default_cases` (every kernel, layout and dtype, the
    rules' picks) and :func:`epilogue_cases` (every epilogue on every candidate tile)."""
    return list(dict.fromkeys([*default_cases(full), *epilogue_cases()]))
