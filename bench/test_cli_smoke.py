"""A tiny suite that exercises `python -m fusedpar bench` end to end on any machine:
torch.matmul whole (the baseline) and in row chunks, at two M, plus a cost-model call."""
from __future__ import annotations

import pytest
import torch

from fusedpar import costmodel


@pytest.mark.parametrize("m", [64, 128])
@pytest.mark.parametrize("variant", ["serial", "chunked"])
def test_smoke_matmul(fixed_bench, quick, m, variant):
    n = k = 64 if quick else 512
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(m, k, device=device)
    b = torch.randn(k, n, device=device)
    if variant == "serial":
        fn = lambda: a @ b  # noqa: E731
    else:
        fn = lambda: torch.cat([piece @ b for piece in a.chunk(2)])  # noqa: E731
    fixed_bench(fn, flops=2 * m * n * k, op="smoke_matmul", m=m, n=n, k=k,
                dtype="float32", variant=variant, baseline=variant == "serial")


def test_smoke_choose_chunks(fixed_bench):
    fixed_bench(lambda: costmodel.choose_chunks(
        "matmul_reduce_scatter", m=8192, n=4096, k=1792, world_size=8,
        dtype=torch.bfloat16, device=costmodel.DEVICES["h100-sxm"]))
