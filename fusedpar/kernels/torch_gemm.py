"""The torch backend of the GEMM family: the same computation with torch ops, the CPU
users' fast path and the tests' reference."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fusedpar.kernels.common import _as_batched


_TORCH_ACTIVATIONS = {
    None: lambda x: x,
    "relu": F.relu,
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def _torch_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` in fp32 for fp16/bf16 inputs (like the kernel's fp32 accumulator), else
    in the inputs' own dtype."""
    if a.dtype in (torch.float16, torch.bfloat16):
        return torch.matmul(a.float(), b.float())
    return torch.matmul(a, b)


_TORCH_ACTIVATIONS_INPLACE = {
    None: lambda y: None,
    "relu": lambda y: y.relu_(),
    "silu": lambda y: F.silu(y, inplace=True),
    "gelu": lambda y: y.copy_(F.gelu(y)),
    "gelu_tanh": lambda y: y.copy_(F.gelu(y, approximate="tanh")),
}


def _torch_matmul_new(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, activation: str | None,
                      out: None = None) -> torch.Tensor:
    """The torch backend's ``act(a @ b + bias)`` as a new tensor ``a.shape[:-1] + (N,)``,
    allocated by the GEMM itself: for dtypes torch computes in (the cases `_torch_matmul_into`
    takes) when the caller gives no ``out``, which is what a decode step's linears do. More
    than 2-D: ``torch.matmul``, whose result is not a view (a custom Function may return it,
    and callers may then modify it in place), with the bias added after."""
    if a.dim() == 2:
        y = torch.mm(a, b) if bias is None else torch.addmm(bias, a, b)
    else:
        y = torch.matmul(a, b)
        if bias is not None:
            y.add_(bias)
    _TORCH_ACTIVATIONS_INPLACE[activation](y)
    return y


def _torch_matmul_2d(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, activation: str | None,
                     out: torch.Tensor) -> torch.Tensor:
    """`_torch_matmul_into` for a 2-D ``a`` and ``out``, without accumulation: one GEMM into
    ``out`` (any strides), returned."""
    if bias is None:
        torch.mm(a, b, out=out)
    else:
        torch.addmm(bias, a, b, out=out)
    _TORCH_ACTIVATIONS_INPLACE[activation](out)
    return out


def _torch_matmul_into(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, activation: str | None,
                       out: torch.Tensor, accumulate: bool) -> None:
    """The torch backend writing the product straight into ``out``: no ``[M, N]``
    temporary, so the overlap schedules' "write this piece into its slice of the output"
    costs no extra memory. Used where torch computes in the output dtype anyway: fp32/fp64,
    and every dtype on CUDA, where cuBLAS accumulates fp16/bf16 in fp32 like the kernel."""
    if not accumulate:  # the common case: rows that flatten to [M, K] and [M, N] views
        try:
            a2 = a if a.dim() == 2 else a.view(-1, a.shape[-1])
            out2 = out if out.dim() == 2 else out.view(-1, out.shape[-1])
        except RuntimeError:  # leading dims that do not merge: the batched path below
            pass
        else:
            if bias is None:
                torch.mm(a2, b, out=out2)
            else:  # one GEMM with the bias in its epilogue (cuBLAS) or C (CPU), as F.linear does
                torch.addmm(bias, a2, b, out=out2)
            _TORCH_ACTIVATIONS_INPLACE[activation](out2)
            return
    a3, out3 = _as_batched(a, out)
    previous = out3.clone() if accumulate and (bias is not None or activation is not None) else None
    if a3.shape[0] == 1:
        if accumulate and previous is None:
            out3[0].addmm_(a3[0], b)
        else:
            torch.mm(a3[0], b, out=out3[0])
    else:
        b3 = b.unsqueeze(0).expand(a3.shape[0], -1, -1)
        if accumulate and previous is None:
            out3.baddbmm_(a3, b3)
        else:
            torch.bmm(a3, b3, out=out3)
    if bias is not None:
        out3.add_(bias)
    _TORCH_ACTIVATIONS_INPLACE[activation](out3)
    if previous is not None:
        out3.add_(previous)
    if out3.data_ptr() != out.data_ptr():  # out's batch dims did not merge: out3 is a copy
        out.copy_(out3.view(out.shape))
