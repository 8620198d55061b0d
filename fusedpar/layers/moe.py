"""Mixture-of-experts blocks, tensor-parallel inside every expert ("moe_tp_experts").

Every rank holds every expert, each cut on its intermediate dim: `gate_up_proj` `[E, 2I, H]`
keeps `[gate_r; up_r]` (packed, `[E, 2I/world, H]`) and `down_proj` `[E, H, I]` keeps
columns `[E, H, I/world]`. The router stays replicated, so every rank routes every token
the same way; the experts then produce a partial sum of the block's output, reduced once:

    x_full, w_full = replicated_inputs(hidden_states, top_k_weights)     backward: ONE all-reduce of (dx, dw)
    y_partial      = Σ_k w[t,k] · down_r(act(gate_r x) · up_r x)         grouped GEMMs, local shards
    y_full         = reduce_partial(y_partial)                           forward: ONE all-reduce

    forward   y [T, H] = all_reduce(y_partial)                          all-reduce
    dgrad     dx, dw = all_reduce(dx_partial, dw_partial)               one all-reduce for both
    wgrad     d gate_up_r, d down_r from this rank's tokens-by-expert   no comm (grouped wgrad GEMMs)

With a shared expert beside the experts, block_reduction.py reduces both partial sums once
at the block's exit where that is exact (the experts then return their partial sum).

The expert GEMMs run grouped (`fusedpar.kernels.grouped_matmul`): tokens sorted by expert,
one launch over every expert's rows, rather than a Python loop of small matmuls, for
experts classes declared through transformers' `use_experts_implementation` (their layout
flags say how to read the weights: transposed, gated, concatenated [gate; up] or
interleaved). Other experts classes keep their own forward, run on the local shards.

"moe_identity_expert" (LongCat's zero-compute experts) divides its input by the world size
so the partial-sum reduction counts it once.

fp8 (`parallelize(..., fp8=...)` or `enable_fp8` on the block): the grouped expert GEMMs
follow the dense linears' recipe (layers/fp8.py) per expert: tokens e4m3 with one scale
each, every expert's weight e4m3 with one scale per output channel (or one per tensor);
the dgrad e5m2 with the expert's channel scales folded into each token's gradient row; the
wgrad in high precision. Experts classes that keep their own forward stay high precision.
"""
from __future__ import annotations

import types
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..kernels.grouped import group_ends, grouped_matmul, grouped_matmul_wgrad
from ..kernels.quantize import quantize_rowwise, quantize_tensorwise
from .partial import reduce_partial, replicated_inputs
from .sharding import ParamShard, shard_parameter

__all__ = ["EXPERT_PARAM_STYLES", "plan_experts", "shard_experts", "grouped_experts"]

# style of a 3-D expert parameter → the dim of [E, a, b] it splits (HF: colwise = ndim-2, rowwise = -1)
EXPERT_PARAM_STYLES = {"colwise": (1, 1), "rowwise": (2, 1), "packed_colwise": (1, 2), "packed_rowwise": (2, 2)}
_SIZE_ATTRS = ("intermediate_dim", "intermediate_size", "expert_dim", "moe_intermediate_size")


def _is_declared(module: nn.Module) -> bool:
    """Declared through `use_experts_implementation`: layout flags and `_apply_gate` present."""
    return all(hasattr(module, a) for a in ("has_gate", "is_transposed", "is_concatenated", "has_bias"))


def plan_experts(module: nn.Module, param_styles: dict[str, str], world: int, *, where: str) -> dict[str, ParamShard]:
    """Check (no comm) an experts module and the styles its parameters are planned with; return
    `{parameter name: ParamShard}`. Every parameter of 2 or more dims must be planned (an
    unsharded one would be summed `world` times by the block's reduction)."""
    shards: dict[str, ParamShard] = {}
    for name, param in module.named_parameters(recurse=False):
        style = param_styles.get(name)
        if style is None:
            if param.ndim >= 2:
                raise ValueError(f"{where}: {name} {list(param.shape)}: expected a plan entry (e.g. 'packed_colwise' "
                                 f"or 'rowwise'): the experts' output is summed over ranks, so an unsharded "
                                 f"weight would count {world} times, got none")
            continue
        if style not in EXPERT_PARAM_STYLES or param.ndim != 3:
            raise ValueError(f"{where}: {name} {list(param.shape)}: expected a 3-D [experts, out, in] weight planned "
                             f"with one of {sorted(EXPERT_PARAM_STYLES)}, got {style!r}")
        dim, parts = EXPERT_PARAM_STYLES[style]
        shard = ParamShard(dim, parts)
        shard.check(param.shape, world, where=f"{where}: {name} ({style!r})")
        shards[name] = shard
    if _is_declared(module):
        if getattr(module, "has_bias", False) or getattr(module, "has_post_expert_norm", False):
            raise ValueError(f"{where}: expected experts without biases or a post-expert norm (neither is "
                             f"applied to a partial sum yet), got has_bias={module.has_bias}, "
                             f"has_post_expert_norm={getattr(module, 'has_post_expert_norm', False)}")
        up_name = "gate_up_proj" if module.has_gate else "up_proj"
        up = shards.get(up_name)
        if up is not None and module.has_gate:
            # [gate; up] concatenated: each part must be split on its own ('packed'); interleaved
            # [g0, u0, g1, u1, ...]: a contiguous split keeps pairs together, a packed one breaks them
            want_parts = 2 if module.is_concatenated else 1
            if up.parts != want_parts:
                layout = "concatenated [gate; up]" if module.is_concatenated else "interleaved gate/up"
                fix = "'packed_colwise' / 'packed_rowwise'" if want_parts == 2 else "'colwise' / 'rowwise'"
                raise ValueError(f"{where}: {up_name}: its rows are {layout}; planned with {up.parts} part(s) per "
                                 f"rank it would pair gate and up features of different units; expected {fix}, "
                                 f"got {param_styles[up_name]!r}")
        inner_dims = {n: s.dim for n, s in shards.items()}
        expected = {up_name: 2 if module.is_transposed else 1, "down_proj": 1 if module.is_transposed else 2}
        for n, d in expected.items():
            if n in inner_dims and inner_dims[n] != d:
                raise ValueError(f"{where}: {n}: expected the intermediate dim ({d} of {list(getattr(module, n).shape)}"
                                 f", {'transposed' if module.is_transposed else 'nn.Linear'} layout) to be split, "
                                 f"got dim {inner_dims[n]} ({param_styles[n]!r})")
    return shards


def shard_experts(module: nn.Module, shards: dict[str, ParamShard], *, group: dist.ProcessGroup, comm: str = "torch",
                  kernel: str = "auto", grouped: bool = True, name: str = "experts") -> None:
    """Shard `module`'s expert weights in place and make its forward tensor-parallel.

    Input `hidden_states [T, H]` and routing (`top_k_index`, `top_k_weights [T, k]`),
    replicated; output `[T, H]`, replicated (one all-reduce). With `grouped=True` and an
    experts class declared through `use_experts_implementation`, the expert GEMMs are
    fusedpar's grouped GEMMs; otherwise the class's own forward runs on the local shards.
    """
    world = dist.get_world_size(group)
    for pname, shard in shards.items():
        shard_parameter(module, pname, shard, group=group, where=f"{name}.{pname}")
    for attr in _SIZE_ATTRS:  # forwards that view by the intermediate size see the local one
        value = getattr(module, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value % world == 0:
            setattr(module, attr, value // world)
    use_grouped = grouped and _is_declared(module)
    inner = types.MethodType(_grouped_forward(kernel), module) if use_grouped else module.forward
    module._fusedpar_experts = "grouped" if use_grouped else "own forward"

    def forward(hidden_states: Tensor, *args: Any, **kwargs: Any) -> Any:
        if len(args) >= 2:
            hidden_states, w = replicated_inputs(hidden_states, args[1], group=group, comm=comm)
            args = (args[0], w, *args[2:])
        elif "top_k_weights" in kwargs:
            hidden_states, w = replicated_inputs(hidden_states, kwargs["top_k_weights"], group=group, comm=comm)
            kwargs = {**kwargs, "top_k_weights": w}
        else:  # routing weights applied before the experts (Llama 4)
            (hidden_states,) = replicated_inputs(hidden_states, group=group, comm=comm)
        out = inner(hidden_states, *args, **kwargs)
        if getattr(module, "_fusedpar_partial_out", False):  # its block reduces (block_reduction.py)
            return out
        return reduce_partial(out, group=group, comm=comm)

    module.forward = forward


# --------------------------------------------------------------------------------------------
# Grouped expert GEMMs
# --------------------------------------------------------------------------------------------


class _GroupedLinearFn(torch.autograd.Function):
    """`y[rows_e] = x[rows_e] @ w[e]` for rows sorted by expert (w `[E, K, N]`, any strides).

    forward   y [S, N] = grouped(x [S, K], w)             no comm
    dgrad     dx [S, K] = grouped(dy, w.transpose(1, 2))  no comm
    wgrad     dw [E, K, N] = grouped_wgrad(x, dy)         no comm
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, ends: Tensor, kernel: str) -> Tensor:
        ctx.save_for_backward(x, w, ends)
        ctx.kernel = kernel
        return grouped_matmul(x, w, ends, kernel=kernel)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, w, ends = ctx.saved_tensors
        dy = dy.contiguous()
        dx = grouped_matmul(dy, w.transpose(1, 2), ends, kernel=ctx.kernel) if ctx.needs_input_grad[0] else None
        dw = _wgrad(x, dy, w, ends, ctx.kernel) if ctx.needs_input_grad[1] else None
        return dx, dw, None, None


class _Fp8GroupedLinearFn(torch.autograd.Function):
    """`y[rows_e] ≈ x[rows_e] @ w[e]` with fp8 GEMMs (w `[E, K, N]`, any strides; `recipe` a
    Float8Recipe).

    forward   y = grouped(x_q, w_q) * x_scale[row] * w_scale[e, col]    x per token, w per expert and column
    dgrad     dx = grouped(dy_q, w_q.T) * dy_scale[row]                 dy·w_scale[e] in e5m2 (dgrad="fp8")
              or grouped(dy, w.T) in dy's dtype                          (dgrad="high")
    wgrad     dw = grouped_wgrad(x, dy)                                 high precision, as the dense recipe
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, ends: Tensor, kernel: str, recipe: Any) -> Tensor:
        w_nk = w.transpose(1, 2)  # [E, N, K]: a row per expert and output channel
        if recipe.scaling == "rowwise":
            x_q, x_s = quantize_rowwise(x, kernel=kernel)
            w_q, w_s = quantize_rowwise(w_nk, kernel=kernel)
            w_s = w_s.squeeze(-1)  # [E, N]
        else:
            x_q, x_s = quantize_tensorwise(x, kernel=kernel)
            w_q, w_s = quantize_tensorwise(w_nk, kernel=kernel)
        _FP8_STATS["grouped_gemms"] += 1
        ctx.save_for_backward(x, w, ends, w_q, w_s)
        ctx.kernel, ctx.recipe = kernel, recipe
        return grouped_matmul(x_q, w_q.transpose(1, 2), ends, x_scale=x_s, w_scale=w_s, out_dtype=x.dtype,
                              kernel=kernel)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, w, ends, w_q, w_s = ctx.saved_tensors
        dy = dy.contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            if ctx.recipe.dgrad == "fp8":
                # w's channel scales lie along this product's sum: folded into each token's
                # gradient row (its expert's scales) before the row is quantized
                if w_s.numel() > 1:
                    counts = torch.diff(ends, prepend=ends.new_zeros(1))
                    expert_of_row = torch.repeat_interleave(torch.arange(len(ends), device=dy.device), counts)
                    folded = dy.float() * w_s[expert_of_row]
                else:
                    folded = dy.float() * w_s
                dy_q, dy_s = quantize_rowwise(folded, torch.float8_e5m2, kernel=ctx.kernel)
                # [E, N, K] with N, the sum's dim, contiguous: what fp8 tensor cores read (a copy of
                # the fp8 weight, half a bf16 weight's bytes)
                w_kmajor = w_q.transpose(1, 2).contiguous().transpose(1, 2)
                dx = grouped_matmul(dy_q, w_kmajor, ends, x_scale=dy_s, out_dtype=dy.dtype, kernel=ctx.kernel)
            else:
                dx = grouped_matmul(dy, w.transpose(1, 2).to(dy.dtype), ends, kernel=ctx.kernel)
        if ctx.needs_input_grad[1]:
            dw = _wgrad(x, dy.to(x.dtype), w, ends, ctx.kernel)
        return dx, dw, None, None, None


_FP8_STATS = {"grouped_gemms": 0}


def _wgrad(x: Tensor, dy: Tensor, w: Tensor, ends: Tensor, kernel: str) -> Tensor:
    if w.transpose(1, 2).is_contiguous():  # w is an [E, N, K] (nn.Linear layout) weight's view:
        # compute its gradient in that layout, so accumulating it is not a transposing copy
        return grouped_matmul_wgrad(dy, x, ends, kernel=kernel).transpose(1, 2)
    return grouped_matmul_wgrad(x, dy, ends, kernel=kernel)


def grouped_experts(x_sorted: Tensor, w: Tensor, ends: Tensor, *, kernel: str = "auto", fp8: Any = None) -> Tensor:
    """`x_sorted[rows_e] @ w[e]` for every expert e, differentiable (see `_GroupedLinearFn`);
    in fp8 with `fp8` a Float8Recipe (`_Fp8GroupedLinearFn`; output in x's dtype)."""
    if fp8 is not None:
        return _Fp8GroupedLinearFn.apply(x_sorted, w, ends, kernel, fp8)
    return _GroupedLinearFn.apply(x_sorted, w, ends, kernel)


def _grouped_forward(kernel: str) -> Any:
    def forward(self: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        """The experts of one rank (local shards) on every routed token: a partial sum."""
        tokens, hidden = hidden_states.shape[0], hidden_states.shape[-1]
        up = self.gate_up_proj if self.has_gate else self.up_proj
        experts = up.shape[0]
        expert_ids = top_k_index.reshape(-1)
        weights = top_k_weights.reshape(-1)
        keep = expert_ids < experts  # routers may emit an id past the last expert for "no expert"
        expert_ids = torch.where(keep, expert_ids, torch.full_like(expert_ids, experts - 1))
        weights = torch.where(keep, weights, torch.zeros_like(weights))
        expert_sorted, order = torch.sort(expert_ids, stable=True)
        token_of = order // top_k_index.shape[-1]
        ends = group_ends(expert_sorted, experts)
        x = hidden_states.reshape(tokens, hidden)[token_of]

        def weight(p: Tensor) -> Tensor:  # [E, K, N] for x @ w[e]
            return p if self.is_transposed else p.transpose(1, 2)

        recipe = _fp8_recipe(self, x, up, kernel)
        cast = (lambda p: p) if recipe is not None else (lambda p: p.to(x.dtype))  # fp8: quantized from the master
        h = grouped_experts(x, cast(weight(up)), ends, kernel=kernel, fp8=recipe)
        h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
        y = grouped_experts(h, cast(weight(self.down_proj)), ends, kernel=kernel, fp8=recipe)
        y = y * weights[order].unsqueeze(-1).to(y.dtype)
        out = torch.zeros(tokens, hidden, dtype=y.dtype, device=y.device).index_add(0, token_of, y)
        return out.to(hidden_states.dtype).view(hidden_states.shape)

    return forward


def _fp8_recipe(experts: nn.Module, x: Tensor, up: Tensor, kernel: str) -> Any:
    """The experts' fp8 recipe (set by `enable_fp8`), or None: none set, or a shape or device
    fp8 cannot serve (said once, as for the dense linears)."""
    recipe = getattr(experts, "_fusedpar_fp8", None)
    if recipe is None:
        return None
    from .fp8 import fallback_reason, warn_fallback

    K, I = x.shape[-1], experts.down_proj.shape[1 if experts.is_transposed else 2]
    reason = fallback_reason(K, I, x.device, kernel)  # gate/up [K, (2)I] and down [I, K]: both dims
    if reason is not None:
        warn_fallback("grouped expert", K, I, reason)
        return None
    return recipe
