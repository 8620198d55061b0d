"""torch's ParallelStyle objects in a plan, read as the fusedpar style objects they mean.

Each torch style becomes the object `styles.TABLE` gives for a Hugging Face string:

    ColwiseParallel()                                   "colwise"
    ColwiseParallel(output_layouts=Replicate())         "colwise_gather_output"
    ColwiseParallel(input_layouts=Shard(1))             "colwise" gathering a sequence shard
    RowwiseParallel()                                   "rowwise"
    RowwiseParallel(output_layouts=Shard(1))            "rowwise" reduce-scattering to a sequence shard
    RowwiseParallel(input_layouts=Replicate())          "rowwise_split_input"
    Rowwise / ColwiseParallel on an nn.Embedding        "embedding_rowwise" / "embedding_colwise",
                                                        output Replicate() or a sequence shard
    SequenceParallel()                                  "sequence_parallel"
    PrepareModuleInput(input_layouts=Shard(1),          GatherInput (no string): the module's column-
        desired_input_layouts=Replicate())              parallel children gather (in their fused GEMM)
    use_local_output=False                              the output is a DTensor, as torch returns it

A Colwise / RowwiseParallel's object carries its layouts (`style.layouts`, a layouts.Layouts
of input_layouts, output_layouts, use_local_output) and sets its module's edges from them
(`install_layouts`): a DTensor output, a DTensor input taken apart, an embedding's output
cut to a sequence shard. Strings in a plan that holds torch styles read as the table's
objects with `Layouts()`: their modules take DTensor inputs too, as torch's styles do.

Shard(1) is the sequence dim of a `[batch, seq, hidden]` activation (Shard(0) of a `[seq,
hidden]` one, e.g. position embeddings), the one fusedpar splits with sequence parallelism.
What the layouts mean when the plan's modules sit in decoder layers is parallelize's to
decide (parallelize.py: its sequence region, or the layouts taken literally when the plan
is applied module by module, as torchtitan does). Anything else (PrepareModuleOutput, a
PrepareModuleInput that is not a sequence gather, layouts other than these, torch's Float8
styles, which fusedpar's `fp8=` replaces) is refused naming the style, its arguments and
why, before anything is converted.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist
from torch import nn

from .layouts import SEQUENCE, Layouts
from .styles import TABLE, Site, Style, key_regex

__all__ = ["is_torch_style", "string_plan", "read_plan", "TorchPlan", "GatherInput", "key_regex"]

@dataclass
class TorchPlan:
    """A plan with torch styles read: `styles` (key → fusedpar's style object, its torch
    layouts in `layouts`, or a string or None as the plan gave it; a PrepareModuleInput that
    moves nothing is dropped)."""

    styles: dict[str, Any] = field(default_factory=dict)
    sequence: bool = False  # some style splits the sequence
    has_torch: bool = False  # some style was a torch ParallelStyle

    @property
    def strings(self) -> dict[str, Any]:
        """key → the style string (the plan's strings, and None, as they are); styles no
        string names (GatherInput) are left out."""
        return {key: s.name if isinstance(s, Style) else s for key, s in self.styles.items()
                if not isinstance(s, Style) or s.plan_string}

    def read(self, key: str, name: str, layouts: Layouts) -> None:
        """Plan `key` reads as fusedpar's style `name` (the table's object) with `layouts` at its edges."""
        style = TABLE[name]()
        style.layouts = layouts
        self.styles[key] = style


def is_torch_style(style: Any) -> bool:
    """Whether `style` is one of torch.distributed.tensor.parallel's ParallelStyle objects."""
    try:
        from torch.distributed.tensor.parallel.style import ParallelStyle
    except ImportError:  # pragma: no cover - torch without tensor parallelism
        return False
    return isinstance(style, ParallelStyle)


def _layout(layouts: Any) -> str:
    """"replicate", "shard(d)" of a one-placement layout tuple (or a single placement)."""
    from torch.distributed.tensor import Replicate, Shard

    placements = layouts if isinstance(layouts, (tuple, list)) else (layouts,)
    if len(placements) != 1:
        return f"{placements!r}"
    p = placements[0]
    if isinstance(p, Replicate):
        return "replicate"
    if isinstance(p, Shard):
        return f"shard({p.dim})"
    return repr(p)


def _describe(style: Any) -> str:
    args = ", ".join(f"{k}={v!r}" for k, v in sorted(vars(style).items()))
    return f"{type(style).__name__}({args})"


def _is_embedding(model: nn.Module, key: str) -> bool:
    if key == "":
        return isinstance(model, nn.Embedding)
    names = [n for n, _ in model.named_modules() if n and fnmatch.fnmatchcase(n, key)]
    return bool(names) and all(isinstance(model.get_submodule(n), nn.Embedding) for n in names)


class GatherInput(Style):
    """torch's `PrepareModuleInput(input_layouts=Shard(1), desired_input_layouts=Replicate())`:
    the module's input arrives as a sequence shard and is wanted whole.

    apply does nothing at the module itself: no DTensor, no redistribute. Its column-parallel
    children gather the sequence in their fused GEMM (`all_gather_matmul`), so the gather
    overlaps their matmul; check finds those children (`at.build`) and `sequence_shards` puts
    them on sequence shards. That holds when torch's layouts are taken literally (a plan
    applied module by module); in fusedpar's own region over the decoder layers the region's
    column groups and islands gather already, and there is nothing to find.
    """

    plan_string = False  # no Hugging Face string: torch plans only

    def check(self, at: Site) -> None:
        if not at.literal:
            at.build = frozenset()
            return
        at.build = frozenset(p for p, b in at.builds.items() if b.kind in ("col", "rep") and not b.gather_output
                             and p.rpartition(".")[0] == at.path)
        if not at.build:
            raise ValueError(
                f"parallelize: plan[{at.key!r}]: PrepareModuleInput(Shard(1) -> Replicate()) on {at.path}: expected "
                f"column-parallel linears directly under it to gather the sequence for (fusedpar gathers in "
                f"their fused GEMM), got none")

    def sequence_shards(self, at: Site) -> Collection[str]:
        return at.build

    def apply(self, module: nn.Module, mesh: dist.ProcessGroup, at: Site) -> nn.Module:
        return module  # the children's fused GEMMs gather (see the class docstring)


def _prepare_input(key: str, style: Any, out: TorchPlan) -> str | None:
    """Read a PrepareModuleInput into `out`; the reason it cannot be, or None."""
    if getattr(style, "with_kwargs", False) and style.input_kwarg_layouts:
        return "input_kwarg_layouts: fusedpar gathers the module's first positional input only"
    ins = tuple(style.input_layouts or ())
    wants = tuple(style.desired_input_layouts or ())
    if not ins or len(ins) != len(wants):
        return "expected input_layouts and desired_input_layouts of the same length"
    first_in, first_want = _layout(ins[0]), _layout(wants[0])
    rest_same = all((a is None and b is None) or (a is not None and b is not None and _layout(a) == _layout(b))
                    for a, b in zip(ins[1:], wants[1:]))
    if not rest_same:
        return "inputs after the first must keep their layout (fusedpar gathers the first input only)"
    if first_in in SEQUENCE and first_want == "replicate":
        out.styles[key] = GatherInput("PrepareModuleInput")
        out.sequence = True
        return None
    if first_in == first_want:
        return None  # nothing to move
    return (f"input {first_in} -> {first_want}: fusedpar gathers a sequence shard (Shard(1) -> Replicate()) "
            f"into a module's column-parallel layers only")


def _one(model: nn.Module, key: str, style: Any, out: TorchPlan) -> None:
    """Read one torch style into `out`, or raise naming it and why."""
    from torch.distributed.tensor.parallel import (
        ColwiseParallel, PrepareModuleInput, RowwiseParallel, SequenceParallel,
    )

    name = type(style).__name__
    why = None
    local = getattr(style, "use_local_output", True) is not False
    if isinstance(style, SequenceParallel):
        seq = _layout(style.sequence_sharding)
        if seq not in SEQUENCE:
            why = f"sequence_sharding={seq}: fusedpar splits the sequence dim of [batch, seq, hidden] only"
        else:
            # fusedpar's norms return local shards; torch's default use_local_output=False only
            # wraps them for the DTensor modules that follow, which fusedpar's layers do not need
            out.sequence = True
            out.read(key, "sequence_parallel", Layouts(seq, seq))
            return
    elif type(style) is PrepareModuleInput:
        why = _prepare_input(key, style, out)
        if why is None:
            return
    elif name in ("ColwiseParallel", "RowwiseParallel") and isinstance(style, (ColwiseParallel, RowwiseParallel)):
        inp, outp = _layout(style.input_layouts), _layout(style.output_layouts)
        embedding = _is_embedding(model, key)
        layouts = Layouts(inp, outp, local)
        seq_out = layouts.sequence_output
        read = None
        if isinstance(style, ColwiseParallel):
            if embedding and inp == "replicate" and (outp == "replicate" or seq_out is not None):
                read = "embedding_colwise"
            elif inp in ("replicate", *SEQUENCE) and outp == "shard(-1)":
                read = "colwise"
            elif inp in ("replicate", *SEQUENCE) and outp == "replicate":
                read = "colwise_gather_output"
            else:
                why = (f"input_layouts={inp}, output_layouts={outp}: expected input Replicate() or Shard(1) "
                       f"and output Shard(-1) or Replicate()")
        else:
            if embedding and inp == "replicate" and (outp == "replicate" or seq_out is not None):
                read = "embedding_rowwise"
            elif inp == "shard(-1)" and (outp == "replicate" or seq_out == -2):
                read = "rowwise"
            elif inp == "replicate" and outp == "replicate":
                read = "rowwise_split_input"
            else:
                why = (f"input_layouts={inp}, output_layouts={outp}: expected input Shard(-1) and output "
                       f"Replicate() or Shard(1), or Replicate() in and out")
        if read is not None:  # the style's layouts say where it splits the sequence and what it hands on
            out.read(key, read, layouts)
            out.sequence = out.sequence or layouts.sequence_input or seq_out is not None
            return
    elif "Float8" in name:
        why = ("torch's Float8 styles need torchao's Float8Linear; fusedpar runs its own fp8 GEMMs: give the "
               "plain style and parallelize(..., fp8=True)")
    else:
        why = ("not a style fusedpar maps onto its layers (ColwiseParallel, RowwiseParallel, SequenceParallel "
               "and a sequence-gathering PrepareModuleInput are)")
    raise ValueError(f"parallelize: plan[{key!r}]: {_describe(style)}: {why}")


def read_plan(model: nn.Module, plan: Mapping[str, Any]) -> TorchPlan:
    """The plan with every torch ParallelStyle read (strings and None kept as they are).
    Raises on the first style that has no fusedpar meaning, naming it."""
    out = TorchPlan()
    for key, style in plan.items():
        if is_torch_style(style):
            out.has_torch = True
            _one(model, key, style, out)
        else:
            out.styles[key] = style
    if out.has_torch:  # the plan's strings beside torch styles take DTensor inputs as torch's do
        for key, style in out.styles.items():
            if isinstance(style, str) and style in TABLE:
                out.read(key, style, Layouts())
    return out


def string_plan(model: nn.Module, plan: Mapping[str, Any]) -> tuple[dict[str, str], bool]:
    """`(strings, whether any style splits the sequence)` of `read_plan`."""
    read = read_plan(model, plan)
    return read.strings, read.sequence
