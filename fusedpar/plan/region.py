"""The sequence-parallel region over a model's decoder layers (a pass of `parallelize`).

Reads: the plan's matched paths, to find the one ModuleList (or ModuleDict keyed 0, 1, ...)
of decoder layers their wildcards run over. Installs: a pre-hook on the first layer that
splits the residual stream (its first input, by position or under its own name) on the
sequence dim when the length divides by the world size, and a hook on the last layer that
gathers it back; the region's `SequenceRegion` state tells its layers and norms whether
this forward runs split.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor, nn

from ..layers.linear import SequenceRegion, gather_from_shard, split_to_shard
from .islands import install_per_token_splits

__all__ = ["NoDecoderLayers", "decoder_layers", "has_decoder_layers", "first_input", "first_parameter",
           "install_sequence_region"]


class NoDecoderLayers(ValueError):
    """The plan's modules do not sit in one ModuleList of decoder layers."""


def decoder_layers(model: nn.Module, matches: dict[str, tuple[str, str]]) -> tuple[str, list[nn.Module]]:
    """The decoder layers the plan's wildcards run over (e.g. `model.layers`), in order: the
    sequence-parallel region. A ModuleList, or a ModuleDict keyed "0", "1", ... in the order
    the model calls them (torchtitan's `for layer in self.layers.values()`)."""
    lists = set()
    for path in matches:
        parts = path.split(".")
        for i in range(1, len(parts)):
            if parts[i].isdigit():
                prefix = ".".join(parts[:i])
                container = model.get_submodule(prefix)
                if isinstance(container, nn.ModuleList) or (
                        isinstance(container, nn.ModuleDict) and list(container) == [str(j) for j in range(len(container))]):
                    lists.add(prefix)
                break
    if len(lists) != 1:
        raise NoDecoderLayers(
            f"parallelize(sequence_parallel=True): expected the plan's modules to sit in exactly one "
            f"ModuleList (or ModuleDict keyed 0, 1, ...) of decoder layers (the sequence-parallel region), "
            f"got {sorted(lists) or 'none'}"
        )
    name = lists.pop()
    container = model.get_submodule(name)
    return name, list(container.values() if isinstance(container, nn.ModuleDict) else container)


def has_decoder_layers(model: nn.Module, matches: dict[str, tuple[str, str]]) -> bool:
    try:
        decoder_layers(model, matches)
    except NoDecoderLayers:
        return False
    return True


def first_input(args: tuple, kwargs: dict, name: str = "hidden_states") -> tuple[Tensor, Any]:
    """The module's first input (by position, or by keyword as `name`) and a function
    putting a replacement back in its place."""
    if args and isinstance(args[0], Tensor):
        return args[0], lambda t: ((t, *args[1:]), kwargs)
    for key in dict.fromkeys((name, "hidden_states")):
        if isinstance(kwargs.get(key), Tensor):
            return kwargs[key], lambda t, key=key: (args, {**kwargs, key: t})
    raise TypeError(f"parallelize: expected the module's first argument (or {name}=) to be a Tensor")


def first_parameter(module: nn.Module) -> str:
    """The name of `module.forward`'s first parameter (the residual stream of a decoder layer)."""
    names = [p for p in inspect.signature(type(module).forward).parameters if p != "self"]
    return names[0] if names else "hidden_states"


def install_sequence_region(region: list[nn.Module], name: str, *, group: Any, comm: str,
                             state: SequenceRegion, entry_check: Any) -> None:
    """Split the residual stream on the sequence dim before the first decoder layer and
    gather it after the last one, when the length divides by the world size; otherwise the
    region runs unsplit for this forward (`state.split`, read by its layers and norms)."""

    first = first_parameter(region[0])

    def split(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        x, put = first_input(args, kwargs, first)
        entry_check(x)  # lengths agree across ranks, or every rank raises (agreement.py)
        if x.ndim < 2:
            raise ValueError(f"parallelize(sequence_parallel=True): {name}.0 input: expected [.., seq, hidden], "
                             f"got shape {list(x.shape)}")
        mode = x.shape[-2] % state.world == 0
        if torch.is_grad_enabled():
            # A norm's gradient all-reduce is decided per backward: one backward over forwards
            # of both kinds would sum some tokens' gradients world times. Raised before any comm.
            if state.pending and mode not in state.pending:
                raise ValueError(
                    f"parallelize(sequence_parallel=True): {name}.0 input: sequence length {x.shape[-2]} "
                    f"{'divides' if mode else 'does not divide'} by the world size {state.world}, unlike a forward "
                    f"whose backward has not run yet; expected backward (or torch.no_grad()) between forwards "
                    f"of split and unsplit lengths"
                )
            state.pending.add(mode)
        state.split, state.length = mode, x.shape[-2]
        if not mode:
            return None
        return put(split_to_shard(x, group=group, dim=-2, comm=comm))

    def gather(module: nn.Module, args: tuple, output: Any) -> Any:
        y = output if isinstance(output, Tensor) else output[0]
        if y.requires_grad:  # backward through the region starts here: its forwards are consumed
            y.register_hook(lambda g: state.pending.clear())
        if not state.split:
            return output
        if isinstance(output, Tensor):
            return gather_from_shard(output, group=group, dim=-2, comm=comm)
        return (gather_from_shard(output[0], group=group, dim=-2, comm=comm), *output[1:])

    region[0].register_forward_pre_hook(split, with_kwargs=True)  # first: the per-token splits read state.split
    install_per_token_splits(region, name, group=group, comm=comm, state=state)
    region[len(region) - 1].register_forward_hook(gather)
