"""torch's layouts at the edges of fusedpar's modules: DTensor outputs and inputs, sequence
shards leaving an embedding.

fusedpar's layers compute on local tensors. A torch plan may still ask for DTensors
(`use_local_output=False`: the attention then views and attends on DTensors, as under
torch's own tensor parallelism) and may feed a DTensor to a parallel layer. A style read from
a torch plan carries its `Layouts` (torch_styles.py), and its `install_layouts` (base.py,
styles.py) puts these hooks at its module's boundary only, so the GEMMs and collectives
inside stay fusedpar's:

    Layouts(input_layouts, output_layouts, use_local_output)   a style's edges, in the
                                     words "replicate" / "shard(d)"
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

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist
from torch import Tensor, nn

from ..comm import device_mesh
from ..layers.linear import split_to_shard
from ..layers.regions import check_sequence_output

__all__ = ["Layouts", "SEQUENCE", "dtensor_output", "accept_dtensor_input", "split_sequence_output", "placements"]

SEQUENCE = ("shard(1)", "shard(-2)")  # the sequence dim of a [batch, seq, hidden] activation
_SEQUENCE_DIM = {"shard(1)": -2, "shard(-2)": -2, "shard(0)": 0}  # ... and of [seq, hidden] (position embeddings)


@dataclass(frozen=True)
class Layouts:
    """A style's layouts at its module's edges, as torch's ColwiseParallel / RowwiseParallel
    carry them, in the words "replicate" / "shard(d)". Any style of a torch plan takes a
    DTensor input apart (a linear: redistributed to the layout its layer computes on)."""

    input_layouts: str | None = None  # None: what fusedpar's layer takes (a string in a torch plan)
    output_layouts: str | None = None  # None: what fusedpar's layer returns
    use_local_output: bool = True  # False: the output handed on as a DTensor of output_layouts

    @property
    def sequence_input(self) -> bool:
        """The input arrives as a sequence shard (Shard(1))."""
        return self.input_layouts in SEQUENCE

    @property
    def sequence_output(self) -> int | None:
        """The dim a sequence-shard output splits (-2 of [batch, seq, hidden], 0 of [seq,
        hidden]); None: the output is not a sequence shard."""
        return _SEQUENCE_DIM.get(self.output_layouts or "")

    @property
    def dtensor_placement(self) -> str | None:
        """The output's DTensor placement (use_local_output=False); None: a local tensor."""
        return None if self.use_local_output else self.output_layouts


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
        check_sequence_output(y, dim, dist.get_world_size(group), where=where)
        return split_to_shard(y, group=group, dim=dim, comm=comm)

    module.register_forward_hook(hook)
