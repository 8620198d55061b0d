"""The gated GEMM kernels ``act(a @ b_gate) * (a @ b_up)`` (SwiGLU, GeGLU) and their launcher
:func:`gated_matmul`: one A tile feeds two fp32 accumulators, so neither product goes
through memory. A pointer and a TMA kernel, chosen per launch as for :mod:`.matmul`. With fp8
operands each accumulator is scaled in the epilogue (a's row scales times its own weight's
column scales) before the activation (:mod:`.fp8`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusedpar.kernels import interpreter
from fusedpar.kernels.common import (
    _activate, _apply_scales, _as_batched, _check_activation, _check_config, _check_num_sms, _check_operands,
    _check_out, _dot_acc, _halves, _input_precision, _pointer_offsets, _select_backend, _tile_coords, _tma_load_a,
    _tma_load_b, _tma_store_tile, _tma_tile_offsets)
from fusedpar.kernels.configs import GemmConfig, m_class
from fusedpar.kernels.fp8 import check_scales, is_fp8, refuse_scales, resolve_out_dtype, scale_cols, scale_rows, \
    torch_scaled_product
from fusedpar.kernels.plan import GemmPlan, _choose, _descriptor, _grid_size, _Launch, _offset_dtype, _run
from fusedpar.kernels.matmul import _max_imprecise
from fusedpar.kernels.torch_gemm import _TORCH_ACTIVATIONS, _torch_product

__all__ = ["gated_matmul", "plan_gated_matmul"]


# ----------------------------------------------------------------------------------------
# Pointer kernel: y[b] = act(a[b] @ b_gate) * (a[b] @ b_up), optionally the pre-activations
# ----------------------------------------------------------------------------------------

@triton.jit
def _gated_matmul_kernel(
    a_ptr, bg_ptr, bu_ptr, out_ptr, gate_ptr, up_ptr, as_ptr, bgs_ptr, bus_ptr,
    BATCH, M, N, K,
    stride_ab, stride_am, stride_ak,
    stride_bgk, stride_bgn,
    stride_buk, stride_bun,
    stride_ob, stride_om, stride_on,
    stride_pb, stride_pm, stride_pn,
    stride_asb, stride_asm, stride_bgsn, stride_busn,
    ACTIVATION: tl.constexpr, RETURN_PREACT: tl.constexpr, SCALED: tl.constexpr, MAX_IMPRECISE_ACC: tl.constexpr,
    UPCAST_TO_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr, OFFSET_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    num_tiles = BATCH * tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile_id in range(tl.program_id(axis=0), num_tiles, tl.num_programs(axis=0)):
        pid_batch, pid_m, pid_n = _tile_coords(tile_id, M, N, BLOCK_M, BLOCK_N, GROUP_M)

        # -- offsets of the first K-block, as in _matmul_kernel (rows/cols past M/N wrap) ---
        a_base = a_ptr + pid_batch * stride_ab
        a_offs, offs_k, offs_bn = _pointer_offsets(pid_m, pid_n, M, N, stride_am, stride_ak, OFFSET_DTYPE,
                                                   BLOCK_M, BLOCK_N, BLOCK_K)
        bg_offs = offs_k[:, None] * stride_bgk + offs_bn[None, :] * stride_bgn
        bu_offs = offs_k[:, None] * stride_buk + offs_bn[None, :] * stride_bun

        # -- main loop: one A tile feeds two fp32 accumulators (fp32 for the same reason as in
        #    _matmul_kernel), so the intermediate never goes through memory -----------------
        acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            k_remaining = K - k * BLOCK_K
            a = tl.load(a_base + a_offs, mask=offs_k[None, :] < k_remaining, other=0.0)
            bg = tl.load(bg_ptr + bg_offs, mask=offs_k[:, None] < k_remaining, other=0.0)
            bu = tl.load(bu_ptr + bu_offs, mask=offs_k[:, None] < k_remaining, other=0.0)
            acc_gate = _dot_acc(acc_gate, a, bg, UPCAST_TO_FP32, INPUT_PRECISION, MAX_IMPRECISE_ACC)
            acc_up = _dot_acc(acc_up, a, bu, UPCAST_TO_FP32, INPUT_PRECISION, MAX_IMPRECISE_ACC)
            a_offs += BLOCK_K * stride_ak
            bg_offs += BLOCK_K * stride_bgk
            bu_offs += BLOCK_K * stride_buk

        # -- epilogue in fp32: gate activation times up, one cast at each store ------------
        offs_cm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (offs_cm[:, None] < M) & (offs_cn[None, :] < N)
        if SCALED:  # fp8: each product times a's row scales and its own weight's column scales
            acc_gate = _apply_scales(acc_gate, as_ptr, bgs_ptr, pid_batch, offs_cm, offs_cn, M, N,
                                     stride_asb, stride_asm, stride_bgsn)
            acc_up = _apply_scales(acc_up, as_ptr, bus_ptr, pid_batch, offs_cm, offs_cn, M, N,
                                   stride_asb, stride_asm, stride_busn)
        y = _activate(acc_gate, ACTIVATION) * acc_up
        out_ptrs = out_ptr + pid_batch * stride_ob + offs_cm[:, None] * stride_om + offs_cn[None, :] * stride_on
        tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)
        if RETURN_PREACT:
            offs_p = pid_batch * stride_pb + offs_cm[:, None] * stride_pm + offs_cn[None, :] * stride_pn
            tl.store(gate_ptr + offs_p, acc_gate.to(gate_ptr.dtype.element_ty), mask=mask)
            tl.store(up_ptr + offs_p, acc_up.to(up_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------
# TMA kernel: the same, through tensor descriptors, persistent
# ----------------------------------------------------------------------------------------

@triton.jit
def _tma_gated_slice(g, u, out_desc, gate_desc, up_desc, off_b, off_m, off_n, M, N,
                     as_ptr, bgs_ptr, bus_ptr, stride_asb, stride_asm, stride_bgsn, stride_busn,
                     ACTIVATION: tl.constexpr, RETURN_PREACT: tl.constexpr, SCALED: tl.constexpr,
                     BATCHED: tl.constexpr, BLOCK_M: tl.constexpr, SLICE_N: tl.constexpr):
    if SCALED:
        offs_m = off_m + tl.arange(0, BLOCK_M)
        offs_n = off_n + tl.arange(0, SLICE_N)
        g = _apply_scales(g, as_ptr, bgs_ptr, off_b, offs_m, offs_n, M, N, stride_asb, stride_asm, stride_bgsn)
        u = _apply_scales(u, as_ptr, bus_ptr, off_b, offs_m, offs_n, M, N, stride_asb, stride_asm, stride_busn)
    y = _activate(g, ACTIVATION) * u
    _tma_store_tile(out_desc, y, off_b, off_m, off_n, BATCHED, BLOCK_M, SLICE_N)
    if RETURN_PREACT:
        _tma_store_tile(gate_desc, g, off_b, off_m, off_n, BATCHED, BLOCK_M, SLICE_N)
        _tma_store_tile(up_desc, u, off_b, off_m, off_n, BATCHED, BLOCK_M, SLICE_N)


@triton.jit
def _gated_matmul_tma_kernel(
    a_desc, bg_desc, bu_desc, out_desc, gate_desc, up_desc, as_ptr, bgs_ptr, bus_ptr,
    BATCH, M, N, K,
    stride_asb, stride_asm, stride_bgsn, stride_busn,
    ACTIVATION: tl.constexpr, RETURN_PREACT: tl.constexpr, SCALED: tl.constexpr, MAX_IMPRECISE_ACC: tl.constexpr,
    UPCAST_TO_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    A_T: tl.constexpr, B_T: tl.constexpr, BATCHED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EPILOGUE_SPLIT: tl.constexpr,
):
    num_tiles = BATCH * tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile_id in tl.range(tl.program_id(axis=0), num_tiles, tl.num_programs(axis=0), flatten=True):
        off_b, off_m, off_n = _tma_tile_offsets(tile_id, M, N, BLOCK_M, BLOCK_N, GROUP_M)

        # -- one A tile feeds two fp32 accumulators: the products never go through memory --
        acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            off_k = ki * BLOCK_K
            a = _tma_load_a(a_desc, off_b, off_m, off_k, A_T, BATCHED, BLOCK_M, BLOCK_K)
            bg = _tma_load_b(bg_desc, off_n, off_k, B_T)
            bu = _tma_load_b(bu_desc, off_n, off_k, B_T)
            acc_gate = _dot_acc(acc_gate, a, bg, UPCAST_TO_FP32, INPUT_PRECISION, MAX_IMPRECISE_ACC)
            acc_up = _dot_acc(acc_up, a, bu, UPCAST_TO_FP32, INPUT_PRECISION, MAX_IMPRECISE_ACC)

        if EPILOGUE_SPLIT == 1:
            _tma_gated_slice(acc_gate, acc_up, out_desc, gate_desc, up_desc, off_b, off_m, off_n, M, N,
                             as_ptr, bgs_ptr, bus_ptr, stride_asb, stride_asm, stride_bgsn, stride_busn,
                             ACTIVATION, RETURN_PREACT, SCALED, BATCHED, BLOCK_M, BLOCK_N)
        else:
            SLICE: tl.constexpr = BLOCK_N // 2
            g0, g1 = _halves(acc_gate, BLOCK_M, BLOCK_N)
            u0, u1 = _halves(acc_up, BLOCK_M, BLOCK_N)
            _tma_gated_slice(g0, u0, out_desc, gate_desc, up_desc, off_b, off_m, off_n, M, N,
                             as_ptr, bgs_ptr, bus_ptr, stride_asb, stride_asm, stride_bgsn, stride_busn,
                             ACTIVATION, RETURN_PREACT, SCALED, BATCHED, BLOCK_M, SLICE)
            _tma_gated_slice(g1, u1, out_desc, gate_desc, up_desc, off_b, off_m, off_n + SLICE, M, N,
                             as_ptr, bgs_ptr, bus_ptr, stride_asb, stride_asm, stride_bgsn, stride_busn,
                             ACTIVATION, RETURN_PREACT, SCALED, BATCHED, BLOCK_M, SLICE)


# ----------------------------------------------------------------------------------------
# Launch and launcher
# ----------------------------------------------------------------------------------------

def _gated_launch(a3, b_gate, b_up, out3, gate3, up3, activation, return_preact, num_sms, config,
                  scales=None, fast_accum=False) -> _Launch:
    """As :func:`.matmul._matmul_launch`; ``scales`` (fp8) is ``(a_scale, b_gate_scale, b_up_scale)``."""
    batch, M, K = a3.shape
    N = b_gate.shape[1]
    if scales is None and is_fp8(a3.dtype):  # plans without scales launch as if given 1s
        one = torch.ones((), dtype=torch.float32, device=a3.device)
        scales = (one, one, one)
    if scales is not None:
        a_s, stride_asb, stride_asm = scale_rows(scales[0], batch, M)
        (bg_s, stride_bgsn), (bu_s, stride_busn) = scale_cols(scales[1]), scale_cols(scales[2])
    else:  # unused pointers: any tensor will do
        a_s = bg_s = bu_s = out3
        stride_asb = stride_asm = stride_bgsn = stride_busn = 0
    upcast = interpreter.upcast_to_fp32(a3.dtype)
    precision = _input_precision(a3.dtype, upcast)
    outs = [out3, gate3, up3] if return_preact else [out3]
    path, config, reason, a_t, b_t = _choose("gated_matmul", a3, [b_gate, b_up], outs, N, K, precision,
                                             num_sms, config)
    grid = _grid_size(path, batch, M, N, config, num_sms, a3.device)
    plan = GemmPlan(path, config, reason, grid)
    flags = dict(ACTIVATION=activation, RETURN_PREACT=return_preact, SCALED=scales is not None,
                 MAX_IMPRECISE_ACC=_max_imprecise(scales, config, fast_accum), UPCAST_TO_FP32=upcast,
                 INPUT_PRECISION=precision, **config.meta, num_warps=config.num_warps,
                 num_stages=config.num_stages)
    if path == "pointer":
        flags["OFFSET_DTYPE"] = _offset_dtype([a3[0], b_gate, b_up])
        args = (a3, b_gate, b_up, out3, gate3, up3, a_s, bg_s, bu_s, batch, M, N, K,
                a3.stride(0), a3.stride(1), a3.stride(2), b_gate.stride(0), b_gate.stride(1),
                b_up.stride(0), b_up.stride(1), out3.stride(0), out3.stride(1), out3.stride(2),
                gate3.stride(0), gate3.stride(1), gate3.stride(2), stride_asb, stride_asm, stride_bgsn, stride_busn)
        return _Launch(_gated_matmul_kernel, (grid,), args, flags, plan, "gated")
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    batched = batch > 1
    lead = [1] if batched else []
    out_block = lead + [bm, bn // config.epilogue_split]
    a_desc = _descriptor(a3, lead + ([bk, bm] if a_t else [bm, bk]), batched, transpose=a_t)
    b_block = [bn, bk] if b_t else [bk, bn]
    bg_desc = _descriptor(b_gate, b_block, False, transpose=b_t)
    bu_desc = _descriptor(b_up, b_block, False, transpose=b_t)
    out_desc = _descriptor(out3, out_block, batched)
    gate_desc = _descriptor(gate3, out_block, batched) if return_preact else out_desc
    up_desc = _descriptor(up3, out_block, batched) if return_preact else out_desc
    args = (a_desc, bg_desc, bu_desc, out_desc, gate_desc, up_desc, a_s, bg_s, bu_s, batch, M, N, K,
            stride_asb, stride_asm, stride_bgsn, stride_busn)
    flags.update(A_T=a_t, B_T=b_t, BATCHED=batched, EPILOGUE_SPLIT=config.epilogue_split)
    return _Launch(_gated_matmul_tma_kernel, (grid,), args, flags, plan, "gated")


def gated_matmul(
    a: torch.Tensor,
    b_gate: torch.Tensor,
    b_up: torch.Tensor,
    *,
    a_scale: torch.Tensor | None = None,
    b_gate_scale: torch.Tensor | None = None,
    b_up_scale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    fast_accum: bool = False,
    activation: str | None = "silu",
    out: torch.Tensor | None = None,
    return_preact: bool = False,
    kernel: str = "auto",
    num_sms: int | None = None,
    config: GemmConfig | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Computes ``out = act(a @ b_gate) * (a @ b_up)`` (SwiGLU for "silu", GeGLU for "gelu")
    in one kernel with two fp32 accumulators: the products never go through memory.

    ``a`` is ``[..., M, K]``; ``b_gate`` and ``b_up`` are ``[K, N]`` with any strides (e.g.
    ``w_gate.T``, ``w_up.T``, or the two halves of a concatenated weight's transpose). ``out``
    follows :func:`matmul`'s rules. With ``return_preact`` it returns ``(out, gate, up)``
    where ``gate = a @ b_gate`` and ``up = a @ b_up`` (new contiguous tensors of the output's
    dtype, written by the same kernel, for the backward); otherwise ``out``. ``kernel``,
    ``num_sms`` and ``config`` as in :func:`matmul`.

    fp8 operands as in :func:`matmul`: ``gate = (a @ b_gate) * a_scale * b_gate_scale`` and
    ``up = (a @ b_up) * a_scale * b_up_scale`` in fp32 before the activation; ``out_dtype``
    bf16 by default; ``fast_accum`` as in :func:`matmul`.
    """
    op = "gated_matmul"
    K, N = _check_operands(op, a, {"b_gate": b_gate, "b_up": b_up})
    fp8 = is_fp8(a.dtype)
    scales = None
    if fp8:
        a_s, (bg_s, bu_s) = check_scales(op, a, a_scale, {"b_gate_scale": b_gate_scale, "b_up_scale": b_up_scale}, N)
        scales = (a_s, bg_s, bu_s)
    else:
        refuse_scales(op, a, {"a_scale": a_scale, "b_gate_scale": b_gate_scale, "b_up_scale": b_up_scale})
    out_dtype = resolve_out_dtype(op, a, out, out_dtype)
    out_shape = (*a.shape[:-1], N)
    _check_activation(op, activation)
    _check_num_sms(op, num_sms)
    _check_config(op, config)
    if out is not None:
        _check_out(op, out, a, out_shape)
    backend = _select_backend(op, kernel, a)
    if out is None:
        out = torch.empty(out_shape, dtype=out_dtype, device=a.device)
    gate = up = None
    if return_preact:
        gate = torch.empty(out_shape, dtype=out.dtype, device=a.device)
        up = torch.empty(out_shape, dtype=out.dtype, device=a.device)
    result = (out, gate, up) if return_preact else out
    if out.numel() == 0:
        return result

    if backend == "torch" or K == 0:
        if fp8:
            gate_acc = torch_scaled_product(a, b_gate, scales[0], scales[1])
            up_acc = torch_scaled_product(a, b_up, scales[0], scales[2])
        else:
            gate_acc = _torch_product(a, b_gate)
            up_acc = _torch_product(a, b_up)
        out.copy_(_TORCH_ACTIVATIONS[activation](gate_acc) * up_acc)
        if return_preact:
            gate.copy_(gate_acc)
            up.copy_(up_acc)
        return result

    a3, out3 = _as_batched(a, out)
    batch, M, _ = a3.shape
    # gate/up are fresh contiguous tensors: they always view as [batch, M, N]
    gate3 = gate.view(batch, M, N) if return_preact else out3
    up3 = up.view(batch, M, N) if return_preact else out3

    def rebuild(cfg: GemmConfig | None) -> _Launch:
        return _gated_launch(a3, b_gate, b_up, out3, gate3, up3, activation, return_preact, num_sms, cfg,
                             scales=scales, fast_accum=fast_accum)

    launch = rebuild(config)
    tune_key = None
    if config is None:
        tune_key = ("gated", launch.plan.path, m_class(batch * M), N, K, activation, return_preact,
                    out3.dtype, b_gate.dtype, fast_accum, a.dtype)
    _run(op, launch, a.dtype, tune_key, rebuild, [])
    if out3.data_ptr() != out.data_ptr():  # out's batch dims did not merge: out3 is a copy
        out.copy_(out3.view(out.shape))
    return result


def plan_gated_matmul(a: torch.Tensor, b_gate: torch.Tensor, b_up: torch.Tensor, *,
                      activation: str | None = "silu", out: torch.Tensor | None = None,
                      return_preact: bool = False, num_sms: int | None = None,
                      config: GemmConfig | None = None, out_dtype: torch.dtype | None = None) -> GemmPlan:
    """As :func:`plan_matmul`, for :func:`gated_matmul`."""
    K, N = _check_operands("plan_gated_matmul", a, {"b_gate": b_gate, "b_up": b_up})
    _check_config("plan_gated_matmul", config)
    if out is None:
        out = torch.empty((*a.shape[:-1], N), dtype=resolve_out_dtype("plan_gated_matmul", a, None, out_dtype),
                          device=a.device)
    a3, out3 = _as_batched(a, out)
    batch, M, _ = a3.shape
    pre = torch.empty((batch, M, N), dtype=out.dtype, device=a.device) if return_preact else out3
    return _gated_launch(a3, b_gate, b_up, out3, pre, pre, activation, return_preact, num_sms, config).plan
