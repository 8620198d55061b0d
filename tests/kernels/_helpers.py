"""Shared inputs, layouts and checks for the kernel tests."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Relative tolerance per input dtype, against a float64 reference, for both the norm-wise
# error and the max-abs error normalised by the reference's max-abs:
#   fp32: fp32 accumulation over K <= 260 gives ~1e-7; 1e-5 leaves room, and the
#         interpreter ignores tf32 (tf32 tolerances live in the GPU tests, ~1e-3).
#   fp16: 11-bit mantissa, one rounding of inputs and output: ~2e-4 measured.
#   bf16: 8-bit mantissa: ~3e-3 measured, so 1e-2.
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2, torch.float64: 1e-12}

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (M, N, K): none a multiple of the blocks; a single row; a 3-column output
SHAPES = [(200, 130, 70), (1, 64, 33), (257, 3, 129)]
LAYOUTS = ["contiguous", "a_transposed", "b_transposed", "out_slice", "batched"]

_ACT_REF = {
    None: lambda x: x,
    "relu": F.relu,
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def reference_act(x: torch.Tensor, activation: str | None) -> torch.Tensor:
    return _ACT_REF[activation](x)


def assert_close(y: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "") -> None:
    """Norm-wise and max-abs relative error of ``y`` against float64 ``ref`` both <= tol."""
    y64, ref64 = y.double(), ref.double()
    assert not y64.isnan().any(), f"{what}: NaN in the result (an element was not written)"
    scale = ref64.norm().item() or 1.0
    rel = (y64 - ref64).norm().item() / scale
    max_scale = ref64.abs().max().item() or 1.0
    rel_max = (y64 - ref64).abs().max().item() / max_scale
    assert rel <= tol and rel_max <= tol, (
        f"{what}: relative error {rel:.3e} (norm), {rel_max:.3e} (max-abs) > tolerance {tol:.1e}")


def make_a(layout: str, M: int, K: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """``a`` [M, K] (or [B, m, K] for "batched") in the given memory layout."""
    if layout == "a_transposed":
        return torch.randn(K, M, generator=gen).to(dtype).T
    if layout == "batched":
        # rows padded on both sides: the batch dim cannot merge into M
        B, m = batch_split(M)
        return torch.randn(B + 2, m + 3, K, generator=gen).to(dtype)[1:1 + B, 2:2 + m]
    return torch.randn(M, K, generator=gen).to(dtype)


def make_b(layout: str, K: int, N: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """``b`` [K, N]: transposed (an nn.Linear weight's ``w.T``) for "b_transposed"."""
    if layout == "b_transposed":
        return torch.randn(N, K, generator=gen).to(dtype).T
    return torch.randn(K, N, generator=gen).to(dtype)


def batch_split(M: int) -> tuple[int, int]:
    B = 3 if M >= 3 else 1
    return B, max(1, M // B)


class Out:
    """A NaN-poisoned output buffer; ``view`` is the tensor handed to the kernel as ``out``.

    For "out_slice" ``view`` is an inner slice of a bigger buffer, for "batched" it is
    ``big.view(B, m_total, N)[:, s:e]`` like an overlap schedule's output chunk; elsewhere
    it is the whole buffer.
    """

    def __init__(self, layout: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        N = shape[-1]
        if layout == "out_slice":
            M = shape[0]
            self.buffer = torch.full((M + 5, N + 7), math.nan, dtype=dtype)
            self.view = self.buffer[2:2 + M, 3:3 + N]
        elif layout == "batched":
            B, m = shape[0], shape[1]
            self.buffer = torch.full((B, m + 4, N), math.nan, dtype=dtype)
            self.view = self.buffer[:, 1:1 + m]
        else:
            self.buffer = torch.full(shape, math.nan, dtype=dtype)
            self.view = self.buffer
        self._inside = torch.zeros(self.buffer.shape, dtype=torch.bool)
        self._inside.as_strided(self.view.shape, self.view.stride(), self.view.storage_offset()).fill_(True)

    def assert_outside_untouched(self) -> None:
        outside = self.buffer[~self._inside]
        assert outside.isnan().all(), "elements of the buffer outside `out` were written"
