"""One reduction per MoE block: the routed experts and a shared expert summed before it.

A mixture-of-experts block with a shared expert (DeepSeek-V2/V3, GLM-4-MoE, ...) holds two
tensor-parallel computations whose outputs are per-rank partial sums: the routed experts
(moe.py) and the shared expert's row-parallel down projection. Reduced one by one, that is
two all-reduces of `[tokens, hidden]` per block; when the block only adds them, one reduction
of the sum gives the same result:

    unmerged   y = all_reduce(routed_r) + all_reduce(shared_r)       two all-reduces
    merged     y = all_reduce(routed_r + shared_r)                   one (a reduce-scatter when the
                                                                     block is a sequence-parallel island)

Backward is unchanged: an all-reduce has an identity backward, so the producers' gradients
are the same in both forms. What makes the merge wrong is anything between the partial sums
and the block's output other than sums and products with constants: a learned gate times the
shared output (Qwen2-MoE's `sigmoid(shared_expert_gate(x)) * shared`) would see a partial
sum in its gradient; a term added that is not a partial sum (a residual) would be counted
once per rank. So the block is checked on its first forward with gradients, run unmerged:
the autograd graph from its output back to the (marked) reduced producer outputs must hold
only additions, views, casts and products with tensors that need no gradient. Blocks that
pass run merged from then on; the others keep a reduction per producer. Until that first
forward (inference only, e.g. generate()) blocks run unmerged.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..layers.partial import reduce_partial
from .blocks import layer_blocks
from .styles import LinearBuild

__all__ = ["install_block_reductions", "install_block_reduction", "block_is_merged", "is_linear_in_marks"]

# styles a block may hold for its partial sums to be reduced once: the experts and plain
# sharded linears; any other reduction or gather keeps its own
_MERGEABLE = frozenset({"moe_tp_experts", "moe_identity_expert", "local_params", "colwise", "rowwise",
                        "packed_colwise", "packed_rowwise", "replicate", "replicated_with_grad_allreduce"})

# backward nodes of ops that are linear in their one tensor input
_UNARY_LINEAR = frozenset({
    "ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "ExpandBackward0", "CloneBackward0",
    "ToCopyBackward0", "TransposeBackward0", "TBackward0", "PermuteBackward0", "SqueezeBackward0",
    "SqueezeBackward1", "SqueezeBackward2", "UnsqueezeBackward0", "SliceBackward0", "SelectBackward0",
    "MulBackward1", "DivBackward1", "NegBackward0", "AliasBackward0",
})
_SUMS = frozenset({"AddBackward0", "SubBackward0"})
_PRODUCTS = frozenset({"MulBackward0", "DivBackward0"})  # linear in the operand that needs a gradient
_MAX_NODES = 10_000


class _MarkFn(torch.autograd.Function):
    """Identity, so a reduced producer output can be found in the autograd graph."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x.clone()  # not a view: models modify block outputs in place (Llama 4's out.add_); once only

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> Tensor:
        return dy


def is_linear_in_marks(output: Tensor, stop: set[Any]) -> bool:
    """Whether `output` is, in its autograd graph, a sum of the marked tensors' values under
    views, casts and products with tensors that need no gradient (and nothing else: no
    other term, no learned factor). `stop`: nodes of the block's inputs (never partial)."""
    memo: dict[Any, bool] = {}
    budget = [_MAX_NODES]

    def partial(node: Any) -> bool:
        if node is None or node in stop:
            return False
        if node in memo:
            return memo[node]
        budget[0] -= 1
        if budget[0] < 0:
            return False
        if isinstance(node, _MarkFn._backward_cls):
            result = True
        else:
            name = type(node).__name__
            children = [fn for fn, _ in node.next_functions]
            if name in _UNARY_LINEAR:
                result = len([c for c in children if c is not None]) == 1 and partial(
                    next(c for c in children if c is not None))
            elif name in _SUMS:
                result = bool(children) and all(partial(c) for c in children)
            elif name in _PRODUCTS:
                live = [c for c in children if c is not None]
                result = len(live) == 1 and partial(live[0])
            else:
                result = False
        memo[node] = result
        return result

    return output.grad_fn is not None and partial(output.grad_fn)


@dataclasses.dataclass
class _BlockState:
    merged: bool | None = None  # None: not decided yet (no forward with gradients so far)
    deciding: bool = False  # in the forward that decides: it runs unmerged to its end
    inputs: tuple = ()


def block_is_merged(block: nn.Module) -> bool:
    """Whether `block`'s output is a per-rank partial sum now (its producers skip their own
    reductions): its exit must reduce it (islands.py reduce-scatters it)."""
    state = getattr(block, "_fusedpar_block_reduction", None)
    return bool(state is not None and state.merged and not state.deciding)


def install_block_reduction(block: nn.Module, experts: list[nn.Module], rows: list[nn.Module], *,
                            group: dist.ProcessGroup, comm: str = "torch", island: bool = False) -> None:
    """Reduce `block`'s partial sums once at its exit if its first forward with gradients
    shows that is exact (module doc). `experts`: moe_tp_experts modules (moe.py); `rows`:
    row-parallel linears without bias (the shared expert's down projection); `island`: the
    block is a sequence-parallel island, whose exit (islands.py) does the reduction."""
    state = _BlockState()
    block._fusedpar_block_reduction = state

    def mark(mod: nn.Module, args: tuple, output: Any) -> Any:
        if state.merged is None and torch.is_grad_enabled() and isinstance(output, Tensor) and output.requires_grad:
            return _MarkFn.apply(output)
        return None

    for producer in [*experts, *rows]:
        producer.register_forward_hook(mark)

    def remember(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        if state.merged is None:
            state.inputs = tuple(t for t in (*args, *kwargs.values()) if isinstance(t, Tensor))

    def decide_or_reduce(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        y = output if isinstance(output, Tensor) else output[0] if isinstance(output, (tuple, list)) else None
        if state.merged is None:
            if y is not None and torch.is_grad_enabled() and y.grad_fn is not None:
                stop = {t.grad_fn for t in state.inputs if t.grad_fn is not None}
                state.merged, state.deciding = is_linear_in_marks(y, stop), True
                state.inputs = ()
                if state.merged:
                    for m in experts:
                        m._fusedpar_partial_out = True
                    for r in rows:
                        r.spec = dataclasses.replace(r.spec, partial_output=True)
            return None  # this forward ran unmerged: its output is whole already
        if not state.merged or island:
            return None  # unmerged; or the island's exit reduce-scatters it
        reduced = reduce_partial(y, group=group, comm=comm)
        return reduced if isinstance(output, Tensor) else (reduced, *output[1:])

    def decided(mod: nn.Module, args: tuple, output: Any) -> None:
        state.deciding = False  # after the island's exit (islands.py, a hook registered before this one)

    block.register_forward_pre_hook(remember, with_kwargs=True)
    block.register_forward_hook(decide_or_reduce, with_kwargs=True, prepend=True)
    block.register_forward_hook(decided)


def install_block_reductions(model: nn.Module, matches: dict[str, tuple[str, str]], builds: Mapping[str, LinearBuild],
                             islands: set[str], region_name: str, region: nn.ModuleList, *,
                             group: dist.ProcessGroup, comm: str = "torch") -> None:
    """Every decoder-layer block of `region` that holds moe_tp_experts and row-parallel
    linears without bias (a shared expert) and only mergeable styles: `install_block_reduction`."""
    experts = [p for p, (s, _) in matches.items() if s == "moe_tp_experts"]
    if not experts:
        return
    for i, layer in enumerate(region):
        for base, child in layer_blocks(layer, f"{region_name}.{i}"):
            here = [e for e in experts if e.startswith(base + ".")]
            if not here:
                continue
            styles = {s for p, (s, _) in matches.items() if p == base or p.startswith(base + ".")}
            rows = [model.get_submodule(p) for p, b in builds.items() if p.startswith(base + ".") and b.kind == "row"]
            if styles <= _MERGEABLE and rows and all(r.bias is None for r in rows):
                install_block_reduction(child, [model.get_submodule(e) for e in here], rows, group=group, comm=comm,
                                        island=base in islands)
