"""Grouped GEMMs (mixture-of-experts token groups) against per-group float64 products.

Both backends (the Triton kernels run interpreted on CPU), fp32/fp16/bf16, shapes that are
multiples of no block, empty groups, a group of one row, weights in the nn.Linear layout
(a transposed view), outputs poisoned with NaN so an unwritten row shows, and the autograd
wrapper the MoE layer uses.
"""
from __future__ import annotations

import pytest
import torch

from fusedpar.kernels import grouped_matmul, grouped_matmul_wgrad
from fusedpar.layers import grouped_experts

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
COUNTS = [3, 0, 70, 1, 0, 17]  # empty groups, a single row, a group longer than one block


def _ends(counts: list[int]) -> torch.Tensor:
    return torch.tensor(counts).cumsum(0)


def _spans(counts: list[int]) -> list[tuple[int, int]]:
    ends = _ends(counts).tolist()
    return list(zip([0] + ends[:-1], ends))


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("kernel", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_grouped_matmul(kernel, dtype):
    g = torch.Generator().manual_seed(0)
    S, K, N = sum(COUNTS), 130, 70
    x = torch.randn(S, K, generator=g).to(dtype)
    w_linear = torch.randn(len(COUNTS), N, K, generator=g).to(dtype)  # [G, N, K]: the nn.Linear layout
    ref = torch.cat([x[s:e].double() @ w_linear[i].double().T for i, (s, e) in enumerate(_spans(COUNTS))])
    out = torch.full((S, N), float("nan"), dtype=dtype)
    y = grouped_matmul(x, w_linear.transpose(1, 2), _ends(COUNTS), out=out, kernel=kernel)
    assert y is out and not torch.isnan(y).any(), "a row was not written"
    assert _rel(y, ref) <= TOL[dtype], _rel(y, ref)


@pytest.mark.parametrize("kernel", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_matmul_wgrad(kernel, dtype):
    g = torch.Generator().manual_seed(1)
    S, K, N = sum(COUNTS), 70, 130
    x = torch.randn(S, K, generator=g).to(dtype)
    dy = torch.randn(S, N, generator=g).to(dtype)
    ref = torch.stack([x[s:e].double().T @ dy[s:e].double() for s, e in _spans(COUNTS)])
    out = torch.full((len(COUNTS), K, N), float("nan"), dtype=dtype)
    dw = grouped_matmul_wgrad(x, dy, _ends(COUNTS), out=out, kernel=kernel)
    assert dw is out and not torch.isnan(dw).any(), "an empty group's dw was not zeroed"
    assert dw[1].abs().max() == 0 and dw[4].abs().max() == 0
    assert _rel(dw, ref) <= TOL[dtype], _rel(dw, ref)


@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_grouped_experts_autograd(kernel):
    # forward, dgrad and wgrad of the differentiable wrapper against torch autograd in float64
    g = torch.Generator().manual_seed(2)
    counts = [5, 0, 9, 2]
    x = torch.randn(sum(counts), 24, generator=g, requires_grad=True)
    w = torch.randn(len(counts), 40, 24, generator=g, requires_grad=True)  # [G, N, K]
    dy = torch.randn(sum(counts), 40, generator=g)
    y = grouped_experts(x, w.transpose(1, 2), _ends(counts), kernel=kernel)
    (y * dy).sum().backward()
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    y64 = torch.cat([x64[s:e] @ w64[i].T for i, (s, e) in enumerate(_spans(counts))])
    (y64 * dy.double()).sum().backward()
    for name, got, ref in (("y", y, y64), ("dx", x.grad, x64.grad), ("dw", w.grad, w64.grad)):
        assert _rel(got, ref.detach()) <= 1e-5, (name, _rel(got, ref.detach()))


@pytest.mark.parametrize("kernel", ["torch", "triton"])
@pytest.mark.parametrize("scaling", ["rowwise", "tensorwise"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_grouped_matmul_fp8_matches_float64_of_dequantized_operands(kernel, scaling, out_dtype):
    from fusedpar.kernels import dequantize, quantize_rowwise, quantize_tensorwise

    g = torch.Generator().manual_seed(4)
    S, K, N = sum(COUNTS), 144, 70  # K: two fp8 K steps of the compiled tile plus a remainder
    G = len(COUNTS)
    x = torch.randn(S, K, generator=g) * torch.rand(S, 1, generator=g) * 8  # rows of different ranges
    w_linear = torch.randn(G, N, K, generator=g) / torch.arange(1, G + 1).view(G, 1, 1)  # experts of different ranges
    if scaling == "rowwise":  # x per token, w per expert and output channel
        x_q, x_s = quantize_rowwise(x, kernel="torch")
        w_q, w_s = quantize_rowwise(w_linear, kernel="torch")  # [G, N, K] → scales [G, N, 1]
        w_s = w_s.squeeze(-1)
    else:
        x_q, x_s = quantize_tensorwise(x, kernel="torch")
        w_q, w_s = quantize_tensorwise(w_linear, kernel="torch")
    x64 = dequantize(x_q, x_s.reshape(-1, 1) if x_s.numel() > 1 else x_s, torch.float64)
    w64 = dequantize(w_q, w_s.unsqueeze(-1) if w_s.numel() > 1 else w_s, torch.float64)
    ref = torch.cat([x64[s:e] @ w64[i].T for i, (s, e) in enumerate(_spans(COUNTS))])
    out = torch.full((S, N), float("nan"), dtype=out_dtype)
    y = grouped_matmul(x_q, w_q.transpose(1, 2), _ends(COUNTS), x_scale=x_s, w_scale=w_s, out=out, kernel=kernel)
    assert y is out and not torch.isnan(y).any(), "a row was not written"
    # the fp8 values are exact and summed in fp32: only fp32 sums (or the bf16 output) round
    assert _rel(y, ref) <= (1e-6 if out_dtype == torch.float32 else 1e-2), _rel(y, ref)
    y_default = grouped_matmul(x_q, w_q.transpose(1, 2), _ends(COUNTS), x_scale=x_s, w_scale=w_s, kernel=kernel)
    assert y_default.dtype == torch.bfloat16


def test_grouped_errors():
    x, w = torch.randn(6, 8), torch.randn(2, 8, 4)
    with pytest.raises(ValueError, match=r"ends\[-1\] must equal the number of rows of x \(6\), got 5"):
        grouped_matmul(x, w, torch.tensor([2, 5]), kernel="torch")
    with pytest.raises(ValueError, match=r"w must be \[G=2, K=8, N\], got shape \(2, 4, 8\)"):
        grouped_matmul(x, w.transpose(1, 2), torch.tensor([2, 6]), kernel="torch")
    with pytest.raises(ValueError, match="ends must be a 1-D int32/int64 tensor"):
        grouped_matmul(x, w, torch.tensor([2.0, 6.0]), kernel="torch")
    with pytest.raises(TypeError, match="operands must share x's dtype"):
        grouped_matmul(x, w.double(), torch.tensor([2, 6]), kernel="torch")
    e4m3 = torch.float8_e4m3fn
    with pytest.raises(TypeError, match=r"x must be float16, .* \(the wgrad stays high precision\), got torch.float8"):
        grouped_matmul_wgrad(x.to(e4m3), x.to(e4m3), torch.tensor([2, 6]), kernel="triton")
    with pytest.raises(TypeError, match="w must be fp8 like x"):
        grouped_matmul(x.to(e4m3), w, torch.tensor([2, 6]), kernel="torch")
    with pytest.raises(ValueError, match=r"w_scale must be float32 on cpu with shape \(2, 4\) or one element, got \(4,\)"):
        grouped_matmul(x.to(e4m3), w.to(e4m3), torch.tensor([2, 6]), w_scale=torch.ones(4), kernel="torch")
    with pytest.raises(TypeError, match="x_scale apply to fp8 operands only"):
        grouped_matmul(x, w, torch.tensor([2, 6]), x_scale=torch.ones(6, 1), kernel="torch")
    with pytest.raises(TypeError, match="out_dtype must be one of"):
        grouped_matmul(x.to(e4m3), w.to(e4m3), torch.tensor([2, 6]), out_dtype=torch.float64, kernel="torch")
