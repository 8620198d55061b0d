"""Sequence parallelism around blocks that cannot take sequence shards: "islands".

With `sequence_parallel=True` the residual stream inside the decoder layers is split on the
sequence dim. A block (a direct child of a decoder layer) runs on those shards natively when
its plan is plain column/row-parallel linears: the column group gathers the sequence and the
row layer reduce-scatters it back. Other blocks run as islands, on the whole sequence:

    pre-hook   x_full = all_gather(x_shard)           backward: keep this rank's rows of dx_full
    inside     the block exactly as without sequence parallelism (replicated input, replicated
               output: MoE experts, DeepSeek's latent attention, gathered-output styles,
               unplanned attention or state-space mixers)
    post-hook  y_shard = y_full.chunk(world, seq)[rank]   backward: all-gather dy

Correct because a block without sequence parallelism returns the same output on every rank
and sends back the same input gradient on every rank. It costs an all-gather and an
all-reduce where a native block has an all-gather and a reduce-scatter; an MoE block whose
partial sums are reduced once at its exit (block_reduction.py) reduce-scatters there instead,
the cost of a native block.

A block is an island when it holds a planned entry that is not a plain linear style, a
planned parameter, an unplanned module with parameters next to planned linears, or no plan
at all but matrices (an unplanned attention). Blocks holding only vectors (norms) run on
shards with their gradients all-reduced, as before.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch.distributed as dist
from torch import Tensor, nn

from .block_reduction import block_is_merged
from ..layers.linear import gather_from_shard, reduce_scatter_to_shard, split_to_shard
from ..layers.partial import reduce_partial
from .blocks import layer_blocks

__all__ = ["PER_TOKEN_ARGS", "SP_NATIVE_STYLES", "install_per_token_splits", "sequence_islands", "install_island",
           "install_islands", "check_layer_inputs", "layer_blocks"]

SP_NATIVE_STYLES = frozenset({"colwise", "rowwise", "packed_colwise", "packed_rowwise",
                              "replicated_with_grad_allreduce", "sequence_parallel", "replicate"})

# decoder-layer forward arguments that are not per-token tensors, or per-token context read only
# inside blocks that run on the whole sequence (hidden_states itself is split): position
# embeddings, masks, Beam's per-position attention scale; plus PER_TOKEN_ARGS, per-token inputs
# made from the whole sequence outside the layers and read next to the residual stream (Gemma
# 4's per-layer embeddings, [batch, seq, d]), split with it. Anything else is refused, since
# fusedpar cannot tell where it is read (e.g. the previous layer's top-k indices).
PER_TOKEN_ARGS = frozenset({"per_layer_input"})
_LAYER_ARGS = PER_TOKEN_ARGS | frozenset({
                         "self", "hidden_states", "attention_mask", "position_ids", "position_embeddings",
                         "past_key_values", "past_key_value", "layer_past", "cache_position", "use_cache",
                         "output_attentions", "output_router_logits", "shared_kv_states", "attention_scaling",
                         "args", "kwargs",
                         # torchtitan's and torch's own model code: rotary tables and masks
                         "freqs_cis", "rope_cache", "attention_masks", "attn_mask", "mask"})


def check_layer_inputs(layer: nn.Module, name: str) -> None:
    """Refuse (no comm) decoder layers that take inputs other than the residual stream,
    whole-sequence context and the per-token inputs split with it (`PER_TOKEN_ARGS`), e.g.
    DeepSeek V4's input ids or GLM-DSA's previous layer's top-k indices: those would stay
    whole while the residual stream they meet is split."""
    # the first argument is the residual stream (split), whatever its name: `hidden_states`,
    # torchtitan's `x`, passed by position or keyword
    names = [p for p in inspect.signature(type(layer).forward).parameters if p != "self"]
    extra = [p for p in names[1:] if p not in _LAYER_ARGS]
    if isinstance(getattr(layer, "altup", None), nn.Module):
        # Gemma 3n: the stream is [altup, batch, seq, hidden]; beyond 3 dims fusedpar cannot
        # tell a stack of streams from hyper-connections' [batch, seq, streams, hidden]
        raise ValueError(
            f"parallelize(sequence_parallel=True): {name}.0 ({type(layer).__name__}): expected a decoder layer whose "
            f"residual stream is [(batch,) seq, hidden], got one with AltUp (a stack of streams, 4 dims)")
    if extra:
        raise ValueError(
            f"parallelize(sequence_parallel=True): {name}.0 ({type(layer).__name__}): expected a decoder layer "
            f"whose only per-token input is its first, the residual stream (fusedpar splits that one), got also {extra}")


def install_per_token_splits(region: nn.ModuleList, name: str, *, group: Any, comm: str, state: Any) -> None:
    """Split each layer's per-token inputs (`PER_TOKEN_ARGS`, given by position or keyword)
    on the sequence dim like the residual stream, in the forwards where the region runs
    split (`state.split`). They are replicated (computed on every rank from the whole
    sequence), so the split is a local slice whose backward all-gathers the gradient: the
    replicated parameters that made them get every token's gradient on every rank."""
    for i, layer in enumerate(region):
        names = [p for p in inspect.signature(type(layer).forward).parameters if p != "self"]
        wanted = [(arg, names.index(arg)) for arg in PER_TOKEN_ARGS if arg in names]
        if not wanted:
            continue

        def split(module: nn.Module, args: tuple, kwargs: dict, wanted=wanted, where=f"{name}.{i}") -> Any:
            if not state.split:
                return None
            args, kwargs = list(args), dict(kwargs)
            for arg, pos in wanted:
                x = kwargs.get(arg) if arg in kwargs else (args[pos] if pos < len(args) else None)
                if not isinstance(x, Tensor):
                    continue
                if x.ndim < 2 or x.shape[-2] != state.length:
                    raise ValueError(f"parallelize(sequence_parallel=True): {where} {arg}: expected [.., seq, d] with "
                                     f"seq {state.length} (the residual stream's), got shape {list(x.shape)}")
                x = split_to_shard(x, group=group, dim=-2, comm=comm)
                if arg in kwargs:
                    kwargs[arg] = x
                else:
                    args[pos] = x
            return tuple(args), kwargs

        layer.register_forward_pre_hook(split, with_kwargs=True)


def sequence_islands(matches: dict[str, tuple[str, str]], params: set[str], name: str,
                     region: nn.ModuleList) -> set[str]:
    """The decoder-layer blocks that run as islands (paths), by the rule in the module doc;
    also a block planned with plain linears only that holds an unplanned module with
    parameters (an activation with learned slopes, a router)."""
    islands: set[str] = set()
    for i, layer in enumerate(region):
        for base, child in layer_blocks(layer, f"{name}.{i}"):
            entries = {p: s for p, (s, _) in matches.items() if p == base or p.startswith(base + ".")}
            if not entries:
                if any(p.ndim >= 2 for p in child.parameters()):
                    islands.add(base)
                continue
            if any(s not in SP_NATIVE_STYLES or p in params for p, s in entries.items()):
                islands.add(base)
                continue
            for sub_name, sub in child.named_modules():
                path = f"{base}.{sub_name}" if sub_name else base
                covered = any(path == p or path.startswith(p + ".") for p in entries)
                if not covered and any(True for _ in sub.parameters(recurse=False)):
                    # natively its input would be the gathered sequence, detached (column group), or
                    # split features: on the whole sequence it is an ordinary tensor-parallel block
                    islands.add(base)
                    break
    return islands


def _first_tensor(args: tuple, kwargs: dict) -> tuple[Tensor, Any]:
    if args and isinstance(args[0], Tensor):
        return args[0], lambda t: ((t, *args[1:]), kwargs)
    if isinstance(kwargs.get("hidden_states"), Tensor):
        return kwargs["hidden_states"], lambda t: (args, {**kwargs, "hidden_states": t})
    raise TypeError("sequence-parallel island: expected the block's first argument (or hidden_states=) to be a Tensor")


def install_island(module: nn.Module, *, group: dist.ProcessGroup, comm: str = "torch", state: Any = None) -> None:
    """Run `module` on the gathered sequence inside a sequence-parallel region (see the module
    doc). `state` is the region's `SequenceRegion`: while it runs unsplit (a length that does
    not divide by the world size), the block's input is whole already and nothing is done."""

    shapes: list[tuple[int, ...] | None] = []

    def gather(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if state is not None and not state.split:
            shapes.append(None)
            return None
        x, put = _first_tensor(args, kwargs)
        x_full = gather_from_shard(x, group=group, dim=-2, comm=comm)
        shapes.append(tuple(x_full.shape[:-1]))
        return put(x_full)

    def split_one(y: Tensor, tokens: tuple[int, ...] | None, partial: bool) -> Tensor:
        if tokens is None:  # the region runs unsplit: whole in, whole out
            return reduce_partial(y, group=group, comm=comm) if partial else y
        # a partial sum (block_reduction.py): reduce-scatter, where a whole output is sliced
        cut = reduce_scatter_to_shard if partial else split_to_shard
        if tuple(y.shape[:-1]) == tokens or y.ndim < 2:
            return cut(y, group=group, dim=-2, comm=comm)
        # a block that returns its tokens flattened ([batch * seq, H], Llama 4's MoE): split per sequence
        y_shard = cut(y.reshape(*tokens, y.shape[-1]), group=group, dim=-2, comm=comm)
        return y_shard.reshape(-1, y.shape[-1])

    def split(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        tokens = shapes.pop()
        partial = block_is_merged(mod)
        if tokens is None and not partial:
            return output
        if isinstance(output, Tensor):
            return split_one(output, tokens, partial)
        return (split_one(output[0], tokens, partial), *output[1:])

    module.register_forward_pre_hook(gather, with_kwargs=True, prepend=True)
    module.register_forward_hook(split, with_kwargs=True)
    module._fusedpar_island = True


def install_islands(model: nn.Module, islands: set[str], region: nn.ModuleList, *, group: dist.ProcessGroup,
                    comm: str = "torch", state: Any = None) -> None:
    """Install every island, and refuse (before the region's first collective) a residual
    stream that is not `[(batch,) seq, hidden]`: hyper-connections carry several streams per
    token, `[batch, seq, streams, hidden]`, whose dim -2 is not the sequence."""

    def check(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        x, _ = _first_tensor(args, kwargs)
        if x.ndim > 3:
            raise ValueError(f"parallelize(sequence_parallel=True): {type(mod).__name__} input: expected "
                             f"hidden_states [(batch,) seq, hidden], got shape {list(x.shape)}")

    region[0].register_forward_pre_hook(check, with_kwargs=True, prepend=True)
    for path in sorted(islands):
        install_island(model.get_submodule(path), group=group, comm=comm, state=state)
