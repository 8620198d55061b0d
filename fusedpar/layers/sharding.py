"""Parameters sharded in place: bare `nn.Parameter`s a plan names (MoE experts' 3-D weights,
attention sinks, per-head gate biases), and the layout of every sharded parameter.

A `ParamShard(dim, parts)` says how the unsharded tensor maps to this rank's piece: `dim` is
cut into `parts` packed blocks (`[gate; up]` is 2 parts, `[q; k; v]` 3), and each block is
split evenly across the ranks, so rank r holds `[block_0[r]; block_1[r]; ...]` along `dim`:

    parts=1   full.chunk(world, dim)[rank]                              (colwise / rowwise)
    parts=2   cat([b.chunk(world, dim)[rank] for b in full.chunk(2, dim)], dim)   (packed)

`shard_parameter` replaces a module's parameter by its local piece and records the layout on
the module, so `full_state_dict` can gather it back and tests can slice a reference to
compare with (`local_shard`).

How torch sees a sharded parameter: as a DTensor (`tp_parameter`). Every parameter of a
parallelized model is an `nn.Parameter` wrapping a DTensor on the TP mesh, so DCP,
`get_state_dict`, `clip_grad_norm_`, the optimizers and FSDP2 know each rank holds a piece:

    replicated            Replicate()                  global shape = local shape
    ParamShard(dim)       Shard(dim)                   global = local with dim x world
    ParamShard(dim, P)    Shard(dim + 1) of the global tensor with `dim` unflattened to
                          (P, size / P): rank r's [block_0[r]; block_1[r]] is then one
                          contiguous box [:, r*m:(r+1)*m] of a [P, size/P] view

The packed case is why the unflattened shape: the two (or three) pieces a rank holds are
not one contiguous box of the packed `[gate; up]`, and torch's `_StridedShard` that
describes them is refused by DCP ("overlapping chunks", torch 2.13). In the unflattened
view they are one box, so optimizer state saved at one world size loads exactly at another.
The model's state dict still shows the packed tensor in its own shape (state-dict hooks
gather it, `packed_state_dict_hooks`), so a checkpoint loads into a plain model.

The compute path never dispatches through DTensor: kernels read `local_tensor(p)`, and modules read
`local_param(p)` in forward (local_views.py: the local tensor, or a gradient leaf aliasing it
whose gradient a hook hands on to the DTensor `.grad`).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from ..comm import Communicator, check_group, device_mesh, get_communicator
from .local_views import install_local_views, local_param, local_tensor, param_of

__all__ = ["ParamShard", "shard_parameter", "param_shards", "local_shard", "gather_shard", "tp_parameter",
           "local_tensor", "local_param", "install_local_views", "replicate_parameters", "is_dtensor",
           "register_state_dict_hooks", "param_of", "tracked_version"]


@dataclass(frozen=True)
class ParamShard:
    """`dim` split across ranks, per packed block (`parts` blocks along `dim`)."""

    dim: int
    parts: int = 1

    def check(self, shape: tuple[int, ...] | torch.Size, world: int, *, where: str) -> None:
        """Raise (no comm) unless `dim` divides into `parts` blocks of `world` pieces."""
        if not -len(shape) <= self.dim < len(shape):
            raise ValueError(f"{where}: expected a tensor with a dim {self.dim}, got shape {list(shape)}")
        size = shape[self.dim]
        if size % (self.parts * world):
            what = f"{self.parts} packed parts x " if self.parts > 1 else ""
            raise ValueError(f"{where}: dim {self.dim} of shape {list(shape)}: expected a multiple of "
                             f"{what}the world size {world} = {self.parts * world}, got {size}")

    def local(self, full: Tensor, rank: int, world: int) -> Tensor:
        """This rank's piece of the unsharded `full` (a copy)."""
        blocks = full.chunk(self.parts, self.dim)
        return torch.cat([b.chunk(world, self.dim)[rank] for b in blocks], self.dim).contiguous()

    def gather(self, local: Tensor, comm: Communicator) -> Tensor:
        """The unsharded tensor from every rank's piece (a collective)."""
        world = comm.world_size
        local = local_tensor(local)  # a DTensor parameter's piece
        dim = self.dim % local.ndim
        moved = local.detach().movedim(dim, 0).contiguous()
        flat = moved.new_empty(world * moved.numel())
        comm.all_gather(flat, moved.view(-1)).wait()
        pieces = flat.view(world, self.parts, moved.shape[0] // self.parts, *moved.shape[1:])
        full = pieces.transpose(0, 1).reshape(world * moved.shape[0], *moved.shape[1:])  # block-major
        return full.movedim(0, dim).contiguous()


def shard_parameter(module: nn.Module, name: str, shard: ParamShard, *, group: dist.ProcessGroup,
                    where: str = "shard_parameter") -> None:
    """Replace `module.<name>` by this rank's piece of it (`requires_grad` kept); record the layout."""
    group = check_group(group, arg=f"{where}: group")
    param = module._parameters.get(name)
    if param is None:
        raise ValueError(f"{where}: expected {type(module).__name__}.{name} to be a parameter, got none")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    shard.check(param.shape, world, where=where)
    with torch.no_grad():
        local = shard.local(local_tensor(param).detach(), rank, world)
    module._parameters[name] = tp_parameter(local, shard, group=group, requires_grad=param.requires_grad)
    register_state_dict_hooks(module)
    install_local_views(module)
    shards = module.__dict__.setdefault("_fusedpar_shards", {})
    shards[name] = (shard, group)
    # declared like the parallel linears' class attributes, which grad_norm and the checkpoint
    # loader and saver read: {name: split dim} (and {name: packed parts} where there are several)
    module.tp_shard_dims = {**getattr(module, "tp_shard_dims", {}), name: shard.dim % local.ndim}
    if shard.parts > 1:
        module.tp_shard_parts = {**getattr(module, "tp_shard_parts", {}), name: shard.parts}


def param_shards(module: nn.Module) -> dict[str, tuple[ParamShard, dist.ProcessGroup]]:
    """`{parameter name: (layout, group)}` recorded on `module` by `shard_parameter`."""
    return dict(module.__dict__.get("_fusedpar_shards", {}))


def gather_shard(module: nn.Module, name: str, comm: str = "torch") -> Tensor:
    """The unsharded value of a parameter sharded by `shard_parameter` (a collective)."""
    shard, group = module.__dict__["_fusedpar_shards"][name]
    return shard.gather(getattr(module, name), get_communicator(group, comm))


def _layout(module: nn.Module, leaf: str) -> tuple[ParamShard, dist.ProcessGroup] | None:
    """How `module.<leaf>` is sharded: recorded by `shard_parameter`, or declared by the
    module's class (`tp_shard_dims`, `tp_shard_parts`: the parallel linears); None: replicated."""
    recorded = param_shards(module).get(leaf)
    if recorded is not None:
        return recorded
    dim = getattr(module, "tp_shard_dims", {}).get(leaf)
    if dim is None:
        return None
    return ParamShard(dim, getattr(module, "tp_shard_parts", {}).get(leaf, 1)), module.spec.group


def local_shard(model: nn.Module, name: str, full: Tensor | None) -> Tensor | None:
    """The part of `full` (an unsharded value of parameter `name`, e.g. its gradient in a
    single-process twin) that this rank stores for it in the parallelized `model`."""
    if full is None:
        return None
    path, _, leaf = name.rpartition(".")
    found = _layout(model.get_submodule(path), leaf)
    if found is None:
        return full
    shard, group = found
    return shard.local(full, dist.get_rank(group), dist.get_world_size(group))



# --------------------------------------------------------------------------------------------
# Parameters as DTensors
# --------------------------------------------------------------------------------------------


def is_dtensor(t: Any) -> bool:
    return isinstance(t, DTensor)


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for n in reversed(shape):
        stride.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(stride))


def tp_parameter(local_value: Tensor, shard: ParamShard | None, *, group: dist.ProcessGroup,
                 requires_grad: bool = True) -> nn.Parameter:
    """An `nn.Parameter` wrapping a DTensor on `group`'s mesh whose local tensor is
    `local_value` (this rank's piece, in the layout the kernels use; no copy) and whose
    placement says which piece: `shard` None is Replicate(); see the module docstring for
    packed parts. `local_tensor(p)` gives `local_value` back."""
    world = dist.get_world_size(group)
    mesh = device_mesh(group, "cuda" if local_value.is_cuda else "cpu")
    shape = list(local_value.shape)
    packed = None
    if shard is None:
        placement: Any = Replicate()
        dt_local, global_shape = local_value, shape
    else:
        dim = shard.dim % local_value.ndim
        if shard.parts > 1:
            packed = dim
            dt_local = local_value.unflatten(dim, (shard.parts, shape[dim] // shard.parts))
            global_shape = list(dt_local.shape)
            global_shape[dim + 1] *= world
            placement = Shard(dim + 1)
        else:
            dt_local, global_shape = local_value, shape
            global_shape[dim] *= world
            placement = Shard(dim)
    dt = DTensor.from_local(dt_local.detach(), mesh, [placement], run_check=False, shape=torch.Size(global_shape),
                            stride=_contiguous_stride(tuple(global_shape)))
    param = nn.Parameter(dt, requires_grad=requires_grad)
    _OWNERS[id(param._local_tensor)] = weakref.ref(param)
    # local_tensor(p) flattens dims (packed, packed + 1) back; set also when None: a missing
    # attribute on a tensor costs a raised AttributeError on every lookup (hot path)
    param._fusedpar_packed = packed
    return param


# id(local tensor) -> the DTensor parameter holding it: in-place writes through the DTensor
# (`p.mul_(2)` under no_grad, an optimizer step) bump the DTensor's version, not the local's
_OWNERS: dict[int, weakref.ref] = {}


def tracked_version(t: Tensor) -> int | None:
    """A counter that moves with every in-place write to `t`, also through the DTensor
    parameter whose local tensor it is, where that counter sees every write: `t` is the local
    tensor of a DTensor parameter made by `tp_parameter`. None for any other tensor, whose writes may
    bypass its counter: FSDP2 refills its unsharded parameters after each all-gather under
    `torch.autograd._unsafe_preserve_version_counter`, often at the same address, so a cache
    keyed on their version and address would silently serve the weights of an earlier step."""
    owner = _OWNERS.get(id(t))
    p = owner() if owner is not None else None
    if p is None or p._local_tensor is not t:
        return None
    return t._version + p._version


def replicate_parameters(model: nn.Module, *, group: dist.ProcessGroup,
                         owned: tuple[type, ...] = ()) -> None:
    """Every plain parameter of `model` becomes a Replicate() DTensor on `group`'s mesh (a
    model is all DTensors or none to torch: `clip_grad_norm_` refuses a mix), and every
    module holding DTensor parameters whose forward is not one of `owned` (fusedpar's layers,
    which read `local_param` themselves) gets `install_local_views`. Ties survive: a
    parameter shared by several modules is converted once."""
    converted: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None or isinstance(p, DTensor):
                continue
            if id(p) not in converted:
                converted[id(p)] = tp_parameter(p.detach(), None, group=group, requires_grad=p.requires_grad)
            module._parameters[name] = converted[id(p)]
    def holds(m: nn.Module) -> bool:
        return any(isinstance(p, DTensor) for p in m._parameters.values())

    for module in model.modules():
        if holds(module):
            register_state_dict_hooks(module)
    # blocks (the entries of a ModuleList / ModuleDict: decoder layers, expert lists) show
    # their whole subtree; every other module holding parameters shows its own
    in_blocks: set[int] = set()  # modules whose block's hooks clean up after them (see install_local_views)
    for container in model.modules():
        if isinstance(container, (nn.ModuleList, nn.ModuleDict)):
            for block in container.children():
                inner = [m for m in block.modules() if holds(m) and not isinstance(m, owned)]
                if inner and not isinstance(block, owned):
                    install_local_views(block, subtree=inner)
                    in_blocks.update(id(m) for m in inner if m is not block)
    for module in model.modules():
        if holds(module) and not isinstance(module, owned):
            install_local_views(module, always_call=id(module) not in in_blocks)


def _placement_shard(p: DTensor) -> ParamShard | None:
    """The ParamShard a DTensor parameter made by `tp_parameter` stands for (None: replicated)."""
    placement = p.placements[0]
    if not isinstance(placement, Shard):
        return None
    packed = getattr(p, "_fusedpar_packed", None)
    if packed is not None:
        return ParamShard(packed, p.shape[packed])
    return ParamShard(placement.dim)


def _full_shape(p: DTensor) -> list[int]:
    """The unsharded tensor's shape in the model's own layout (packed parts flattened)."""
    shape = list(p.shape)
    packed = getattr(p, "_fusedpar_packed", None)
    if packed is not None:
        shape[packed:packed + 2] = [shape[packed] * shape[packed + 1]]
    return shape


def _state_dict_hook(module: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    # packed parameters are shown whole, in the model's own [gate; up] layout: one rank's
    # pieces are two boxes of it, which no DTensor placement DCP accepts can say (module docstring)
    for name, p in module._parameters.items():
        if isinstance(p, DTensor) and getattr(p, "_fusedpar_packed", None) is not None and prefix + name in state:
            group = p.device_mesh.get_group()
            state[prefix + name] = _placement_shard(p).gather(p, get_communicator(group))


def _load_pre_hook(module: nn.Module, state: dict[str, Any], prefix: str, *args: Any) -> None:
    # a plain (unsharded) tensor for a DTensor parameter: keep this rank's piece, as a DTensor
    # of the parameter's placement, so the default copy_ runs locally
    for name, p in module._parameters.items():
        key = prefix + name
        value = state.get(key)
        if not isinstance(p, DTensor) or value is None or isinstance(value, DTensor):
            continue
        full = _full_shape(p)
        if list(value.shape) != full:
            raise ValueError(f"load_state_dict: {key}: expected the unsharded tensor of shape {full} (this rank "
                             f"holds {list(local_tensor(p).shape)}), got {list(value.shape)}")
        shard = _placement_shard(p)
        group = p.device_mesh.get_group()
        piece = value if shard is None else shard.local(value, dist.get_rank(group), dist.get_world_size(group))
        if getattr(p, "_fusedpar_packed", None) is not None:
            piece = piece.reshape(p._local_tensor.shape)
        state[key] = DTensor(piece.to(device=p.device, dtype=p.dtype), p._spec, requires_grad=False)


def register_state_dict_hooks(module: nn.Module) -> None:
    """State-dict hooks for a module holding DTensor parameters (idempotent): `state_dict()`
    shows packed parameters whole (a collective), and `load_state_dict` takes unsharded
    plain tensors (each rank keeps its piece) as well as DTensors."""
    if module.__dict__.get("_fusedpar_state_hooks"):
        return
    module._register_state_dict_hook(_state_dict_hook)
    module._register_load_state_dict_pre_hook(_load_pre_hook, with_module=True)
    module.__dict__["_fusedpar_state_hooks"] = True
