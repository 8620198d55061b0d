"""How a parallel linear runs (`LinearSpec`) and the sequence-parallel region state it reads.

`LinearSpec` is the frozen configuration every autograd Function, region op and module of
the parallel linears takes: the process group, whether activations are split on the
sequence dim (`sequence_parallel`: `x_shard` in, `y_shard` out of a row layer) or
replicated (`x_full`), the chunking / kernel / comm knobs passed through to overlap/, an
fp8 recipe, and `partial_output` (a row layer's output left a per-rank partial sum
`y_partial`). `SequenceRegion` and `effective_spec` let a region whose sequence does not
divide by the world size run its layers unsplit (replicated activations). `LinearKnobs`
names the keyword arguments a layer made of linears hands on to each of them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TypedDict

import torch
import torch.distributed as dist
from torch import nn

from ..comm import Communicator, check_group, get_communicator

__all__ = ["LinearKnobs", "LinearSpec", "SequenceRegion", "effective_spec"]

_COMMS = ("torch", "cupy")
_KERNELS = ("auto", "triton", "torch")


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
    region: SequenceRegion | None = layer.__dict__.get("_fusedpar_region")  # (getattr would miss through Module.__getattr__)
    if spec.sequence_parallel and region is not None and not region.split:
        return spec.unsplit()
    return spec


class LinearKnobs(TypedDict, total=False):
    """The keyword arguments a layer made of parallel linears (`ReplicatedColumnLinear`,
    `ParallelMLP`, `ParallelAttention`) hands on to each of its linears: how they run, and
    the dtype and device they are made with. Each one not given defaults as in
    `ColumnParallelLinear`: `sequence_parallel` False (`x_full`), `sequence_dim` -2,
    `chunks` None (chosen per shape), `kernel` "auto", `comm` "torch",
    `save_gathered_input` True (column layers only), `dtype` and `device` torch's defaults."""

    sequence_parallel: bool
    sequence_dim: int
    chunks: int | None
    kernel: str
    comm: str
    save_gathered_input: bool
    dtype: torch.dtype | None
    device: torch.device | str | None


_KNOB_NAMES = frozenset(LinearKnobs.__annotations__)


def _check_knobs(knobs: dict[str, Any], where: str, *, not_here: tuple[str, ...] = ()) -> None:
    """Refuse a keyword that is no knob, or one this layer fixes itself (`not_here`), as
    Python refuses an unexpected keyword argument (checked once, at construction)."""
    for name in knobs:
        if name not in _KNOB_NAMES or name in not_here:
            raise TypeError(f"{where}: got an unexpected keyword argument {name!r}")


def _row_knobs(knobs: dict[str, Any]) -> dict[str, Any]:
    """`knobs` for a row-parallel linear: without `save_gathered_input`, which only a column
    layer (the one that gathers its input) takes."""
    return {name: value for name, value in knobs.items() if name != "save_gathered_input"}


def _make_spec(
    group: Any, *, where: str, sequence_parallel: bool = False, sequence_dim: int = -2, chunks: int | None = None,
    kernel: str = "auto", comm: str = "torch", save_gathered_input: bool = True,
) -> LinearSpec:
    """The validated spec of a linear built with these knobs (`where` names it in errors)."""
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
