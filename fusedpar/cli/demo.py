"""`python -m fusedpar demo` (placeholder): one fusedpar matmul on a real problem.

Prints the shape, dtype, backend that ran, error against a float64 torch reference and
the time. The tensor-parallel Llama demo replaces this module later.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from fusedpar.cli._common import default_device, import_kernels


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `demo`."""
    parser.add_argument("--shape", type=int, nargs=3, metavar=("M", "N", "K"),
                        help="GEMM [M,K] @ [K,N] (default 256^3 on CPU, 4096^3 on GPU)")
    parser.add_argument("--dtype", default=None,
                        help="float32 / float16 / bfloat16 (default float32 on CPU, where "
                             "interpreted Triton gets bf16 wrong; bfloat16 on GPU)")
    parser.add_argument("--kernel", default="auto", help="auto / triton / torch")
    parser.add_argument("--reps", type=int, default=3)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(args: argparse.Namespace) -> int:
    """Run the GEMM, print what ran and how well; 1 if the error is out of tolerance."""
    device = default_device()
    m, n, k = args.shape or ((4096,) * 3 if device.type == "cuda" else (256,) * 3)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(k, n, generator=gen).to(device=device, dtype=dtype)

    kernels = import_kernels()
    if kernels is None:
        backend, fn = "torch (fusedpar.kernels not available yet)", torch.matmul
    else:
        backend = kernels.resolve_kernel(args.kernel, device)
        fn = lambda x, y: kernels.matmul(x, y, kernel=args.kernel)  # noqa: E731

    out = fn(a, b)  # warm-up: Triton compiles here
    _sync(device)
    times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        out = fn(a, b)
        _sync(device)
        times.append(time.perf_counter() - t0)
    ref = a.double() @ b.double()
    rel_err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
    # Tolerance by dtype (shared/STYLE.md), with tf32 room for fp32 on GPUs.
    tol = {torch.float32: 1e-3, torch.float64: 1e-9}.get(dtype, 1e-2)
    med = statistics.median(times)
    print(f"matmul [{m}, {k}] @ [{k}, {n}]  dtype={str(dtype).removeprefix('torch.')}  "
          f"device={device.type}")
    print(f"backend: {backend}")
    print(f"max rel. error vs float64 torch: {rel_err:.2e} (tolerance {tol:.0e})")
    print(f"time: {med * 1e3:.3f} ms median of {args.reps}  "
          f"({2 * m * n * k / med / 1e12:.3f} TFLOP/s)")
    return 0 if rel_err <= tol else 1
