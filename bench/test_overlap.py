"""Overlapped schedules vs their serial references vs PyTorch async-TP's fallback, on 2 ranks.

On CPU the ranks are gloo processes on a 2-core machine, where overlap cannot buy wall
time (FACTS.md): expect parity, and read these numbers as the cost of the machinery. On a
GPU machine with several GPUs the same suite runs on NCCL ranks (launch it under torchrun).

Each benchmark round dispatches one fixed-size timed loop to the ranks (identical iteration
counts everywhere: ranks that calibrated separately would desynchronize their collectives)
and reports the slowest rank's time. The `overlapped` entries also carry `ratio_vs_serial`,
from serial and overlapped loops interleaved in the same run, so machine noise hits both.
"""
from __future__ import annotations

import statistics
import time

import pytest
import torch
import torch.distributed as dist

from fusedpar import overlap

OPS = ("all_gather_matmul", "matmul_reduce_scatter", "matmul_all_reduce")
LOOP = 4  # schedule calls per timed loop


def _problem(op: str, group, m: int, k: int, n: int, dtype: torch.dtype):
    """This rank's operands, so that each rank's GEMM is [m, k] @ [k, n] with m the rows of all ranks."""
    world = dist.get_world_size(group)
    g = torch.Generator().manual_seed(0)
    if op == "all_gather_matmul":
        return torch.randn(m // world, k, generator=g).to(dtype), torch.randn(k, n, generator=g).to(dtype)
    return torch.randn(m, k, generator=g).to(dtype), torch.randn(k, n, generator=g).to(dtype)


def _call(op: str, variant: str, group, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if variant == "serial":
        return getattr(overlap, op + "_reference")(x, w, group=group, kernel="torch")
    if variant == "overlapped":
        return getattr(overlap, op)(x, w, group=group, kernel="torch")
    # peer: PyTorch async-TP's decomposed ops (torch.distributed._symmetric_memory), the
    # code path torch.compile's micro-pipeline TP falls back to where symmetric memory is absent
    from torch.distributed import _symmetric_memory as symm

    if op == "all_gather_matmul":
        return symm._fused_all_gather_matmul_fallback(x, [w], 0, group.group_name, return_A=False)[1][0]
    if op == "matmul_reduce_scatter":
        return symm._fused_matmul_reduce_scatter_fallback(x, w, "sum", 0, group.group_name)
    raise ValueError(f"no peer for {op}")


def _loop_time(op, variant, group, x, w) -> float:
    dist.barrier(group=group)
    start = time.perf_counter()
    for _ in range(LOOP):
        _call(op, variant, group, x, w)
    if x.is_cuda:
        torch.cuda.synchronize()
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX, group=group)  # the slowest rank sets the pace
    return elapsed.item()


def _bench_rank(group, *, op, variant, m, k, n, dtype_name):
    x, w = _problem(op, group, m, k, n, getattr(torch, dtype_name))
    return _loop_time(op, variant, group, x, w)


def _interleaved_rank(group, *, op, m, k, n, dtype_name, rounds):
    x, w = _problem(op, group, m, k, n, getattr(torch, dtype_name))
    times = {"serial": [], "overlapped": []}
    for _ in range(rounds):
        for variant in times:
            times[variant].append(_loop_time(op, variant, group, x, w))
    return {v: statistics.median(t) for v, t in times.items()}


@pytest.fixture(scope="module")
def ranks():
    from tests.dist import DistPool

    pool = DistPool(2)
    yield pool
    pool.close()


def _shape(quick: bool) -> tuple[int, int, int]:
    # CPU: a small TP-shaped problem; quick: tiny
    return (64, 64, 64) if quick else (512, 512, 384)


@pytest.mark.parametrize("variant", ["serial", "overlapped", "peer"])
@pytest.mark.parametrize("op", OPS)
def test_overlap(fixed_bench, ranks, quick, bench_rounds, op, variant):
    if variant == "peer" and op == "matmul_all_reduce":
        pytest.skip("no async-TP fallback for matmul+all-reduce (DTensor's rowwise is matmul then all_reduce: our serial)")
    m, k, n = _shape(quick)
    info = dict(op=op, m=m, n=n, k=k, dtype="float32", world_size=ranks.world, variant=variant,
                baseline=variant == "serial", calls_per_round=LOOP,
                note="CPU gloo on 2 cores: overlap cannot gain wall time here (FACTS.md)")
    if variant == "overlapped":
        med = ranks.run(_interleaved_rank, op=op, m=m, k=k, n=n, dtype_name="float32", rounds=bench_rounds)[0]
        info["ratio_vs_serial"] = med["overlapped"] / med["serial"]
        info["serial_ms_per_call"] = med["serial"] / LOOP * 1e3
        info["overlapped_ms_per_call"] = med["overlapped"] / LOOP * 1e3
    fixed_bench(lambda: ranks.run(_bench_rank, op=op, variant=variant, m=m, k=k, n=n, dtype_name="float32"),
                flops=2.0 * m * n * k * LOOP, **info)
