"""Column- and row-parallel linears whose collectives overlap their GEMMs (fusedpar.overlap).

Layouts, in the vocabulary of overlap/: `x_full` replicated on every rank, `x_shard`
split across ranks on the sequence (token) dim, `y_part` split on the feature (last) dim,
`y_partial` a partial sum. `w` is always the local `[K, N]` operand, `weight.t()` (a view).

                       forward                                  backward (dx ‖ dw)
    column             x_full @ w_shard_n → y_part               all-reduce(dx) ‖ wgrad
    column, SP         all_gather(x_shard) @ w_shard_n → y_part  reduce-scatter(dx) ‖ wgrad
    row                all_reduce(y_part @ w_shard_k) → y_full   none
    row, SP            reduce_scatter(y_part @ w_shard_k) → y_shard   all-gather(dy) ‖ dgrad, wgrad

Also here: the autograd "region" ops that move a tensor between layouts (split / gather on
the sequence dim or the feature dim), which `parallelize` and the blocks use around the
linears, and `column_parallel_group`, which runs several column-parallel linears that read
the same input as one fused GEMM (q/k/v, gate/up): one gather in forward, one reduction in
backward, like Megatron's fused QKV weight but over separately stored parameters.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from .. import overlap
from . import traced
from ..comm import Communicator, check_group, get_communicator
from ..kernels import matmul, resolve_kernel
from .norm import all_reduce_grads
from .sharding import ParamShard, local_param, local_tensor, register_state_dict_hooks, tp_parameter, version_of

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

_COMMS = ("torch", "cupy")
_KERNELS = ("auto", "triton", "torch")


# --------------------------------------------------------------------------------------------
# Configuration shared by the linears
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearSpec:
    """How a parallel linear runs: its group, layout and the knobs passed through to overlap."""

    group: dist.ProcessGroup
    sequence_parallel: bool = False
    sequence_dim: int = -2
    chunks: int | None = None
    kernel: str = "auto"
    comm: str = "torch"
    save_gathered_input: bool = True
    fp8: Any = None  # a Float8Recipe: its column_parallel / row_parallel run the GEMMs in fp8 (layers/fp8.py)
    # row-parallel: leave the output a per-rank partial sum, reduced by the enclosing block
    # together with other partial sums (block_reduction.py); never with sequence_parallel
    partial_output: bool = False

    # Resolved once per spec and kept in the instance dict (not fields: equality and
    # dataclasses.replace ignore them), so a forward does not re-validate the group.
    def communicator(self) -> Communicator:
        found = self.__dict__.get("_communicator")
        if found is None:
            found = self.__dict__["_communicator"] = get_communicator(self.group, self.comm)
        return found

    def knobs(self) -> dict[str, Any]:
        """The overlap schedules' keyword arguments (the group as its communicator); shared, not to be mutated."""
        found = self.__dict__.get("_knobs")
        if found is None:
            found = self.__dict__["_knobs"] = {"group": self.communicator(), "chunks": self.chunks,
                                               "kernel": self.kernel, "comm": self.comm}
        return found

    def unsplit(self) -> LinearSpec:
        """This spec without sequence parallelism (made once)."""
        found = self.__dict__.get("_unsplit")
        if found is None:
            found = self.__dict__["_unsplit"] = dataclasses.replace(self, sequence_parallel=False)
        return found


class SequenceRegion:
    """The state of one sequence-parallel region (parallelize's decoder layers) for the
    forward running through it: `split` is False when the sequence length does not divide
    by the world size (a decode step of one token, an odd prefill), and the region then runs
    unsplit: its layers take their non-sequence-parallel path (replicated activations,
    all-reduce) and its norms' gradients need no all-reduce (every rank saw every token)."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.split = True
        self.length = 0  # the whole sequence's length in this forward
        self.pending: set[bool] = set()  # modes of grad-recording forwards not yet backpropagated


def effective_spec(layer: nn.Module) -> LinearSpec:
    """The layer's spec for this forward: without sequence parallelism while its region
    runs unsplit."""
    spec: LinearSpec = layer.spec
    region: SequenceRegion | None = getattr(layer, "_fusedpar_region", None)
    if spec.sequence_parallel and region is not None and not region.split:
        return spec.unsplit()
    return spec


def _make_spec(
    group: Any, *, sequence_parallel: bool, sequence_dim: int, chunks: int | None, kernel: str, comm: str,
    save_gathered_input: bool, where: str,
) -> LinearSpec:
    group = check_group(group, arg=f"{where}: group")
    if chunks is not None and (not isinstance(chunks, int) or isinstance(chunks, bool) or chunks < 1):
        raise ValueError(f"{where}: chunks: expected None or an int >= 1, got {chunks!r}")
    if kernel not in _KERNELS:
        raise ValueError(f"{where}: kernel: expected one of {_KERNELS}, got {kernel!r}")
    if comm not in _COMMS:
        raise ValueError(f"{where}: comm: expected one of {_COMMS}, got {comm!r}")
    if sequence_dim >= 0 or sequence_dim == -1:
        raise ValueError(
            f"{where}: sequence_dim: expected a negative dim other than -1 (counted from the "
            f"feature dim, e.g. -2 for [tokens, H] and [batch, seq, H]), got {sequence_dim}"
        )
    return LinearSpec(group, bool(sequence_parallel), sequence_dim, chunks, kernel, comm, bool(save_gathered_input))


def _wgrad(x: Tensor, dy: Tensor, w: Tensor, kernel: str) -> Tensor:
    """`x_rows.T @ dy_rows` as `[K, N]` whose `.t()` is contiguous (the nn.Linear weight layout)."""
    dw = w.new_empty(w.shape[1], w.shape[0]).t()
    matmul(x.reshape(-1, x.shape[-1]).t(), dy.reshape(-1, dy.shape[-1]), out=dw, kernel=kernel)
    return dw


def _sum_rows(dy: Tensor) -> Tensor:
    return dy.reshape(-1, dy.shape[-1]).sum(0)


def _all_gather_dim(x: Tensor, comm: Communicator, dim: int) -> Tensor:
    """`torch.cat([x of every rank], dim)` through the communicator (flat buffer, one gather)."""
    world = comm.world_size
    dim = dim % x.ndim
    moved = x.movedim(dim, 0).contiguous()
    out = moved.new_empty(world * moved.numel())
    comm.all_gather(out, moved.view(-1)).wait()
    full = out.view(world * moved.shape[0], *moved.shape[1:])
    return full.movedim(0, dim).contiguous() if dim else full


def _check_divisible(x: Tensor, dim: int, world: int, *, what: str) -> None:
    if x.shape[dim] % world:
        raise ValueError(
            f"{what}: expected x.shape[{dim}] (of {list(x.shape)}) to be a multiple of the world "
            f"size {world}, got {x.shape[dim]}"
        )


# --------------------------------------------------------------------------------------------
# Regions: move a tensor between layouts, with the dual collective in backward
# --------------------------------------------------------------------------------------------


class _SplitFn(torch.autograd.Function):
    """`x_full → x_shard = x_full.chunk(world, dim)[rank]`.

    forward   x_full [.., M, ..] → x_shard [.., M/world, ..]   no comm (local slice)
    dgrad     dx_full = all_gather(dx_shard, dim)               all-gather
    wgrad     —
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, spec: LinearSpec, dim: int) -> Tensor:
        comm = spec.communicator()
        ctx.spec, ctx.dim = spec, dim
        return x.chunk(comm.world_size, dim)[comm.rank].contiguous()

    @staticmethod
    def backward(ctx: Any, dx_shard: Tensor) -> tuple[Tensor, None, None]:
        return _all_gather_dim(dx_shard, ctx.spec.communicator(), ctx.dim), None, None


class _GatherFn(torch.autograd.Function):
    """`x_shard → x_full = all_gather(x_shard, dim)`, whose consumers are replicated.

    forward   x_shard [.., m, ..] → x_full [.., world*m, ..]   all-gather
    dgrad     dx_shard = dx_full.chunk(world, dim)[rank]        no comm (dx_full is the same on every rank)
    wgrad     —
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, spec: LinearSpec, dim: int) -> Tensor:
        ctx.spec, ctx.dim = spec, dim
        return _all_gather_dim(x, spec.communicator(), dim)

    @staticmethod
    def backward(ctx: Any, dx_full: Tensor) -> tuple[Tensor, None, None]:
        comm = ctx.spec.communicator()
        return dx_full.chunk(comm.world_size, ctx.dim)[comm.rank].contiguous(), None, None


def split_to_shard(x: Tensor, *, group: Any, dim: int = -2, comm: str = "torch") -> Tensor:
    """This rank's `x.chunk(world, dim)` piece (backward all-gathers). `dim` must divide evenly."""
    if torch.compiler.is_compiling():  # the traceable path (traced.py)
        group = check_group(group)
        _check_divisible(x, dim, dist.get_world_size(group), what="split_to_shard")
        return traced.split(x, dim, group)
    spec = LinearSpec(check_group(group), comm=comm)
    _check_divisible(x, dim, spec.communicator().world_size, what="split_to_shard")
    return _SplitFn.apply(x, spec, dim)


class _ReduceScatterFn(torch.autograd.Function):
    """`x_partial → x_shard = reduce_scatter(x_partial, dim)`: the sum over ranks, this rank's piece.

    forward   x_partial [.., M, ..] → x_shard [.., M/world, ..]   reduce-scatter
    dgrad     dx_partial = all_gather(dx_shard, dim)              all-gather
    wgrad     —
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, spec: LinearSpec, dim: int) -> Tensor:
        comm = spec.communicator()
        ctx.spec, ctx.dim = spec, dim
        rows = x.movedim(dim, 0).contiguous()
        out = rows.new_empty(rows.shape[0] // comm.world_size, *rows.shape[1:])
        comm.reduce_scatter(out, rows).wait()
        return out.movedim(0, dim).contiguous()

    @staticmethod
    def backward(ctx: Any, dx_shard: Tensor) -> tuple[Tensor, None, None]:
        return _all_gather_dim(dx_shard.contiguous(), ctx.spec.communicator(), ctx.dim), None, None


def reduce_scatter_to_shard(x: Tensor, *, group: Any, dim: int = -2, comm: str = "torch") -> Tensor:
    """This rank's `dim`-piece of the sum over ranks of the partial sums `x` (backward
    all-gathers). `dim` must divide evenly."""
    if torch.compiler.is_compiling():
        group = check_group(group)
        _check_divisible(x, dim, dist.get_world_size(group), what="reduce_scatter_to_shard")
        return traced.reduce_scatter_to_shard(x, dim, group)
    spec = LinearSpec(check_group(group), comm=comm)
    _check_divisible(x, dim, spec.communicator().world_size, what="reduce_scatter_to_shard")
    return _ReduceScatterFn.apply(x, spec, dim)


def gather_from_shard(x_shard: Tensor, *, group: Any, dim: int = -2, comm: str = "torch") -> Tensor:
    """`all_gather(x_shard, dim)` for replicated consumers (backward keeps this rank's piece)."""
    if torch.compiler.is_compiling():
        return traced.gather(x_shard, dim, check_group(group))
    return _GatherFn.apply(x_shard, LinearSpec(check_group(group), comm=comm), dim)


# --------------------------------------------------------------------------------------------
# The autograd Functions
# --------------------------------------------------------------------------------------------


def _autocast_operands(x: Tensor, w: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """Under `torch.autocast`, the GEMM runs in the autocast dtype, as `nn.Linear`'s would:
    the input, the (e.g. fp32 master) weight and the bias are cast here, and the casts'
    backward returns the gradients in each parameter's own dtype."""
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return x, w, b
    dtype = torch.get_autocast_dtype(device_type)
    return x.to(dtype), w.to(dtype), b.to(dtype) if b is not None else None


def _autocast_off(method: Any) -> Any:
    """Run an autograd Function's forward/backward with autocast off: its operands already
    have one dtype (`_autocast_operands`), and the kernels write into preallocated outputs,
    which autocast would refuse or re-cast."""

    @functools.wraps(method)
    def run(ctx: Any, x: Tensor, *args: Any) -> Any:
        device_type = x.device.type
        if not torch.is_autocast_enabled(device_type):  # the usual case: no context to enter
            return method(ctx, x, *args)
        with torch.autocast(device_type, enabled=False):
            return method(ctx, x, *args)

    return run



def _column_apply(x: Tensor, weights: list[Tensor], b: Tensor | None, spec: LinearSpec, holder: list | None) -> Tensor:
    """The column-parallel product of ``x`` and the weights ``[N_i, K]`` (concatenated on N):
    in fp8 when the spec has a recipe (layers/fp8.py), else ``_ColumnParallelFn``."""
    if spec.fp8 is not None:  # the recipe runs it: fp8.py builds on this module, not the reverse
        return spec.fp8.column_parallel(x, weights, b, spec, holder)
    w = weights[0] if len(weights) == 1 else torch.cat(weights, 0)
    if torch.compiler.is_compiling():  # the traceable path: functional collectives, the compiler's GEMM (traced.py)
        y, x_full = traced.column_parallel(x, w, b, group=spec.group, sequence_parallel=spec.sequence_parallel,
                                           dim=spec.sequence_dim)
        if holder is not None:
            holder.append(x_full)
        return y
    return _ColumnParallelFn.apply(*_autocast_operands(x, w.t(), b), spec, holder)


def _row_apply(x: Tensor, weight: Tensor, b: Tensor | None, spec: LinearSpec) -> Tensor:
    """The row-parallel product, in fp8 when the spec has a recipe, else ``_RowParallelFn``."""
    if spec.fp8 is not None:
        return spec.fp8.row_parallel(x, weight, b, spec)
    if torch.compiler.is_compiling():
        return traced.row_parallel(x, weight, b, group=spec.group, sequence_parallel=spec.sequence_parallel,
                                   dim=spec.sequence_dim, partial_output=spec.partial_output)
    return _RowParallelFn.apply(*_autocast_operands(x, weight.t(), b), spec)


class _ColumnParallelFn(torch.autograd.Function):
    """Column-parallel `y_part = x @ w_shard_n + b_shard_n` (w `[K, N/world]`).

    sequence_parallel=False (x_full `[.., M, K]` replicated):
        forward   y_part [.., M, N/world] = x_full @ w_shard_n          no comm
        dgrad     dx_full = all_reduce(dy_part @ w_shard_n.T)           matmul_all_reduce, chunked
        wgrad     dw_shard_n [K, N/world] = x_full.T @ dy_part          overlapped with the dgrad all-reduce
    sequence_parallel=True (x_shard `[.., M/world, K]` split on the sequence dim):
        forward   y_part [.., M, N/world] = all_gather(x_shard) @ w     all_gather_matmul (ring)
        dgrad     dx_shard = reduce_scatter(dy_part @ w_shard_n.T)      matmul_reduce_scatter, chunked
        wgrad     dw_shard_n = x_full.T @ dy_part                       x_full kept from forward or re-gathered
    """

    @staticmethod
    @_autocast_off
    def forward(ctx: Any, x: Tensor, w: Tensor, bias: Tensor | None, spec: LinearSpec, holder: list | None) -> Tensor:
        ctx.spec = spec
        if spec.sequence_parallel:
            y, x_full = overlap.all_gather_matmul(
                x, w, dim=spec.sequence_dim, bias=bias, return_gathered=True, **spec.knobs()
            )
            keep = x_full if spec.save_gathered_input else x
        else:
            y = matmul(x, w, bias=bias, kernel=spec.kernel)
            x_full = keep = x
        if holder is not None:
            holder.append(x_full)
        ctx.save_for_backward(keep, w)
        return y

    @staticmethod
    @_autocast_off
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x_kept, w = ctx.saved_tensors
        spec: LinearSpec = ctx.spec
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        dx = dw = None
        if spec.sequence_parallel:
            if need_dx:
                dx, dw = overlap.matmul_reduce_scatter_with_wgrad(
                    dy, w, x_kept, x_is_gathered=spec.save_gathered_input, dim=spec.sequence_dim,
                    need_wgrad=need_dw, **spec.knobs()
                )
            elif need_dw:
                x_full = x_kept if spec.save_gathered_input else _all_gather_dim(x_kept, spec.communicator(), spec.sequence_dim)
                dw = _wgrad(x_full, dy, w, spec.kernel)
        elif need_dx:
            dx, dw = overlap.matmul_all_reduce_with_wgrad(dy, w, x_kept, need_wgrad=need_dw, **spec.knobs())
        elif need_dw:
            dw = _wgrad(x_kept, dy, w, spec.kernel)
        db = _sum_rows(dy) if need_db else None
        return dx, dw if need_dw else None, db, None, None


class _RowParallelFn(torch.autograd.Function):
    """Row-parallel `y = sum_ranks(x_part @ w_shard_k) + b` (w `[K/world, N]`, b replicated).

    sequence_parallel=False (x_part `[.., M, K/world]`):
        forward   y_full [.., M, N] = all_reduce(x_part @ w_shard_k) + b        matmul_all_reduce, chunked
        dgrad     dx_part = dy_full @ w_shard_k.T                               no comm
        wgrad     dw_shard_k [K/world, N] = x_part.T @ dy_full; db = Σ dy_full  no comm
    sequence_parallel=True:
        forward   y_shard [.., M/world, N] = reduce_scatter(x_part @ w) + b     matmul_reduce_scatter, chunked
        dgrad     dx_part = all_gather(dy_shard) @ w_shard_k.T                  all_gather_matmul_with_wgrad (ring)
        wgrad     dw_shard_k = x_part.T @ all_gather(dy_shard); db = all_reduce(Σ dy_shard)
    """

    @staticmethod
    @_autocast_off
    def forward(ctx: Any, x: Tensor, w: Tensor, bias: Tensor | None, spec: LinearSpec) -> Tensor:
        ctx.spec = spec
        ctx.save_for_backward(x, w)
        if spec.partial_output:  # the block reduces it; backward is the non-SP one (no comm)
            return matmul(x, w, out=x.new_empty(*x.shape[:-1], w.shape[1]), kernel=spec.kernel)
        # the output is allocated here, not a view of a schedule buffer: autograd forbids in-place
        # ops on a view made inside a Function, and models add into it (Llama 4: `out.add_(...)`)
        if spec.sequence_parallel:
            shape = list(x.shape[:-1]) + [w.shape[1]]
            shape[spec.sequence_dim] //= spec.communicator().world_size
            return overlap.matmul_reduce_scatter(x, w, dim=spec.sequence_dim, bias=bias, out=x.new_empty(shape),
                                                 **spec.knobs())
        return overlap.matmul_all_reduce(x, w, bias=bias, out=x.new_empty(*x.shape[:-1], w.shape[1]), **spec.knobs())

    @staticmethod
    @_autocast_off
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, w = ctx.saved_tensors
        spec: LinearSpec = ctx.spec
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        dx = dw = db = None
        if spec.sequence_parallel:
            if need_dx or need_dw:
                dx, dw = overlap.all_gather_matmul_with_wgrad(dy, w, x, dim=spec.sequence_dim, need_wgrad=need_dw,
                                                              **spec.knobs())
            if need_db:
                db = _sum_rows(dy).contiguous()
                spec.communicator().all_reduce(db).wait()
        else:
            if need_dx:
                dx = matmul(dy, w.t(), kernel=spec.kernel)
            if need_dw:
                dw = _wgrad(x, dy, w, spec.kernel)
            if need_db:
                db = _sum_rows(dy)
        return (dx if need_dx else None), (dw if need_dw else None), db, None


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


def stash_precomputed(layer: nn.Module, x_full: Tensor, y: Tensor) -> None:
    """Leave `y`, computed for `x_full` by a fused group (`column_parallel_group`, via
    `parallelize`), for the layer's next forward to return."""
    if torch.compiler.is_compiling():  # attribute ops torch 2.11's dynamo traces (not __dict__'s)
        setattr(layer, "_fusedpar_precomputed", (x_full, y))
    else:  # per forward: the instance dict, not nn.Module.__setattr__
        layer.__dict__["_fusedpar_precomputed"] = (x_full, y)


def pop_precomputed(layer: nn.Module) -> tuple[Tensor, Tensor] | None:
    """Take what `stash_precomputed` left on `layer` (None: nothing, or already taken)."""
    if torch.compiler.is_compiling():
        stash = getattr(layer, "_fusedpar_precomputed", None)
        if stash is not None:
            setattr(layer, "_fusedpar_precomputed", None)
        return stash
    return layer.__dict__.pop("_fusedpar_precomputed", None)


def _take_precomputed(layer: nn.Module, x: Tensor) -> Tensor | None:
    """The output a fused group already computed for `x` (`stash_precomputed`)."""
    stash = pop_precomputed(layer)
    return stash[1] if stash is not None and stash[0] is x else None


def _keep_frozen(layer: nn.Module, linear: nn.Linear) -> None:
    """Carry each parameter's `requires_grad` over from the linear being sharded, so a model
    frozen before `parallelize` (fine-tuning only some layers) stays frozen after it."""
    for name, param in linear.named_parameters(recurse=False):
        getattr(layer, name).requires_grad_(param.requires_grad)


class _ParallelLinearBase(nn.Module):
    in_features: int
    out_features: int
    spec: LinearSpec

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
        _, world = _rank_world(self.spec)
        if out_features % world:
            raise ValueError(
                f"{_name}: out_features: expected a multiple of the world size {world} "
                f"(the output features are split across ranks), got {out_features}"
            )
        self.in_features, self.out_features = in_features, out_features
        self.gather_output = gather_output
        kw = {"dtype": dtype, "device": device}
        group = self.spec.group
        self.weight = tp_parameter(_init_uniform(torch.empty(out_features // world, in_features, **kw), in_features),
                                   ParamShard(0), group=group)
        self.bias = tp_parameter(_init_uniform(torch.empty(out_features // world, **kw), in_features), ParamShard(0),
                                 group=group) if bias else None
        register_state_dict_hooks(self)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, group: dist.ProcessGroup, name: str = "linear", **kwargs: Any) -> ColumnParallelLinear:
        """Shard an existing `nn.Linear` (pretrained weights survive); `name` appears in errors."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{name}: expected an nn.Linear to shard column-wise, got {type(linear).__name__}")
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, group=group, bias=linear.bias is not None,
                    dtype=w.dtype, device=w.device, _name=name, **kwargs)
        rank, world = _rank_world(layer.spec)
        with torch.no_grad():
            local_tensor(layer.weight).copy_(local_tensor(w).chunk(world, 0)[rank])
            if linear.bias is not None:
                local_tensor(layer.bias).copy_(local_tensor(linear.bias).chunk(world, 0)[rank])
        _keep_frozen(layer, linear)
        return layer

    def column_operands(self) -> tuple[Tensor, Tensor | None]:
        """The local `(weight [N/world, K], bias [N/world] | None)` this layer multiplies by
        (plain tensors whose gradients reach the DTensor parameters)."""
        return local_param(self.weight), local_param(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        precomputed = _take_precomputed(self, x)
        if precomputed is not None:
            return precomputed
        spec = effective_spec(self)
        w, b = self.column_operands()
        y = _column_apply(x, [w], b, spec, None)
        if self.gather_output:
            y = traced.gather(y, -1, spec.group) if torch.compiler.is_compiling() else _GatherFn.apply(y, spec, -1)
        return y

    def full_state_dict(self) -> dict[str, Tensor]:
        """The unsharded `{"weight", "bias"}` (a collective: every rank of the group must call it)."""
        comm = self.spec.communicator()
        out = {"weight": _all_gather_dim(local_tensor(self.weight).detach(), comm, 0)}
        if self.bias is not None:
            out["bias"] = _all_gather_dim(local_tensor(self.bias).detach(), comm, 0)
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features} "
                f"(local {local_tensor(self.weight).shape[0]}), bias={self.bias is not None}, gather_output={self.gather_output}, "
                f"save_gathered_input={self.spec.save_gathered_input}, " + self._knobs_repr())


class ReplicatedColumnLinear(_ParallelLinearBase):
    """A column-parallel linear with fewer output blocks (`parts`) than ranks.

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
        sequence_parallel: bool = False,
        sequence_dim: int = -2,
        chunks: int | None = None,
        kernel: str = "auto",
        comm: str = "torch",
        save_gathered_input: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        _name: str = "ReplicatedColumnLinear",
    ) -> None:
        super().__init__()
        self.spec = _make_spec(group, sequence_parallel=sequence_parallel, sequence_dim=sequence_dim, chunks=chunks,
                               kernel=kernel, comm=comm, save_gathered_input=save_gathered_input, where=_name)
        rank, world = _rank_world(self.spec)
        if parts < 1 or world % parts or out_features % parts:
            raise ValueError(
                f"{_name}: parts: expected a divisor of both the world size {world} and "
                f"out_features {out_features}, got {parts}"
            )
        self.in_features, self.out_features, self.parts = in_features, out_features, parts
        self.block = rank // (world // parts)
        self.gather_output = False
        kw = {"dtype": dtype, "device": device}
        group = self.spec.group
        self.weight = tp_parameter(_init_uniform(torch.empty(out_features, in_features, **kw), in_features), None,
                                   group=group)
        self.bias = tp_parameter(_init_uniform(torch.empty(out_features, **kw), in_features), None,
                                 group=group) if bias else None
        register_state_dict_hooks(self)
        all_reduce_grads(self, group=self.spec.group, comm=self.spec.comm)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, group: dist.ProcessGroup, parts: int, name: str = "linear",
                    **kwargs: Any) -> ReplicatedColumnLinear:
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{name}: expected an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, group=group, parts=parts,
                    bias=linear.bias is not None, dtype=w.dtype, device=w.device, _name=name, **kwargs)
        with torch.no_grad():
            local_tensor(layer.weight).copy_(local_tensor(w))
            if linear.bias is not None:
                local_tensor(layer.bias).copy_(local_tensor(linear.bias))
        _keep_frozen(layer, linear)
        return layer

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

    def full_state_dict(self) -> dict[str, Tensor]:
        out = {"weight": local_tensor(self.weight).detach().clone()}
        if self.bias is not None:
            out["bias"] = local_tensor(self.bias).detach().clone()
        return out

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
        _, world = _rank_world(self.spec)
        if in_features % world:
            raise ValueError(
                f"{_name}: in_features: expected a multiple of the world size {world} "
                f"(the input features are split across ranks), got {in_features}"
            )
        self.in_features, self.out_features = in_features, out_features
        self.input_is_parallel = input_is_parallel
        kw = {"dtype": dtype, "device": device}
        group = self.spec.group
        self.weight = tp_parameter(_init_uniform(torch.empty(out_features, in_features // world, **kw), in_features),
                                   ParamShard(1), group=group)
        self.bias = tp_parameter(_init_uniform(torch.empty(out_features, **kw), in_features), None,
                                 group=group) if bias else None
        register_state_dict_hooks(self)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, group: dist.ProcessGroup, name: str = "linear", **kwargs: Any) -> RowParallelLinear:
        """Shard an existing `nn.Linear` (pretrained weights survive); `name` appears in errors."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{name}: expected an nn.Linear to shard row-wise, got {type(linear).__name__}")
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, group=group, bias=linear.bias is not None,
                    dtype=w.dtype, device=w.device, _name=name, **kwargs)
        rank, world = _rank_world(layer.spec)
        with torch.no_grad():
            local_tensor(layer.weight).copy_(local_tensor(w).chunk(world, 1)[rank])
            if linear.bias is not None:
                local_tensor(layer.bias).copy_(local_tensor(linear.bias))
        _keep_frozen(layer, linear)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        spec = effective_spec(self)
        if not self.input_is_parallel:
            _check_divisible(x, -1, _rank_world(spec)[1], what="RowParallelLinear (input_is_parallel=False)")
            x = traced.split(x, -1, spec.group) if torch.compiler.is_compiling() else _SplitFn.apply(x, spec, -1)
        if spec.sequence_parallel:
            _check_divisible(x, spec.sequence_dim, _rank_world(spec)[1],
                             what="RowParallelLinear (sequence_parallel=True)")
        return _row_apply(x, local_param(self.weight), local_param(self.bias), spec)

    def full_state_dict(self) -> dict[str, Tensor]:
        """The unsharded `{"weight", "bias"}` (a collective: every rank of the group must call it)."""
        out = {"weight": _all_gather_dim(local_tensor(self.weight).detach(), self.spec.communicator(), 1)}
        if self.bias is not None:
            out["bias"] = local_tensor(self.bias).detach().clone()
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} (local {local_tensor(self.weight).shape[1]}), out_features={self.out_features}, "
                f"bias={self.bias is not None}, input_is_parallel={self.input_is_parallel}, " + self._knobs_repr())


# --------------------------------------------------------------------------------------------
# Several column-parallel linears on one input, as one GEMM
# --------------------------------------------------------------------------------------------


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
    operands = [layer.column_operands() for layer in layers]
    sizes = [w.shape[0] for w, _ in operands]
    holder: list[Tensor] = []
    if spec.fp8 is not None or torch.compiler.is_compiling():  # fp8 quantizes per part; a compiled graph fuses the cat
        if all(b is None for _, b in operands):
            b = None
        else:
            b = torch.cat([bi if bi is not None else wi.new_zeros(wi.shape[0]) for wi, bi in operands], 0)
        y = _column_apply(x, [w for w, _ in operands], b, spec, holder)
    else:
        w, b = _fused_operands(layers, operands)
        y = _ColumnParallelFn.apply(*_autocast_operands(x, w.t(), b), spec, holder)
    x_full = holder[0] if spec.sequence_parallel else x
    outs = list(y.split(sizes, -1)) if len(sizes) > 1 else [y]
    return outs, (x_full.detach() if spec.sequence_parallel else x_full)


class _FusedParts(torch.autograd.Function):
    """`parts → fused`, where `fused` is the parts' concatenation on dim 0, already made (cached).

    forward   fused [sum N_i, ..] returned as an alias             no copy, nothing saved
    backward  d part_i = d fused[N_0+..+N_{i-1} : ..+N_i]            views, no copy
    """

    @staticmethod
    def forward(ctx: Any, fused: Tensor, bounds: tuple[tuple[int, int], ...],  # type: ignore[override]
                *parts: Tensor) -> Tensor:
        ctx.bounds = bounds
        return fused.view_as(fused)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        return (None, None, *(grad[a:b] for a, b in ctx.bounds))


def _source(p: Tensor | None) -> Tensor | None:
    """The tensor whose version says whether `p`'s values changed (a DTensor's local tensor)."""
    return p._local_tensor if isinstance(p, DTensor) else p


def _linked(fused: Tensor, sizes: list[int], parts: list[Tensor | None]) -> Tensor:
    """`fused` linked by autograd to the parts (of `sizes` rows) that need a gradient, each
    getting its slice; `fused` itself without grad mode or when none does."""
    if not torch.is_grad_enabled():
        return fused
    bounds, grads, start = [], [], 0
    for n, part in zip(sizes, parts):
        if part is not None and part.requires_grad:
            bounds.append((start, start + n))
            grads.append(part)
        start += n
    return _FusedParts.apply(fused, tuple(bounds), *grads) if grads else fused


def _fused_operands(layers: Sequence[nn.Module], operands: list[tuple[Tensor, Tensor | None]]
                    ) -> tuple[Tensor, Tensor | None]:
    """The group's weights `[sum N_i, K]` and biases concatenated (zeros for a layer without
    one), made once per version of the layers' parameters and kept on the first layer: an
    in-place write (an optimizer step, `load_state_dict`, `copy_` under no_grad; also
    through a DTensor parameter, `version_of`) or a replaced parameter makes a new one.
    Writes the version counter does not see (under `torch.inference_mode`, or through
    `.data`) are not noticed.
    The kept tensors cost one copy of the group's local weights, where a forward used to
    allocate (and, training, save for backward) one per call."""
    sources = tuple(_source(getattr(layer, name)) for layer in layers for name in ("weight", "bias"))
    # the version and the memory of each: a storage refilled elsewhere (FSDP2's unsharded
    # parameters are freed and re-gathered around each forward) moves at least one of them
    versions = tuple(None if t is None else (version_of(t), t.data_ptr()) for t in sources)
    cache = layers[0].__dict__.setdefault("_fusedpar_fused", {})
    key = tuple(id(layer) for layer in layers)
    entry = cache.get(key)
    if (entry is None or entry[1] != versions or any(a is not b for a, b in zip(entry[0], sources))
            or (entry[2].is_inference() and not torch.is_inference_mode_enabled())):  # autograd refuses those
        with torch.no_grad():
            w = torch.cat([wi.detach() for wi, _ in operands], 0)
            b = None if all(bi is None for _, bi in operands) else torch.cat(
                [bi.detach() if bi is not None else wi.new_zeros(wi.shape[0]) for wi, bi in operands], 0)
        entry = cache[key] = (sources, versions, w, b)  # the sources are held: their ids cannot be reused
    sizes = [wi.shape[0] for wi, _ in operands]
    w, b = entry[2], entry[3]
    b_linked = None if b is None else _linked(b, sizes, [bi for _, bi in operands])
    return _linked(w, sizes, [wi for wi, _ in operands]), b_linked
