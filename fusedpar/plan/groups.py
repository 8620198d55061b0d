"""Fused column groups (a pass of `parallelize`): column-parallel children that read their
parent's input (q/k/v in attention, gate/up in an MLP) run as one GEMM.

Reads: the built column layers and the model's hidden size. Installs: a pre-hook on the
parent that computes the group's outputs (one gather of a sequence shard, one backward
reduction for the group) and hands the parent the gathered input, and a post-hook that
checks each child was called on it.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from ..layers.linear import column_parallel_group, effective_spec, pop_precomputed, stash_precomputed
from .region import first_input

__all__ = ["reads_hidden", "install_column_group"]


def reads_hidden(model: nn.Module, path: str) -> bool:
    """Whether a column-parallel child can read its parent's input (the residual stream), so
    it may join the parent's fused group: DeepSeek's q_b_proj / kv_b_proj read latents, and a
    vocab-split LM head's parent, the whole model, reads token ids."""
    if "." not in path:
        return False
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = getattr(config, "hidden_size", None)
    return not isinstance(hidden, int) or model.get_submodule(path).in_features == hidden


def install_column_group(parent: nn.Module, layers: list[nn.Module], parent_path: str) -> None:
    """Run `layers` (column-parallel children reading the parent's input) as one fused GEMM."""

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        x, put = first_input(args, kwargs)
        outs, x_full = column_parallel_group(layers, x)
        for layer, y in zip(layers, outs):
            stash_precomputed(layer, x_full, y)
        return put(x_full)

    def post_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        unused = [type(l).__name__ for l in layers if pop_precomputed(l) is not None]
        if unused and effective_spec(layers[0]).sequence_parallel:
            raise RuntimeError(
                f"parallelize: {parent_path}: expected each column-parallel child to be called on the "
                f"module's input (they are computed together, sequence-parallel), but {len(unused)} were not"
            )
        return output

    for layer in layers:
        layer._fusedpar_grouped = True
    parent.register_forward_pre_hook(pre_hook, with_kwargs=True)
    parent.register_forward_hook(post_hook, with_kwargs=True)
