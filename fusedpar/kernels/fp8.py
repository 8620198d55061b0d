"""fp8 operands of the GEMM family: the dtypes, the checks of their scales, and the torch
emulation that the torch backend runs and the tests compare against.

A scaled fp8 GEMM computes ``out = act((a_q @ b_q) * a_scale * b_scale + bias)``: each
operand is stored in fp8 with fp32 scales (an operand's value = its fp8 value x its scale),
the fp8 products are accumulated in fp32 (a product of two e4m3 values is exact in fp32),
and the scales multiply the fp32 accumulator in the epilogue, before bias, activation,
accumulation and the one cast at the store. A scale may be per tensor (0-d or one element)
or per row of ``a`` (``a_scale`` ``[..., M, 1]``) / per column of ``b`` (``b_scale``
``[1, N]``): a scale along M or N factors out of the K sum, one along K would not, which
is why there is no per-K scale. How the fp8 values and scales are made is in
:mod:`.quantize`.

e4m3 (``torch.float8_e4m3fn``, 3 mantissa bits, max 448) is the format for weights and
activations; e5m2 (``torch.float8_e5m2``, 2 mantissa bits, max 57344) has the range
gradients need. Any pair of the two may be multiplied (the dgrad takes an e5m2 gradient
times an e4m3 weight). fp8 tensor cores exist from sm_89 (Ada) and sm_90 (Hopper); Triton
refuses e4m3 on sm_80, so the planner raises there (:mod:`.plan`).
"""
from __future__ import annotations

import torch

__all__ = ["FP8_DTYPES", "FP8_MAX", "FP8_OUT_DTYPES", "is_fp8"]

FP8_DTYPES: tuple[torch.dtype, ...] = (torch.float8_e4m3fn, torch.float8_e5m2)
# the largest finite value of each format: the target of the scale rules in quantize.py
FP8_MAX: dict[torch.dtype, float] = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}
# what an fp8 GEMM may write: the accumulator is fp32, and an fp8 output would need a scale
# of its own (the next GEMM quantizes its input itself, per row, instead)
FP8_OUT_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16, torch.float32)


def is_fp8(dtype: torch.dtype) -> bool:
    """Whether ``dtype`` is one of the fp8 formats the kernels take (:data:`FP8_DTYPES`)."""
    return dtype in FP8_DTYPES


def _check_scale(op: str, name: str, scale: object, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """A scale is a float32 tensor on the operand's device with one element (per tensor)
    or the given ``shape`` (per row of a: ``a.shape[:-1] + (1,)``; per column of b: ``(1, N)``)."""
    if not isinstance(scale, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor (float32), got {type(scale).__name__}")
    if scale.dtype != torch.float32:
        raise TypeError(f"{op}: {name} must have dtype torch.float32, got {scale.dtype}")
    if scale.device != device:
        raise ValueError(f"{op}: {name} must be on the operands' device ({device}), got {scale.device}")
    if scale.numel() != 1 and tuple(scale.shape) != shape:
        raise ValueError(f"{op}: {name} must have one element (per tensor) or shape {shape}, "
                         f"got shape {tuple(scale.shape)}")
    return scale


def check_scales(op: str, a: torch.Tensor, a_scale: torch.Tensor | None,
                 b_scales: dict[str, torch.Tensor | None], N: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Check the scales of an fp8 GEMM (``a`` fp8, its weights checked by the caller); a
    missing scale means 1. Returns ``(a_scale, [b_scale, ...])`` as tensors."""
    one = None

    def unit() -> torch.Tensor:
        nonlocal one
        if one is None:
            one = torch.ones((), dtype=torch.float32, device=a.device)
        return one

    a_s = unit() if a_scale is None else _check_scale(op, "a_scale", a_scale, (*a.shape[:-1], 1), a.device)
    b_s = [unit() if s is None else _check_scale(op, name, s, (1, N), a.device) for name, s in b_scales.items()]
    return a_s, b_s


def refuse_scales(op: str, a: torch.Tensor, scales: dict[str, torch.Tensor | None]) -> None:
    """Scales belong to fp8 operands only: given with another dtype they would be ignored."""
    given = [name for name, s in scales.items() if s is not None]
    if given:
        raise TypeError(f"{op}: {', '.join(given)} apply to fp8 operands only, but a has dtype {a.dtype}")


def out_dtypes(a_dtype: torch.dtype) -> tuple[torch.dtype, ...]:
    """The output dtypes a GEMM on ``a_dtype`` operands may write (fp32: a main_grad)."""
    if is_fp8(a_dtype):
        return FP8_OUT_DTYPES
    return (a_dtype,) if a_dtype == torch.float32 else (a_dtype, torch.float32)


def resolve_out_dtype(op: str, a: torch.Tensor, out: torch.Tensor | None, out_dtype: torch.dtype | None) -> torch.dtype:
    """The output's dtype: ``out``'s, else ``out_dtype``, else bf16 for fp8 operands and
    ``a.dtype`` otherwise; ``out_dtype`` must be one the operands may write and agree with ``out``."""
    allowed = out_dtypes(a.dtype)
    if out_dtype is not None and out_dtype not in allowed:
        raise TypeError(f"{op}: out_dtype must be one of {allowed} for {a.dtype} operands, got {out_dtype}")
    if out is not None and out_dtype is not None and isinstance(out, torch.Tensor) and out.dtype != out_dtype:
        raise TypeError(f"{op}: out has dtype {out.dtype} but out_dtype={out_dtype}; give one or make them agree")
    if out_dtype is not None:
        return out_dtype
    if out is not None and isinstance(out, torch.Tensor):
        return out.dtype
    return torch.bfloat16 if is_fp8(a.dtype) else a.dtype


def scale_rows(a_scale: torch.Tensor, batch: int, rows: int) -> tuple[torch.Tensor, int, int]:
    """``a_scale`` as the kernels read it for ``a`` viewed as ``[batch, rows, K]``: the tensor
    and its (batch, row) strides, zero for a per-tensor scale (every row reads element 0)."""
    if a_scale.numel() == 1:
        return a_scale.reshape(1), 0, 0
    s = a_scale.reshape(batch, rows)  # a view when the layout allows; a scale is small anyway
    return s, s.stride(0), s.stride(1)


def scale_cols(b_scale: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``b_scale`` and its stride along N (zero for a per-tensor scale)."""
    if b_scale.numel() == 1:
        return b_scale.reshape(1), 0
    return b_scale, b_scale.stride(1)


def torch_scaled_product(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor,
                         b_scale: torch.Tensor) -> torch.Tensor:
    """``(a_q @ b_q) * a_scale * b_scale`` in fp32, as the kernels compute it: the fp8 values
    upcast exactly, multiplied and summed in fp32, the scales applied to the sum. The torch
    backend's fp8 path (CPU, or ``kernel="torch"``): an emulation for correctness, with no
    fp8 speed-up."""
    y = torch.matmul(a.float(), b.float())
    return y * a_scale.reshape(a_scale.shape if a_scale.numel() > 1 else ()) * b_scale.reshape(
        b_scale.shape if b_scale.numel() > 1 else ())
