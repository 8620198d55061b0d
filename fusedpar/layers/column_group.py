"""What runs several column-parallel linears on one input (q/k/v, gate/up) as one GEMM
(`column_parallel_group` in linear.py) needs besides the modules: the group's weights and
biases concatenated once per version of the parameters (`_fused_operands`), linked back to
each layer's parameters by `_FusedParts`, and the per-layer outputs it leaves for each
layer's next forward (`stash_precomputed` / `pop_precomputed`).

Layouts: each part is a layer's local `[N_i, K]` weight (column-split, `w_shard_n`, or a
replicated layer's block) and its `[N_i]` bias; the fused operand is their concatenation
`[sum N_i, K]`, and a stashed output is the layer's `y_part [.., N_i]` for the input
`x_full` it was computed from.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from .local_views import GradTarget
from .sharding import tracked_version

__all__ = ["stash_precomputed", "pop_precomputed"]


def stash_precomputed(layer: nn.Module, x_full: Tensor, y: Tensor) -> None:
    """Leave `y`, computed for `x_full` by a fused group (`column_parallel_group`, via
    `parallelize`), for the layer's next forward to return."""
    if torch.compiler.is_compiling():  # attribute ops torch 2.11's dynamo traces (not __dict__'s)
        setattr(layer, "_fusedpar_precomputed", (x_full, y))
    else:  # per forward: the instance dict, not nn.Module.__setattr__
        layer.__dict__["_fusedpar_precomputed"] = (x_full, y)


def pop_precomputed(layer: nn.Module) -> tuple[Tensor, Tensor] | None:
    """Take what `stash_precomputed` left on `layer` (None: nothing, or already taken)."""
    if torch.compiler.is_compiling():
        stash = getattr(layer, "_fusedpar_precomputed", None)
        if stash is not None:
            setattr(layer, "_fusedpar_precomputed", None)
        return stash
    return layer.__dict__.pop("_fusedpar_precomputed", None)


def _take_precomputed(layer: nn.Module, x: Tensor) -> Tensor | None:
    """The output a fused group already computed for `x` (`stash_precomputed`)."""
    stash = pop_precomputed(layer)
    return stash[1] if stash is not None and stash[0] is x else None


class _FusedParts(torch.autograd.Function):
    """`parts → fused`, where `fused` is the parts' concatenation on dim 0, already made (cached).

    forward   fused [sum N_i, ..] returned as an alias             no copy, nothing saved
    backward  d part_i = d fused[N_0+..+N_{i-1} : ..+N_i]            views, no copy

    A part with a `GradTarget` (`param_operand`) has its slice handed to its parameter here,
    as AccumulateGrad would (when the running backward accumulates into it), and None returned.
    """

    @staticmethod
    def forward(ctx: Any, fused: Tensor, bounds: tuple[tuple[int, int], ...],  # type: ignore[override]
                targets: tuple[GradTarget | None, ...] | None, *parts: Tensor) -> Tensor:
        ctx.bounds, ctx.targets = bounds, targets
        return fused.view_as(fused)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        if ctx.targets is None:
            return (None, None, None, *(grad[a:b] for a, b in ctx.bounds))
        out: list[Tensor | None] = []
        for (a, b), target in zip(ctx.bounds, ctx.targets):
            if target is None:
                out.append(grad[a:b])
            else:
                if target.wanted():
                    target.accumulate(grad[a:b])
                out.append(None)
        return (None, None, None, *out)


def _source(p: Tensor | None) -> Tensor | None:
    """The tensor whose version says whether `p`'s values changed (a DTensor's local tensor)."""
    return p._local_tensor if isinstance(p, DTensor) else p


def _linked(fused: Tensor, sizes: list[int], parts: list[Tensor | None],
            targets: Sequence[GradTarget | None] | None = None) -> Tensor:
    """`fused` linked by autograd to the parts (of `sizes` rows) that need a gradient, each
    getting its slice (handed to its parameter where `targets` has one); `fused` itself
    without grad mode or when none does."""
    if not torch.is_grad_enabled():
        return fused
    bounds, grads, kept, start = [], [], [], 0
    for i, (n, part) in enumerate(zip(sizes, parts)):
        if part is not None and part.requires_grad:
            bounds.append((start, start + n))
            grads.append(part)
            kept.append(targets[i] if targets is not None else None)
        start += n
    if not grads:
        return fused
    return _FusedParts.apply(fused, tuple(bounds), tuple(kept) if any(t is not None for t in kept) else None, *grads)


def _cat_biases(operands: Sequence[tuple[Tensor, Tensor | None]]) -> Tensor | None:
    """The parts' biases `[N_i]` concatenated `[sum N_i]`, zeros for a part without one; None
    when no part has one."""
    if all(b is None for _, b in operands):
        return None
    return torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for w, b in operands], 0)


def _fused_operands(layers: Sequence[nn.Module], operands: list[tuple[Tensor, Tensor | None]],
                    targets: list[tuple[GradTarget | None, GradTarget | None]] | None = None
                    ) -> tuple[Tensor, Tensor | None]:
    """The group's weights `[sum N_i, K]` and biases concatenated (zeros for a layer without
    one), made once per version of the layers' parameters and kept on the first layer: an
    in-place write (an optimizer step, `load_state_dict`, `copy_` under no_grad; also
    through a DTensor parameter) or a replaced parameter makes a new one.
    Kept only for the parameters fusedpar made (`tracked_version`); others (FSDP2's unsharded
    ones, refilled each step without moving their version) are concatenated every forward.
    Writes the version counter does not see (under `torch.inference_mode`, or through
    `.data`) are not noticed.
    The kept tensors cost one copy of the group's local weights, where a forward used to
    allocate (and, training, save for backward) one per call."""
    sources = tuple(_source(getattr(layer, name)) for layer in layers for name in ("weight", "bias"))
    versions = tuple(None if t is None else (tracked_version(t), t.data_ptr()) for t in sources)
    cache = layers[0].__dict__.setdefault("_fusedpar_fused", {})
    key = tuple(id(layer) for layer in layers)
    if any(v is not None and v[0] is None for v in versions):  # a source whose writes its version may miss
        cache.pop(key, None)
        with torch.no_grad():
            entry = (sources, versions, torch.cat([wi.detach() for wi, _ in operands], 0), _cat_biases(operands))
    else:
        entry = cache.get(key)
        if (entry is None or entry[1] != versions or any(a is not b for a, b in zip(entry[0], sources))
                or (entry[2].is_inference() and not torch.is_inference_mode_enabled())):  # autograd refuses those
            with torch.no_grad():
                w = torch.cat([wi.detach() for wi, _ in operands], 0)
                b = _cat_biases(operands)
            entry = cache[key] = (sources, versions, w, b)  # the sources are held: their ids cannot be reused
    sizes = [wi.shape[0] for wi, _ in operands]
    w, b = entry[2], entry[3]
    t_w = [t for t, _ in targets] if targets is not None else None
    t_b = [t for _, t in targets] if targets is not None else None
    b_linked = None if b is None else _linked(b, sizes, [bi for _, bi in operands], t_b)
    return _linked(w, sizes, [wi for wi, _ in operands], t_w), b_linked
