"""Unplanned modules with parameters inside tensor-parallel blocks: which ones need their
gradients summed over ranks.

A plan names the layers it shards; every other module keeps its parameters replicated. Where
such a module sits decides whether its gradient is already whole on every rank:

    upstream of the split, reading the replicated block input   (a router, MLA's q_a_proj /
        kv_a_layernorm, a shared-expert gate): whole, since the column-parallel layers
        downstream all-reduce the gradient they send back                    → nothing to do
    reading split activations (this rank's heads or intermediate features: an activation
        with learned parameters between a column- and a row-parallel layer): a per-rank
        partial sum                                                           → all-reduce

Which of the two a module is cannot be read from the module tree (MLA's kv_a_layernorm runs
after the column-parallel q_b_proj, yet reads replicated data), so it is read from the data:
on the module's first forward with gradients on, the autograd graph of its inputs is walked
back to the nearest layout change. A column-parallel output or a sharded parameter reached
before any reduction (row-parallel output, gather, all-reduce) or leaf means split input.
The answer is kept; the gradient hooks installed up front act on it.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..comm import get_communicator
from ..layers.norm import all_reduced_grad
from ..layers.sharding import param_of, param_shards
from .blocks import layer_blocks

__all__ = ["watch_unplanned", "reads_split", "unplanned_modules"]


def unplanned_modules(matches: dict[str, tuple[str, str]], name: str, region: nn.ModuleList) -> dict[str, nn.Module]:
    """`{path: module}` of the unplanned modules with parameters of their own inside the
    decoder-layer blocks (of `region`, at `name`) that hold a column-parallel layer."""
    planned = set(matches)
    splitting = {p for p, (style, _) in matches.items() if style in ("colwise", "packed_colwise")}
    found: dict[str, nn.Module] = {}
    for i, layer in enumerate(region):
        for base, child in layer_blocks(layer, f"{name}.{i}"):
            if not any(p == base or p.startswith(base + ".") for p in splitting):
                continue
            for sub_name, sub in child.named_modules():
                path = f"{base}.{sub_name}" if sub_name else base
                covered = any(path == p or path.startswith(p + ".") for p in planned)
                if not covered and any(True for _ in sub.parameters(recurse=False)):
                    found[path] = sub
    return found


def _node_classes() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """Backward-node classes that make data split (sources) or whole again (stops)."""
    from ..layers.fp8 import _Fp8ColumnParallelFn, _Fp8RowParallelFn
    from ..layers.linear import _ColumnParallelFn, _GatherFn, _RowParallelFn, _SplitFn
    from ..layers.moe import _GroupedLinearFn
    from ..layers.partial import _ReducePartialFn

    sources = (_ColumnParallelFn._backward_cls, _Fp8ColumnParallelFn._backward_cls, _SplitFn._backward_cls,
               _GroupedLinearFn._backward_cls)
    stops = (_RowParallelFn._backward_cls, _Fp8RowParallelFn._backward_cls, _GatherFn._backward_cls,
             _ReducePartialFn._backward_cls)
    return sources, stops


def reads_split(tensors: list[Tensor], sharded: set[int]) -> bool:
    """Whether any of `tensors` depends on split data without a reduction in between.

    Walks the autograd graph from their `grad_fn`s; `sharded` holds `id()`s of sharded
    parameters (their AccumulateGrad nodes are sources).
    """
    sources, stops = _node_classes()
    stack = [t.grad_fn for t in tensors if isinstance(t, Tensor) and t.grad_fn is not None]
    seen: set[Any] = set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if isinstance(node, sources):
            return True
        if isinstance(node, stops):
            continue
        variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf parameter
        if variable is not None:
            if id(param_of(variable)) in sharded:  # a parameter's gradient leaf stands for it
                return True
            continue
        stack.extend(fn for fn, _ in node.next_functions)
    return False


def watch_unplanned(model: nn.Module, modules: dict[str, nn.Module], *, group: dist.ProcessGroup,
                    comm: str = "torch") -> None:
    """Install, on each of `modules` (path → module, parameters of their own), a gradient
    all-reduce that acts once the module's first forward with gradients found its input split."""
    sharded = {id(getattr(m, n)) for m in model.modules() for n in param_shards(m)}
    communicator = get_communicator(group, comm)

    for path, module in modules.items():
        state: dict[str, Any] = {"split": None}

        def pre_hook(mod: nn.Module, args: tuple, kwargs: dict, state: dict = state, path: str = path) -> None:
            if state["split"] is not None or not torch.is_grad_enabled():
                return
            if torch.compiler.is_compiling():  # walking grad_fn nodes does not trace
                raise RuntimeError(
                    f"parallelize: {path}: cannot tell under torch.compile whether this unplanned module reads "
                    f"split activations; run one forward with gradients before compiling, or plan it "
                    f"explicitly: 'replicated_with_grad_allreduce' if it does, 'replicate' if not")
            inputs = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
            if not any(t.requires_grad for t in inputs):
                trainable = any(p.requires_grad for p in mod.parameters(recurse=False))
                if trainable and any(t.is_floating_point() for t in inputs):
                    raise RuntimeError(
                        f"parallelize: {path}: cannot tell whether this unplanned module reads split "
                        f"activations (its inputs carry no autograd history); plan it explicitly: "
                        f"'replicated_with_grad_allreduce' if it does, 'replicate' if not")
                return
            state["split"] = reads_split(inputs, sharded)

        def grad_hook(grad: Tensor, state: dict = state) -> Tensor:
            if not state["split"]:
                return grad
            return all_reduced_grad(grad, communicator)

        module.register_forward_pre_hook(pre_hook, with_kwargs=True)
        for p in module.parameters(recurse=False):
            if p.requires_grad:
                p.register_hook(grad_hook)
        module._fusedpar_unplanned = state
