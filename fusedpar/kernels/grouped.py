"""Grouped GEMMs over row groups (mixture-of-experts token groups) and their launchers.

Rows of ``x`` are sorted by group (expert); ``ends[g]`` is the end row of group g
(cumulative counts, so group g is rows ``ends[g-1]:ends[g]``). Two products, each in one
launch over every group's tiles instead of one small GEMM per group:

* :func:`grouped_matmul`        ``y[rows_g] = x[rows_g] @ w[g]``          (forward, dgrad)
* :func:`grouped_matmul_wgrad`  ``dw[g] = x[rows_g].T @ dy[rows_g]``      (wgrad; 0 for empty groups)

``grouped_matmul`` also takes fp8 operands with their scales, applied once in the fp32
epilogue: ``x_scale`` one per row (``[S, 1]``, as ``quantize_rowwise`` makes them) and
``w_scale`` one per group and output column (``[G, N]``: an expert weight quantized per
output channel), or one element each (per tensor). The wgrad stays high precision (its
sum runs over the tokens, where per-token scales do not factor out).

``w`` is ``[G, K, N]`` with any strides, so an expert weight stored ``[G, N, K]`` (the
nn.Linear layout) is passed as ``w.transpose(1, 2)`` without a copy. The Triton kernels walk
a tile list built on the host from the group sizes (one tile per BLOCK_M rows of a group, so
a group of 3 tokens costs one tile, not a padded batch entry). The torch backend is a loop
of ``torch.mm`` over the non-empty groups writing into slices of one output (measured
against a padded ``bmm`` in bench/test_grouped.py); accumulation is in fp32 for 16-bit
inputs on both backends.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusedpar.kernels import interpreter
from fusedpar.kernels.common import _dot_acc, _input_precision, _select_backend
from fusedpar.kernels.fp8 import is_fp8, refuse_scales, resolve_out_dtype, torch_scaled_product
from fusedpar.kernels.plan import _fp8_device_reason

__all__ = ["grouped_matmul", "grouped_matmul_wgrad", "group_ends"]


# ----------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------

@triton.jit
def _grouped_kernel(
    x_ptr, w_ptr, y_ptr, xs_ptr, ws_ptr, tile_group_ptr, tile_row_ptr, ends_ptr,
    N, K,
    stride_xm, stride_xk,
    stride_wg, stride_wk, stride_wn,
    stride_ym, stride_yn,
    stride_xsm, stride_wsg, stride_wsn,
    SCALED: tl.constexpr, MAX_IMPRECISE_ACC: tl.constexpr,
    UPCAST_TO_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # -- which tile: axis 0 walks the host-built list of (group, first row), axis 1 N-tiles --
    pid_t = tl.program_id(axis=0).to(tl.int64)
    pid_n = tl.program_id(axis=1).to(tl.int64)
    g = tl.load(tile_group_ptr + pid_t).to(tl.int64)
    row0 = tl.load(tile_row_ptr + pid_t).to(tl.int64)
    row_end = tl.load(ends_ptr + g).to(tl.int64)

    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < row_end
    mask_n = offs_n < N
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + g * stride_wg + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn

    # -- main loop: fp32 accumulator whatever the input dtype (one cast at the store) --------
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(x_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(w_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0.0)
        acc = _dot_acc(acc, a, b, UPCAST_TO_FP32, INPUT_PRECISION, MAX_IMPRECISE_ACC)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    # -- fp8: the row's and the group's column scales factor out of the K sum: applied once ---
    if SCALED:
        x_s = tl.load(xs_ptr + offs_m * stride_xsm, mask=mask_m, other=0.0)
        w_s = tl.load(ws_ptr + g * stride_wsg + offs_n * stride_wsn, mask=mask_n, other=0.0)
        acc = acc * x_s[:, None] * w_s[None, :]

    # -- store this group's rows only ---------------------------------------------------------
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _grouped_wgrad_kernel(
    x_ptr, dy_ptr, dw_ptr, ends_ptr,
    K, N,
    stride_xm, stride_xk,
    stride_dym, stride_dyn,
    stride_dwg, stride_dwk, stride_dwn,
    UPCAST_TO_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # -- which tile: one group, one [BLOCK_K, BLOCK_N] tile of its dw; the reduction runs over
    #    the group's rows, whose count only the loaded ends know --------------------------------
    g = tl.program_id(axis=0).to(tl.int64)
    pid_k = tl.program_id(axis=1).to(tl.int64)
    pid_n = tl.program_id(axis=2).to(tl.int64)
    row_start = tl.load(ends_ptr + g - 1, mask=g > 0, other=0).to(tl.int64)
    row_end = tl.load(ends_ptr + g).to(tl.int64)

    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    mask_k = offs_k < K
    mask_n = offs_n < N

    # -- main loop over the group's rows, fp32 accumulator; an empty group stores zeros -------
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for m0 in range(row_start, row_end, BLOCK_M):
        rows = m0 + offs_m
        mask_m = rows < row_end
        xt = tl.load(x_ptr + rows[None, :] * stride_xm + offs_k[:, None] * stride_xk,
                     mask=mask_k[:, None] & mask_m[None, :], other=0.0)
        dy = tl.load(dy_ptr + rows[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                     mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        acc = _dot_acc(acc, xt, dy, UPCAST_TO_FP32, INPUT_PRECISION, None)

    dw_ptrs = dw_ptr + g * stride_dwg + offs_k[:, None] * stride_dwk + offs_n[None, :] * stride_dwn
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=mask_k[:, None] & mask_n[None, :])


# ----------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------

def _blocks(op: str, precision: str | None, fp8: bool = False) -> dict[str, int]:
    """The tile of the forward (``op`` "fwd") or wgrad kernel for a ``tl.dot`` precision
    (fp8: K steps of 128, one 128-byte row per tile row, as the dense fp8 tiles)."""
    if interpreter.is_interpreting():  # big blocks: the interpreter pays per program (interpreter.py)
        return {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}
    # IEEE fp32 runs on FMA units with the operand tiles in registers: a 16-deep step, or the
    # 64-deep one spills 464 B on sm_80 (python -m fusedpar kernels --full)
    depth = 16 if precision == "ieee" else 64
    if op == "wgrad":  # the reduction runs over BLOCK_M rows here
        return {"BLOCK_M": 16 if precision == "ieee" else 32, "BLOCK_N": 64, "BLOCK_K": 64}
    return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128 if fp8 else depth}


def group_ends(group_ids_sorted: torch.Tensor, groups: int) -> torch.Tensor:
    """`ends[g]` (int64, cumulative) for rows sorted by group id in `[0, groups)`."""
    counts = torch.bincount(group_ids_sorted, minlength=groups)[:groups]
    return counts.cumsum(0)


def _check(op: str, x: torch.Tensor, w_or_dy: torch.Tensor, ends: torch.Tensor, *, groups: int | None,
           fp8_ok: bool = False) -> None:
    for name, t in (("x", x), ("ends", ends)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be 2-D [S, K] (rows sorted by group), got shape {tuple(x.shape)}")
    if ends.dim() != 1 or ends.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{op}: ends must be a 1-D int32/int64 tensor of cumulative group ends, "
                         f"got shape {tuple(ends.shape)} dtype {ends.dtype}")
    if groups is not None and ends.shape[0] != groups:
        raise ValueError(f"{op}: ends must have one entry per group ({groups}), got {ends.shape[0]}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64) and not (
            fp8_ok and is_fp8(x.dtype)):
        also = " or an fp8 dtype (with its scales)" if fp8_ok else " (the wgrad stays high precision)"
        raise TypeError(f"{op}: x must be float16, bfloat16, float32 or float64{also}, got {x.dtype}")
    if is_fp8(x.dtype) and not is_fp8(w_or_dy.dtype):
        raise TypeError(f"{op}: w must be fp8 like x ({x.dtype}), got {w_or_dy.dtype}")
    if not is_fp8(x.dtype) and w_or_dy.dtype != x.dtype:
        raise TypeError(f"{op}: operands must share x's dtype ({x.dtype}), got {w_or_dy.dtype}")
    if w_or_dy.device != x.device or ends.device != x.device:
        raise ValueError(f"{op}: operands must be on x's device ({x.device})")


def _check_group_scales(op: str, x: torch.Tensor, x_scale: torch.Tensor | None, w_scale: torch.Tensor | None,
                        G: int, N: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8 scales as float32 tensors: ``x_scale`` ``[S, 1]`` or one element, ``w_scale``
    ``[G, N]`` or one element; a missing one means 1."""
    out = []
    for name, s, shape in (("x_scale", x_scale, (x.shape[0], 1)), ("w_scale", w_scale, (G, N))):
        if s is None:
            s = torch.ones((), dtype=torch.float32, device=x.device)
        elif not isinstance(s, torch.Tensor) or s.dtype != torch.float32 or s.device != x.device or (
                s.numel() != 1 and tuple(s.shape) != shape):
            got = f"{tuple(s.shape)} {s.dtype} on {s.device}" if isinstance(s, torch.Tensor) else type(s).__name__
            raise ValueError(f"{op}: {name} must be float32 on {x.device} with shape {shape} or one element, "
                             f"got {got}")
        out.append(s)
    return out[0], out[1]


def _spans(ends: torch.Tensor) -> list[tuple[int, int, int]]:
    """`(group, start, end)` of every non-empty group (one host sync for the whole call)."""
    out, start = [], 0
    for g, end in enumerate(ends.tolist()):
        if end > start:
            out.append((g, start, end))
        start = end
    return out


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor, *, out: torch.Tensor | None = None,
                   x_scale: torch.Tensor | None = None, w_scale: torch.Tensor | None = None,
                   out_dtype: torch.dtype | None = None, kernel: str = "auto") -> torch.Tensor:
    """Computes ``y[rows_g] = x[rows_g] @ w[g]`` for every group g, in one launch.

    ``x`` ``[S, K]`` has its rows sorted by group, ``ends`` ``[G]`` the cumulative group
    ends (``ends[-1] == S``), ``w`` ``[G, K, N]`` any strides. Returns ``y`` ``[S, N]``
    (``out`` if given). fp8 ``x`` and ``w``: ``y = (x_q @ w_q[g]) * x_scale * w_scale[g]``
    with ``x_scale`` ``[S, 1]`` and ``w_scale`` ``[G, N]`` (or one element each), written in
    ``out_dtype`` (bf16 by default; fp16 or fp32). ``kernel`` picks the backend like
    :func:`fusedpar.kernels.matmul`.
    """
    op = "grouped_matmul"
    _check(op, x, w, ends, groups=None, fp8_ok=True)
    if w.dim() != 3 or w.shape[1] != x.shape[1] or w.shape[0] != ends.shape[0]:
        raise ValueError(f"{op}: w must be [G={ends.shape[0]}, K={x.shape[1]}, N], got shape {tuple(w.shape)}")
    S, K = x.shape
    G, N = w.shape[0], w.shape[2]
    fp8 = is_fp8(x.dtype)
    if fp8:
        x_scale, w_scale = _check_group_scales(op, x, x_scale, w_scale, G, N)
        dtype = resolve_out_dtype(op, x, out, out_dtype)
    else:
        refuse_scales(op, x, {"x_scale": x_scale, "w_scale": w_scale})
        if out_dtype is not None and out_dtype != x.dtype:
            raise TypeError(f"{op}: out_dtype must be x's dtype ({x.dtype}) for {x.dtype} operands, got {out_dtype}")
        dtype = x.dtype
    if out is None:
        out = torch.empty(S, N, dtype=dtype, device=x.device)
    elif not isinstance(out, torch.Tensor) or tuple(out.shape) != (S, N) or out.dtype != dtype:
        got = f"{tuple(out.shape)} {out.dtype}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{op}: out must be [{S}, {N}] {dtype}, got {got}")
    if S == 0 or N == 0:
        return out
    backend = _select_backend(op, kernel, x)
    spans = _spans(ends)
    if spans and spans[-1][2] != S:
        raise ValueError(f"{op}: ends[-1] must equal the number of rows of x ({S}), got {spans[-1][2]}")
    if backend == "torch":
        wide = x.dtype in (torch.float16, torch.bfloat16) and not x.is_cuda  # CPU 16-bit: fp32 accumulate
        for g, start, end in spans:
            if fp8:  # an emulation of the kernel's arithmetic (exact fp8 values, fp32 sums)
                xs = x_scale[start:end] if x_scale.numel() > 1 else x_scale
                ws = w_scale[g:g + 1] if w_scale.numel() > 1 else w_scale
                out[start:end] = torch_scaled_product(x[start:end], w[g], xs, ws).to(dtype)
            elif wide:
                out[start:end] = (x[start:end].float() @ w[g].float()).to(x.dtype)
            else:
                torch.mm(x[start:end], w[g], out=out[start:end])
        return out
    if fp8 and x.is_cuda:
        reason = _fp8_device_reason(x.device)
        if reason is not None:
            raise RuntimeError(f"{op}: fp8 operands cannot run here: {reason}")
    upcast = interpreter.upcast_to_fp32(x.dtype)
    precision = _input_precision(x.dtype, upcast)
    blocks = _blocks("fwd", precision, fp8=fp8)
    bm = blocks["BLOCK_M"]
    tile_group, tile_row = [], []
    for g, start, end in spans:
        for row in range(start, end, bm):
            tile_group.append(g)
            tile_row.append(row)
    tiles_g = torch.tensor(tile_group, dtype=torch.int32, device=x.device)
    tiles_r = torch.tensor(tile_row, dtype=torch.int64, device=x.device)
    grid = (len(tile_group), triton.cdiv(N, blocks["BLOCK_N"]))
    xs, ws = (x_scale, w_scale) if fp8 else (out, out)  # unread without SCALED
    scale_strides = (x_scale.stride(0) if x_scale.numel() > 1 else 0,
                     *((w_scale.stride(0), w_scale.stride(1)) if w_scale.numel() > 1 else (0, 0))) if fp8 \
        else (0, 0, 0)
    _grouped_kernel[grid](
        x, w, out, xs, ws, tiles_g, tiles_r, ends, N, K,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2), out.stride(0), out.stride(1),
        *scale_strides,
        SCALED=fp8, MAX_IMPRECISE_ACC=blocks["BLOCK_K"] if fp8 else None,
        UPCAST_TO_FP32=upcast, INPUT_PRECISION=precision, **blocks,
    )
    return out


def grouped_matmul_wgrad(x: torch.Tensor, dy: torch.Tensor, ends: torch.Tensor, *, out: torch.Tensor | None = None,
                         kernel: str = "auto") -> torch.Tensor:
    """Computes ``dw[g] = x[rows_g].T @ dy[rows_g]`` for every group g (zeros for an empty one).

    ``x`` ``[S, K]`` and ``dy`` ``[S, N]`` have their rows sorted by group, ``ends`` ``[G]``
    the cumulative group ends. Returns ``dw`` ``[G, K, N]`` (``out`` if given, any strides).
    """
    op = "grouped_matmul_wgrad"
    _check(op, x, dy, ends, groups=None)
    if dy.dim() != 2 or dy.shape[0] != x.shape[0]:
        raise ValueError(f"{op}: dy must be 2-D [S={x.shape[0]}, N], got shape {tuple(dy.shape)}")
    G, K, N = ends.shape[0], x.shape[1], dy.shape[1]
    if out is None:
        out = torch.empty(G, K, N, dtype=x.dtype, device=x.device)
    elif tuple(out.shape) != (G, K, N) or out.dtype != x.dtype:
        raise ValueError(f"{op}: out must be [{G}, {K}, {N}] {x.dtype}, got {tuple(out.shape)} {out.dtype}")
    if out.numel() == 0:
        return out
    backend = _select_backend(op, kernel, x)
    if backend == "torch":
        out.zero_()
        wide = x.dtype in (torch.float16, torch.bfloat16) and not x.is_cuda
        for g, start, end in _spans(ends):
            if wide:
                out[g] = (x[start:end].float().t() @ dy[start:end].float()).to(x.dtype)
            else:
                torch.mm(x[start:end].t(), dy[start:end], out=out[g])
        return out
    upcast = interpreter.upcast_to_fp32(x.dtype)
    precision = _input_precision(x.dtype, upcast)
    blocks = _blocks("wgrad", precision)
    grid = (G, triton.cdiv(K, blocks["BLOCK_K"]), triton.cdiv(N, blocks["BLOCK_N"]))
    _grouped_wgrad_kernel[grid](
        x, dy, out, ends, K, N,
        x.stride(0), x.stride(1), dy.stride(0), dy.stride(1), out.stride(0), out.stride(1), out.stride(2),
        UPCAST_TO_FP32=upcast, INPUT_PRECISION=precision, **blocks,
    )
    return out
