"""What every GEMM kernel of the family shares: the backend choice, the tile walk, the
pointer kernels' offsets, the fp32-accumulating dot and epilogue activations (device
helpers), the TMA load/store helpers, and the host-side input checks and layouts. Kernels
live in :mod:`.matmul`, :mod:`.gated` and :mod:`.grouped`; tiles in :mod:`.configs`; which
kernel and tile a launch gets in :mod:`.plan`.
"""
from __future__ import annotations

import logging
import math

import torch
import triton
import triton.language as tl

from fusedpar.kernels import interpreter
from fusedpar.kernels.configs import GemmConfig
from fusedpar.kernels.fp8 import FP8_DTYPES, is_fp8, out_dtypes

logger = logging.getLogger("fusedpar")

ACTIVATIONS: tuple[str | None, ...] = (None, "relu", "silu", "gelu", "gelu_tanh")
KERNELS: tuple[str, ...] = ("auto", "triton", "torch")

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32, *FP8_DTYPES)
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
# Device helpers: the tile walk, activations, TMA tiles
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
def _tma_tile_offsets(tile_id, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """The TMA kernels' tile `tile_id` (walked as in :func:`_tile_coords`) as the element
    offsets ``(off_b, off_m, off_n)`` of its first row and column, in int32: tensor
    descriptors take int32 coordinates."""
    pid_batch, pid_m, pid_n = _tile_coords(tile_id, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    return pid_batch.to(tl.int32), (pid_m * BLOCK_M).to(tl.int32), (pid_n * BLOCK_N).to(tl.int32)


@triton.jit
def _pointer_offsets(pid_m, pid_n, M, N, stride_am, stride_ak, OFFSET_DTYPE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The pointer kernels' offsets of their first K-block: A's ``[BLOCK_M, BLOCK_K]`` tile
    from A's base, and the K and N offsets a B operand's tile is made of
    (``offs_k[:, None] * stride_bk + offs_bn[None, :] * stride_bn``). In OFFSET_DTYPE, int32
    when the launcher found every offset below 2**31: half the registers of int64 addresses,
    which is what spilled the big tiles. Rows/cols past M/N wrap (% M) so the loads need no
    M/N mask: those lanes compute garbage that the masked store drops."""
    offs_am = ((pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M).to(OFFSET_DTYPE)
    offs_bn = ((pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N).to(OFFSET_DTYPE)
    offs_k = tl.arange(0, BLOCK_K).to(OFFSET_DTYPE)
    return offs_am[:, None] * stride_am + offs_k[None, :] * stride_ak, offs_k, offs_bn


@triton.jit
def _dot_acc(acc, a, b, UPCAST_TO_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
             MAX_IMPRECISE_ACC: tl.constexpr):
    """``acc + a @ b`` into the fp32 accumulator ``acc`` (fp32 whatever the inputs, so a long K
    sum of fp16 or bf16 products keeps fp32 precision until the one cast at the store).
    UPCAST_TO_FP32 (interpreted runs only: the interpreter's bf16 arithmetic is wrong,
    interpreter.py) converts the tiles to fp32 first; compiled kernels never set it."""
    if UPCAST_TO_FP32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION, max_num_imprecise_acc=MAX_IMPRECISE_ACC)


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


@triton.jit
def _apply_scales(acc, as_ptr, bs_ptr, off_b, offs_m, offs_n, M, N, stride_asb, stride_asm, stride_bsn):
    """fp8: the fp32 accumulator times a's scale per row and b's per column (strides of 0
    for a per-tensor scale). Scales along M and N factor out of the K sum, so applying them
    once here is exact, and the bias and activation that follow see real values."""
    a_s = tl.load(as_ptr + off_b * stride_asb + offs_m * stride_asm, mask=offs_m < M, other=0.0)
    b_s = tl.load(bs_ptr + offs_n * stride_bsn, mask=offs_n < N, other=0.0)
    return acc * a_s[:, None] * b_s[None, :]


# A is [M, K] (or [BATCH, M, K]) read through a descriptor over its own memory: A_T says the
# memory is transposed (unit stride along M, e.g. dy.T in a wgrad), so the descriptor covers
# [K, M] and the tile is transposed in shared memory, where wgmma reads either orientation of
# 16-bit data. B_T likewise for B [K, N] stored as [N, K] (an nn.Linear weight's w.T: the
# common case). TMA zero-fills loads past the tensor's edge and clips stores to it, so no
# masks and no wrapped offsets are needed.

@triton.jit
def _tma_load_tile(desc, off_b, off_r, off_c, BATCHED: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_C: tl.constexpr):
    """The ``[BLOCK_R, BLOCK_C]`` tile at ``(off_r, off_c)`` of a 2-D descriptor, or of entry
    ``off_b`` of a batched (3-D) one."""
    if BATCHED:
        t = desc.load([off_b, off_r, off_c]).reshape(BLOCK_R, BLOCK_C)
    else:
        t = desc.load([off_r, off_c])
    return t


@triton.jit
def _tma_load_a(a_desc, off_b, off_m, off_k, A_T: tl.constexpr, BATCHED: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    if A_T:
        a = _tma_load_tile(a_desc, off_b, off_k, off_m, BATCHED, BLOCK_K, BLOCK_M).T
    else:
        a = _tma_load_tile(a_desc, off_b, off_m, off_k, BATCHED, BLOCK_M, BLOCK_K)
    return a


@triton.jit
def _tma_load_b(b_desc, off_n, off_k, B_T: tl.constexpr):
    if B_T:
        b = b_desc.load([off_n, off_k]).T
    else:
        b = b_desc.load([off_k, off_n])
    return b


@triton.jit
def _tma_store_tile(desc, c, off_b, off_m, off_n, BATCHED: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr):
    """Store ``c`` (cast to the descriptor's dtype) as :func:`_tma_load_tile`'s tile."""
    c = c.to(desc.dtype)
    if BATCHED:
        desc.store([off_b, off_m, off_n], c.reshape(1, BLOCK_M, BLOCK_N))
    else:
        desc.store([off_m, off_n], c)


@triton.jit
def _halves(x, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """[BLOCK_M, BLOCK_N] -> its left and right [BLOCK_M, BLOCK_N // 2] column halves."""
    return x.reshape(BLOCK_M, 2, BLOCK_N // 2).permute(0, 2, 1).split()


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
        if w.dtype != a.dtype and not (is_fp8(a.dtype) and is_fp8(w.dtype)):  # fp8: any pair of formats
            also = " or another fp8 dtype" if is_fp8(a.dtype) else ""
            raise TypeError(f"{op}: {name} must have the dtype of a ({a.dtype}){also}, got {w.dtype}")
        if w.device != a.device:
            raise ValueError(f"{op}: {name} must be on a's device ({a.device}), got {w.device}")
    return K, N


def _check_out(op: str, out: torch.Tensor, a: torch.Tensor, shape: tuple[int, ...]) -> None:
    _check_tensor(op, "out", out)
    if tuple(out.shape) != shape:
        raise ValueError(f"{op}: out must have shape a.shape[:-1] + (N,) = {shape}, got {tuple(out.shape)}")
    # fp32 out: wgrad into main_grad; fp8 operands write bf16, fp16 or fp32
    allowed = " or ".join(sorted(str(d) for d in out_dtypes(a.dtype)))
    if out.dtype not in out_dtypes(a.dtype):
        raise TypeError(f"{op}: out must have dtype {allowed}, got {out.dtype}")
    if out.device != a.device:
        raise ValueError(f"{op}: out must be on a's device ({a.device}), got {out.device}")


def _check_activation(op: str, activation: str | None) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: activation must be one of {ACTIVATIONS}, got {activation!r}")


def _check_num_sms(op: str, num_sms: int | None) -> None:
    if num_sms is not None and (isinstance(num_sms, bool) or not isinstance(num_sms, int) or num_sms < 1):
        raise ValueError(f"{op}: num_sms must be None or a positive int, got {num_sms!r}")


def _check_config(op: str, config: object) -> None:
    if config is not None and not isinstance(config, GemmConfig):
        raise TypeError(f"{op}: config must be a fusedpar.kernels.GemmConfig or None, got {type(config).__name__}")


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


def _tf32_allowed() -> bool:
    """Whether torch allows TF32 for fp32 CUDA matmuls. Torch >= 2.9 has `fp32_precision`
    ("tf32" after either API turned TF32 on) and raises when the legacy `allow_tf32` flag
    is read after a user set the new one, so the new attribute is read first."""
    precision = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    if precision is not None:
        return precision == "tf32"
    return bool(torch.backends.cuda.matmul.allow_tf32)


def _input_precision(dtype: torch.dtype, upcast: bool) -> str | None:
    """tl.dot precision: tf32 for fp32 inputs iff torch allows it for CUDA matmuls; None
    (the tensor cores' own) for 16-bit and fp8 inputs."""
    if dtype == torch.float32 and not upcast:
        return "tf32" if _tf32_allowed() else "ieee"
    if upcast:
        return "ieee"  # bf16 up-cast to fp32 by the interpreter workaround: exact fp32 dot
    return None  # fp16 / bf16: the only tensor-core path
