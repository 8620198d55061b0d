"""The style protocol: `Style` (check, apply, and what it does at its module's edges), the
`Site` it is applied at, and the records they share. styles.py holds the styles themselves
and the table of Hugging Face strings; torch_styles.py reads torch's ParallelStyles into them.
"""
from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch.distributed as dist
from torch import nn

from .layouts import Layouts, dtensor_output

__all__ = ["Style", "Site", "Knobs", "LinearBuild", "ModuleOnly", "key_regex", "PARAM_STYLES"]

# style on a bare parameter → (dim for >= 2-D, dim for 1-D, packed parts); Hugging Face: colwise
# splits dim ndim-2 (dim 0 of a vector), rowwise the last dim (a bias stays replicated)
PARAM_STYLES = {"colwise": (-2, 0, 1), "rowwise": (-1, -1, 1), "packed_colwise": (-2, -1, 2),
                "packed_rowwise": (-1, -1, 2)}


def key_regex(key: str) -> re.Pattern[str]:
    """A plan key as a regex over module / parameter paths: `*` matches one path component."""
    return re.compile("".join("[^.]+" if part == "*" else re.escape(part) for part in re.split(r"(\*)", key)) + "$")


@dataclass(frozen=True)
class Knobs:
    """parallelize's settings for the layers it builds (every parallel linear, the experts)."""

    chunks: int | None
    kernel: str
    comm: str
    save_gathered_input: bool


@dataclass(frozen=True)
class LinearBuild:
    """What a linear style's check decided the linear becomes (its apply builds it; the passes read it)."""

    kind: str  # "col" ColumnParallelLinear, "rep" ReplicatedColumnLinear (kv heads), "row" RowParallelLinear;
    # "keep" until apply: a fusedpar layer an earlier call built, whose layout apply sets again
    gather_output: bool = False  # col: output gathered to Replicate()
    input_is_parallel: bool = True  # row: input arrives split on features (else split here)
    parts: int = 1  # packed [gate; up] halves, or the kv heads a "rep" layer holds
    heads: int | None = None  # attention projections split by whole heads: the global count ...
    head_dim: int | None = None  # ... and the head width


@dataclass
class Site:
    """One plan entry at one path: what a style's check reads and its apply is told."""

    model: nn.Module
    path: str  # the module's (or the bare parameter's) path
    key: str  # the plan key that matched it
    style: Style
    ranks: list[int]  # the TP group's ranks
    matches: Mapping[str, tuple[str, str]]  # the whole plan: {path: (style string, plan key)}
    params: Mapping[str, nn.Parameter]  # the model's parameters before any conversion
    knobs: Knobs
    module: nn.Module  # the module at `path` (a bare parameter's owner), taken before any conversion
    build: Any = None  # what check decided for apply (a linear's LinearBuild, the experts' shards)
    sequence_parallel: bool = False  # the module runs on sequence shards (set before apply)
    literal: bool = False  # a torch plan's layouts taken literally (module by module; set before check)
    builds: Mapping[str, LinearBuild] = field(default_factory=dict)  # every linear's (set once they are checked)
    region: Any = None  # fusedpar's SequenceRegion when it has one (set before apply)

    @property
    def name(self) -> str:  # the style string
        return self.style.name

    @property
    def world(self) -> int:
        return len(self.ranks)

    @property
    def where(self) -> str:
        return f"parallelize: {self.path} (plan key {self.key!r}, style {self.name!r})"

    @property
    def leaf(self) -> str:
        return self.path.rpartition(".")[2]


class Style:
    """One way of splitting a module: `check` raises before anything is converted, `apply`
    converts, `install_layouts` sets the module's edges to the layouts a torch plan gave it."""

    stage: ClassVar[str] = "modules"
    plan_string: ClassVar[bool] = True  # a Hugging Face string names it (False: only a torch style does)

    def __init__(self, name: str) -> None:
        self.name = name  # the Hugging Face string this object stands for (else the torch style's name)
        # the module's input / output layouts in a torch plan (torch_styles.py sets them, as
        # ColwiseParallel carries input_layouts, output_layouts, use_local_output); None: a
        # Hugging Face plan, whose modules take and return local tensors
        self.layouts: Layouts | None = None

    def check(self, at: Site) -> None:
        """Raise (no comm) if the target at `at` cannot take this style."""

    def apply(self, module: nn.Module, mesh: dist.ProcessGroup, at: Site) -> nn.Module:
        """Convert `module` over `mesh`; return the module that takes its place."""
        return module

    def on_parameter(self) -> Style:
        """The style for a plan entry naming a bare parameter."""
        return ModuleOnly(self.name)

    def sequence_shards(self, at: Site) -> Collection[str]:
        """Paths this entry puts on sequence shards when torch's layouts are taken literally (after check)."""
        return ()

    def install_layouts(self, module: nn.Module, mesh: dist.ProcessGroup, at: Site) -> None:
        """Give `module` (the one `apply` left at `at.path`) the edges `self.layouts` says, once
        every style is applied: here, the output handed on as a DTensor (use_local_output=False).
        Linears also take DTensor inputs apart, embeddings cut a sequence shard (styles.py)."""
        placement = self.layouts.dtensor_placement if self.layouts is not None else None
        if placement is not None:
            dtensor_output(module, placement, group=mesh)

    def __repr__(self) -> str:
        layouts = f", {self.layouts}" if self.layouts is not None else ""
        return f"{type(self).__name__}({self.name!r}{layouts})"


class ModuleOnly(Style):
    """A module's style planned on a bare parameter: refused."""

    def check(self, at: Site) -> None:
        raise ValueError(f"{at.where}: expected a module for this style, got a parameter "
                         f"(parameters take {sorted(PARAM_STYLES)})")
