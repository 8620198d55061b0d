"""GEMM kernel family: ``act(a @ b + bias)`` and the gated ``act(a @ b_gate) * (a @ b_up)``.

Layout, after the tutorial python/tutorials/03-matrix-multiplication.py: autotune configs,
the ``@triton.autotune`` + ``@triton.jit`` kernels, then thin launchers that check inputs,
view them as a batch of 2-D problems and launch. Every operand is read through its strides
(``x @ w.T`` and ``dy.T @ x`` need no copy) and the output may be any strided view of a
bigger buffer, so the overlap schedules can consume a received chunk ``[B, m, K]`` and write
straight into its rows of the full output. The grid is 1-D over the B x M x N output
tiles (``b`` is shared by the batch), optionally capped at ``num_sms`` persistent programs.

Each public function runs one of two backends (:func:`resolve_kernel`): "triton" (CUDA
tensors, or CPU tensors under ``TRITON_INTERPRET=1``) or "torch", which computes the same
thing with torch ops: the CPU users' fast path and the tests' reference. fp64 runs on the
torch backend only. Nothing here records autograd history for the Triton backend: the
autograd.Functions of the layers call these launchers.
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fusedpar.kernels import interpreter

__all__ = ["ACTIVATIONS", "gated_matmul", "matmul", "resolve_kernel"]

logger = logging.getLogger("fusedpar")

ACTIVATIONS: tuple[str | None, ...] = (None, "relu", "silu", "gelu", "gelu_tanh")
KERNELS: tuple[str, ...] = ("auto", "triton", "torch")

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TORCH_DTYPES = (*_TRITON_DTYPES, torch.float64)


# ----------------------------------------------------------------------------------------
# Backend choice
# ----------------------------------------------------------------------------------------

def resolve_kernel(kernel: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """Which backend, ``"triton"`` or ``"torch"``, runs a GEMM on ``device``.

    ``"auto"`` picks Triton for CUDA tensors, and for CPU tensors only when Triton runs in
    the interpreter (``TRITON_INTERPRET=1``); torch otherwise, and always for float64
    ``dtype`` (which the Triton kernels do not take). An explicit ``"triton"`` that cannot
    run raises ``ValueError`` rather than falling back silently.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    device = torch.device(device)
    triton_runs_here = device.type == "cuda" or (device.type == "cpu" and interpreter.is_interpreting())
    if kernel == "auto":
        return "triton" if triton_runs_here and dtype != torch.float64 else "torch"
    if kernel == "triton" and not triton_runs_here:
        raise ValueError(
            f"kernel='triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set "
            f"before triton is imported; got tensors on {device.type!r} without the interpreter")
    return kernel


_logged_backends: set[tuple[str, str]] = set()


def _log_backend_once(device: torch.device, backend: str) -> None:
    """Say once per (device type, backend) which backend runs, so no choice is silent."""
    key = (device.type, backend)
    if key not in _logged_backends:
        _logged_backends.add(key)
        mode = " (interpreted)" if backend == "triton" and interpreter.is_interpreting() else ""
        logger.info("fusedpar GEMMs on %s tensors run on the %s backend%s", device.type, backend, mode)


# ----------------------------------------------------------------------------------------
# Autotune configs
# ----------------------------------------------------------------------------------------

def _gpu_configs() -> list[triton.Config]:
    """Tiles for Ampere and Hopper: the tutorial's fp16 set plus a few larger tiles with
    deeper pipelines (Hopper's 228 KiB of shared memory) and small-M tiles for decode.
    Configs that do not fit a device fail to compile and are dropped by the autotuner."""
    tiles = [
        # BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_stages, num_warps
        (128, 256, 64, 8, 3, 8),
        (256, 128, 64, 8, 3, 8),
        (128, 256, 64, 8, 4, 8),
        (256, 128, 64, 8, 4, 8),
        (128, 128, 64, 8, 4, 4),
        (128, 128, 32, 8, 4, 4),
        (128, 64, 64, 8, 4, 4),
        (64, 128, 64, 8, 4, 4),
        (64, 64, 64, 8, 4, 4),
        (128, 32, 32, 8, 4, 4),
        (64, 32, 32, 8, 5, 2),
        # small M (decode, TP shards of a few tokens): narrow rows, long K steps
        (16, 64, 128, 1, 4, 4),
        (16, 128, 128, 1, 3, 4),
        (32, 64, 128, 1, 4, 4),
    ]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": gm},
                      num_stages=stages, num_warps=warps)
        for bm, bn, bk, gm, stages, warps in tiles
    ]


def get_autotune_configs() -> list[triton.Config]:
    """The GPU configs, or under the interpreter one large-block config (per-program cost
    dominates there, so fewer, bigger programs are fastest)."""
    if interpreter.is_interpreting():
        return [triton.Config(dict(interpreter.INTERPRETER_BLOCKS), num_stages=1, num_warps=4)]
    return _gpu_configs()


def _prune_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Skip tiles far taller than M (M=1..16 decode would tune 256-row tiles for nothing)."""
    if len(configs) <= 1:
        return configs
    m_cap = max(16, triton.next_power_of_2(named_args["M"]))
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= m_cap]
    return kept or configs


# The autotuner's cache key is (M, N, K) plus the dtype of every tensor argument, so fp16,
# bf16 and fp32 problems of one shape are tuned separately.
_AUTOTUNE_KWARGS: dict = {"prune_configs_by": {"early_config_prune": _prune_configs}}
if interpreter.is_interpreting():
    _AUTOTUNE_KWARGS["do_bench"] = interpreter.cpu_do_bench


# ----------------------------------------------------------------------------------------
# Shared device helpers
# ----------------------------------------------------------------------------------------

@triton.jit
def _tile_coords(tile_id, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Map a linear tile id over (batch, M-tiles, N-tiles) to (pid_batch, pid_m, pid_n), as
    int64 so that multiplying them by strides cannot overflow. Within a batch entry tiles go
    in groups of GROUP_M row-blocks, so programs running together reuse B's columns from L2."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_batch = tile_id // (num_pid_m * num_pid_n)
    pid = tile_id % (num_pid_m * num_pid_n)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_batch.to(tl.int64), pid_m.to(tl.int64), pid_n.to(tl.int64)


@triton.jit
def _activate(x, ACTIVATION: tl.constexpr):
    """Elementwise activation of an fp32 tile; ACTIVATION is one of ACTIVATIONS."""
    if ACTIVATION == "relu":
        x = tl.maximum(x, 0.0)
    elif ACTIVATION == "silu":
        x = x * tl.sigmoid(x)
    elif ACTIVATION == "gelu":
        x = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACTIVATION == "gelu_tanh":
        # 0.5 * (1 + tanh(u)) == sigmoid(2u): no tanh needed, which not every Triton has
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        x = x * tl.sigmoid(2.0 * u)
    return x


# ----------------------------------------------------------------------------------------
# Kernel: out[b] (+)= act(a[b] @ w + bias)
# ----------------------------------------------------------------------------------------

@triton.autotune(configs=get_autotune_configs(), key=["M_BUCKET", "N", "K"], restore_value=["out_ptr"],
                 **_AUTOTUNE_KWARGS)
@triton.jit
def _matmul_kernel(
    a_ptr, b_ptr, bias_ptr, out_ptr,
    BATCH, M, N, K, M_BUCKET,
    stride_ab, stride_am, stride_ak,
    stride_bk, stride_bn,
    stride_bias,
    stride_ob, stride_om, stride_on,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, ACCUMULATE: tl.constexpr,
    UPCAST_TO_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # -- which tiles: ids run over batch x M-tiles x N-tiles; a program takes every
    #    num_programs-th one (a single tile unless the launcher capped the grid at num_sms) --
    num_tiles = BATCH * tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile_id in range(tl.program_id(axis=0), num_tiles, tl.num_programs(axis=0)):
        pid_batch, pid_m, pid_n = _tile_coords(tile_id, M, N, BLOCK_M, BLOCK_N, GROUP_M)

        # -- pointers to the first K-block; rows/cols past M/N wrap (% M) so the loads need no
        #    M/N mask: those lanes compute garbage that the masked store drops ----------------
        offs_am = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
        offs_bn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + pid_batch * stride_ab + offs_am[:, None] * stride_am + offs_k[None, :] * stride_ak
        b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_bn[None, :] * stride_bn

        # -- main loop: accumulate in fp32, whatever the input dtype, so a long K sum of fp16
        #    or bf16 products keeps fp32 precision until the single cast at the store --------
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            k_remaining = K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_remaining, other=0.0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < k_remaining, other=0.0)
            if UPCAST_TO_FP32:  # interpreter only: its bf16 arithmetic is wrong (interpreter.py)
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk

        # -- epilogue in fp32: bias, activation, accumulate into out, one cast at the store --
        offs_cm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
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
# Kernel: y[b] = act(a[b] @ w_gate) * (a[b] @ w_up), optionally storing both pre-activations
# ----------------------------------------------------------------------------------------

@triton.autotune(configs=get_autotune_configs(), key=["M_BUCKET", "N", "K"], **_AUTOTUNE_KWARGS)
@triton.jit
def _gated_matmul_kernel(
    a_ptr, bg_ptr, bu_ptr, out_ptr, gate_ptr, up_ptr,
    BATCH, M, N, K, M_BUCKET,
    stride_ab, stride_am, stride_ak,
    stride_bgk, stride_bgn,
    stride_buk, stride_bun,
    stride_ob, stride_om, stride_on,
    stride_pb, stride_pm, stride_pn,
    ACTIVATION: tl.constexpr, RETURN_PREACT: tl.constexpr,
    UPCAST_TO_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # -- which tiles: ids run over batch x M-tiles x N-tiles; a program takes every
    #    num_programs-th one (a single tile unless the launcher capped the grid at num_sms) --
    num_tiles = BATCH * tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile_id in range(tl.program_id(axis=0), num_tiles, tl.num_programs(axis=0)):
        pid_batch, pid_m, pid_n = _tile_coords(tile_id, M, N, BLOCK_M, BLOCK_N, GROUP_M)

        # -- pointers to the first K-block (rows/cols past M/N wrap; the store masks them) ---
        offs_am = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
        offs_bn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + pid_batch * stride_ab + offs_am[:, None] * stride_am + offs_k[None, :] * stride_ak
        bg_ptrs = bg_ptr + offs_k[:, None] * stride_bgk + offs_bn[None, :] * stride_bgn
        bu_ptrs = bu_ptr + offs_k[:, None] * stride_buk + offs_bn[None, :] * stride_bun

        # -- main loop: one A tile feeds two fp32 accumulators (fp32 for the same reason as in
        #    _matmul_kernel), so the intermediate never goes through memory -----------------
        acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            k_remaining = K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_remaining, other=0.0)
            bg = tl.load(bg_ptrs, mask=offs_k[:, None] < k_remaining, other=0.0)
            bu = tl.load(bu_ptrs, mask=offs_k[:, None] < k_remaining, other=0.0)
            if UPCAST_TO_FP32:  # interpreter only: its bf16 arithmetic is wrong (interpreter.py)
                a = a.to(tl.float32)
                bg = bg.to(tl.float32)
                bu = bu.to(tl.float32)
            acc_gate = tl.dot(a, bg, acc_gate, input_precision=INPUT_PRECISION)
            acc_up = tl.dot(a, bu, acc_up, input_precision=INPUT_PRECISION)
            a_ptrs += BLOCK_K * stride_ak
            bg_ptrs += BLOCK_K * stride_bgk
            bu_ptrs += BLOCK_K * stride_buk

        # -- epilogue in fp32: gate activation times up, one cast at each store ------------
        offs_cm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (offs_cm[:, None] < M) & (offs_cn[None, :] < N)
        y = _activate(acc_gate, ACTIVATION) * acc_up
        out_ptrs = out_ptr + pid_batch * stride_ob + offs_cm[:, None] * stride_om + offs_cn[None, :] * stride_on
        tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)
        if RETURN_PREACT:
            offs_p = pid_batch * stride_pb + offs_cm[:, None] * stride_pm + offs_cn[None, :] * stride_pn
            tl.store(gate_ptr + offs_p, acc_gate.to(gate_ptr.dtype.element_ty), mask=mask)
            tl.store(up_ptr + offs_p, acc_up.to(up_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------
# Host side: checks and layouts
# ----------------------------------------------------------------------------------------

def _check_tensor(op: str, name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def _check_operands(op: str, a: torch.Tensor, weights: dict[str, torch.Tensor]) -> tuple[int, int]:
    """Check ``a`` [..., M, K] against 2-D weights [K, N]; returns (K, N)."""
    _check_tensor(op, "a", a)
    if a.dim() < 2:
        raise ValueError(f"{op}: a must have at least 2 dims [..., M, K], got shape {tuple(a.shape)}")
    if a.dtype not in _TORCH_DTYPES:
        raise TypeError(f"{op}: a must have dtype in {_TORCH_DTYPES}, got {a.dtype}")
    K = a.shape[-1]
    N = None
    for name, w in weights.items():
        _check_tensor(op, name, w)
        if w.dim() != 2:
            raise ValueError(f"{op}: {name} must be 2-D [K, N], got shape {tuple(w.shape)}")
        if w.shape[0] != K:
            raise ValueError(f"{op}: {name} must have K={K} rows to match a.shape[-1], "
                             f"got shape {tuple(w.shape)}")
        if N is not None and w.shape[1] != N:
            raise ValueError(f"{op}: {name} must have N={N} columns like the other weight, "
                             f"got shape {tuple(w.shape)}")
        N = w.shape[1]
        if w.dtype != a.dtype:
            raise TypeError(f"{op}: {name} must have the dtype of a ({a.dtype}), got {w.dtype}")
        if w.device != a.device:
            raise ValueError(f"{op}: {name} must be on a's device ({a.device}), got {w.device}")
    return K, N


def _check_out(op: str, out: torch.Tensor, a: torch.Tensor, shape: tuple[int, ...]) -> None:
    _check_tensor(op, "out", out)
    if tuple(out.shape) != shape:
        raise ValueError(f"{op}: out must have shape a.shape[:-1] + (N,) = {shape}, got {tuple(out.shape)}")
    allowed = " or ".join(sorted({str(a.dtype), str(torch.float32)}))  # fp32 out: wgrad into main_grad
    if out.dtype not in (a.dtype, torch.float32):
        raise TypeError(f"{op}: out must have dtype {allowed}, got {out.dtype}")
    if out.device != a.device:
        raise ValueError(f"{op}: out must be on a's device ({a.device}), got {out.device}")


def _check_activation(op: str, activation: str | None) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: activation must be one of {ACTIVATIONS}, got {activation!r}")


def _check_num_sms(op: str, num_sms: int | None) -> None:
    if num_sms is not None and (isinstance(num_sms, bool) or not isinstance(num_sms, int) or num_sms < 1):
        raise ValueError(f"{op}: num_sms must be None or a positive int, got {num_sms!r}")


def _select_backend(op: str, kernel: str, a: torch.Tensor) -> str:
    if kernel not in KERNELS:
        raise ValueError(f"{op}: kernel must be one of {KERNELS}, got {kernel!r}")
    backend = resolve_kernel(kernel, a.device, a.dtype)
    if backend == "triton" and a.dtype not in _TRITON_DTYPES:
        raise TypeError(f"{op}: kernel='triton' takes dtypes {_TRITON_DTYPES}, got {a.dtype}; "
                        f"use kernel='torch' (or 'auto') for it")
    _log_backend_once(a.device, backend)
    return backend


def _as_batched(a: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """View ``a`` [..., M, K] and ``out`` [..., M, N] as 3-D [B, M, K], [B, M, N].

    Leading dims are merged into M (B=1) when both tensors' strides allow it; otherwise
    they become the batch axis of the grid. Only a >3-D ``a`` whose batch dims do not
    merge is copied; an ``out`` like that is returned as a copy the caller writes back.
    """
    K, N = a.shape[-1], out.shape[-1]
    rows = math.prod(a.shape[:-1])
    if a.dim() == 2:
        return a.unsqueeze(0), out.unsqueeze(0)
    try:
        return a.view(1, rows, K), out.view(1, rows, N)
    except RuntimeError:  # leading dims do not merge into M for a or out: batch them
        pass
    M = a.shape[-2]
    batch = math.prod(a.shape[:-2])
    a3 = a.reshape(batch, M, K)
    try:
        out3 = out.view(batch, M, N)
    except RuntimeError:
        out3 = out.reshape(batch, M, N)
    return a3, out3


def _m_bucket(rows: int) -> int:
    """The autotuner's key for M: rows rounded up to a power of two. Keyed on the exact M,
    every new token count (each ragged chunk of an overlap schedule, each prefill length)
    would re-run the whole config sweep, with a device sync, in the middle of a schedule."""
    return triton.next_power_of_2(max(rows, 1))


def _grid(batch: int, M: int, N: int, num_sms: int | None):
    """1-D grid over the batch x M x N tiles, capped at ``num_sms`` programs (persistent)."""
    def grid(meta):
        tiles = batch * triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])
        return (tiles if num_sms is None else min(tiles, num_sms),)
    return grid


def _tf32_allowed() -> bool:
    """Whether torch allows TF32 for fp32 CUDA matmuls. Torch >= 2.9 has `fp32_precision`
    ("tf32" after either API turned TF32 on) and raises when the legacy `allow_tf32` flag
    is read after a user set the new one, so the new attribute is read first."""
    precision = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    if precision is not None:
        return precision == "tf32"
    return bool(torch.backends.cuda.matmul.allow_tf32)


def _input_precision(dtype: torch.dtype, upcast: bool) -> str | None:
    """tl.dot precision: tf32 for fp32 inputs iff torch allows it for CUDA matmuls."""
    if dtype == torch.float32 and not upcast:
        return "tf32" if _tf32_allowed() else "ieee"
    if upcast:
        return "ieee"  # bf16 up-cast to fp32 by the interpreter workaround: exact fp32 dot
    return None  # fp16 / bf16: the only tensor-core path


# ----------------------------------------------------------------------------------------
# Torch backend: the same computation with torch ops (reference and CPU fast path)
# ----------------------------------------------------------------------------------------

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


def _torch_matmul_into(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, activation: str | None,
                       out: torch.Tensor, accumulate: bool) -> None:
    """The torch backend writing the product straight into ``out``: no ``[M, N]``
    temporary, so the overlap schedules' "write this piece into its slice of the output"
    costs no extra memory. Used where torch computes in the output dtype anyway: fp32/fp64,
    and every dtype on CUDA, where cuBLAS accumulates fp16/bf16 in fp32 like the kernel."""
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


# ----------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------

def matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    out: torch.Tensor | None = None,
    accumulate: bool = False,
    kernel: str = "auto",
    num_sms: int | None = None,
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
    concurrent communication kernels (the torch backend ignores it). Returns ``out``,
    allocated with ``a.dtype`` when not given.
    """
    op = "matmul"
    K, N = _check_operands(op, a, {"b": b})
    out_shape = (*a.shape[:-1], N)
    if bias is not None:
        _check_tensor(op, "bias", bias)
        if tuple(bias.shape) != (N,):
            raise ValueError(f"{op}: bias must have shape (N,) = ({N},), got {tuple(bias.shape)}")
        if bias.dtype != a.dtype:
            raise TypeError(f"{op}: bias must have the dtype of a ({a.dtype}), got {bias.dtype}")
        if bias.device != a.device:
            raise ValueError(f"{op}: bias must be on a's device ({a.device}), got {bias.device}")
    _check_activation(op, activation)
    _check_num_sms(op, num_sms)
    if accumulate and out is None:
        raise ValueError(f"{op}: accumulate=True needs out= (the tensor to add into), got out=None")
    if out is not None:
        _check_out(op, out, a, out_shape)
    backend = _select_backend(op, kernel, a)
    if out is None:
        out = torch.empty(out_shape, dtype=a.dtype, device=a.device)
    if out.numel() == 0:
        return out

    if backend == "torch":
        if out.dtype == a.dtype and (a.dtype in (torch.float32, torch.float64) or a.is_cuda):
            _torch_matmul_into(a, b, bias, activation, out, accumulate)
            return out
        y = _torch_product(a, b)
        if bias is not None:
            y = y + bias.to(y.dtype)
        y = _TORCH_ACTIVATIONS[activation](y)
        if accumulate:
            y = y + out.to(y.dtype)
        out.copy_(y)
        return out

    a3, out3 = _as_batched(a, out)
    batch, M, _ = a3.shape
    upcast = interpreter.upcast_to_fp32(a.dtype)

    _matmul_kernel[_grid(batch, M, N, num_sms)](
        a3, b, bias if bias is not None else out3, out3,
        batch, M, N, K, _m_bucket(batch * M),
        a3.stride(0), a3.stride(1), a3.stride(2),
        b.stride(0), b.stride(1),
        bias.stride(0) if bias is not None else 0,
        out3.stride(0), out3.stride(1), out3.stride(2),
        HAS_BIAS=bias is not None, ACTIVATION=activation, ACCUMULATE=accumulate,
        UPCAST_TO_FP32=upcast, INPUT_PRECISION=_input_precision(a.dtype, upcast),
    )
    if out3.data_ptr() != out.data_ptr():  # out's batch dims did not merge: out3 is a copy
        out.copy_(out3.view(out.shape))
    return out


def gated_matmul(
    a: torch.Tensor,
    b_gate: torch.Tensor,
    b_up: torch.Tensor,
    *,
    activation: str | None = "silu",
    out: torch.Tensor | None = None,
    return_preact: bool = False,
    kernel: str = "auto",
    num_sms: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Computes ``out = act(a @ b_gate) * (a @ b_up)`` (SwiGLU for "silu", GeGLU for "gelu")
    in one kernel with two fp32 accumulators: the products never go through memory.

    ``a`` is ``[..., M, K]``; ``b_gate`` and ``b_up`` are ``[K, N]`` with any strides (e.g.
    ``w_gate.T``, ``w_up.T``, or the two halves of a concatenated weight's transpose). ``out``
    follows :func:`matmul`'s rules. With ``return_preact`` it returns ``(out, gate, up)``
    where ``gate = a @ b_gate`` and ``up = a @ b_up`` (new contiguous tensors of ``a.dtype``,
    written by the same kernel, for the backward); otherwise ``out``. ``kernel`` and
    ``num_sms`` as in :func:`matmul`.
    """
    op = "gated_matmul"
    K, N = _check_operands(op, a, {"b_gate": b_gate, "b_up": b_up})
    out_shape = (*a.shape[:-1], N)
    _check_activation(op, activation)
    _check_num_sms(op, num_sms)
    if out is not None:
        _check_out(op, out, a, out_shape)
    backend = _select_backend(op, kernel, a)
    if out is None:
        out = torch.empty(out_shape, dtype=a.dtype, device=a.device)
    gate = up = None
    if return_preact:
        gate = torch.empty(out_shape, dtype=a.dtype, device=a.device)
        up = torch.empty(out_shape, dtype=a.dtype, device=a.device)
    result = (out, gate, up) if return_preact else out
    if out.numel() == 0:
        return result

    if backend == "torch":
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
    upcast = interpreter.upcast_to_fp32(a.dtype)

    _gated_matmul_kernel[_grid(batch, M, N, num_sms)](
        a3, b_gate, b_up, out3, gate3, up3,
        batch, M, N, K, _m_bucket(batch * M),
        a3.stride(0), a3.stride(1), a3.stride(2),
        b_gate.stride(0), b_gate.stride(1),
        b_up.stride(0), b_up.stride(1),
        out3.stride(0), out3.stride(1), out3.stride(2),
        gate3.stride(0), gate3.stride(1), gate3.stride(2),
        ACTIVATION=activation, RETURN_PREACT=return_preact,
        UPCAST_TO_FP32=upcast, INPUT_PRECISION=_input_precision(a.dtype, upcast),
    )
    if out3.data_ptr() != out.data_ptr():  # out's batch dims did not merge: out3 is a copy
        out.copy_(out3.view(out.shape))
    return result

