"""Model surgery: `parallelize` converts a whole model in place from a plan of styles.

    parallelize(model, plan, group=...)       Hugging Face style strings or torch ParallelStyles
    parallelize_module(module, mesh, plan)    the same with torch's signature
    full_state_dict(model)                    the unsharded weights gathered back for saving
    resolve_plan(model, plan)                 the plan as {path pattern: style string}

The plan is data and the styles are behaviour: each style is one object with `check(at)`
and `apply(module, mesh, at)` (base.py), and one table maps every Hugging Face string to its
object (styles.py); torch's ParallelStyles are read as the same objects, their layouts
fields of the object (torch_styles.py). Every entry is checked before any conversion, the
styles are applied (the linears, then the other styles, then gradient hooks, then what a
torch plan's layouts put at the modules' edges: DTensor in/out, sequence shards, with the
hooks of layouts.py), then the whole-model passes run, one file each:

    ties.py             tied weights split alike and re-tied
    islands.py          the sequence-parallel region's blocks that run on the whole sequence
    unplanned.py        unplanned modules next to split layers: gradients all-reduced
    block_reduction.py  MoE blocks with a shared expert: one reduction where exact
    agreement.py        every rank called with the same model, plan and shapes

It builds on fusedpar.layers (the modules and their autograd functions), never the reverse.
"""
from __future__ import annotations

from .agreement import RanksDisagreeError
from .parallelize import STYLES, full_state_dict, parallelize, resolve_plan
from .torch_api import parallelize_module

__all__ = ["parallelize", "parallelize_module", "full_state_dict", "resolve_plan", "STYLES", "RanksDisagreeError"]
