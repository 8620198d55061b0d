"""Benchmarks: fusedpar's Triton GEMMs against torch on tensor-parallel Llama shapes.

    PYTHONPATH=. python -m pytest bench/test_matmul.py --benchmark-only -q

On a GPU: M (tokens per rank) in {1, 16, 2048, 8192} times the Llama-3-8B and Llama-3-70B
projections, column-parallel ones split on N and row-parallel ones on K by TP in {1, 2, 8},
in bf16. Each row times the fused kernel with ``benchmark.pedantic`` and records in
``extra_info`` its TFLOP/s, torch's TFLOP/s for the same (unfused) computation and their
ratio. Nothing passes or fails on speed.

On a CPU only a few tiny shapes run, interpreted Triton (TRITON_INTERPRET=1) or the torch
backend: the numbers say nothing about GPU speed, and extra_info says so.
"""
from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from fusedpar.kernels import gated_matmul, interpreter, matmul

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
KERNEL = "triton" if ON_GPU or interpreter.is_interpreting() else "torch"
ROUNDS, WARMUP = (20, 3) if ON_GPU else (3, 1)

# (model, projection, N, K, split): "col" shards N by TP, "row" shards K
LLAMA_PROJECTIONS = [
    ("llama3-8b", "q", 4096, 4096, "col"),
    ("llama3-8b", "kv", 1024, 4096, "col"),
    ("llama3-8b", "o", 4096, 4096, "row"),
    ("llama3-8b", "gate_up", 14336, 4096, "col"),
    ("llama3-8b", "down", 4096, 14336, "row"),
    ("llama3-70b", "q", 8192, 8192, "col"),
    ("llama3-70b", "kv", 1024, 8192, "col"),
    ("llama3-70b", "o", 8192, 8192, "row"),
    ("llama3-70b", "gate_up", 28672, 8192, "col"),
    ("llama3-70b", "down", 8192, 28672, "row"),
]


def _problems(projections: set[str] | None = None) -> list:
    """(M, N, K) per rank as pytest params with readable ids."""
    if not ON_GPU:  # tiny shapes: interpreted Triton costs ~2.5 ms per program and K-step
        return [pytest.param(m, n, k, id=f"cpu-M{m}-N{n}-K{k}") for m, n, k in [(16, 128, 128), (64, 256, 128)]]
    params = []
    for model, proj, n, k, split in LLAMA_PROJECTIONS:
        if projections is not None and proj not in projections:
            continue
        for tp in (1, 2, 8):
            n_rank, k_rank = (n // tp, k) if split == "col" else (n, k // tp)
            for m in (1, 16, 2048, 8192):
                params.append(pytest.param(m, n_rank, k_rank, id=f"{model}-{proj}-tp{tp}-M{m}"))
    return params


def _sync() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


def _median_seconds(fn, rounds: int = ROUNDS, warmup: int = WARMUP) -> float:
    """Median wall time of ``fn`` (synchronised), for the torch baseline."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _run(benchmark, fused, baseline, flops: float) -> None:
    """Time ``fused`` with pytest-benchmark and ``baseline`` alongside; record TFLOP/s."""
    def timed_fused():
        fused()
        _sync()

    def timed_baseline():
        baseline()
        _sync()

    benchmark.pedantic(timed_fused, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    fused_s = benchmark.stats.stats.median
    torch_s = _median_seconds(timed_baseline)
    benchmark.extra_info.update({
        "device": torch.cuda.get_device_name() if ON_GPU else "cpu",
        "dtype": str(DTYPE),
        "kernel": KERNEL + (" (interpreted)" if KERNEL == "triton" and not ON_GPU else ""),
        "tflops": flops / fused_s / 1e12,
        "torch_tflops": flops / torch_s / 1e12,
        "ratio_to_torch": torch_s / fused_s,  # > 1: fusedpar is faster
    })
    if not ON_GPU:
        benchmark.extra_info["note"] = "CPU run: tiny shapes, timings say nothing about GPU speed"


def _inputs(m: int, n: int, k: int, n_weights: int = 1):
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(m, k, device=DEVICE, generator=gen).to(DTYPE)
    weights = [(torch.randn(n, k, device=DEVICE, generator=gen) / k**0.5).to(DTYPE) for _ in range(n_weights)]
    return x, weights


@pytest.mark.parametrize("m, n, k", _problems())
def test_matmul(benchmark, m, n, k):
    """``x @ w.T`` (an nn.Linear forward) against ``torch.matmul``."""
    x, (w,) = _inputs(m, n, k)
    out = torch.empty(m, n, device=DEVICE, dtype=DTYPE)
    _run(benchmark,
         lambda: matmul(x, w.T, out=out, kernel=KERNEL),
         lambda: torch.matmul(x, w.T, out=out),
         2.0 * m * n * k)


@pytest.mark.parametrize("m, n, k", _problems({"q", "gate_up"}))
def test_matmul_bias_gelu(benchmark, m, n, k):
    """``gelu(x @ w.T + bias)`` in one kernel against torch's matmul, add and gelu."""
    x, (w,) = _inputs(m, n, k)
    bias = torch.randn(n, device=DEVICE).to(DTYPE)
    out = torch.empty(m, n, device=DEVICE, dtype=DTYPE)
    _run(benchmark,
         lambda: matmul(x, w.T, bias=bias, activation="gelu", out=out, kernel=KERNEL),
         lambda: F.gelu(torch.addmm(bias, x, w.T)),
         2.0 * m * n * k)


@pytest.mark.parametrize("m, n, k", _problems({"gate_up"}))
def test_gated_matmul_swiglu(benchmark, m, n, k):
    """SwiGLU ``silu(x @ w_gate.T) * (x @ w_up.T)`` in one kernel against torch's two
    matmuls, silu and multiply (N here is the width of each of gate and up)."""
    x, (w_gate, w_up) = _inputs(m, n, k, n_weights=2)
    out = torch.empty(m, n, device=DEVICE, dtype=DTYPE)
    _run(benchmark,
         lambda: gated_matmul(x, w_gate.T, w_up.T, out=out, kernel=KERNEL),
         lambda: F.silu(x @ w_gate.T) * (x @ w_up.T),
         2.0 * 2 * m * n * k)
