"""torch's ParallelStyle objects in a plan, read as the fusedpar styles they mean.

    ColwiseParallel()                                   "colwise"
    ColwiseParallel(output_layouts=Replicate())         "colwise_gather_output"
    ColwiseParallel(input_layouts=Shard(1))             "colwise", sequence parallel
    RowwiseParallel()                                   "rowwise"
    RowwiseParallel(output_layouts=Shard(1))            "rowwise", sequence parallel
    RowwiseParallel(input_layouts=Replicate())          "rowwise_split_input"
    Rowwise / ColwiseParallel on an nn.Embedding        "embedding_rowwise" / "embedding_colwise"
    SequenceParallel()                                  "sequence_parallel"

Shard(1) is the sequence dim of a `[batch, seq, hidden]` activation, the one fusedpar splits
when `sequence_parallel=True`. Anything else (DTensor outputs with `use_local_output=False`,
PrepareModuleInput / PrepareModuleOutput, layouts other than these) is refused naming the
style, its arguments and why, before anything is converted.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from typing import Any

from torch import nn

__all__ = ["is_torch_style", "string_plan"]


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
    names = [n for n, _ in model.named_modules() if n and fnmatch.fnmatchcase(n, key)]
    return bool(names) and all(isinstance(model.get_submodule(n), nn.Embedding) for n in names)


def _one(model: nn.Module, key: str, style: Any) -> tuple[str, bool]:
    """(fusedpar style string, whether it means sequence parallelism) for one torch style."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel

    name = type(style).__name__
    why = None
    if getattr(style, "use_local_output", True) is False and not isinstance(style, SequenceParallel):
        why = ("use_local_output=False asks for DTensor outputs; fusedpar's layers return local tensors "
               "(pass use_local_output=True)")
    elif isinstance(style, SequenceParallel):
        seq = _layout(style.sequence_sharding)
        if seq not in ("shard(1)", "shard(-2)"):
            why = f"sequence_sharding={seq}: fusedpar splits the sequence dim of [batch, seq, hidden] only"
        else:
            return "sequence_parallel", True
    elif isinstance(style, (ColwiseParallel, RowwiseParallel)) and name in ("ColwiseParallel", "RowwiseParallel"):
        inp, out = _layout(style.input_layouts), _layout(style.output_layouts)
        seq = ("shard(1)", "shard(-2)")
        embedding = _is_embedding(model, key)
        if isinstance(style, ColwiseParallel):
            if embedding and inp == "replicate" and out in ("replicate", *seq):
                return "embedding_colwise", out in seq
            if inp in ("replicate", *seq) and out == "shard(-1)":
                return "colwise", inp in seq
            if inp == "replicate" and out == "replicate":
                return "colwise_gather_output", False
            why = (f"input_layouts={inp}, output_layouts={out}: expected input Replicate() or Shard(1) "
                   f"and output Shard(-1), or Replicate() in and out")
        else:
            if embedding and inp == "replicate" and out in ("replicate", *seq):
                return "embedding_rowwise", out in seq
            if inp == "shard(-1)" and out in ("replicate", *seq):
                return "rowwise", out in seq
            if inp == "replicate" and out == "replicate":
                return "rowwise_split_input", False
            why = (f"input_layouts={inp}, output_layouts={out}: expected input Shard(-1) and output "
                   f"Replicate() or Shard(1), or Replicate() in and out")
    else:
        why = ("not a style fusedpar maps onto its layers (ColwiseParallel, RowwiseParallel and "
               "SequenceParallel are)")
    raise ValueError(f"parallelize: plan[{key!r}]: {_describe(style)}: {why}")


def string_plan(model: nn.Module, plan: Mapping[str, Any]) -> tuple[dict[str, str], bool]:
    """The plan with every torch ParallelStyle replaced by its fusedpar string (strings and
    None kept), and whether any style means sequence parallelism. Raises on the first
    style that has no fusedpar meaning, naming it."""
    out: dict[str, str] = {}
    sequence = False
    for key, style in plan.items():
        if is_torch_style(style):
            out[key], sp = _one(model, key, style)
            sequence = sequence or sp
        else:
            out[key] = style
    return out, sequence
