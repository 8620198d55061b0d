"""fp8 GEMMs in the tensor-parallel linears: the recipe, and the autograd Functions that run a
column- or row-parallel linear's GEMMs in fp8.

    model = fusedpar.parallelize(model, "auto", group=group, sequence_parallel=True, fp8=True)
    model = fusedpar.parallelize(model, plan, group=group, fp8=Float8Recipe(scaling="tensorwise"))
    fusedpar.enable_fp8(layer, Float8Recipe())          # linears built by hand; None turns it off

Per linear ``y = x @ W.T + b`` (W ``[N, K]``, the master weight, untouched), with ``Q`` the
e4m3 and ``Q5`` the e5m2 quantization of fusedpar.kernels.quantize and dynamic scales (each
step measures the tensor it quantizes):

    forward  y  = Q(x) @ Q(W).T          fp8 x fp8; x one scale per row (token), W per output channel
    dgrad    dx = Q5(dy * s_W) @ Q(W)    fp8 (recipe.dgrad="fp8"), the forward's fp8 weight reused;
                                         or dy @ W in dy's dtype (dgrad="high")
    wgrad    dW = deq(Q(x)).T @ dy       in dy's dtype (bf16 under autocast), written in W's dtype

The wgrad is never fp8: its reduction runs over the tokens, so per-token scales of x and dy
cannot be taken out of the sum (fp8 would need x and dy re-quantized along the other axis,
two more passes over the activations), and the weight gradient feeds the optimizer
directly, summed over every token: dy's e5m2 rounding (2 mantissa bits) would land in it
unaveraged. torchao's row-wise recipe with a high-precision weight gradient makes the same
choice. The dgrad tolerates fp8 because its error is one more rounding of an activation
gradient that the next layers average anyway; its weight scales, which lie along the
dgrad's reduction, are folded into dy before it is quantized (``s_W`` above). The wgrad uses
the quantized x the forward saw (the gradient of the function computed, and half the memory
of saving x in bf16).

With sequence parallelism the column-parallel all-gather moves the fp8 rows and their scales
(half of bf16's bytes) and keeps them for the wgrad (``save_gathered_input``; otherwise the
dequantized shard is re-gathered in backward); reduce-scatters and all-reduces carry
bf16/fp32 partial sums, never fp8 (fusedpar.overlap says why). The gathered input a fused
column group hands its parent module is then the dequantized fp8 rows.

Master weights and the optimizer state stay as they are: the fp8 weight is a temporary made
each forward, saved for the dgrad. Frozen weights (``requires_grad=False``) are quantized
once and the fp8 copy reused until the weight changes (its version counter moves), e.g. for
inference or LoRA-style fine-tuning: 1 byte per element, plus 1 for the dgrad's K-major copy.

What fp8 cannot serve falls back to the high-precision GEMMs of the same layer, with a
warning logged once per reason (logger ``fusedpar``): a GEMM dim (K or N, per rank) not a
multiple of 16 (fp8 rows must be 16-byte aligned for TMA and fit the fp8 tensor cores' K
step), a GPU without fp8 tensor cores (before sm_89), or ``kernel="torch"`` on CUDA (the
torch backend only emulates fp8, through fp32: right, slow). On CPU ``kernel="torch"``
runs that emulation, which the tests use as the fast reference of the same arithmetic.
"""
from __future__ import annotations

import dataclasses
import logging
import weakref
from typing import Any

import torch
from torch import Tensor, nn

from .. import overlap
from ..kernels import gated_matmul, matmul, resolve_kernel
from ..kernels.plan import _fp8_device_reason
from ..kernels.quantize import dequantize, quantize_rowwise, quantize_tensorwise
from .sharding import tracked_version
from .linear import ColumnParallelLinear, ReplicatedColumnLinear, RowParallelLinear
from .linear_autograd import _autocast_off, _autocast_operands, _ColumnParallelFn, _RowParallelFn, _sum_rows
from .linear_spec import LinearSpec
from .regions import _all_gather_dim

__all__ = ["Float8Recipe", "as_recipe", "enable_fp8", "fp8_stats"]

logger = logging.getLogger("fusedpar")

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
_SCALINGS = ("rowwise", "tensorwise")
_DGRADS = ("fp8", "high")
_PARALLEL_LINEARS = (ColumnParallelLinear, ReplicatedColumnLinear, RowParallelLinear)


@dataclasses.dataclass(frozen=True)
class Float8Recipe:
    """How the parallel linears use fp8 (module docstring).

    ``scaling``: "rowwise" (default: one scale per token of x and per output channel of W,
    so an outlier token or channel costs only its own precision) or "tensorwise" (one scale
    per tensor and rank). ``dgrad``: "fp8" (default, e5m2 gradient x e4m3 weight) or "high"
    (dy's dtype). Forward GEMMs are always fp8 and the wgrad never is.
    """

    scaling: str = "rowwise"
    dgrad: str = "fp8"

    def __post_init__(self) -> None:
        if self.scaling not in _SCALINGS:
            raise ValueError(f"Float8Recipe: scaling: expected one of {_SCALINGS}, got {self.scaling!r}")
        if self.dgrad not in _DGRADS:
            raise ValueError(f"Float8Recipe: dgrad: expected one of {_DGRADS}, got {self.dgrad!r}")

    def short(self) -> str:
        return f"{self.scaling}, dgrad {self.dgrad}"

    # The parallel linears call these on their spec's recipe, so linear_autograd.py needs no import
    # of this module (which builds on its autograd functions).
    def column_parallel(self, x: Tensor, weights: list[Tensor], bias: Tensor | None, spec: LinearSpec,
                        holder: list | None) -> Tensor:
        """The column-parallel product in fp8: :func:`column_parallel_fp8`."""
        return column_parallel_fp8(x, weights, bias, spec, holder)

    def row_parallel(self, x: Tensor, weight: Tensor, bias: Tensor | None, spec: LinearSpec) -> Tensor:
        """The row-parallel product in fp8: :func:`row_parallel_fp8`."""
        return row_parallel_fp8(x, weight, bias, spec)


def as_recipe(fp8: Any, *, where: str = "fp8") -> Float8Recipe | None:
    """``True`` -> the default recipe, ``None``/``False`` -> None, a recipe -> itself."""
    if fp8 is None or fp8 is False:
        return None
    if fp8 is True:
        return Float8Recipe()
    if isinstance(fp8, Float8Recipe):
        return fp8
    raise TypeError(f"{where}: expected True, False, None or a fusedpar.Float8Recipe, got {type(fp8).__name__}")


def enable_fp8(module: nn.Module, recipe: Float8Recipe | bool | None = True) -> nn.Module:
    """Run the GEMMs of every fusedpar parallel linear and grouped-experts block in ``module``
    (itself included) in fp8 per ``recipe`` (``True``: ``Float8Recipe()``; ``None``/``False``:
    high precision again). Returns ``module``. The weights are not touched."""
    rec = as_recipe(recipe, where="enable_fp8: recipe")
    layers = [m for m in module.modules() if isinstance(m, _PARALLEL_LINEARS)]
    experts = [m for m in module.modules() if getattr(m, "_fusedpar_experts", None) == "grouped"]
    if not layers and not experts:
        raise ValueError(f"enable_fp8: expected fusedpar parallel linears or grouped experts in "
                         f"{type(module).__name__}, found none")
    for layer in layers:
        layer.spec = dataclasses.replace(layer.spec, fp8=rec)
    for block in experts:  # layers/moe.py reads it per forward
        block._fusedpar_fp8 = rec
    return module


# ----------------------------------------------------------------------------------------
# When fp8 cannot serve a GEMM
# ----------------------------------------------------------------------------------------

_logged: set[tuple] = set()


def fallback_reason(K: int, N: int, device: torch.device, kernel: str) -> str | None:
    """Why an fp8 GEMM of ``[*, K] @ [K, N]`` cannot run here, or None when it can."""
    if K % 16 or N % 16:
        return f"K={K} and N={N} (per rank) must be multiples of 16"
    if device.type == "cuda":
        if resolve_kernel(kernel, device) == "torch":
            return "kernel='torch' has no fp8 GEMM on CUDA (its fp8 path is a slow fp32 emulation)"
        return _fp8_device_reason(device)
    return None


def warn_fallback(kind: str, K: int, N: int, reason: str) -> None:
    """Say once per GEMM kind, shape and reason that it runs in high precision instead."""
    key = (kind, K, N, reason)
    if key not in _logged:
        _logged.add(key)
        logger.warning("fusedpar fp8: the %s GEMM [K=%d, N=%d] runs in high precision instead: %s",
                       kind, K, N, reason)


def _falls_back(kind: str, K: int, N: int, x: Tensor, spec: LinearSpec) -> bool:
    reason = fallback_reason(K, N, x.device, spec.kernel)
    if reason is not None:
        warn_fallback(kind, K, N, reason)
    return reason is not None


# ----------------------------------------------------------------------------------------
# Operands: weights (cached when frozen), inputs, the compute dtype
# ----------------------------------------------------------------------------------------

_stats = {"weight_quantizations": 0}


def fp8_stats() -> dict[str, int]:
    """Counters: ``weight_quantizations`` (weights quantized so far in this process; frozen
    weights count once)."""
    return dict(_stats)


class _QuantizedWeight:
    """A weight [N, K] in e4m3 with one fp32 scale per row (a per-tensor scale repeated, so
    that a fused group's weights concatenate), and its K-major copy for the dgrad, made once
    when first needed."""

    def __init__(self, q: Tensor, scale: Tensor) -> None:
        self.q, self.scale, self._t = q, scale, None

    def t_contiguous(self) -> Tensor:
        if self._t is None:
            self._t = self.q.t().contiguous()
        return self._t


# frozen weights' fp8 copies: id(parameter) -> (weakref to it, {view and version: copy}); an
# entry goes when its parameter does (tensors cannot key a WeakKeyDictionary: == is elementwise)
_FROZEN: dict[int, tuple[weakref.ref, dict[tuple, _QuantizedWeight]]] = {}


def _frozen_copies(base: Tensor) -> dict[tuple, _QuantizedWeight]:
    entry = _FROZEN.get(id(base))
    if entry is None or entry[0]() is not base:
        entry = _FROZEN[id(base)] = (weakref.ref(base), {})
        weakref.finalize(base, _FROZEN.pop, id(base), None)
    return entry[1]


def _quantize_weight(w: Tensor, scaling: str, kernel: str) -> _QuantizedWeight:
    """``w`` [N, K] quantized per row (or per tensor); a frozen weight once per version (of a
    parameter fusedpar made: others, such as FSDP2's refilled unsharded parameters, may be
    written without their version moving, `tracked_version`, and are quantized every call)."""
    key = copies = None
    base = w._base if w._base is not None else w
    version = None if w.requires_grad else tracked_version(base)
    if version is not None:
        key = (version, w.storage_offset(), tuple(w.shape), tuple(w.stride()), scaling)
        copies = _frozen_copies(base)
        if key in copies:
            return copies[key]
    _stats["weight_quantizations"] += 1
    w = w.detach()
    if scaling == "rowwise":
        q, s = quantize_rowwise(w, E4M3, kernel=kernel)
        qw = _QuantizedWeight(q, s.reshape(-1))
    else:
        q, s = quantize_tensorwise(w, E4M3, kernel=kernel)
        qw = _QuantizedWeight(q, s.reshape(1).expand(w.shape[0]).contiguous())
    if copies is not None:  # only copies of the weight's current version are kept
        for stale in [k for k in copies if k[0] != key[0]]:
            del copies[stale]
        copies[key] = qw
    return qw


def _weights(weights: list[Tensor], scaling: str, kernel: str) -> list[_QuantizedWeight]:
    return [_quantize_weight(w, scaling, kernel) for w in weights]


def _cat_q(parts: list[_QuantizedWeight]) -> tuple[Tensor, Tensor]:
    """(q [N, K], scale [N]) of the concatenated weights."""
    if len(parts) == 1:
        return parts[0].q, parts[0].scale
    return torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts])


def _dgrad_operand(parts: list[_QuantizedWeight]) -> Tensor:
    """The dgrad's ``W`` as ``[N, K]`` stored K-major (its reduction dim N contiguous, what
    fp8 wgmma and TMA want): a byte transpose of the fp8 weight, cached with a frozen one."""
    t = parts[0].t_contiguous() if len(parts) == 1 else torch.cat([p.t_contiguous() for p in parts], dim=1)
    return t.t()


def _quantize_input(x: Tensor, scaling: str, kernel: str) -> tuple[Tensor, Tensor]:
    if scaling == "rowwise":
        return quantize_rowwise(x, E4M3, kernel=kernel)
    return quantize_tensorwise(x, E4M3, kernel=kernel)


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype of the outputs and gradients: autocast's when it is on (what nn.Linear
    would compute in), else the input's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _wgrad_like(dtype: torch.dtype, dy: Tensor, K: int, N: int) -> Tensor:
    """A ``[K, N]`` stand-in for the weight in the backward blocks: with an fp8 dgrad they
    only read its shape and dtype, the dtype dW is written in (the master weight's, fp32
    for mixed precision, so the wgrad is accumulated and stored without a bf16 rounding)."""
    if dtype not in (dy.dtype, torch.float32):
        dtype = torch.float32
    return torch.empty((), dtype=dtype, device=dy.device).expand(K, N)


def _wgrad(x_full: Tensor, dy: Tensor, dtype: torch.dtype) -> Tensor:
    """``x.T @ dy`` as [K, N] in ``dtype`` with ``.t()`` contiguous (the weight layout)."""
    x2, dy2 = x_full.reshape(-1, x_full.shape[-1]), dy.reshape(-1, dy.shape[-1])
    dw = torch.empty(dy2.shape[1], x2.shape[1], dtype=dtype, device=dy.device).t()
    out = dw if dtype in (dy.dtype, torch.float32) else torch.empty_like(dw, dtype=torch.float32)
    matmul(x2.t(), dy2, out=out)
    if out is not dw:
        dw.copy_(out)
    return dw


def _split_dw(dw: Tensor | None, weights: tuple[Tensor, ...], needs: tuple[bool, ...]) -> list[Tensor | None]:
    """dW [K, sum N_i] of a fused group -> one [N_i, K] gradient per weight (None if unneeded)."""
    if dw is None:
        return [None] * len(weights)
    parts = dw.t().split([w.shape[0] for w in weights], 0)
    return [p.to(w.dtype) if need else None for p, w, need in zip(parts, weights, needs)]


# ----------------------------------------------------------------------------------------
# Column-parallel
# ----------------------------------------------------------------------------------------


class _Fp8ColumnParallelFn(torch.autograd.Function):
    """Column-parallel ``y_part = x @ cat(W_i).T + b`` with fp8 GEMMs (layouts as in
    ``_ColumnParallelFn``; the weights ``W_i [N_i, K]`` are the parameters themselves):

        forward   y_part = Q(x) @ Q(W).T            SP: all_gather_matmul of fp8 rows + scales
        dgrad     dx = all_reduce / reduce_scatter(Q5(dy s_W) @ Q(W))   fp8, or dy @ W ("high")
        wgrad     dW = deq(Q(x_full)).T @ dy_part    dy's dtype, overlapped with the dgrad collective
    """

    @staticmethod
    @_autocast_off
    def forward(ctx: Any, x: Tensor, bias: Tensor | None, spec: LinearSpec, holder: list | None, hp: torch.dtype,
                *weights: Tensor) -> Tensor:
        recipe, kernel = spec.fp8, spec.kernel
        parts = _weights(list(weights), recipe.scaling, kernel)
        w_q, w_s = _cat_q(parts)
        x_q, x_s = _quantize_input(x, recipe.scaling, kernel)
        if spec.sequence_parallel:
            y, x_full_q, x_full_s = overlap.all_gather_matmul(
                x_q, w_q.t(), x_scale=x_s, w_scale=w_s.view(1, -1), bias=bias, out_dtype=hp,
                dim=spec.sequence_dim, return_gathered=True, **spec.knobs())
            kept = (x_full_q, x_full_s) if spec.save_gathered_input else (x_q, x_s)
            if holder is not None:
                holder.append(dequantize(x_full_q, x_full_s, x.dtype))
        else:
            y = matmul(x_q, w_q.t(), a_scale=x_s, b_scale=w_s.view(1, -1), bias=bias, out_dtype=hp, kernel=kernel)
            kept = (x_q, x_s)
            if holder is not None:
                holder.append(x)
        ctx.spec, ctx.hp, ctx.parts = spec, hp, parts
        ctx.save_for_backward(*kept, w_s, *weights)
        return y

    @staticmethod
    @_autocast_off
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x_q, x_s, w_s, *weights = ctx.saved_tensors
        spec: LinearSpec = ctx.spec
        need_dx, need_db = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        needs_dw = tuple(ctx.needs_input_grad[5:])
        need_dw = any(needs_dw)
        dy = dy.contiguous()
        K, N = x_q.shape[-1], dy.shape[-1]
        w_dtype = weights[0].dtype
        if spec.fp8.dgrad == "fp8":
            w_arg, dgrad_fp8 = _wgrad_like(w_dtype, dy, K, N), (_dgrad_operand(ctx.parts), w_s)
        else:  # the high-precision dgrad multiplies by the weight itself
            w_cat = weights[0] if len(weights) == 1 else torch.cat(weights, 0)
            w_arg, dgrad_fp8 = w_cat.detach().to(dy.dtype).t(), None
        # the wgrad's x is what the forward saw; without a wgrad the schedules read only x's shape
        x_kept = dequantize(x_q, x_s, dy.dtype) if need_dw else torch.empty((), dtype=dy.dtype).expand(x_q.shape)
        dx = dw = None
        if spec.sequence_parallel:
            if need_dx:
                dx, dw = overlap.matmul_reduce_scatter_with_wgrad(
                    dy, w_arg, x_kept, x_is_gathered=spec.save_gathered_input, dim=spec.sequence_dim,
                    need_wgrad=need_dw, dgrad_fp8=dgrad_fp8, **spec.knobs())
            elif need_dw:
                x_full = x_kept if spec.save_gathered_input else _all_gather_dim(x_kept, spec.communicator(),
                                                                                spec.sequence_dim)
                dw = _wgrad(x_full, dy, w_dtype)
        elif need_dx:
            dx, dw = overlap.matmul_all_reduce_with_wgrad(dy, w_arg, x_kept, need_wgrad=need_dw, dgrad_fp8=dgrad_fp8,
                                                          **spec.knobs())
        elif need_dw:
            dw = _wgrad(x_kept, dy, w_dtype)
        db = _sum_rows(dy) if need_db else None
        return (dx, db, None, None, None, *_split_dw(dw, tuple(weights), needs_dw))


def column_parallel_fp8(x: Tensor, weights: list[Tensor], bias: Tensor | None, spec: LinearSpec,
                        holder: list | None) -> Tensor:
    """``x @ cat(weights).T + bias`` column-parallel with fp8 GEMMs, or with the layer's
    high-precision Function when fp8 cannot serve the GEMM (logged once)."""
    K, N = x.shape[-1], sum(w.shape[0] for w in weights)
    if _falls_back("column-parallel", K, N, x, spec):
        w = weights[0] if len(weights) == 1 else torch.cat(weights, 0)
        return _ColumnParallelFn.apply(*_autocast_operands(x, w.t(), bias), spec, holder, None)
    return _Fp8ColumnParallelFn.apply(x, bias, spec, holder, _compute_dtype(x), *weights)


# ----------------------------------------------------------------------------------------
# Row-parallel
# ----------------------------------------------------------------------------------------


class _Fp8RowParallelFn(torch.autograd.Function):
    """Row-parallel ``y = sum_ranks(x_part @ W_k.T) + b`` with fp8 GEMMs (layouts as in
    ``_RowParallelFn``; x_part and W_k quantized per rank, over the local K):

        forward   y = all_reduce / reduce_scatter(Q(x_part) @ Q(W_k).T) + b   partial sums in bf16/fp32
        dgrad     dx_part = Q5(dy s_W) @ Q(W_k)      SP: dy all-gathered in its dtype, quantized per piece
        wgrad     dW_k = deq(Q(x_part)).T @ dy       dy's dtype; db = sum dy (all-reduced with SP)
    """

    @staticmethod
    @_autocast_off
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, spec: LinearSpec, hp: torch.dtype) -> Tensor:
        recipe, kernel = spec.fp8, spec.kernel
        (part,) = _weights([weight], recipe.scaling, kernel)
        x_q, x_s = _quantize_input(x, recipe.scaling, kernel)
        kw = dict(x_scale=x_s, w_scale=part.scale.view(1, -1), bias=bias, out_dtype=hp, **spec.knobs())
        if spec.partial_output:  # the block reduces it (block_reduction.py)
            y = matmul(x_q, part.q.t(), a_scale=x_s, b_scale=part.scale.view(1, -1), out_dtype=hp, kernel=kernel)
        elif spec.sequence_parallel:
            y = overlap.matmul_reduce_scatter(x_q, part.q.t(), dim=spec.sequence_dim, **kw)
        else:
            y = overlap.matmul_all_reduce(x_q, part.q.t(), **kw)
        ctx.spec, ctx.part = spec, part
        ctx.save_for_backward(x_q, x_s, weight)
        return y

    @staticmethod
    @_autocast_off
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x_q, x_s, weight = ctx.saved_tensors
        spec: LinearSpec = ctx.spec
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        dy = dy.contiguous()
        K, N = x_q.shape[-1], dy.shape[-1]
        if spec.fp8.dgrad == "fp8":
            w_arg, dgrad_fp8 = _wgrad_like(weight.dtype, dy, K, N), (_dgrad_operand([ctx.part]), ctx.part.scale)
        else:
            w_arg, dgrad_fp8 = weight.detach().to(dy.dtype).t(), None
        # the wgrad's x is what the forward saw; without a wgrad the schedule reads only x's shape
        x_hp = dequantize(x_q, x_s, dy.dtype) if need_dw else torch.empty((), dtype=dy.dtype).expand(x_q.shape)
        dx = dw = db = None
        if spec.sequence_parallel:
            if need_dx or need_dw:
                dx, dw = overlap.all_gather_matmul_with_wgrad(
                    dy, w_arg, x_hp, dim=spec.sequence_dim, need_wgrad=need_dw, dgrad_fp8=dgrad_fp8, **spec.knobs())
            if need_db:
                db = _sum_rows(dy).contiguous()
                spec.communicator().all_reduce(db).wait()
        else:
            if need_dx:
                if dgrad_fp8 is not None:
                    dy_q, dy_s, wt_q = overlap._fp8_dgrad(dy, dgrad_fp8, spec.kernel)
                    dx = matmul(dy_q, wt_q, a_scale=dy_s, out_dtype=dy.dtype, kernel=spec.kernel)
                else:
                    dx = matmul(dy, w_arg.t(), kernel=spec.kernel)
            if need_dw:
                dw = _wgrad(x_hp, dy, weight.dtype)
            if need_db:
                db = _sum_rows(dy)
        dw = dw.t().to(weight.dtype) if (need_dw and dw is not None) else None  # [N, K], the parameter's layout
        return (dx if need_dx else None), dw, db, None, None


def row_parallel_fp8(x: Tensor, weight: Tensor, bias: Tensor | None, spec: LinearSpec) -> Tensor:
    """``all_reduce / reduce_scatter(x_part @ weight.T) + bias`` with fp8 GEMMs, or with the
    layer's high-precision Function when fp8 cannot serve the GEMM (logged once)."""
    if _falls_back("row-parallel", x.shape[-1], weight.shape[0], x, spec):
        return _RowParallelFn.apply(*_autocast_operands(x, weight.t(), bias), spec, None)
    return _Fp8RowParallelFn.apply(x, weight, bias, spec, _compute_dtype(x))


# ----------------------------------------------------------------------------------------
# The gated MLP product without autograd (inference)
# ----------------------------------------------------------------------------------------


def gated_fp8(x: Tensor, gate: Tensor, up: Tensor, activation: str, spec: LinearSpec) -> Tensor | None:
    """``act(x @ gate.T) * (x @ up.T)`` in one fp8 kernel (ParallelMLP under no_grad), or
    None when fp8 cannot serve it (the caller runs its high-precision kernel)."""
    if _falls_back("gated", x.shape[-1], gate.shape[0], x, spec):
        return None
    scaling = spec.fp8.scaling
    g, u = _weights([gate, up], scaling, spec.kernel)
    x_q, x_s = _quantize_input(x, scaling, spec.kernel)
    return gated_matmul(x_q, g.q.t(), u.q.t(), a_scale=x_s, b_gate_scale=g.scale.view(1, -1),
                        b_up_scale=u.scale.view(1, -1), activation=activation, out_dtype=_compute_dtype(x),
                        kernel=spec.kernel)
