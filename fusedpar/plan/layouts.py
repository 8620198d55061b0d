"""torch's layouts at the edges of fusedpar's modules: DTensor outputs and inputs, sequence
shards leaving an embedding.

fusedpar's layers compute on local tensors. A torch plan may still ask for DTensors
(`use_local_output=False`: the attention then views and attends on DTensors, as under
torch's own tensor parallelism) and may feed a DTensor to a parallel layer. These hooks
translate at the module boundary only, so the GEMMs and collectives inside stay fusedpar's:

    dtensor_output(module, layout)   the module's local output wrapped as a DTensor on the
                                     TP mesh: "shard(-1)" (column-parallel features),
                                     "replicate", "shard(1)" / "shard(0)" (a sequence shard)
    accept_dtensor_input(module, layout)   a DTensor input redistributed to `layout`
                                     ("shard(-1)": split features, "replicate", or a sequence
                                     shard) and handed over as its local tensor
    split_sequence_output(module, dim)    an embedding's replicated output cut to this
                                     rank's sequence shard (backward all-gathers): the entry
                                     of sequence parallelism when a plan says Shard(1) there
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch.distributed as dist
from torch import Tensor, nn

from ..comm import device_mesh
from ..layers.linear import split_to_shard
from .styles import LinearBuild

__all__ = ["dtensor_output", "accept_dtensor_input", "split_sequence_output", "placements"]


def placements(layout: str, ndim: int) -> tuple[Any, ...]:
    """DTensor placements of a "replicate" / "shard(d)" layout for a tensor of `ndim` dims."""
    from torch.distributed.tensor import Replicate, Shard

    if layout == "replicate":
        return (Replicate(),)
    dim = int(layout[len("shard("):-1])
    return (Shard(dim % ndim),)


def _mesh(module: nn.Module, group: dist.ProcessGroup) -> Any:
    p = next(module.parameters(), None)
    return device_mesh(group, p.device.type if p is not None else "cpu")


def dtensor_output(module: nn.Module, layout: str, *, group: dist.ProcessGroup) -> None:
    """Return `module`'s output as a DTensor with placement `layout` over `group`'s mesh
    (the local tensor is the piece this rank holds; no communication)."""
    from torch.distributed.tensor import DTensor

    def hook(mod: nn.Module, args: tuple, y: Any) -> Any:
        if not isinstance(y, Tensor) or isinstance(y, DTensor):
            return y
        return DTensor.from_local(y, _mesh(mod, group), placements(layout, y.ndim), run_check=False)

    module.register_forward_hook(hook)


def accept_dtensor_input(module: nn.Module, layout: str, *, group: dist.ProcessGroup, where: str,
                         prepend: bool = False) -> None:
    """Hand `module` the local tensor of a DTensor first input, redistributed to `layout`
    first when it is laid out otherwise (a collective, as in torch); plain tensors pass."""
    from torch.distributed.tensor import DTensor

    def pre_hook(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if args and isinstance(args[0], DTensor):
            x, put = args[0], lambda t: ((t, *args[1:]), kwargs)
        elif isinstance(kwargs.get("hidden_states"), DTensor):
            x, put = kwargs["hidden_states"], lambda t: (args, {**kwargs, "hidden_states": t})
        else:
            return None
        mesh = _mesh(mod, group)
        if x.device_mesh.ndim != 1 or (dist.get_process_group_ranks(x.device_mesh.get_group())
                                       != dist.get_process_group_ranks(group)):
            raise ValueError(f"{where}: input: expected a DTensor on the tensor-parallel mesh {mesh}, "
                             f"got one on {x.device_mesh}")
        want = placements(layout, x.ndim)
        if tuple(x.placements) != want:
            x = x.redistribute(x.device_mesh, want)
        return put(x.to_local())

    module.register_forward_pre_hook(pre_hook, with_kwargs=True, prepend=prepend)


def split_sequence_output(module: nn.Module, dim: int, *, group: dist.ProcessGroup, comm: str, where: str) -> None:
    """Cut `module`'s replicated output to this rank's piece of `dim` (the sequence): the
    backward all-gathers the pieces' gradients, so every rank's replicated parameters get
    every token's gradient."""

    def hook(mod: nn.Module, args: tuple, y: Tensor) -> Tensor:
        world = dist.get_world_size(group)
        if y.ndim <= dim % y.ndim or y.shape[dim] % world:
            raise ValueError(f"{where}: output: expected dim {dim} (the sequence) of shape {list(y.shape)} to be a "
                             f"multiple of the world size {world} (a Shard layout in the plan splits it evenly)")
        return split_to_shard(y, group=group, dim=dim, comm=comm)

    module.register_forward_hook(hook)


def _paths(matches: dict[str, tuple[str, str]], keys: Any) -> set[str]:
    return {path for path, (_, key) in matches.items() if key in keys}


def literal_sequence_layers(matches: dict[str, tuple[str, str]], plan: Any,
                            builds: Mapping[str, LinearBuild]) -> set[str]:
    """The linears a torch plan's own layouts put on sequence shards when taken literally:
    column layers whose input_layouts are a sequence shard and row layers whose output is one
    (a PrepareModuleInput's children are its style's to say: `GatherInput.sequence_shards`)."""
    return _paths(matches, plan.seq_in) | {p for p in _paths(matches, plan.seq_out) if p in builds
                                           and builds[p].kind == "row"}


def install_torch_layouts(model: nn.Module, matches: dict[str, tuple[str, str]], builds: Mapping[str, LinearBuild],
                          plan: Any, literal: bool, *, group: dist.ProcessGroup, comm: str) -> None:
    """What a torch plan says beyond fusedpar's strings: DTensor outputs (`use_local_output=False`),
    DTensor inputs taken apart at every parallel linear, and, with literal sequence layouts,
    embeddings whose output leaves as a sequence shard."""
    for path, (style, key) in matches.items():
        if key not in plan.styles:
            continue
        module = model.get_submodule(path) if path else model
        if literal and key in plan.seq_out and style.startswith("embedding_"):
            split_sequence_output(module, plan.seq_out[key], group=group, comm=comm, where=f"parallelize: {path}")
        if key in plan.dtensor_out:
            dtensor_output(module, plan.dtensor_out[key], group=group)
        if path in builds:
            b = builds[path]
            sp = module.spec.sequence_parallel
            if b.kind == "row":
                layout = "shard(-1)" if b.input_is_parallel else "replicate"
            else:
                layout = "shard(-2)" if sp else "replicate"
            accept_dtensor_input(module, layout, group=group, where=f"parallelize: {path}")
            if b.kind in ("col", "rep") and path.rpartition(".")[0] and not b.gather_output:
                parent = model.get_submodule(path.rpartition(".")[0])
                if not getattr(parent, "_fusedpar_accepts_dtensor", False):
                    parent._fusedpar_accepts_dtensor = True  # before the fused group's pre-hook
                    accept_dtensor_input(parent, layout, group=group, where=f"parallelize: {path.rpartition('.')[0]}",
                                         prepend=True)
