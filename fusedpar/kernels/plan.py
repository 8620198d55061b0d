"""Which kernel and tile a Triton launch of the GEMM family gets, and why.

The TMA kernel (Hopper and later) runs wherever the operands allow it: 16-byte aligned base
addresses and strides and a unit stride on one dim of each operand, and for tf32 and fp8
K-major operands (wgmma reads those from shared memory in that orientation only). fp8
operands need fp8 tensor cores (sm_89 and later): on an older GPU the planner raises.
Anything else takes the pointer kernel, and the reason is kept in the
:class:`GemmPlan` and logged once. The tile comes from :func:`.configs.pick_config`, or from
timing the candidates when autotuning is on. A plan is built into a :class:`_Launch` (kernel,
grid, arguments), which :mod:`.compile_report` compiles without running.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import torch
import triton
import triton.language as tl

from fusedpar.kernels import configs as _configs
from fusedpar.kernels.common import logger
from fusedpar.kernels.configs import GemmConfig
from fusedpar.kernels.fp8 import is_fp8

try:  # host-side TMA descriptors: triton >= 3.3 (3.6 on the GPU machine, 3.9 on CI)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older triton: the pointer kernel serves everything
    TensorDescriptor = None


@dataclasses.dataclass(frozen=True)
class GemmPlan:
    """What a Triton launch runs: ``path`` ("tma" or "pointer"), the tile ``config``, the
    ``reason`` the path was chosen (e.g. why TMA could not take these operands) and the
    number of programs in the 1-D ``grid``."""

    path: str
    config: GemmConfig
    reason: str
    grid: int


@functools.lru_cache(maxsize=None)
def _cuda_props(index: int) -> tuple[tuple[int, int], int]:
    props = torch.cuda.get_device_properties(index)
    return (props.major, props.minor), props.multi_processor_count


# (compute capability, SM count) to plan for instead of the tensors' device: set only by
# compile_report, which plans launches for sm_90 and sm_80 with CPU tensors.
_PLAN_TARGET: tuple[tuple[int, int], int] | None = None


def _device_sms(device: torch.device) -> int | None:
    """SMs of a CUDA device; None on the CPU (the interpreter runs programs one by one, so
    a persistent grid would only add loop overhead there)."""
    if _PLAN_TARGET is not None:
        return _PLAN_TARGET[1]
    if device.type != "cuda":
        return None
    return _cuda_props(device.index if device.index is not None else torch.cuda.current_device())[1]


def _tma_device_reason(device: torch.device) -> str | None:
    """None when the device runs the TMA kernel, else why not."""
    if TensorDescriptor is None:
        return f"triton {triton.__version__} has no host tensor descriptors"
    if _PLAN_TARGET is not None and _PLAN_TARGET[0] < (9, 0):
        cap = _PLAN_TARGET[0]
        return f"sm_{cap[0]}{cap[1]} has no TMA (Hopper, sm_90, and later)"
    if device.type == "cuda" and _PLAN_TARGET is None:
        index = device.index if device.index is not None else torch.cuda.current_device()
        cap = _cuda_props(index)[0]
        if cap < (9, 0):
            return f"sm_{cap[0]}{cap[1]} has no TMA (Hopper, sm_90, and later)"
    return None  # sm_90+; or the interpreter, which runs the same kernel on CPU tensors


def _fp8_device_reason(device: torch.device) -> str | None:
    """None when fp8 GEMMs can run on the device, else why not: Triton takes e4m3 operands
    from sm_89 (Ada) on and refuses them on sm_80, which has no fp8 tensor cores (on the CPU
    the interpreter runs them)."""
    cap = None
    if _PLAN_TARGET is not None:
        cap = _PLAN_TARGET[0]
    elif device.type == "cuda":
        cap = _cuda_props(device.index if device.index is not None else torch.cuda.current_device())[0]
    if cap is not None and cap < (8, 9):
        return f"sm_{cap[0]}{cap[1]} has no fp8 tensor cores (sm_89 / sm_90 and later)"
    return None


def _aligned(t: torch.Tensor, dims: tuple[int, ...]) -> bool:
    """Base address and the strides of ``dims`` are 16-byte multiples (TMA's rule)."""
    size = t.element_size()
    return t.data_ptr() % 16 == 0 and all((t.stride(d) * size) % 16 == 0 for d in dims)


def _tma_layout(a3: torch.Tensor, bs: list[torch.Tensor], outs: list[torch.Tensor],
                dtype: torch.dtype, precision: str | None) -> tuple[bool, bool, str | None]:
    """(A_T, B_T, reason): the operands' orientation for the TMA kernel, and None as the
    reason when TMA can take them all (else the reason it cannot)."""
    batched = a3.shape[0] > 1
    batch_dims = (0,) if batched else ()
    if a3.stride(2) == 1 and _aligned(a3, (1, *batch_dims)):
        a_t = False
    elif a3.stride(1) == 1 and _aligned(a3, (2, *batch_dims)):
        a_t = True
    else:
        shown = tuple(a3.stride()) if batched else tuple(a3.stride())[1:]
        return False, False, f"a's strides {shown} have no unit dim with 16-byte aligned others"
    b_ts = set()
    for b in bs:
        if b.stride(1) == 1 and _aligned(b, (0,)):
            b_ts.add(False)
        elif b.stride(0) == 1 and _aligned(b, (1,)):
            b_ts.add(True)
        else:
            return a_t, False, f"b's strides {tuple(b.stride())} have no unit dim with 16-byte aligned others"
    if len(b_ts) != 1:
        return a_t, False, "the two weights of a gated GEMM are stored in different orientations"
    b_t = b_ts.pop()
    for out in outs:
        if not (out.stride(2) == 1 and _aligned(out, (1, *batch_dims))):
            shown = tuple(out.stride()) if batched else tuple(out.stride())[1:]
            return a_t, b_t, (f"out's strides {shown} (storage offset {out.storage_offset()}) are not 16-byte "
                              f"aligned with a unit last stride")
    if dtype == torch.float32 and precision == "tf32" and (a_t or not b_t):
        # tf32 wgmma reads both operands K-major from shared memory only
        return a_t, b_t, "tf32 tensor cores need K-contiguous a and b"
    if is_fp8(dtype) and (a_t or not b_t):
        # fp8 wgmma, like tf32, reads both operands K-major from shared memory; the pointer
        # kernel takes the other layouts (Triton transposes the tile on its way in)
        return a_t, b_t, "fp8 tensor cores need K-contiguous a and b (b stored as [N, K])"
    return a_t, b_t, None


def _choose(op: str, a3: torch.Tensor, bs: list[torch.Tensor], outs: list[torch.Tensor], N: int, K: int,
            precision: str | None, num_sms: int | None, config: GemmConfig | None, accumulate: bool = False):
    """(path, config, reason, A_T, B_T) for a launch; ``config`` (from the caller) wins."""
    device, dtype = a3.device, a3.dtype
    if is_fp8(dtype):
        fp8_reason = _fp8_device_reason(device)
        if fp8_reason is not None:
            raise ValueError(f"{op}: fp8 operands need fp8 tensor cores, which cannot run here: {fp8_reason}")
    reason = _tma_device_reason(device)
    a_t = b_t = False
    if reason is None:
        a_t, b_t, reason = _tma_layout(a3, bs, outs, dtype, precision)
    want_tma = config.tma if config is not None else None
    if want_tma and reason is not None:
        raise ValueError(f"{op}: config asks for the TMA kernel, which cannot run here: {reason}")
    use_tma = reason is None and want_tma is not False
    if reason is None:
        reason = "TMA: operands aligned" if use_tma else "pointer kernel asked for by config"
    sms = num_sms or _device_sms(device) or 132
    if config is None:
        kind = "gated" if len(bs) == 2 else "matmul"
        config = _configs.pick_config(kind, a3.shape[0] * a3.shape[1], N, K, dtype, tma=use_tma, num_sms=sms,
                                      tensor_cores=precision != "ieee", reads_out=accumulate)
    if use_tma:  # given or picked, a tile must fit: an fp32 output needs a finer epilogue
        config = _configs.fit_epilogue(config, dtype, outs[0].dtype, n_b=len(bs), n_out=len(outs),
                                       reads_out=accumulate)
    if config.epilogue_split > (2 if len(bs) == 2 else 4):
        raise ValueError(f"{op}: epilogue_split must be <= {2 if len(bs) == 2 else 4}, got {config.epilogue_split}")
    return ("tma" if use_tma else "pointer"), config, reason, a_t, b_t


def _grid_size(path: str, batch: int, M: int, N: int, config: GemmConfig, num_sms: int | None,
               device: torch.device) -> int:
    """Programs to launch: every tile (pointer kernel), or at most one per SM (TMA kernel,
    persistent); ``num_sms`` caps both, leaving SMs to communication kernels."""
    tiles = batch * triton.cdiv(M, config.block_m) * triton.cdiv(N, config.block_n)
    cap = num_sms if num_sms is not None else (_device_sms(device) if path == "tma" else None)
    return max(1, min(tiles, cap) if cap is not None else tiles)


def _descriptor(t: torch.Tensor, block: list[int], batched: bool, transpose: bool = False) -> TensorDescriptor:
    """A TMA descriptor over ``t`` [B, R, C] (or [R, C] when not batched), the last two dims
    swapped when ``transpose`` so that the unit-stride dim comes last."""
    if transpose:
        t = t.transpose(-1, -2)
    if t.dim() == 3 and not batched:
        t = t[0]
    return TensorDescriptor(t, list(t.shape), list(t.stride()), block)


def _offset_dtype(tensors: list[torch.Tensor]) -> object:
    """int32 element offsets for the pointer kernel's loads when every offset within each
    operand (one batch entry of a: the batch offset is added to its base as a scalar) stays
    below 2**31, which is nearly always; int64 otherwise."""
    span = max(sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride())) for t in tensors)
    # + one BLOCK_K step past the end: the loop advances the offsets before the last check
    return tl.int32 if span + 512 * max(abs(st) for t in tensors for st in t.stride()) < 2**31 else tl.int64


@dataclasses.dataclass
class _Launch:
    """A kernel launch, built and not yet run: what compile_report compiles."""

    fn: object
    grid: tuple[int]
    args: tuple
    kwargs: dict
    plan: GemmPlan
    op: str  # "matmul" or "gated": which candidate tiles apply

    def run(self) -> None:
        self.fn[self.grid](*self.args, **self.kwargs)


_logged_plans: set[tuple] = set()


def _log_plan_once(op: str, plan: GemmPlan, dtype: torch.dtype) -> None:
    """Say once per (op, path, reason, dtype) which kernel runs: the TMA/pointer choice is
    never silent."""
    key = (op, plan.path, plan.reason, dtype)
    if key not in _logged_plans:
        _logged_plans.add(key)
        logger.info("fusedpar %s (%s): %s kernel, %s", op, str(dtype).replace("torch.", ""), plan.path, plan.reason)


def _run(op: str, launch: _Launch, dtype: torch.dtype, tune_key: tuple | None, rebuild,
         restore: list[torch.Tensor]) -> GemmPlan:
    """Run a launch, first timing every candidate tile when autotuning is on (opt-in)."""
    if tune_key is not None and _configs.autotune_enabled():
        config = _autotune(tune_key, launch, rebuild, restore)
        launch = rebuild(config)
    _log_plan_once(op, launch.plan, dtype)
    launch.run()
    return launch.plan


_TUNED: dict[tuple, GemmConfig] = {}


def _autotune(key: tuple, launch: _Launch, rebuild, restore: list[torch.Tensor]) -> GemmConfig:
    """The fastest candidate for ``key`` (timed once per process, CUDA events, median);
    outputs written by the trials are restored, so accumulation stays right."""
    if key in _TUNED:
        return _TUNED[key]
    saved = [t.clone() for t in restore]
    best, best_ms = launch.plan.config, math.inf
    tensor_cores = launch.kwargs.get("INPUT_PRECISION") != "ieee"
    reads_out = bool(launch.kwargs.get("ACCUMULATE"))
    for cand in _configs.candidate_configs(launch.op, key[-1], launch.plan.path == "tma", tensor_cores=tensor_cores,
                                           reads_out=reads_out):
        try:
            trial = rebuild(cand)
            ms = triton.testing.do_bench(trial.run, warmup=5, rep=20, return_mode="median")
        except Exception as e:  # a tile that does not fit this device: skip it  # noqa: BLE001
            logger.debug("autotune: %s failed: %s", cand.short(), e)
            continue
        if ms < best_ms:
            best, best_ms = cand, ms
    for t, s in zip(restore, saved):
        t.copy_(s)
    _TUNED[key] = best
    logger.info("fusedpar autotune %s: %s (%.3f ms)", key[:-1], best.short(), best_ms)
    return best
