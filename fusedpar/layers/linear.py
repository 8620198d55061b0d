"""Column- and row-parallel linears whose collectives overlap their GEMMs (fusedpar.overlap).

Layouts, in the vocabulary of overlap/: `x_full` replicated on every rank, `x_shard`
split across ranks on the sequence (token) dim, `y_part` split on the feature (last) dim,
`y_partial` a partial sum. `w` is always the local `[K, N]` operand, `weight.t()` (a view).

                       forward                                  backward (dx ‖ dw)
    column             x_full @ w_shard_n → y_part               all-reduce(dx) ‖ wgrad
    column, SP         all_gather(x_shard) @ w_shard_n → y_part  reduce-scatter(dx) ‖ wgrad
    row                all_reduce(y_part @ w_shard_k) → y_full   none
    row, SP            reduce_scatter(y_part @ w_shard_k) → y_shard   all-gather(dy) ‖ dgrad, wgrad

This file holds the nn.Modules and `column_parallel_group`, which runs several column-parallel
linears that read the same input as one fused GEMM (q/k/v, gate/up): one gather in forward,
one reduction in backward, like Megatron's fused QKV weight but over separately stored
parameters. The rest lives beside it and is re-exported here, where plan/, fp8.py, the
tests and the benchmarks import it from:

    linear_spec.py       LinearSpec, SequenceRegion, effective_spec
    regions.py           split_to_shard, gather_from_shard, reduce_scatter_to_shard (layout changes)
    linear_autograd.py   _ColumnParallelFn, _RowParallelFn and their operand / autocast helpers
    column_group.py      the fused group's cached weights (_fused_operands) and stashed outputs
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from typing_extensions import Unpack  # typing.Unpack needs Python 3.11; torch requires typing_extensions

from . import traced
from ..kernels import resolve_kernel
from .column_group import (  # noqa: F401
    _cat_biases,
    _fused_operands,
    _FusedParts,
    _linked,
    _source,
    _take_precomputed,
    pop_precomputed,
    stash_precomputed,
)
from .linear_autograd import (  # noqa: F401
    _autocast_off,
    _autocast_operands,
    _column_apply,
    _column_fn,
    _ColumnParallelFn,
    _row_apply,
    _RowParallelFn,
    _sum_rows,
)
from .linear_spec import (  # noqa: F401
    _COMMS,
    _KERNELS,
    LinearKnobs,
    LinearSpec,
    SequenceRegion,
    _check_knobs,
    _make_spec,
    effective_spec,
)
from .norm import all_reduce_grads
from .regions import (  # noqa: F401
    _all_gather_dim,
    _check_divisible,
    _GatherFn,
    _ReduceScatterFn,
    _SplitFn,
    gather_from_shard,
    reduce_scatter_to_shard,
    split_to_shard,
)
from .local_views import param_operands
from .sharding import ParamShard, local_param, local_tensor, register_state_dict_hooks, tp_parameter

__all__ = [
    "ColumnParallelLinear",
    "RowParallelLinear",
    "ReplicatedColumnLinear",
    "column_parallel_group",
    "split_to_shard",
    "gather_from_shard",
    "LinearSpec",
    "SequenceRegion",
    "effective_spec",
]


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


def _rank_world(spec: LinearSpec) -> tuple[int, int]:
    return dist.get_rank(spec.group), dist.get_world_size(spec.group)


def _init_uniform(t: Tensor, fan_in: int) -> Tensor:
    """nn.Linear's default init (kaiming_uniform with a=√5 ⇒ U(±1/√fan_in)) with the *full* fan-in."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    with torch.no_grad():
        if t.device.type != "meta":
            t.uniform_(-bound, bound)
    return t


def _keep_frozen(layer: nn.Module, linear: nn.Linear) -> None:
    """Carry each parameter's `requires_grad` over from the linear being sharded, so a model
    frozen before `parallelize` (fine-tuning only some layers) stays frozen after it."""
    for name, param in linear.named_parameters(recurse=False):
        getattr(layer, name).requires_grad_(param.requires_grad)


_L = TypeVar("_L", bound="_ParallelLinearBase")
_FEATURES = {0: ("out_features", "output"), 1: ("in_features", "input")}  # weight dim -> its features


class _ParallelLinearBase(nn.Module):
    """What the parallel linears share. A subclass declares its layout once, in
    `tp_shard_dims` (parameter -> the dim split across the group, in rank order; a parameter
    not named is replicated), and creating the parameters, sharding an `nn.Linear` and
    gathering the unsharded state dict all read it."""

    in_features: int
    out_features: int
    spec: LinearSpec
    tp_shard_dims: dict[str, int]
    _from_what = "an nn.Linear"  # `from_linear`'s expectation, in its TypeError

    def _init_params(self, in_features: int, out_features: int, *, bias: bool, dtype: torch.dtype | None,
                     device: torch.device | str | None, where: str) -> None:
        """This rank's weight `[out_features, in_features]` and bias `[out_features]`, split on
        the dims of `tp_shard_dims`, as DTensor parameters initialized like `nn.Linear`'s
        (over the full fan-in)."""
        world = _rank_world(self.spec)[1]
        split = self.tp_shard_dims.get("weight")
        if split is not None:
            arg, features = _FEATURES[split]
            size = (out_features, in_features)[split]
            if size % world:
                raise ValueError(f"{where}: {arg}: expected a multiple of the world size {world} "
                                 f"(the {features} features are split across ranks), got {size}")
        self.in_features, self.out_features = in_features, out_features
        kw = {"dtype": dtype, "device": device}

        def make(name: str, shape: list[int]) -> nn.Parameter:
            dim = self.tp_shard_dims.get(name)
            if dim is not None:
                shape[dim] //= world
            return tp_parameter(_init_uniform(torch.empty(shape, **kw), in_features),
                                None if dim is None else ParamShard(dim), group=self.spec.group)

        self.weight = make("weight", [out_features, in_features])
        self.bias = make("bias", [out_features]) if bias else None
        register_state_dict_hooks(self)

    @classmethod
    def from_linear(cls: type[_L], linear: nn.Linear, *, group: dist.ProcessGroup, name: str = "linear",
                    **kwargs: Any) -> _L:
        """Shard an existing `nn.Linear` (pretrained weights survive); `name` appears in errors."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{name}: expected {cls._from_what}, got {type(linear).__name__}")
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, group=group, bias=linear.bias is not None,
                    dtype=w.dtype, device=w.device, _name=name, **kwargs)
        rank, world = _rank_world(layer.spec)
        with torch.no_grad():
            for key, src in (("weight", w), ("bias", linear.bias)):
                if src is not None:
                    full, dim = local_tensor(src), cls.tp_shard_dims.get(key)
                    local_tensor(getattr(layer, key)).copy_(full if dim is None else full.chunk(world, dim)[rank])
        _keep_frozen(layer, linear)
        return layer

    def full_state_dict(self) -> dict[str, Tensor]:
        """The unsharded `{"weight", "bias"}` (a collective where one is split: every rank of
        the group must call it); packed parameters (`tp_shard_parts`) come back in packed order."""
        parts = getattr(self, "tp_shard_parts", {})
        out = {}
        for name in ("weight", "bias"):
            p = getattr(self, name)
            if p is not None:
                dim = self.tp_shard_dims.get(name)
                out[name] = (local_tensor(p).detach().clone() if dim is None else
                             ParamShard(dim, parts.get(name, 1)).gather(p, self.spec.communicator()))
        return out

    def _knobs_repr(self) -> str:
        _, world = _rank_world(self.spec)
        try:
            kernel = resolve_kernel(self.spec.kernel, self.weight.device, self.weight.dtype)
        except ValueError:
            kernel = f"{self.spec.kernel} (cannot run on {self.weight.device.type} here)"
        return (
            f"world={world}, sequence_parallel={self.spec.sequence_parallel}, kernel={kernel}, "
            f"comm={self.spec.comm}, chunks={self.spec.chunks if self.spec.chunks is not None else 'auto'}"
            + (f", fp8=({self.spec.fp8.short()})" if self.spec.fp8 is not None else "")
        )


class ColumnParallelLinear(_ParallelLinearBase):
    """`nn.Linear(in_features, out_features)` with its output features split across `group`.

    This rank holds rows `[rank*N/world, (rank+1)*N/world)` of the weight and bias. The input is
    replicated (`x_full`), or, with `sequence_parallel=True`, split on `sequence_dim` (`x_shard`,
    gathered by a ring that overlaps the GEMM). The output is `y_part [.., N/world]`, or the
    full `[.., N]` with `gather_output=True`. `save_gathered_input` (SP only) keeps the gathered
    input for backward (memory) instead of re-gathering it there (one more collective, hidden
    under the dgrad GEMMs).
    """

    # parameter -> the dim split evenly across the group in rank order (what grad_norm, the
    # checkpoint loader and saver read); parameters not named are replicated
    tp_shard_dims = {"weight": 0, "bias": 0}
    _from_what = "an nn.Linear to shard column-wise"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        group: dist.ProcessGroup,
        bias: bool = True,
        gather_output: bool = False,
        sequence_parallel: bool = False,
        sequence_dim: int = -2,
        chunks: int | None = None,
        kernel: str = "auto",
        comm: str = "torch",
        save_gathered_input: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        _name: str = "ColumnParallelLinear",
    ) -> None:
        super().__init__()
        self.spec = _make_spec(group, sequence_parallel=sequence_parallel, sequence_dim=sequence_dim, chunks=chunks,
                               kernel=kernel, comm=comm, save_gathered_input=save_gathered_input, where=_name)
        self.gather_output = gather_output
        self._init_params(in_features, out_features, bias=bias, dtype=dtype, device=device, where=_name)

    def column_operands(self) -> tuple[Tensor, Tensor | None]:
        """The local `(weight [N/world, K], bias [N/world] | None)` this layer multiplies by
        (plain tensors whose gradients reach the DTensor parameters)."""
        return local_param(self.weight), local_param(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        precomputed = _take_precomputed(self, x)
        if precomputed is not None:
            return precomputed
        spec = effective_spec(self)
        if (spec.fp8 is None and type(self).column_operands is ColumnParallelLinear.column_operands
                and not torch.is_autocast_enabled(x.device.type)):
            # the Function hands the parameters' gradients on itself (no hook per parameter)
            w, b, targets = param_operands(self.weight, self.bias)
            y = _column_apply(x, [w], b, spec, None, targets)
        else:
            w, b = self.column_operands()
            y = _column_apply(x, [w], b, spec, None)
        if self.gather_output:
            y = traced.gather(y, -1, spec.group) if torch.compiler.is_compiling() else _GatherFn.apply(y, spec, -1)
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features} "
                f"(local {local_tensor(self.weight).shape[0]}), bias={self.bias is not None}, gather_output={self.gather_output}, "
                f"save_gathered_input={self.spec.save_gathered_input}, " + self._knobs_repr())


class ReplicatedColumnLinear(_ParallelLinearBase):
    """A column-parallel linear with fewer output blocks (`parts`) than ranks; its other
    keyword arguments (`LinearKnobs`) as `ColumnParallelLinear`'s.

    Every rank stores the full weight (replicated); rank r multiplies by block
    `r // (world // parts)`, so each block is used by `world // parts` consecutive ranks, the
    layout of key/value heads when a grouped-query model has fewer kv heads than ranks.
    Each rank's weight gradient is non-zero only on its block; it is all-reduced over the
    group in backward (a hook on the parameters), which sums every user's share.
    """

    tp_shard_dims: dict[str, int] = {}  # the full weight on every rank

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        group: dist.ProcessGroup,
        parts: int,
        bias: bool = True,
        _name: str = "ReplicatedColumnLinear",
        **knobs: Unpack[LinearKnobs],
    ) -> None:
        super().__init__()
        _check_knobs(knobs, _name)
        factory = {"dtype": knobs.pop("dtype", None), "device": knobs.pop("device", None)}
        self.spec = _make_spec(group, where=_name, **knobs)
        rank, world = _rank_world(self.spec)
        if parts < 1 or world % parts or out_features % parts:
            raise ValueError(
                f"{_name}: parts: expected a divisor of both the world size {world} and "
                f"out_features {out_features}, got {parts}"
            )
        self.parts, self.block = parts, rank // (world // parts)
        self.gather_output = False
        self._init_params(in_features, out_features, bias=bias, where=_name, **factory)
        all_reduce_grads(self, group=self.spec.group, comm=self.spec.comm)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, group: dist.ProcessGroup, parts: int, name: str = "linear",
                    **kwargs: Any) -> ReplicatedColumnLinear:
        """Copy an existing `nn.Linear` onto every rank (pretrained weights survive); this rank
        multiplies by its block of `parts`."""
        return super().from_linear(linear, group=group, name=name, parts=parts, **kwargs)

    def column_operands(self) -> tuple[Tensor, Tensor | None]:
        n = self.out_features // self.parts
        s = slice(self.block * n, (self.block + 1) * n)
        w, b = local_param(self.weight), local_param(self.bias)
        return w[s], (b[s] if b is not None else None)

    def forward(self, x: Tensor) -> Tensor:
        precomputed = _take_precomputed(self, x)
        if precomputed is not None:
            return precomputed
        w, b = self.column_operands()
        return _column_apply(x, [w], b, effective_spec(self), None)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features} (block {self.block} of "
                f"{self.parts}, replicated), bias={self.bias is not None}, " + self._knobs_repr())


class RowParallelLinear(_ParallelLinearBase):
    """`nn.Linear(in_features, out_features)` with its input features split across `group`.

    This rank holds columns `[rank*K/world, (rank+1)*K/world)` of the weight; the bias is
    replicated and added once, after the reduction. The input is `x_part [.., K/world]`
    (`input_is_parallel=True`, the output of a column-parallel layer) or the full `[.., K]`,
    split here. The output is all-reduced (`y_full`) or, with `sequence_parallel=True`,
    reduce-scattered on `sequence_dim` (`y_shard`).
    """

    tp_shard_dims = {"weight": 1}  # the bias is replicated, added once after the reduction
    _from_what = "an nn.Linear to shard row-wise"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        group: dist.ProcessGroup,
        bias: bool = True,
        input_is_parallel: bool = True,
        sequence_parallel: bool = False,
        sequence_dim: int = -2,
        chunks: int | None = None,
        kernel: str = "auto",
        comm: str = "torch",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        _name: str = "RowParallelLinear",
    ) -> None:
        super().__init__()
        self.spec = _make_spec(group, sequence_parallel=sequence_parallel, sequence_dim=sequence_dim, chunks=chunks,
                               kernel=kernel, comm=comm, save_gathered_input=True, where=_name)
        self.input_is_parallel = input_is_parallel
        self._init_params(in_features, out_features, bias=bias, dtype=dtype, device=device, where=_name)

    def forward(self, x: Tensor) -> Tensor:
        spec = effective_spec(self)
        if not self.input_is_parallel:
            _check_divisible(x, -1, _rank_world(spec)[1], what="RowParallelLinear (input_is_parallel=False)")
            x = traced.split(x, -1, spec.group) if torch.compiler.is_compiling() else _SplitFn.apply(x, spec, -1)
        if spec.sequence_parallel:
            _check_divisible(x, spec.sequence_dim, _rank_world(spec)[1],
                             what="RowParallelLinear (sequence_parallel=True)")
        if spec.fp8 is not None or torch.is_autocast_enabled(x.device.type):
            return _row_apply(x, local_param(self.weight), local_param(self.bias), spec)
        w, b, targets = param_operands(self.weight, self.bias)  # as in ColumnParallelLinear
        return _row_apply(x, w, b, spec, targets)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} (local {local_tensor(self.weight).shape[1]}), out_features={self.out_features}, "
                f"bias={self.bias is not None}, input_is_parallel={self.input_is_parallel}, " + self._knobs_repr())


# --------------------------------------------------------------------------------------------
# Several column-parallel linears on one input, as one GEMM
# --------------------------------------------------------------------------------------------


def _group_operands(layers: Sequence[nn.Module], x: Tensor
                    ) -> tuple[list[tuple[Tensor, Tensor | None]], list[tuple[Any, Any]] | None]:
    """Each layer's `(weight, bias)` operands and, with grad on and autocast off, the
    `GradTarget`s of those the fused group's `_FusedParts` hands gradients to itself
    (`param_operand`: plain column-parallel layers; a replicated layer's block keeps its hook)."""
    if not torch.is_grad_enabled() or torch.is_autocast_enabled(x.device.type):
        return [layer.column_operands() for layer in layers], None
    operands, targets = [], []
    for layer in layers:
        if type(layer).column_operands is ColumnParallelLinear.column_operands:
            w, b, pair = param_operands(layer.weight, layer.bias)
            operands.append((w, b))
            targets.append(pair or (None, None))
        else:
            operands.append(layer.column_operands())
            targets.append((None, None))
    return operands, targets if any(t is not None for pair in targets for t in pair) else None


def column_parallel_group(
    layers: Sequence[ColumnParallelLinear | ReplicatedColumnLinear], x: Tensor
) -> tuple[list[Tensor], Tensor]:
    """`[layer(x) for layer in layers]` as one fused column-parallel GEMM; also returns `x_full`.

    The local weights run concatenated (`[sum N_i, K]`) so that sequence parallelism gathers
    `x_shard` once (one ring, overlapped) and backward reduces `sum_i dy_i @ w_i` with one
    all-reduce / reduce-scatter instead of one per layer. The concatenation is made once per
    version of the weights and kept (`_fused_operands`), not copied every forward; backward
    saves that same tensor and hands each layer its own slice of the weight gradient.
    `x_full` is the gathered input (detached; `x` itself without sequence parallelism), for
    modules that take shapes from their input. All layers must share the group, the layout
    and the knobs.
    """
    if not layers:
        raise ValueError("column_parallel_group: expected at least one layer, got none")
    spec = effective_spec(layers[0])
    specs = [effective_spec(layer) for layer in layers]
    agreed = layers[0].__dict__.get("_fusedpar_group_specs")  # specs are frozen: once compared, the same objects agree
    for i, layer in enumerate(layers):
        if not isinstance(layer, (ColumnParallelLinear, ReplicatedColumnLinear)) or layer.gather_output:
            raise TypeError(f"column_parallel_group: layers[{i}]: expected a column-parallel linear without "
                            f"gather_output, got {type(layer).__name__}")
    if agreed is None or len(agreed) != len(specs) or any(a is not b for a, b in zip(agreed, specs)):
        for i, other in enumerate(specs):
            if other != spec:
                raise ValueError(f"column_parallel_group: layers[{i}]: expected the same spec as layers[0] "
                                 f"({spec}), got {other}")
        layers[0].__dict__["_fusedpar_group_specs"] = tuple(specs)
    holder: list[Tensor] = []
    if spec.fp8 is not None or torch.compiler.is_compiling():  # fp8 quantizes per part; a compiled graph fuses the cat
        operands = [layer.column_operands() for layer in layers]
        sizes = [w.shape[0] for w, _ in operands]
        y = _column_apply(x, [w for w, _ in operands], _cat_biases(operands), spec, holder)
    else:
        operands, targets = _group_operands(layers, x)
        sizes = [w.shape[0] for w, _ in operands]
        w, b = _fused_operands(layers, operands, targets)
        y = _column_fn(x, w.t(), b, spec, holder)
    x_full = holder[0] if spec.sequence_parallel else x
    outs = list(y.split(sizes, -1)) if len(sizes) > 1 else [y]
    return outs, (x_full.detach() if spec.sequence_parallel else x_full)

