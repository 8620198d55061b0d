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
"""
from __future__ import annotations

from dataclasses import dataclass
import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..comm import Communicator, check_group, get_communicator

__all__ = ["ParamShard", "shard_parameter", "param_shards", "local_shard", "gather_shard"]


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
        local = shard.local(param.detach(), rank, world)
    module._parameters[name] = nn.Parameter(local, requires_grad=param.requires_grad)
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

