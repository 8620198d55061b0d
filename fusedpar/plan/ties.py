"""Tied weights kept tied through sharding (an LM head that shares the input embedding's table).

A tied parameter is one tensor used by two modules; its gradient is the sum of both uses.
Sharding replaces each module's parameter with its local slice, so a plan that splits one
member of a tie, or splits the two on different dims, would leave two parameters that
train apart (and a checkpoint loader that finds the head missing). So a plan that splits
one member has the other split the same way, and after sharding the members share one
parameter again:

    the table [V, H] split on          embedding                linear (the LM head)
    dim 0, vocabulary rows             embedding_rowwise        colwise_gather_output (colwise*)
    dim 1, hidden columns              embedding_colwise        rowwise_split_input (rowwise*)

(the head's output gathered, or its split input sliced and its partial sums reduced, so the
model still returns full logits; `loss_parallel=True` keeps the head's vocabulary split
instead, embedding.py). Ties the plan leaves alone stay tied, as before. Anything else
that would cut a tie (members split on different dims, a member that is neither an
embedding nor a linear) is refused before any collective.
"""
from __future__ import annotations

from torch import nn

__all__ = ["complete_tied_plan", "retie"]

_SPLIT_DIM = {  # style → the dim of the shared [V, H] weight it splits
    "embedding_rowwise": 0, "colwise": 0, "colwise_rep": 0, "colwise_gather_output": 0,
    "embedding_colwise": 1, "rowwise": 1, "rowwise_rep": 1, "rowwise_split_input": 1,
}
_COMPLETION = {  # (split dim, the unplanned member's kind) → the style it gets
    (0, "embedding"): "embedding_rowwise", (0, "linear"): "colwise_gather_output",
    (1, "embedding"): "embedding_colwise", (1, "linear"): "rowwise_split_input",
}


def tied_groups(model: nn.Module) -> list[list[tuple[str, str]]]:
    """Each parameter used by more than one module: its `(module path, parameter name)`s,
    in module order (shared submodules, one module under two paths, are not ties)."""
    users: dict[int, list[tuple[str, str, nn.Module]]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        for name, p in module._parameters.items():
            if p is not None:
                users.setdefault(id(p), []).append((path, name, module))
    groups = []
    for members in users.values():
        if len({id(m) for *_, m in members}) > 1:
            groups.append([(path, name) for path, name, _ in members])
    return groups


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.Linear):
        return "linear"
    return None


def complete_tied_plan(model: nn.Module, matches: dict[str, tuple[str, str]]) -> list[list[tuple[str, str]]]:
    """Add to `matches` ({path: (style, plan key)}) the style each tie's unplanned member needs
    (the table above); return the ties the plan splits, for :func:`retie`. Raises (no comm)
    when a split cannot keep a tie."""
    split_ties = []
    for group in tied_groups(model):
        styles = {path: matches[path][0] for path, _ in group if path in matches}
        dims = {_SPLIT_DIM[style] for style in styles.values() if style in _SPLIT_DIM}
        if not dims:
            continue  # the plan splits no member: the tie stays as it is
        names = [f"{path}.{name}" for path, name in group]
        where = f"parallelize: tied parameters {names}"
        if len(dims) > 1 or any(style not in _SPLIT_DIM for style in styles.values()):
            raise ValueError(f"{where}: expected the plan to split every member on the same dim of the shared "
                             f"weight (embedding_rowwise with colwise / colwise_gather_output, or "
                             f"embedding_colwise with rowwise_split_input), got {styles}")
        dim = dims.pop()
        for path, name in group:
            if path in matches:
                continue
            module = model.get_submodule(path)
            kind = _kind(module)
            if kind is None or name != "weight":
                raise ValueError(f"{where}: {path} ({type(module).__name__}) shares the {name!r} the plan splits; "
                                 f"expected an nn.Embedding or nn.Linear weight, to split with it so the tie "
                                 f"survives")
            matches[path] = (_COMPLETION[dim, kind], f"(tied to {names[0]})")
        split_ties.append(group)
    return split_ties


def retie(model: nn.Module, groups: list[list[tuple[str, str]]]) -> None:
    """After sharding: the members of each split tie share the first linear's local weight
    again (no comm; the slices are the same rows or columns on every member)."""
    for group in groups:
        modules = [(model.get_submodule(path), name) for path, name in group]
        keep = next((m for m, _ in modules if not isinstance(m, nn.Embedding)), modules[0][0])
        shared = keep.weight
        for module, name in modules:
            current = getattr(module, name)
            if current is shared:
                continue
            if current.shape != shared.shape:
                raise RuntimeError(f"parallelize: tied {group}: local slices {tuple(current.shape)} and "
                                   f"{tuple(shared.shape)} differ; expected the same split")
            setattr(module, name, shared)
