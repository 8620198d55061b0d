"""The GEMM kernels ``out (+)= act(a @ b + bias)`` and their launcher :func:`matmul`; with fp8
operands ``out (+)= act((a_q @ b_q) * a_scale * b_scale + bias)`` (:mod:`.fp8`).

Two kernels, after Triton's tutorials 03-matrix-multiplication (pointer) and
09-persistent-matmul (TMA); :mod:`.plan` picks one per launch:

* **TMA** (Hopper and later): A, B and the output move through tensor descriptors (the TMA
  copy engine; no per-element address registers), the grid is persistent (one program per
  SM looping over tiles, so tile i+1's loads overlap tile i's epilogue), and the epilogue
  works on column slices of the tile so it does not spill.
* **pointer** (any strides; Ampere; whatever TMA cannot take): int32 offsets where they
  fit, ``cp.async`` pipelining, a 1-D tile grid optionally capped at ``num_sms`` programs.

Every operand is read through its strides (``x @ w.T`` and ``dy.T @ x`` need no copy) and
the output may be any strided view of a bigger buffer, so the overlap schedules can consume
a received chunk ``[B, m, K]`` and write straight into its rows of the full output. fp64 and
CPU tensors without the interpreter run on the torch backend (:mod:`.torch_gemm`).
"""
from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from fusedpar.kernels import interpreter
from fusedpar.kernels.common import (
    _activate, _apply_scales, _as_batched, _check_activation, _check_config, _check_num_sms, _check_operands,
    _check_out, _check_tensor, _dot_acc, _halves, _input_precision, _pointer_offsets, _select_backend, _tile_coords,
    _tma_load_a, _tma_load_b, _tma_load_tile, _tma_store_tile, _tma_tile_offsets)
from fusedpar.kernels.configs import GemmConfig, m_class
from fusedpar.kernels.fp8 import (
    FP8_OUT_DTYPES, check_scales, is_fp8, refuse_scales, resolve_out_dtype, scale_cols, scale_rows,
    torch_scaled_product)
from fusedpar.kernels.plan import GemmPlan, _choose, _descriptor, _grid_size, _Launch, _offset_dtype, _run
from fusedpar.kernels.torch_gemm import (
    _TORCH_ACTIVATIONS, _torch_matmul_2d, _torch_matmul_into, _torch_matmul_new, _torch_product)

__all__ = ["matmul", "plan_matmul"]


# ----------------------------------------------------------------------------------------
# Pointer kernel: out[b] (+)= act(a[b] @ b + bias)
# ----------------------------------------------------------------------------------------

@triton.jit
def _matmul_kernel(
    a_ptr, b_ptr, bias_ptr, out_ptr, as_ptr, bs_ptr,
    BATCH, M, N, K,
    stride_ab, stride_am, stride_ak,
    stride_bk, stride_bn,
    stride_bias,
    stride_ob, stride_om, stride_on,
    stride_asb, stride_asm, stride_bsn,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, ACCUMULATE: tl.constexpr, SCALED: tl.constexpr,
    MAX_IMPRECISE_ACC: tl.constexpr,
    UPCAST_TO_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr, OFFSET_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # -- which tiles: ids run over batch x M-tiles x N-tiles; a program takes every
    #    num_programs-th one (a single tile unless the launcher capped the grid at num_sms) --
    num_tiles = BATCH * tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile_id in range(tl.program_id(axis=0), num_tiles, tl.num_programs(axis=0)):
        pid_batch, pid_m, pid_n = _tile_coords(tile_id, M, N, BLOCK_M, BLOCK_N, GROUP_M)

        # -- offsets of the first K-block from the operands' bases (int32 where they fit,
        #    rows/cols past M/N wrapped: _pointer_offsets) -----------------------------------
        a_base = a_ptr + pid_batch * stride_ab
        a_offs, offs_k, offs_bn = _pointer_offsets(pid_m, pid_n, M, N, stride_am, stride_ak, OFFSET_DTYPE,
                                                   BLOCK_M, BLOCK_N, BLOCK_K)
        b_offs = offs_k[:, None] * stride_bk + offs_bn[None, :] * stride_bn

        # -- main loop: accumulate in fp32, whatever the input dtype (_dot_acc) --------------
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            k_remaining = K - k * BLOCK_K
            a = tl.load(a_base + a_offs, mask=offs_k[None, :] < k_remaining, other=0.0)
            b = tl.load(b_ptr + b_offs, mask=offs_k[:, None] < k_remaining, other=0.0)
            acc = _dot_acc(acc, a, b, UPCAST_TO_FP32, INPUT_PRECISION, MAX_IMPRECISE_ACC)
            a_offs += BLOCK_K * stride_ak
            b_offs += BLOCK_K * stride_bk

        # -- epilogue in fp32: fp8 scales, bias, activation, accumulate into out, one cast --
        offs_cm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        if SCALED:
            acc = _apply_scales(acc, as_ptr, bs_ptr, pid_batch, offs_cm, offs_cn, M, N,
                                stride_asb, stride_asm, stride_bsn)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_cn * stride_bias, mask=offs_cn < N, other=0.0)
            acc += bias.to(tl.float32)[None, :]
        acc = _activate(acc, ACTIVATION)
        out_ptrs = out_ptr + pid_batch * stride_ob + offs_cm[:, None] * stride_om + offs_cn[None, :] * stride_on
        out_mask = (offs_cm[:, None] < M) & (offs_cn[None, :] < N)
        if ACCUMULATE:
            acc += tl.load(out_ptrs, mask=out_mask, other=0.0).to(tl.float32)
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


# ----------------------------------------------------------------------------------------
# TMA kernel: the same, through tensor descriptors, persistent, sliced epilogue
# ----------------------------------------------------------------------------------------

@triton.jit
def _tma_epilogue_slice(c, out_desc, bias_ptr, stride_bias, as_ptr, bs_ptr, stride_asb, stride_asm, stride_bsn,
                        off_b, off_m, off_n, M, N,
                        HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, ACCUMULATE: tl.constexpr,
                        SCALED: tl.constexpr, BATCHED: tl.constexpr, BLOCK_M: tl.constexpr, SLICE_N: tl.constexpr):
    """fp8 scales, bias, activation and accumulate on one column slice in fp32, one cast at
    the store."""
    if SCALED:
        c = _apply_scales(c, as_ptr, bs_ptr, off_b, off_m + tl.arange(0, BLOCK_M), off_n + tl.arange(0, SLICE_N),
                          M, N, stride_asb, stride_asm, stride_bsn)
    if HAS_BIAS:
        offs_n = off_n + tl.arange(0, SLICE_N)
        bias = tl.load(bias_ptr + offs_n * stride_bias, mask=offs_n < N, other=0.0)
        c += bias.to(tl.float32)[None, :]
    c = _activate(c, ACTIVATION)
    if ACCUMULATE:
        c += _tma_load_tile(out_desc, off_b, off_m, off_n, BATCHED, BLOCK_M, SLICE_N).to(tl.float32)
    _tma_store_tile(out_desc, c, off_b, off_m, off_n, BATCHED, BLOCK_M, SLICE_N)


@triton.jit
def _tma_epilogue_halves(c, out_desc, bias_ptr, stride_bias, as_ptr, bs_ptr, stride_asb, stride_asm, stride_bsn,
                         off_b, off_m, off_n, M, N,
                         HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, ACCUMULATE: tl.constexpr,
                         SCALED: tl.constexpr, BATCHED: tl.constexpr, BLOCK_M: tl.constexpr, SLICE_N: tl.constexpr):
    """:func:`_tma_epilogue_slice` on the left and then the right column half of ``c``."""
    HALF: tl.constexpr = SLICE_N // 2
    c0, c1 = _halves(c, BLOCK_M, SLICE_N)
    _tma_epilogue_slice(c0, out_desc, bias_ptr, stride_bias, as_ptr, bs_ptr, stride_asb, stride_asm, stride_bsn,
                        off_b, off_m, off_n, M, N, HAS_BIAS, ACTIVATION, ACCUMULATE, SCALED, BATCHED, BLOCK_M, HALF)
    _tma_epilogue_slice(c1, out_desc, bias_ptr, stride_bias, as_ptr, bs_ptr, stride_asb, stride_asm, stride_bsn,
                        off_b, off_m, off_n + HALF, M, N, HAS_BIAS, ACTIVATION, ACCUMULATE, SCALED, BATCHED, BLOCK_M,
                        HALF)


@triton.jit
def _matmul_tma_kernel(
    a_desc, b_desc, bias_ptr, out_desc, as_ptr, bs_ptr,
    BATCH, M, N, K,
    stride_bias, stride_asb, stride_asm, stride_bsn,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, ACCUMULATE: tl.constexpr, SCALED: tl.constexpr,
    MAX_IMPRECISE_ACC: tl.constexpr, UPCAST_TO_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    A_T: tl.constexpr, B_T: tl.constexpr, BATCHED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EPILOGUE_SPLIT: tl.constexpr,
):
    # -- persistent: one program per SM (or per num_sms) walks the tiles; the nested loops are
    #    flattened so the next tile's first loads are issued under this tile's epilogue -----
    num_tiles = BATCH * tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile_id in tl.range(tl.program_id(axis=0), num_tiles, tl.num_programs(axis=0), flatten=True):
        off_b, off_m, off_n = _tma_tile_offsets(tile_id, M, N, BLOCK_M, BLOCK_N, GROUP_M)

        # -- main loop: fp32 accumulator (long K sums of fp16/bf16 keep fp32 precision) ----
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            off_k = ki * BLOCK_K
            a = _tma_load_a(a_desc, off_b, off_m, off_k, A_T, BATCHED, BLOCK_M, BLOCK_K)
            b = _tma_load_b(b_desc, off_n, off_k, B_T)
            acc = _dot_acc(acc, a, b, UPCAST_TO_FP32, INPUT_PRECISION, MAX_IMPRECISE_ACC)

        # -- epilogue in column slices: a 128x256 fp32 tile is 128 registers a thread, and
        #    bias/activation/casts on all of it at once is what spilled ----------------------
        if EPILOGUE_SPLIT == 1:
            _tma_epilogue_slice(acc, out_desc, bias_ptr, stride_bias, as_ptr, bs_ptr,
                                stride_asb, stride_asm, stride_bsn, off_b, off_m, off_n, M, N,
                                HAS_BIAS, ACTIVATION, ACCUMULATE, SCALED, BATCHED, BLOCK_M, BLOCK_N)
        elif EPILOGUE_SPLIT == 2:
            _tma_epilogue_halves(acc, out_desc, bias_ptr, stride_bias, as_ptr, bs_ptr,
                                 stride_asb, stride_asm, stride_bsn, off_b, off_m, off_n, M, N,
                                 HAS_BIAS, ACTIVATION, ACCUMULATE, SCALED, BATCHED, BLOCK_M, BLOCK_N)
        else:  # quarters: each half in halves
            HALF: tl.constexpr = BLOCK_N // 2
            c0, c1 = _halves(acc, BLOCK_M, BLOCK_N)
            _tma_epilogue_halves(c0, out_desc, bias_ptr, stride_bias, as_ptr, bs_ptr,
                                 stride_asb, stride_asm, stride_bsn, off_b, off_m, off_n, M, N,
                                 HAS_BIAS, ACTIVATION, ACCUMULATE, SCALED, BATCHED, BLOCK_M, HALF)
            _tma_epilogue_halves(c1, out_desc, bias_ptr, stride_bias, as_ptr, bs_ptr,
                                 stride_asb, stride_asm, stride_bsn, off_b, off_m, off_n + HALF, M, N,
                                 HAS_BIAS, ACTIVATION, ACCUMULATE, SCALED, BATCHED, BLOCK_M, HALF)


# ----------------------------------------------------------------------------------------
# Launch and launcher
# ----------------------------------------------------------------------------------------

def _max_imprecise(scales, config: GemmConfig, fast_accum: bool) -> int | None:
    """tl.dot's max_num_imprecise_acc: Hopper's fp8 tensor cores accumulate in less than
    fp32 (about 14 bits), so by default each BLOCK_K step's partial product is added into
    the fp32 accumulator (promotion every 128 products, DeepSeek-V3's interval); with
    ``fast_accum`` the whole K sum stays in the tensor cores (Triton's default on sm_90).
    None (Triton's default) for other dtypes, where it does not apply."""
    return config.block_k if scales is not None and not fast_accum else None


def _matmul_launch(a3, b, bias, out3, activation, accumulate, num_sms, config, op="matmul",
                   scales=None, fast_accum=False) -> _Launch:
    """The launch for ``a3`` [B, M, K] @ ``b`` [K, N] into ``out3`` [B, M, N]; ``scales``
    (fp8) is ``(a_scale, b_scale)`` as :func:`.fp8.check_scales` returns them."""
    batch, M, K = a3.shape
    N = b.shape[1]
    if scales is None and is_fp8(a3.dtype):  # plans without scales launch as if given 1s
        one = torch.ones((), dtype=torch.float32, device=a3.device)
        scales = (one, one)
    if scales is not None:
        (a_s, stride_asb, stride_asm), (b_s, stride_bsn) = scale_rows(scales[0], batch, M), scale_cols(scales[1])
    else:  # unused pointers: any tensor will do
        a_s, b_s, stride_asb, stride_asm, stride_bsn = out3, out3, 0, 0, 0
    upcast = interpreter.upcast_to_fp32(a3.dtype)
    precision = _input_precision(a3.dtype, upcast)
    path, config, reason, a_t, b_t = _choose(op, a3, [b], [out3], N, K, precision, num_sms, config, accumulate)
    grid = _grid_size(path, batch, M, N, config, num_sms, a3.device)
    plan = GemmPlan(path, config, reason, grid)
    flags = dict(HAS_BIAS=bias is not None, ACTIVATION=activation, ACCUMULATE=accumulate,
                 SCALED=scales is not None, MAX_IMPRECISE_ACC=_max_imprecise(scales, config, fast_accum),
                 UPCAST_TO_FP32=upcast, INPUT_PRECISION=precision, **config.meta,
                 num_warps=config.num_warps, num_stages=config.num_stages)
    bias_arg = bias if bias is not None else out3
    stride_bias = bias.stride(0) if bias is not None else 0
    if path == "pointer":
        flags["OFFSET_DTYPE"] = _offset_dtype([a3[0], b])
        args = (a3, b, bias_arg, out3, a_s, b_s, batch, M, N, K,
                a3.stride(0), a3.stride(1), a3.stride(2), b.stride(0), b.stride(1), stride_bias,
                out3.stride(0), out3.stride(1), out3.stride(2), stride_asb, stride_asm, stride_bsn)
        return _Launch(_matmul_kernel, (grid,), args, flags, plan, "matmul")
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    batched = batch > 1
    lead = [1] if batched else []
    a_desc = _descriptor(a3, lead + ([bk, bm] if a_t else [bm, bk]), batched, transpose=a_t)
    b_desc = _descriptor(b, [bn, bk] if b_t else [bk, bn], False, transpose=b_t)
    out_desc = _descriptor(out3, lead + [bm, bn // config.epilogue_split], batched)
    args = (a_desc, b_desc, bias_arg, out_desc, a_s, b_s, batch, M, N, K, stride_bias, stride_asb, stride_asm,
            stride_bsn)
    flags.update(A_T=a_t, B_T=b_t, BATCHED=batched, EPILOGUE_SPLIT=config.epilogue_split)
    return _Launch(_matmul_tma_kernel, (grid,), args, flags, plan, "matmul")


def matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    a_scale: torch.Tensor | None = None,
    b_scale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    fast_accum: bool = False,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    out: torch.Tensor | None = None,
    accumulate: bool = False,
    kernel: str = "auto",
    num_sms: int | None = None,
    config: GemmConfig | None = None,
) -> torch.Tensor:
    """Computes ``out = act(a @ b + bias)``, or ``out += act(a @ b + bias)`` with ``accumulate``.

    ``a`` is ``[..., M, K]`` and ``b`` ``[K, N]``, both with any strides (``x @ w.T`` for an
    ``nn.Linear`` weight needs no copy); a 3-D ``a`` ``[B, M, K]`` whose batch dim cannot merge
    into M runs as a batch sharing ``b``. ``bias`` is ``[N]``; ``activation`` one of
    :data:`ACTIVATIONS`. ``out`` is ``a.shape[:-1] + (N,)`` with any strides (e.g. a slice
    of a bigger buffer) and dtype ``a.dtype`` or float32; it is required with
    ``accumulate=True`` (gradient accumulation into an fp32 main_grad). The product is
    accumulated and the epilogue applied in fp32 (fp64 for fp64), with one cast at the
    store. ``kernel`` picks the backend (:func:`resolve_kernel`). ``num_sms`` caps the Triton
    grid at that many programs, each looping over tiles, so the GEMM leaves the other SMs to
    concurrent communication kernels (the torch backend ignores it). ``config`` forces a
    tile and path (benchmarks, tuning); by default :func:`plan_matmul` picks them. Returns
    ``out``, allocated with ``out_dtype`` (default ``a.dtype``) when not given.

    fp8 (``a`` and ``b`` in ``torch.float8_e4m3fn`` / ``float8_e5m2``, any pair): computes
    ``act((a @ b) * a_scale * b_scale + bias)`` with the scales applied to the fp32
    accumulator in the epilogue. ``a_scale`` is float32 with one element (per tensor) or
    shape ``a.shape[:-1] + (1,)`` (per row); ``b_scale`` one element or ``(1, N)`` (per
    column); None means 1. ``out_dtype`` is bf16 (default), fp16 or fp32; ``bias`` any of
    those. On Hopper, K-major operands (``x @ w.T`` with both K-contiguous) take the TMA
    kernel; sm_80 has no fp8 tensor cores and raises. Hopper accumulates fp8 products in
    less than fp32: each BLOCK_K partial sum is promoted into the fp32 accumulator, unless
    ``fast_accum`` (faster, less accurate for long K). The torch backend emulates the same
    arithmetic in fp32 (:func:`.fp8.torch_scaled_product`): right, not fast.
    """
    key = None
    if (a_scale is None and b_scale is None and config is None and isinstance(a, torch.Tensor) and not is_fp8(a.dtype)
            and isinstance(b, torch.Tensor) and (bias is None or isinstance(bias, torch.Tensor))
            and (out is None or isinstance(out, torch.Tensor)) and isinstance(activation, (str, type(None)))
            and isinstance(kernel, str) and isinstance(out_dtype, (torch.dtype, type(None)))):
        # the checks and the backend choice depend only on shapes, dtypes, devices and flags:
        # done once per key (what a decode step repeats every call), not per call
        key = (a.shape, a.dtype, a.device, b.shape, b.dtype, b.device,
               None if bias is None else (bias.shape, bias.dtype, bias.device),
               None if out is None else (out.shape, out.dtype, out.device),
               out_dtype, activation, accumulate, kernel, num_sms)
    checked = _CHECKED.get(key) if key is not None else None
    if checked is None and key is not None:
        checked = _check_matmul(a, b, bias=bias, activation=activation, out=out, out_dtype=out_dtype,
                                accumulate=accumulate, kernel=kernel, num_sms=num_sms)
        if len(_CHECKED) >= 4096:  # shapes that keep changing: bound the cache
            _CHECKED.clear()
            _TORCH_DIRECT.clear()
        _CHECKED[key] = checked
        _TORCH_DIRECT[key] = _torch_direct(checked, a, out, accumulate)
    elif checked is None:
        checked = _check_matmul(a, b, bias=bias, activation=activation, out=out, out_dtype=out_dtype,
                                accumulate=accumulate, kernel=kernel, num_sms=num_sms, config=config,
                                a_scale=a_scale, b_scale=b_scale)
    K, N, out_dtype, backend, scales = checked
    fp8 = scales is not None
    direct = _TORCH_DIRECT.get(key) if backend == "torch" and key is not None else None
    if direct is not None:
        return direct(a, b, bias, activation, out)
    out_shape = (*a.shape[:-1], N)
    if out is None:
        out = torch.empty(out_shape, dtype=out_dtype, device=a.device)
    if out.numel() == 0:
        return out
    return _launch_matmul(a, b, bias, activation, out, accumulate, backend, K, out_shape, fp8, scales,
                          num_sms, config, fast_accum)


# (shapes, dtypes, devices, flags) of matmul calls already checked -> _check_matmul's answer
_CHECKED: dict[tuple, tuple] = {}
# the same keys -> the torch call that runs it straight away, or None (cleared with _CHECKED)
_TORCH_DIRECT: dict[tuple, Any] = {}


def _torch_direct(checked: tuple, a: torch.Tensor, out: torch.Tensor | None, accumulate: bool) -> Any:
    """For the torch backend computing in the output dtype: one torch GEMM and nothing around
    it, `_torch_matmul_new` (torch allocates the result: no empty() + out= round trip) or
    `_torch_matmul_2d` (2-D operands into a 2-D `out`), a good part of a decode-sized GEMM's
    host time; None for the general path."""
    _, _, out_dtype, backend, scales = checked
    if (backend != "torch" or scales is not None or accumulate or out_dtype != a.dtype
            or not (a.dtype in (torch.float32, torch.float64) or a.is_cuda)):
        return None
    if out is None:
        return _torch_matmul_new
    return _torch_matmul_2d if a.dim() == 2 and out.dim() == 2 else None


def _check_matmul(a: torch.Tensor, b: torch.Tensor, *, bias: torch.Tensor | None, activation: str | None,
                  out: torch.Tensor | None, out_dtype: torch.dtype | None, accumulate: bool, kernel: str,
                  num_sms: int | None, config: GemmConfig | None = None, a_scale: torch.Tensor | None = None,
                  b_scale: torch.Tensor | None = None) -> tuple:
    """`matmul`'s argument checks; returns (K, N, out dtype, backend, scales or None)."""
    op = "matmul"
    K, N = _check_operands(op, a, {"b": b})
    fp8 = is_fp8(a.dtype)
    scales = None
    if fp8:
        a_s, (b_s,) = check_scales(op, a, a_scale, {"b_scale": b_scale}, N)
        scales = (a_s, b_s)
    else:
        refuse_scales(op, a, {"a_scale": a_scale, "b_scale": b_scale})
    out_dtype = resolve_out_dtype(op, a, out, out_dtype)
    out_shape = (*a.shape[:-1], N)
    if bias is not None:
        _check_tensor(op, "bias", bias)
        if tuple(bias.shape) != (N,):
            raise ValueError(f"{op}: bias must have shape (N,) = ({N},), got {tuple(bias.shape)}")
        if fp8 and bias.dtype not in FP8_OUT_DTYPES:
            raise TypeError(f"{op}: bias of an fp8 GEMM must have a dtype in {FP8_OUT_DTYPES}, got {bias.dtype}")
        if not fp8 and bias.dtype != a.dtype:
            raise TypeError(f"{op}: bias must have the dtype of a ({a.dtype}), got {bias.dtype}")
        if bias.device != a.device:
            raise ValueError(f"{op}: bias must be on a's device ({a.device}), got {bias.device}")
    _check_activation(op, activation)
    _check_num_sms(op, num_sms)
    _check_config(op, config)
    if accumulate and out is None:
        raise ValueError(f"{op}: accumulate=True needs out= (the tensor to add into), got out=None")
    if out is not None:
        _check_out(op, out, a, out_shape)
    backend = _select_backend(op, kernel, a)
    return K, N, out_dtype, backend, scales


def _launch_matmul(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, activation: str | None,
                   out: torch.Tensor, accumulate: bool, backend: str, K: int, out_shape: tuple[int, ...], fp8: bool,
                   scales: tuple | None, num_sms: int | None, config: GemmConfig | None,
                   fast_accum: bool) -> torch.Tensor:
    """`matmul` after its checks: run the chosen backend into `out`."""
    op, N = "matmul", out_shape[-1]
    if backend == "torch":
        if not fp8 and out.dtype == a.dtype and (a.dtype in (torch.float32, torch.float64) or a.is_cuda):
            _torch_matmul_into(a, b, bias, activation, out, accumulate)
            return out
        y = torch_scaled_product(a, b, *scales) if fp8 else _torch_product(a, b)
        if bias is not None:
            y = y + bias.to(y.dtype)
        y = _TORCH_ACTIVATIONS[activation](y)
        if accumulate:
            y = y + out.to(y.dtype)
        out.copy_(y)
        return out

    if K == 0:  # an empty sum: the kernels would store act(bias) after zero K-steps; say it plainly
        y = torch.zeros(out_shape, dtype=torch.float32, device=a.device)
        if bias is not None:
            y += bias.float()
        y = _TORCH_ACTIVATIONS[activation](y)
        out.copy_(y + out.float() if accumulate else y)
        return out
    a3, out3 = _as_batched(a, out)

    def rebuild(cfg: GemmConfig | None) -> _Launch:
        return _matmul_launch(a3, b, bias, out3, activation, accumulate, num_sms, cfg,
                              scales=scales if fp8 else None, fast_accum=fast_accum)

    launch = rebuild(config)
    tune_key = None
    if config is None:
        tune_key = ("matmul", launch.plan.path, m_class(a3.shape[0] * a3.shape[1]), N, K,
                    bias is not None, activation, accumulate, out3.dtype, b.dtype, fast_accum, a.dtype)
    _run(op, launch, a.dtype, tune_key, rebuild, [out3] if accumulate else [])
    if out3.data_ptr() != out.data_ptr():  # out's batch dims did not merge: out3 is a copy
        out.copy_(out3.view(out.shape))
    return out


def plan_matmul(a: torch.Tensor, b: torch.Tensor, *, bias: torch.Tensor | None = None,
                activation: str | None = None, out: torch.Tensor | None = None, accumulate: bool = False,
                num_sms: int | None = None, config: GemmConfig | None = None,
                out_dtype: torch.dtype | None = None) -> GemmPlan:
    """The kernel path, tile and grid :func:`matmul` would launch for these arguments on the
    Triton backend, and the reason for the path, without launching anything (scales do not
    change the plan, so fp8 operands are planned without them)."""
    K, N = _check_operands("plan_matmul", a, {"b": b})
    if out is None:
        out = torch.empty((*a.shape[:-1], N), dtype=resolve_out_dtype("plan_matmul", a, None, out_dtype),
                          device=a.device)
    _check_config("plan_matmul", config)
    a3, out3 = _as_batched(a, out)
    return _matmul_launch(a3, b, bias, out3, activation, accumulate, num_sms, config, op="plan_matmul").plan
