"""`parallelize(model, plan, group=...)`: convert a model's linears in place from a plain-data plan.

    parallelize(model, {"layers.*.self_attn.q_proj": "colwise", ...}, group=group)
    parallelize(hf_causal_lm, "auto", group=group, sequence_parallel=True)

`plan` maps module paths (`*` matches one path component) to the style strings Hugging Face
uses; "auto" reads the model's own `config.base_model_tp_plan` (keys relative to the base
model, so a `...ForCausalLM` gets them under its `model.` prefix). Embeddings and the LM
head stay replicated unless the plan names them. Every check (plan keys, styles, module
types, divisibility of heads / features) runs before the first conversion, so a bad plan
raises on every rank alike and no collective is ever left waiting.

Styles:
    colwise                          ColumnParallelLinear (output split on features)
    colwise_rep, colwise_gather_output   ColumnParallelLinear(gather_output=True)
    rowwise                          RowParallelLinear (input split on features)
    rowwise_rep, rowwise_split_input RowParallelLinear(input_is_parallel=False)
    replicated_with_grad_allreduce   unchanged module, gradients all-reduced (per-head norms)
    sequence_parallel                unchanged norm on sequence shards, gradients all-reduced
    replicate                        unchanged

Column-parallel siblings that read their parent's input (q/k/v in attention, gate/up in
the MLP) run as one fused GEMM (`column_parallel_group`), computed in a pre-hook of the
parent: one gather and one backward reduction for the group. With
`sequence_parallel=True` the residual stream inside the decoder layers is split on the
sequence dim: a pre-hook on the first decoder layer splits it (after the model has built
its causal mask and rotary embeddings from the full length) and a hook on the last one
gathers it back, so the final norm and the head see the whole sequence. The parent
pre-hook hands the attention / MLP module the gathered input, so modules that take shapes
from their input (`view(*input_shape, -1, head_dim)`) work unchanged; norms directly inside
each decoder layer run on shards with their gradients all-reduced.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch.distributed as dist
from torch import Tensor, nn

from ..comm import check_group
from .linear import (
    ColumnParallelLinear,
    ReplicatedColumnLinear,
    RowParallelLinear,
    column_parallel_group,
    gather_from_shard,
    split_to_shard,
)
from .fp8 import as_recipe, enable_fp8
from .norm import all_reduce_grads

__all__ = ["parallelize", "full_state_dict", "STYLES", "resolve_plan"]

STYLES = (
    "colwise", "colwise_rep", "colwise_gather_output",
    "rowwise", "rowwise_rep", "rowwise_split_input",
    "replicated_with_grad_allreduce", "sequence_parallel", "replicate",
)
_COLWISE = {"colwise": False, "colwise_rep": True, "colwise_gather_output": True}  # style → gather_output
_ROWWISE = {"rowwise": True, "rowwise_rep": False, "rowwise_split_input": False}  # style → input_is_parallel
_PARALLEL_LINEARS = (ColumnParallelLinear, ReplicatedColumnLinear, RowParallelLinear)


def resolve_plan(model: nn.Module, plan: Mapping[str, str] | str) -> dict[str, str]:
    """The plan as `{key: style}`; "auto" → the model's `config.base_model_tp_plan`, prefixed."""
    if isinstance(plan, str):
        if plan != "auto":
            raise ValueError(f"parallelize: plan: expected a dict of {{path: style}} or 'auto', got {plan!r}")
        config = getattr(model, "config", None)
        base_plan = getattr(config, "base_model_tp_plan", None)
        if not base_plan:
            raise ValueError(
                f"parallelize: plan='auto': expected {type(model).__name__}.config.base_model_tp_plan "
                f"(a Hugging Face model's own plan), got {base_plan!r}"
            )
        prefix = _base_prefix(model)
        return {prefix + key: style for key, style in base_plan.items()}
    if not isinstance(plan, Mapping):
        raise TypeError(f"parallelize: plan: expected a dict of {{path: style}} or 'auto', got {type(plan).__name__}")
    return dict(plan)


def _base_prefix(model: nn.Module) -> str:
    base = getattr(model, "base_model", model)
    if base is model:
        return ""
    for name, module in model.named_modules():
        if module is base:
            return name + "."
    return ""


def _key_regex(key: str) -> re.Pattern[str]:
    return re.compile("".join("[^.]+" if part == "*" else re.escape(part) for part in re.split(r"(\*)", key)) + "$")


def _match(model: nn.Module, plan: dict[str, str]) -> dict[str, tuple[str, str]]:
    """`{module path: (style, plan key)}`; every key must match a module, no module two styles."""
    names = [name for name, _ in model.named_modules() if name]
    found: dict[str, tuple[str, str]] = {}
    for key, style in plan.items():
        if style not in STYLES:
            raise ValueError(f"parallelize: plan[{key!r}]: expected a style in {list(STYLES)}, got {style!r}")
        rx = _key_regex(key)
        hits = [n for n in names if rx.match(n)]
        if not hits:
            example = ", ".join(names[:6])
            raise ValueError(
                f"parallelize: plan key {key!r}: expected it to match a module of {type(model).__name__} "
                f"(paths look like: {example}, ...), got no match"
            )
        for n in hits:
            if n in found and found[n][0] != style:
                raise ValueError(f"parallelize: {n}: matched by plan keys {found[n][1]!r} ({found[n][0]!r}) and "
                                 f"{key!r} ({style!r}); expected one style")
            found[n] = (style, key)
    return found


def _parent(path: str) -> str:
    return path.rsplit(".", 1)[0] if "." in path else ""


def _head_dim(model: nn.Module, parent: nn.Module) -> int | None:
    hd = getattr(parent, "head_dim", None)
    return hd if isinstance(hd, int) and hd > 0 else None


class _NoDecoderLayers(ValueError):
    """The plan's modules do not sit in one ModuleList of decoder layers."""


def _decoder_layers(model: nn.Module, matches: dict[str, tuple[str, str]]) -> tuple[str, nn.ModuleList]:
    """The ModuleList the plan's wildcards run over (e.g. `model.layers`): the sequence-parallel region."""
    lists = set()
    for path in matches:
        parts = path.split(".")
        for i in range(1, len(parts)):
            if parts[i].isdigit():
                prefix = ".".join(parts[:i])
                if isinstance(model.get_submodule(prefix), nn.ModuleList):
                    lists.add(prefix)
                break
    if len(lists) != 1:
        raise _NoDecoderLayers(
            f"parallelize(sequence_parallel=True): expected the plan's modules to sit in exactly one "
            f"ModuleList of decoder layers (the sequence-parallel region), got {sorted(lists) or 'none'}"
        )
    name = lists.pop()
    return name, model.get_submodule(name)


def _plan_linear(model: nn.Module, path: str, style: str, key: str, world: int) -> dict[str, Any]:
    """Check one planned linear (no comm); return what to build for it."""
    module = model.get_submodule(path)
    where = f"parallelize: {path} (plan key {key!r}, style {style!r})"
    if not isinstance(module, nn.Linear):
        raise TypeError(f"{where}: expected an nn.Linear, got {type(module).__name__}")
    if style in _ROWWISE:
        if module.in_features % world:
            raise ValueError(f"{where}: in_features: expected a multiple of the world size {world}, "
                             f"got {module.in_features}")
        return {"kind": "row", "input_is_parallel": _ROWWISE[style]}
    parent = model.get_submodule(_parent(path))
    hd = _head_dim(model, parent)
    out = module.out_features
    if hd is not None and not _COLWISE[style]:
        if out % hd:
            raise ValueError(f"{where}: out_features: expected a multiple of {_parent(path)}.head_dim {hd}, got {out}")
        heads = out // hd
        if heads % world == 0:
            return {"kind": "col", "gather_output": False, "heads": heads, "head_dim": hd}
        config = getattr(model, "config", None)
        n_kv = getattr(config, "num_key_value_heads", None)
        n_q = getattr(config, "num_attention_heads", None)
        if heads == n_kv and n_q is not None and heads < n_q and world % heads == 0:
            return {"kind": "rep", "parts": heads, "heads": heads, "head_dim": hd}
        raise ValueError(
            f"{where}: heads: expected the number of heads (out_features {out} / head_dim {hd}) to be a "
            f"multiple of the world size {world} (or, for kv heads, a divisor of it), got {heads}"
        )
    if out % world:
        raise ValueError(f"{where}: out_features: expected a multiple of the world size {world} (the output "
                         f"features are split across ranks), got {out}")
    return {"kind": "col", "gather_output": _COLWISE[style]}


def parallelize(
    model: nn.Module,
    plan: Mapping[str, str] | str,
    *,
    group: dist.ProcessGroup,
    sequence_parallel: bool = False,
    chunks: int | None = None,
    kernel: str = "auto",
    comm: str = "torch",
    save_gathered_input: bool = True,
    fp8: Any = None,
) -> nn.Module:
    """Convert `model` in place for tensor parallelism over `group`; return it.

    Pretrained weights are sharded, not re-initialized. Every rank must call it with the
    same model and plan. `chunks` / `kernel` / `comm` / `save_gathered_input` go to every
    parallel linear. With `sequence_parallel=True` the sequence length must be a multiple
    of the world size (checked on each forward before any collective). `fp8` (True or a
    `Float8Recipe`) runs the parallel linears' GEMMs in fp8 (layers/fp8.py: what is fp8,
    what stays high precision, what falls back); layers the plan leaves alone are untouched.
    """
    group = check_group(group, arg="parallelize: group")
    recipe = as_recipe(fp8, where="parallelize: fp8")
    world = dist.get_world_size(group)
    matches = _match(model, resolve_plan(model, plan))

    # 1. Check everything (no comm), so a bad plan raises on every rank before any collective.
    builds = {p: _plan_linear(model, p, s, k, world) for p, (s, k) in matches.items() if s in _COLWISE or s in _ROWWISE}
    region_name, region = _decoder_layers(model, matches) if sequence_parallel else ("", None)

    def in_region(path: str) -> bool:
        return bool(region_name) and path.startswith(region_name + ".")

    if sequence_parallel:
        _check_sequence_region(model, matches, region_name, region)
    else:
        try:  # decoder-layer models: blocks with head-split layers, same check as with SP
            _check_unplanned_parameters(matches, *_decoder_layers(model, matches), sequence_parallel=False)
        except _NoDecoderLayers:
            pass  # other models: a parameter next to parallel layers may see replicated inputs

    # 2. Convert the linears.
    knobs = dict(chunks=chunks, kernel=kernel, comm=comm, sequence_dim=-2)
    for path, b in builds.items():
        linear = model.get_submodule(path)
        sp = in_region(path)
        if b["kind"] == "row":
            new = RowParallelLinear.from_linear(linear, group=group, name=path, input_is_parallel=b["input_is_parallel"],
                                                sequence_parallel=sp, **knobs)
        elif b["kind"] == "rep":
            new = ReplicatedColumnLinear.from_linear(linear, group=group, parts=b["parts"], name=path,
                                                     sequence_parallel=sp, save_gathered_input=save_gathered_input,
                                                     **knobs)
        else:
            new = ColumnParallelLinear.from_linear(linear, group=group, name=path, gather_output=b["gather_output"],
                                                   sequence_parallel=sp, save_gathered_input=save_gathered_input,
                                                   **knobs)
        parent_path, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent_path), leaf, new)

    # 3. Replicated parameters whose gradients are per-rank partial sums.
    for path, (style, _) in matches.items():
        if style == "replicated_with_grad_allreduce" or (style == "sequence_parallel" and sequence_parallel):
            all_reduce_grads(model.get_submodule(path), group=group, comm=comm)

    # 4. Attention modules: local head counts; fused column groups under each parent.
    _set_local_heads(model, builds, world)
    by_parent: dict[str, list[str]] = {}
    for path, b in builds.items():
        if b["kind"] in ("col", "rep") and not b.get("gather_output"):
            by_parent.setdefault(_parent(path), []).append(path)
    for parent_path, paths in by_parent.items():
        _install_group(model.get_submodule(parent_path), [model.get_submodule(p) for p in paths], parent_path)

    # 5. Sequence parallelism: split the residual stream inside the decoder layers.
    if sequence_parallel:
        assert region is not None
        _install_sequence_region(region, region_name, group=group, comm=comm, world=world)
        planned = set(matches)
        for i, layer in enumerate(region):
            for child_name, child in layer.named_children():
                path = f"{region_name}.{i}.{child_name}"
                owns_params = any(True for _ in child.parameters(recurse=False))
                holds_plan = any(p == path or p.startswith(path + ".") for p in planned)
                if owns_params and not holds_plan:
                    all_reduce_grads(child, group=group, comm=comm)
    if recipe is not None and builds:
        enable_fp8(model, recipe)
    model._fusedpar_parallel = {"group": group, "sequence_parallel": sequence_parallel, "plan": dict(matches)}
    return model


def _check_sequence_region(model: nn.Module, matches: dict[str, tuple[str, str]], name: str,
                           region: nn.ModuleList) -> None:
    """Reject what sequence parallelism cannot run correctly inside the decoder layers (no comm).

    Inside the region, inputs are sequence shards: a layer planned with a replicated input
    ("*_rep", "rowwise_split_input") would see a shard, and an unplanned parameter inside a
    block that holds planned layers (e.g. an unplanned gate_proj next to a planned down_proj)
    would get a per-rank partial gradient that nothing sums.
    """
    for path, (style, key) in matches.items():
        if path.startswith(name + ".") and style in ("colwise_rep", "colwise_gather_output", "rowwise_rep",
                                                     "rowwise_split_input"):
            raise ValueError(
                f"parallelize(sequence_parallel=True): {path} (plan key {key!r}): expected a style that "
                f"takes sequence shards inside {name} ('colwise' / 'rowwise'), got {style!r}"
            )
    _check_unplanned_parameters(matches, name, region, sequence_parallel=True)


def _check_unplanned_parameters(matches: dict[str, tuple[str, str]], name: str, region: nn.ModuleList, *,
                                sequence_parallel: bool) -> None:
    """Reject an unplanned module with parameters inside a decoder-layer block that holds
    planned layers (e.g. a per-head q_norm, or a gate_proj left out of the plan): it would
    see split activations, and its gradient would be a per-rank partial sum nothing adds up.
    With sequence parallelism every such block sees split activations; without it, only
    blocks with a 'colwise' layer (its split output feeds the rest of the block)."""
    planned = set(matches)
    splitting = planned if sequence_parallel else {p for p, (style, _) in matches.items() if style == "colwise"}
    for i, layer in enumerate(region):
        for child_name, child in layer.named_children():
            base = f"{name}.{i}.{child_name}"
            if not any(p == base or p.startswith(base + ".") for p in splitting):
                continue
            for sub_name, sub in child.named_modules():
                path = f"{base}.{sub_name}" if sub_name else base
                covered = any(path == p or path.startswith(p + ".") for p in planned)
                if not covered and any(True for _ in sub.parameters(recurse=False)):
                    raise ValueError(
                        f"parallelize(sequence_parallel={sequence_parallel}): {path}: expected a plan entry for a "
                        f"module with parameters inside a block with parallel layers (its gradient would be a "
                        f"per-rank partial sum; e.g. 'replicated_with_grad_allreduce'), got none"
                    )


def _set_local_heads(model: nn.Module, builds: dict[str, dict[str, Any]], world: int) -> None:
    """Tell attention modules their local head counts (only the attributes they already have)."""
    config = getattr(model, "config", None)
    n_q, n_kv = getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)
    parents: dict[str, dict[str, int]] = {}
    for path, b in builds.items():
        if "heads" not in b:
            continue
        local = 1 if b["kind"] == "rep" else b["heads"] // world
        counts = parents.setdefault(_parent(path), {})
        if b["heads"] == n_q:
            counts["q"] = local
        if b["heads"] == n_kv:
            counts["kv"] = local
    for parent_path, counts in parents.items():
        attn = model.get_submodule(parent_path)
        q, kv = counts.get("q"), counts.get("kv")
        if q is not None and hasattr(attn, "num_heads"):
            attn.num_heads = q
        if kv is not None and hasattr(attn, "num_key_value_heads"):
            attn.num_key_value_heads = kv
        if q is not None and kv is not None and hasattr(attn, "num_key_value_groups"):
            attn.num_key_value_groups = q // kv


def _first_input(args: tuple, kwargs: dict) -> tuple[Tensor, Any]:
    """The module's first input and a function putting a replacement back in its place."""
    if args and isinstance(args[0], Tensor):
        return args[0], lambda t: ((t, *args[1:]), kwargs)
    if isinstance(kwargs.get("hidden_states"), Tensor):
        return kwargs["hidden_states"], lambda t: (args, {**kwargs, "hidden_states": t})
    raise TypeError("parallelize: expected the module's first argument (or hidden_states=) to be a Tensor")


def _install_group(parent: nn.Module, layers: list[nn.Module], parent_path: str) -> None:
    """Run `layers` (column-parallel children reading the parent's input) as one fused GEMM."""

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        x, put = _first_input(args, kwargs)
        outs, x_full = column_parallel_group(layers, x)
        for layer, y in zip(layers, outs):
            layer._fusedpar_precomputed = (x_full, y)
        return put(x_full)

    def post_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        unused = [type(l).__name__ for l in layers if l.__dict__.pop("_fusedpar_precomputed", None) is not None]
        if unused and layers[0].spec.sequence_parallel:
            raise RuntimeError(
                f"parallelize: {parent_path}: expected each column-parallel child to be called on the "
                f"module's input (they are computed together, sequence-parallel), but {len(unused)} were not"
            )
        return output

    for layer in layers:
        layer._fusedpar_grouped = True
    parent.register_forward_pre_hook(pre_hook, with_kwargs=True)
    parent.register_forward_hook(post_hook, with_kwargs=True)


def _install_sequence_region(region: nn.ModuleList, name: str, *, group: Any, comm: str, world: int) -> None:
    def split(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        x, put = _first_input(args, kwargs)
        if x.ndim < 2 or x.shape[-2] % world:
            raise ValueError(
                f"parallelize(sequence_parallel=True): {name}.0 input: expected the sequence length "
                f"(dim -2 of {list(x.shape)}) to be a multiple of the world size {world}, got "
                f"{x.shape[-2] if x.ndim >= 2 else None}"
            )
        return put(split_to_shard(x, group=group, dim=-2, comm=comm))

    def gather(module: nn.Module, args: tuple, output: Any) -> Any:
        if isinstance(output, Tensor):
            return gather_from_shard(output, group=group, dim=-2, comm=comm)
        return (gather_from_shard(output[0], group=group, dim=-2, comm=comm), *output[1:])

    region[0].register_forward_pre_hook(split, with_kwargs=True)
    region[len(region) - 1].register_forward_hook(gather)


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's state dict with every parallel linear's weights gathered whole.

    A collective: every rank of the group must call it. The keys are the original model's,
    so the result loads into a fresh single-process model.
    """
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name, module in model.named_modules():
        if isinstance(module, _PARALLEL_LINEARS):
            for k, v in module.full_state_dict().items():
                sd[f"{name}.{k}" if name else k] = v
    return sd
