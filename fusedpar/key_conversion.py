"""Hugging Face's checkpoint key conversions, read slice by slice.

Most MoE families store their experts one tensor per expert (`experts.3.w1.weight`) while
the model holds them fused (`experts.gate_up_proj` `[E, 2I, H]`); transformers converts on
load with the model's conversion mapping (`transformers.conversion_mapping`: renamings,
then converters made of `MergeModulelist` (stack the experts) and `Concatenate` (gate next
to up)), and reverts it on save. The sharded loader must not build the fused tensor to cut
its slice out, so the same operations are applied lazily here: a model key maps to a view
that has a shape and can be indexed with slices, and reads only the stored tensors (and
rows of them) that the requested slice covers.

The mapping is transformers' own (looked up per model, as `from_pretrained` does), so the
families it covers are the ones transformers covers. Conversions with other operations
(interleaving, fp8 dequantization, ...) are reported, and a model key that needs one fails
with a message naming it.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["converted_keys", "revert_conversion"]


class _Stacked:
    """`torch.stack(leaves, dim)`, read lazily."""

    def __init__(self, leaves: list[Any], dim: int) -> None:
        shapes = {tuple(leaf.get_shape()) for leaf in leaves}
        if len(shapes) != 1:
            raise ValueError(f"expected the stacked tensors to share one shape, got {sorted(shapes)}")
        self.leaves, self.dim = leaves, dim
        inner = list(shapes.pop())
        self.shape = inner[:dim] + [len(leaves)] + inner[dim:]

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def __getitem__(self, index: Any) -> Tensor:
        index = _full_index(index, len(self.shape))
        inner = index[:self.dim] + index[self.dim + 1:]
        picked = range(len(self.leaves))[index[self.dim]]
        return torch.stack([self.leaves[i][inner] for i in picked], self.dim)


class _Concatenated:
    """`torch.cat(parts, dim)`, read lazily: a slice along `dim` reads only the parts (and
    the rows of them) it covers."""

    def __init__(self, parts: list[Any], dim: int) -> None:
        shapes = [list(p.get_shape()) for p in parts]
        rest = {tuple(s[:dim] + s[dim + 1:]) for s in shapes}
        if len(rest) != 1:
            raise ValueError(f"expected the concatenated tensors to differ only in dim {dim}, got {shapes}")
        self.parts, self.dim = parts, dim
        self.sizes = [s[dim] for s in shapes]
        self.shape = list(shapes[0])
        self.shape[dim] = sum(self.sizes)

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def __getitem__(self, index: Any) -> Tensor:
        index = _full_index(index, len(self.shape))
        start, stop, step = index[self.dim].indices(self.shape[self.dim])
        if step != 1:
            raise ValueError(f"expected a contiguous slice along the concatenated dim, got step {step}")
        pieces, offset = [], 0
        for part, size in zip(self.parts, self.sizes):
            lo, hi = max(start, offset), min(stop, offset + size)
            if lo < hi:
                sub = index[:self.dim] + (slice(lo - offset, hi - offset),) + index[self.dim + 1:]
                pieces.append(part[sub])
            offset += size
        return torch.cat(pieces, self.dim)


def _full_index(index: Any, ndim: int) -> tuple[slice, ...]:
    index = index if isinstance(index, tuple) else (index,)
    if not all(isinstance(s, slice) for s in index):
        raise TypeError(f"expected an index of slices, got {index!r}")
    return index + (slice(None),) * (ndim - len(index))


def _transforms(model: nn.Module) -> tuple[list[Any], list[Any], Any] | None:
    """(renamings, converters, transformers' module) for a Hugging Face model, else None."""
    try:
        from transformers import PreTrainedModel
        from transformers import core_model_loading as core
        from transformers.conversion_mapping import get_model_conversion_mapping
    except ImportError:
        return None
    if not isinstance(model, PreTrainedModel):
        return None
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, core.WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, core.WeightConverter)]
    return renamings, converters, core


def converted_keys(model: nn.Module, stored: Iterable[str], wanted: set[str],
                   open_slice: Any) -> tuple[dict[str, Any], dict[str, list[str]], dict[str, str]]:
    """The model keys in `wanted` that the checkpoint holds under other names.

    `stored`: the checkpoint's keys; `open_slice(key)`: a lazily indexed stored tensor
    (safetensors' `get_slice`). Returns `({model key: lazily indexed tensor}, {model key:
    the stored keys it reads}, {model key: why it cannot be read sliced})`.
    """
    found = _transforms(model)
    if found is None:
        return {}, {}, {}
    renamings, converters, core = found
    prefix = getattr(model, "base_model_prefix", None)
    meta = dict.fromkeys(wanted, True)  # only its keys matter: whether to add or drop the base-model prefix
    renamed: dict[str, str] = {}
    gathered: dict[str, tuple[Any, dict[str, list[str]]]] = {}
    for key in stored:
        if key in wanted:
            continue
        new = key
        for renaming in renamings:  # every renaming in turn (transformers' `apply_renamings`, absent in 5.17)
            new, _ = renaming.rename_source_key(new)
        converter, pattern = None, None
        for conv in converters:
            target, pattern = conv.rename_source_key(new)
            if pattern is not None:
                converter, new = conv, target
                break
        new, _ = core.rename_source_key(new, [], [], prefix, meta)  # the base-model prefix only
        if new not in wanted:
            continue
        if converter is None:
            renamed[new] = key
        else:
            gathered.setdefault(new, (converter, {}))[1].setdefault(pattern, []).append(key)

    views: dict[str, Any] = {k: open_slice(v) for k, v in renamed.items()}
    sources: dict[str, list[str]] = {k: [v] for k, v in renamed.items()}
    refused: dict[str, str] = {}
    for target, (converter, by_pattern) in gathered.items():
        lists = [[open_slice(k) for k in sorted(by_pattern[p], key=core.dot_natural_key)]
                 for p in converter.source_patterns if p in by_pattern]
        try:
            values: list[Any] = lists
            for op in converter.operations:
                if isinstance(op, core.MergeModulelist):
                    values = [_Stacked(leaves, op.dim) for leaves in values]
                elif isinstance(op, core.Concatenate):
                    flat = [v for item in values for v in (item if isinstance(item, list) else [item])]
                    values = [_Concatenated(flat, op.dim)]
                else:
                    raise ValueError(f"its conversion uses {type(op).__name__}, which the slice loader does not "
                                     f"apply (it knows MergeModulelist and Concatenate)")
            if len(values) != 1:
                raise ValueError(f"its conversion leaves {len(values)} tensors, expected one")
            value = values[0]
            views[target] = value[0] if isinstance(value, list) and len(value) == 1 else value
            sources[target] = [k for keys in by_pattern.values() for k in keys]
        except ValueError as e:
            refused[target] = f"stored as {sorted(k for ks in by_pattern.values() for k in ks)[:4]} ...: {e}"
    return views, sources, refused


def revert_conversion(model: nn.Module, key: str, value: Tensor) -> dict[str, Tensor]:
    """`{stored key: tensor}` that Hugging Face's `save_pretrained` writes for the model
    tensor `key` (its conversion reverted: fused experts back to one tensor each)."""
    found = _transforms(model)
    if found is None or not (found[0] or found[1]):
        return {key: value}
    return dict(found[2].revert_weight_conversion(model, {key: value}))
