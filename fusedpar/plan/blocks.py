"""The blocks a decoder layer calls, as the whole-model passes (islands, block reductions,
unplanned modules) walk them: its own file, so those passes import it from here rather
than from each other."""
from __future__ import annotations

from torch import nn

__all__ = ["layer_blocks"]


def layer_blocks(layer: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    """The blocks a decoder layer calls: its children, with lists of modules (LongCat's two
    attentions in `self_attn.0`, `self_attn.1`) opened up, since a list is never called."""
    blocks = []
    for name, child in layer.named_children():
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            blocks += [(f"{prefix}.{name}.{n}", c) for n, c in child.named_children()]
        else:
            blocks.append((f"{prefix}.{name}", child))
    return blocks
