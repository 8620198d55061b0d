"""The static check of the GEMM family on sm_90a and sm_80 (no GPU): everything the rules or
the autotuner may pick compiles, does not spill, fits in shared memory, and on Hopper uses
wgmma with a pipelined (TMA) K loop. And the check itself can fail."""
from __future__ import annotations

import pytest

from fusedpar.kernels import GemmConfig
from fusedpar.kernels.compile_report import Case, default_cases, format_table, problems, run_cases


@pytest.fixture(scope="module")
def report():
    return run_cases(default_cases())


def test_every_pickable_tile_compiles_without_spills_on_sm90a_and_sm80(report):
    found = problems(report)
    assert not found, "\n".join(found) + "\n\n" + format_table(report)


def test_the_report_covers_both_targets_paths_dtypes_and_layouts(report):
    seen = {(r.case.target, r.path) for r in report if not r.skipped}
    assert seen == {("sm_90a", "tma"), ("sm_90a", "pointer"), ("sm_80", "pointer"), ("sm_90a", "grouped"),
                    ("sm_80", "grouped")}
    assert {r.case.dtype for r in report if r.case.target == "sm_90a"} == {
        "bfloat16", "float16", "float32-tf32", "float32-ieee", "float8_e4m3fn", "float8_e5m2-e4m3fn"}
    assert {r.case.layout for r in report} == {"x@w.T", "dy@w", "dy.T@x", "out_slice", "batched", "grouped",
                                               "grouped_wgrad"}


def test_hopper_tiles_use_wgmma_tma_and_a_pipelined_loop(report):
    hopper = [r for r in report if r.case.target == "sm_90a" and r.path == "tma"
              and r.case.dtype in ("bfloat16", "float16")]
    assert hopper and all(r.mma == "wgmma" and r.tma and r.pipelined for r in hopper), format_table(hopper)
    ampere = [r for r in report if r.case.target == "sm_80" and not r.skipped]
    assert ampere and all(r.mma == "mma" and r.pipelined and not r.tma for r in ampere), format_table(ampere)
    grouped = [r for r in report if r.path == "grouped" and r.case.dtype == "bfloat16"]
    assert {r.case.target for r in grouped} == {"sm_90a", "sm_80"}, format_table(grouped)
    assert all(r.mma == ("wgmma" if r.case.target == "sm_90a" else "mma") and r.pipelined for r in grouped), \
        format_table(grouped)


def test_fp8_tiles_use_fp8_wgmma_with_tma_on_hopper_and_are_refused_on_ampere(report):
    fp8 = [r for r in report if r.case.dtype.startswith("float8") and r.case.target == "sm_90a"]
    tma = [r for r in fp8 if r.path == "tma"]
    # the forward (x @ w.T) and the dgrad (e5m2 x e4m3 against the weight's K-major copy)
    assert {r.case.dtype for r in tma if r.case.layout == "x@w.T"} == {"float8_e4m3fn", "float8_e5m2-e4m3fn"}
    assert tma and all(r.mma == "wgmma" and r.tma and r.pipelined and not r.stack for r in tma), format_table(tma)
    assert all(r.ok and not r.stack for r in fp8), format_table(fp8)
    ampere = [r for r in report if r.case.dtype.startswith("float8") and r.case.target == "sm_80"]
    assert ampere and all(r.skipped and "no fp8 tensor cores" in r.skipped for r in ampere), format_table(ampere)


def test_the_check_fails_on_a_spilling_tile_and_on_one_too_big_for_shared_memory():
    spilling = Case("sm_80", "bfloat16", "out_slice", "bias_silu",
                    config=GemmConfig(128, 256, 64, num_warps=4, num_stages=3, tma=False))
    too_big = Case("sm_90a", "bfloat16", "x@w.T", "none",
                   config=GemmConfig(256, 256, 128, num_warps=8, num_stages=2, tma=True))  # 256 KiB of ring alone
    results = run_cases([spilling, too_big], jobs=2)
    found = problems(results)
    assert any("spills" in p and "ptr:128x256x64/w4" in p for p in found), found
    assert any("shared memory" in p and "tma:256x256x128" in p for p in found), found


def test_fp8_partial_sums_are_promoted_to_fp32_unless_fast_accum():
    """Hopper's fp8 tensor cores accumulate in less than fp32: by default each BLOCK_K step's
    partial sum is added into an fp32 accumulator (one add.f32 per accumulator element and
    thread, 64 for a 128x128 tile on 8 warps); fast_accum leaves the K sum in the tensor cores."""
    cfg = GemmConfig(128, 128, 128, num_warps=8, num_stages=3, tma=True)
    precise, fast = run_cases([Case("sm_90a", "float8_e4m3fn", "x@w.T", "none", config=cfg),
                               Case("sm_90a", "float8_e4m3fn", "x@w.T", "none", config=cfg, fast_accum=True)], jobs=2)
    assert precise.ok and fast.ok and precise.mma == fast.mma == "wgmma", format_table([precise, fast])
    assert precise.fp32_adds >= 64 and fast.fp32_adds < precise.fp32_adds, (precise.fp32_adds, fast.fp32_adds)
