"""Quantization to fp8: amax, scale and cast, as Triton kernels and their torch references.

The scale rules (dynamic scaling: every call measures the tensor it quantizes):

* **amax** is the largest ``|x|`` over the group a scale covers: one row (``axis`` "row",
  the ``[..., K]`` vectors a GEMM reduces over, so the scale factors out of the sum) or the
  whole tensor ("tensor"). With ``col_scale`` the values are ``x * col_scale`` (one factor
  per column, applied before the amax: the dgrad folds the weight's per-channel scales into
  the gradient this way, see :mod:`fusedpar.layers.fp8`).
* **scale** ``= max(amax, EPS) / FP8_MAX`` in fp32, FP8_MAX the format's largest finite
  value (448 for e4m3, 57344 for e5m2), so the group's largest value lands on it and the
  format's whole range is used. ``EPS = 1e-12`` keeps an all-zero group finite (its values
  stay 0). Scales are not rounded to powers of two: they multiply the fp32 accumulator
  once, in the GEMM epilogue, where their own rounding (2**-24) is far below fp8's.
* **cast**: ``q = round_to_nearest_even(clamp(x * (FP8_MAX / amax), -FP8_MAX, FP8_MAX))``,
  so ``q * scale`` reproduces ``x`` to fp8's relative precision (2**-4 for e4m3, 2**-3 for
  e5m2) down to the subnormals.
* **non-finite input** stays non-finite, as in an fp32 GEMM: a NaN makes its group's amax
  and scale NaN, so every value of the group becomes NaN; an inf makes the scale inf and
  the group's other values 0 (``x * FP8_MAX / inf``) with NaN where the inf was
  (``inf * 0``), so ``q * scale`` is NaN across the group either way and a GEMM's output
  row (row-wise) or whole output (tensor-wise) is NaN. The clamp never turns NaN into
  ``-FP8_MAX``. Every NaN is written as the positive one (``0x7F`` in both formats; NaN's
  sign is whatever the hardware makes, x86 makes ``inf * 0`` negative), so kernels and
  references agree bit for bit on non-finite input too.

Fused where possible: row-wise quantization is one launch per tensor (a program owns whole
rows: it finds their amax, writes their scales and casts them, from registers when a row fits
one block). Tensor-wise takes two (per-program maxima, then the cast, which reduces them
first): no program may cast before the whole tensor's amax is known.

The torch references compute the same formula with the same operation order (a reciprocal
as a tensor division, not ``scalar / tensor``, which torch evaluates as a reciprocal times
a scalar and rounds differently), so kernels and references agree bit for bit.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fusedpar.kernels import interpreter
from fusedpar.kernels.common import resolve_kernel
from fusedpar.kernels.fp8 import FP8_DTYPES, FP8_MAX

__all__ = ["EPS", "dequantize", "quantize_rowwise", "quantize_rowwise_reference", "quantize_tensorwise",
           "quantize_tensorwise_reference"]

EPS = 1e-12
_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# (mantissa bits, smallest normal exponent) of each format, for the interpreter's cast fix
_FORMAT = {torch.float8_e4m3fn: (3, -6), torch.float8_e5m2: (2, -14)}


# ----------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------

@triton.jit
def _cast(v, inv, FP8_MAX: tl.constexpr, GRID_ROUND: tl.constexpr, MANTISSA_BITS: tl.constexpr,
          MIN_NORMAL_EXP: tl.constexpr, out_dtype: tl.constexpr):
    """fp32 values times their reciprocal scale, saturated to the format's range, cast;
    NaN stays NaN (the positive one)."""
    # PropagateNan.ALL: the default lets a compiled clamp (and the interpreter's) turn NaN
    # into -FP8_MAX, a finite value from a NaN token
    v = tl.clamp(v * inv, -FP8_MAX, FP8_MAX, propagate_nan=tl.PropagateNan.ALL)
    v = tl.where(v != v, float("nan"), v)  # one NaN, whatever sign the arithmetic gave it
    if GRID_ROUND:  # interpreter only: its fp32 -> fp8 cast rounds wrongly (interpreter.py)
        v = interpreter.round_to_fp8_grid(v, MANTISSA_BITS, MIN_NORMAL_EXP)
        return interpreter.cast_to_fp8(v, out_dtype)
    return v.to(out_dtype)


@triton.jit
def _nanmax(t, axis: tl.constexpr):
    """``tl.max`` along ``axis``, NaN where the slice holds a NaN: ``tl.max`` itself ignores
    NaN (compiled, a maxnum; interpreted, numpy's nanmax), which hid a NaN token's NaN."""
    has_nan = tl.max((t != t).to(tl.int32), axis=axis)
    return tl.where(has_nan > 0, float("nan"), tl.max(t, axis=axis))


@triton.jit
def _load_tile(x_ptr, rows, cols, R, C, stride_xr, stride_xc, cs_ptr, stride_cs, COL_SCALED: tl.constexpr):
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    x = tl.load(x_ptr + rows[:, None] * stride_xr + cols[None, :] * stride_xc, mask=mask, other=0.0).to(tl.float32)
    if COL_SCALED:
        x = x * tl.load(cs_ptr + cols * stride_cs, mask=cols < C, other=0.0)[None, :]
    return x


@triton.jit
def _quantize_rows_kernel(
    x_ptr, q_ptr, scale_ptr, cs_ptr,
    R, C, stride_xr, stride_xc, stride_qr, stride_cs,
    FP8_MAX: tl.constexpr, EPS: tl.constexpr, COL_SCALED: tl.constexpr, GRID_ROUND: tl.constexpr,
    MANTISSA_BITS: tl.constexpr, MIN_NORMAL_EXP: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ONE_BLOCK: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    # -- amax of each row (of x * col_scale); a row that fits one block stays in registers --
    if ONE_BLOCK:
        x = _load_tile(x_ptr, rows, cols, R, C, stride_xr, stride_xc, cs_ptr, stride_cs, COL_SCALED)
        amax = _nanmax(tl.abs(x), 1)
    else:
        amax = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            x = _load_tile(x_ptr, rows, c0 + cols, R, C, stride_xr, stride_xc, cs_ptr, stride_cs, COL_SCALED)
            amax = tl.maximum(amax, _nanmax(tl.abs(x), 1), propagate_nan=tl.PropagateNan.ALL)
    # -- the scale rule (module docstring); IEEE divisions, as the torch reference's ---------
    amax = tl.maximum(amax, EPS, propagate_nan=tl.PropagateNan.ALL)
    tl.store(scale_ptr + rows, tl.div_rn(amax, FP8_MAX), mask=rows < R)
    inv = tl.div_rn(tl.full(amax.shape, FP8_MAX, tl.float32), amax)[:, None]
    # -- cast ----------------------------------------------------------------------------
    q_dtype = q_ptr.dtype.element_ty
    if ONE_BLOCK:
        q = _cast(x, inv, FP8_MAX, GRID_ROUND, MANTISSA_BITS, MIN_NORMAL_EXP, q_dtype)
        tl.store(q_ptr + rows[:, None] * stride_qr + cols[None, :], q, mask=(rows[:, None] < R) & (cols[None, :] < C))
    else:
        for c0 in range(0, C, BLOCK_C):
            x = _load_tile(x_ptr, rows, c0 + cols, R, C, stride_xr, stride_xc, cs_ptr, stride_cs, COL_SCALED)
            q = _cast(x, inv, FP8_MAX, GRID_ROUND, MANTISSA_BITS, MIN_NORMAL_EXP, q_dtype)
            mask = (rows[:, None] < R) & ((c0 + cols)[None, :] < C)
            tl.store(q_ptr + rows[:, None] * stride_qr + (c0 + cols)[None, :], q, mask=mask)


@triton.jit
def _amax_kernel(x_ptr, partial_ptr, R, C, stride_xr, stride_xc, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Each program's amax over the row blocks it walks (grid-stride): partial_ptr[pid]."""
    cols = tl.arange(0, BLOCK_C)
    amax = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for rb in range(tl.program_id(0), tl.cdiv(R, BLOCK_R), tl.num_programs(0)):
        rows = rb * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
        for c0 in range(0, C, BLOCK_C):
            x = _load_tile(x_ptr, rows, c0 + cols, R, C, stride_xr, stride_xc, x_ptr, 0, False)
            amax = tl.maximum(amax, tl.abs(x), propagate_nan=tl.PropagateNan.ALL)
    tl.store(partial_ptr + tl.program_id(0), _nanmax(_nanmax(amax, 1), 0))


@triton.jit
def _quantize_tensor_kernel(
    x_ptr, q_ptr, scale_ptr, partial_ptr, NUM_PARTIALS,
    R, C, stride_xr, stride_xc, stride_qr,
    FP8_MAX: tl.constexpr, EPS: tl.constexpr, GRID_ROUND: tl.constexpr,
    MANTISSA_BITS: tl.constexpr, MIN_NORMAL_EXP: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # -- the tensor's amax from the partial maxima (each program reduces them itself) -------
    partials = tl.load(partial_ptr + tl.arange(0, BLOCK_P), mask=tl.arange(0, BLOCK_P) < NUM_PARTIALS, other=0.0)
    amax = tl.maximum(_nanmax(partials, 0), EPS, propagate_nan=tl.PropagateNan.ALL)
    if tl.program_id(0) == 0:
        tl.store(scale_ptr, tl.div_rn(amax, FP8_MAX))
    inv = tl.div_rn(FP8_MAX, amax)
    cols = tl.arange(0, BLOCK_C)
    for rb in range(tl.program_id(0), tl.cdiv(R, BLOCK_R), tl.num_programs(0)):
        rows = rb * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
        for c0 in range(0, C, BLOCK_C):
            x = _load_tile(x_ptr, rows, c0 + cols, R, C, stride_xr, stride_xc, x_ptr, 0, False)
            q = _cast(x, inv, FP8_MAX, GRID_ROUND, MANTISSA_BITS, MIN_NORMAL_EXP, q_ptr.dtype.element_ty)
            mask = (rows[:, None] < R) & ((c0 + cols)[None, :] < C)
            tl.store(q_ptr + rows[:, None] * stride_qr + (c0 + cols)[None, :], q, mask=mask)


# ----------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------

def _check(op: str, x: object, dtype: object, kernel: str) -> str:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _INPUT_DTYPES:
        raise TypeError(f"{op}: x must have a dtype in {_INPUT_DTYPES}, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least 1 dim [..., K], got shape {tuple(x.shape)}")
    if dtype not in FP8_DTYPES:
        raise TypeError(f"{op}: dtype must be one of {FP8_DTYPES}, got {dtype}")
    return resolve_kernel(kernel, x.device, x.dtype)


def _blocks(C: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps): a tile of ~8K elements (interpreted: ~16K, its cost is
    per program), whole rows when they fit."""
    tile = 16384 if interpreter.is_interpreting() else 8192
    block_c = min(triton.next_power_of_2(max(C, 1)), tile)
    return max(1, tile // block_c), block_c, 8 if block_c * max(1, tile // block_c) >= 4096 else 4


def _rows2d(x: torch.Tensor) -> torch.Tensor:
    """``x`` [..., C] as [R, C] (a view when the strides allow, else a copy)."""
    return x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x


def quantize_rowwise(x: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn, *,
                     col_scale: torch.Tensor | None = None, kernel: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """One scale per row: ``x`` ``[..., C]`` (fp32/bf16/fp16, any strides) to ``(q, scale)``
    with ``q`` contiguous ``x.shape`` in ``dtype`` (e4m3 by default; e5m2 for gradients) and
    ``scale`` float32 ``[..., 1]``, so that ``q * scale ≈ x`` (the rules in the module
    docstring). ``col_scale`` (float32, ``[C]`` or one element) multiplies each column before
    quantizing. ``kernel``: "triton" (CUDA, or CPU interpreted), "torch" (the reference), or
    "auto" as for the GEMMs."""
    op = "quantize_rowwise"
    backend = _check(op, x, dtype, kernel)
    C = x.shape[-1]
    if col_scale is not None:
        if not isinstance(col_scale, torch.Tensor) or col_scale.dtype != torch.float32 \
                or (col_scale.numel() != 1 and tuple(col_scale.shape) != (C,)) or col_scale.device != x.device:
            got = (f"{tuple(col_scale.shape)} {col_scale.dtype} on {col_scale.device}"
                   if isinstance(col_scale, torch.Tensor) else type(col_scale).__name__)
            raise ValueError(f"{op}: col_scale must be float32 on {x.device} with shape ({C},) or one element, "
                             f"got {got}")
    if backend == "torch" or x.numel() == 0:
        return quantize_rowwise_reference(x, dtype, col_scale=col_scale)
    q = torch.empty(x.shape, dtype=dtype, device=x.device)
    scale = torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device)
    x2 = _rows2d(x)
    R = x2.shape[0]
    block_r, block_c, warps = _blocks(C)
    cs = col_scale.reshape(-1) if col_scale is not None else scale
    mant, min_exp = _FORMAT[dtype]
    _quantize_rows_kernel[(triton.cdiv(R, block_r),)](
        x2, q, scale, cs, R, C, x2.stride(0), x2.stride(1), C, cs.stride(0) if cs.numel() > 1 else 0,
        FP8_MAX=FP8_MAX[dtype], EPS=EPS, COL_SCALED=col_scale is not None,
        GRID_ROUND=interpreter.fp8_cast_rounds_wrongly(), MANTISSA_BITS=mant, MIN_NORMAL_EXP=min_exp,
        BLOCK_R=block_r, BLOCK_C=block_c, ONE_BLOCK=C <= block_c, num_warps=warps)
    return q, scale


def quantize_tensorwise(x: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn, *,
                        kernel: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """One scale for the whole tensor: ``x`` (fp32/bf16/fp16, any strides) to ``(q, scale)``,
    ``q`` contiguous in ``dtype``, ``scale`` a 0-d float32 tensor (rules in the module
    docstring). Two launches: per-program amax, then the cast."""
    op = "quantize_tensorwise"
    backend = _check(op, x, dtype, kernel)
    if backend == "torch" or x.numel() == 0:
        return quantize_tensorwise_reference(x, dtype)
    q = torch.empty(x.shape, dtype=dtype, device=x.device)
    scale = torch.empty((), dtype=torch.float32, device=x.device)
    x2 = _rows2d(x)
    R, C = x2.shape
    block_r, block_c, warps = _blocks(C)
    programs = max(1, min(triton.cdiv(R, block_r), 1024))  # the cast kernel reduces all partials in one tile
    partials = torch.empty(programs, dtype=torch.float32, device=x.device)
    _amax_kernel[(programs,)](x2, partials, R, C, x2.stride(0), x2.stride(1), BLOCK_R=block_r, BLOCK_C=block_c,
                              num_warps=warps)
    mant, min_exp = _FORMAT[dtype]
    _quantize_tensor_kernel[(programs,)](
        x2, q, scale, partials, programs, R, C, x2.stride(0), x2.stride(1), C,
        FP8_MAX=FP8_MAX[dtype], EPS=EPS, GRID_ROUND=interpreter.fp8_cast_rounds_wrongly(), MANTISSA_BITS=mant,
        MIN_NORMAL_EXP=min_exp, BLOCK_R=block_r, BLOCK_C=block_c, BLOCK_P=triton.next_power_of_2(programs),
        num_warps=warps)
    return q, scale


# ----------------------------------------------------------------------------------------
# Torch references (the same operations in the same order) and dequantization
# ----------------------------------------------------------------------------------------

def _cast_reference(xf: torch.Tensor, amax: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    fmax = FP8_MAX[dtype]
    amax = amax.clamp_min(EPS)  # keeps NaN, as the kernels' maximum(..., PropagateNan.ALL)
    amax = amax.masked_fill(amax.isnan(), math.nan)  # the kernels' one NaN (any payload in x)
    inv = torch.full_like(amax, fmax) / amax  # a tensor division: IEEE, like the kernels' div_rn
    v = (xf * inv).clamp(-fmax, fmax)
    v = v.masked_fill_(v.isnan(), math.nan)  # positive NaN: x86 makes inf * 0 a negative one
    return v.to(dtype), amax / fmax


def quantize_rowwise_reference(x: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn, *,
                               col_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_rowwise` in torch ops (the torch backend, and the tests' reference)."""
    xf = x.float()
    if col_scale is not None:
        xf = xf * col_scale.reshape(-1)
    q, scale = _cast_reference(xf, xf.abs().amax(-1, keepdim=True) if x.numel() else
                               torch.zeros((*x.shape[:-1], 1), device=x.device), dtype)
    return q.contiguous(), scale


def quantize_tensorwise_reference(x: torch.Tensor,
                                  dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_tensorwise` in torch ops."""
    xf = x.float()
    amax = xf.abs().amax() if x.numel() else torch.zeros((), device=x.device)
    q, scale = _cast_reference(xf, amax, dtype)
    return q.contiguous(), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``q * scale`` in ``dtype`` (computed in fp32, one rounding): the value an fp8 tensor
    stands for, e.g. for a GEMM that runs in high precision on a quantized operand."""
    if q.dtype not in FP8_DTYPES:
        raise TypeError(f"dequantize: q must have an fp8 dtype {FP8_DTYPES}, got {q.dtype}")
    work = torch.float64 if dtype == torch.float64 else torch.float32  # one rounding, at most
    return (q.to(work) * scale.to(work)).to(dtype)
