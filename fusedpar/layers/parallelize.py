"""`parallelize(model, plan, group=...)`: convert a model's linears in place from a plain-data plan.

    parallelize(model, {"layers.*.self_attn.q_proj": "colwise", ...}, group=group)
    parallelize(hf_causal_lm, "auto", group=group, sequence_parallel=True)

`plan` maps module paths (`*` matches one path component) to the style strings Hugging Face
uses; "auto" reads the model's own `config.base_model_tp_plan` (keys relative to the base
model, so a `...ForCausalLM` gets them under its `model.` prefix). Embeddings and the LM
head stay replicated unless the plan names them. Every check (plan keys, styles, module
types, divisibility of heads / features) runs before the first conversion, so a bad plan
raises on every rank alike and no collective is ever left waiting.

Styles (a key may name a module or a parameter):
    colwise                          ColumnParallelLinear (output split on features); on a
                                     bare parameter: split dim ndim-2 (sharding.py)
    colwise_rep, colwise_gather_output   ColumnParallelLinear(gather_output=True)
    rowwise                          RowParallelLinear (input split on features); on a bare
                                     parameter: split its last dim
    rowwise_rep, rowwise_split_input RowParallelLinear(input_is_parallel=False)
    packed_colwise, packed_rowwise   fused [gate; up] weights split per part (packed.py)
    embedding_rowwise / _colwise     vocab- / hidden-parallel embedding (embedding.py)
    moe_tp_experts                   experts split on their intermediate dim, grouped GEMMs (moe.py)
    moe_identity_expert, all_reduce, mla_kv_a_proj   partial-sum hooks (partial.py)
    replicated_with_grad_allreduce   unchanged module, gradients all-reduced (per-head norms)
    sequence_parallel                unchanged norm on sequence shards, gradients all-reduced
    replicate, local_params          unchanged
Unplanned modules with parameters next to column-parallel layers get their gradients
all-reduced when their first forward finds them reading split data (unplanned.py). MoE
blocks with a shared expert reduce both partial sums once where exact (block_reduction.py).

Column-parallel siblings that read their parent's input (q/k/v in attention, gate/up in
the MLP) run as one fused GEMM (`column_parallel_group`), computed in a pre-hook of the
parent: one gather and one backward reduction for the group. With
`sequence_parallel=True` the residual stream inside the decoder layers is split on the
sequence dim: a pre-hook on the first decoder layer splits it (after the model has built
its causal mask and rotary embeddings from the full length) and a hook on the last one
gathers it back, so the final norm and the head see the whole sequence. The parent
pre-hook hands the attention / MLP module the gathered input, so modules that take shapes
from their input (`view(*input_shape, -1, head_dim)`) work unchanged; norms directly inside
each decoder layer run on shards with their gradients all-reduced. Blocks that cannot take
shards (MoE, latent attention, gathered-output styles) run on the gathered sequence
(islands.py).
"""
from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..comm import check_group
from .linear import (
    ColumnParallelLinear,
    ReplicatedColumnLinear,
    RowParallelLinear,
    SequenceRegion,
    column_parallel_group,
    effective_spec,
    gather_from_shard,
    split_to_shard,
)
from .agreement import check_parallelize_agrees, install_input_check
from .fp8 import as_recipe, enable_fp8
from .norm import all_reduce_grads
from . import embedding
from .block_reduction import install_block_reductions
from .islands import check_layer_inputs, install_islands, install_per_token_splits, layer_blocks, sequence_islands
from .packed import PackedColumnParallelLinear, PackedRowParallelLinear
from .sharding import ParamShard, gather_shard, local_tensor, param_shards, replicate_parameters
from .styles import check_row_inputs, inside_experts, plan_styles
from .ties import complete_tied_plan, retie
from .torch_styles import string_plan
from .unplanned import unplanned_modules, watch_unplanned

__all__ = ["parallelize", "full_state_dict", "STYLES", "resolve_plan"]

logger = logging.getLogger("fusedpar")

STYLES = (
    "colwise", "colwise_rep", "colwise_gather_output",
    "rowwise", "rowwise_rep", "rowwise_split_input",
    "packed_colwise", "packed_rowwise",
    "embedding_rowwise", "embedding_colwise",
    "moe_tp_experts", "moe_identity_expert", "mla_kv_a_proj", "all_reduce", "local_params",
    "replicated_with_grad_allreduce", "sequence_parallel", "replicate",
)
_COLWISE = {"colwise": False, "colwise_rep": True, "colwise_gather_output": True}  # style → gather_output
_ROWWISE = {"rowwise": True, "rowwise_rep": False, "rowwise_split_input": False}  # style → input_is_parallel
_PACKED = {"packed_colwise": "col", "packed_rowwise": "row"}
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
        prefix = _auto_prefix(model, base_plan)
        return {prefix + key: style for key, style in base_plan.items()}
    if not isinstance(plan, Mapping):
        raise TypeError(f"parallelize: plan: expected a dict of {{path: style}} or 'auto', got {type(plan).__name__}")
    return string_plan(model, plan)[0]  # torch's ParallelStyle objects read as strings (torch_styles.py)


def _base_prefix(model: nn.Module) -> str:
    base = getattr(model, "base_model", model)
    if base is model:
        return ""
    for name, module in model.named_modules():
        if module is base:
            return name + "."
    return ""


def _auto_prefix(model: nn.Module, base_plan: Mapping[str, str]) -> str:
    """The base model's path, plus "."; when `base_model` does not lead to it (a text model
    whose `base_model_prefix` names a multimodal wrapper's attribute), the child under which
    every plan key finds a module or parameter."""
    names = _targets(model)
    candidates = [_base_prefix(model)] + [name + "." for name, _ in model.named_children()]

    def hits(prefix: str) -> int:
        return sum(any(_key_regex(prefix + key).match(n) for n in names) for key in base_plan)

    return max(candidates, key=hits)  # the first of the best


def _targets(model: nn.Module) -> list[str]:
    """Paths a plan key may name: every submodule and every parameter."""
    return [name for name, _ in model.named_modules() if name] + [name for name, _ in model.named_parameters()]


def _key_regex(key: str) -> re.Pattern[str]:
    return re.compile("".join("[^.]+" if part == "*" else re.escape(part) for part in re.split(r"(\*)", key)) + "$")


def _match(model: nn.Module, plan: dict[str, str], *, unmatched_ok: bool = False) -> dict[str, tuple[str, str]]:
    """`{module or parameter path: (style, plan key)}`; no path two styles. Every key must
    match, except with `unmatched_ok` (a model's own plan covers variants the model may not
    build, e.g. dense and MoE MLPs): then at least one must."""
    names = _targets(model)
    found: dict[str, tuple[str, str]] = {}
    for key, style in plan.items():
        rx = _key_regex(key)
        hits = [n for n in names if rx.match(n)]
        if style not in STYLES:
            where = f"{hits[0]} (plan key {key!r})" if hits else f"plan key {key!r}"
            raise ValueError(f"parallelize: {where}: style {style!r} is not one fusedpar knows; "
                             f"expected one of {list(STYLES)}")
        if not hits and unmatched_ok:
            logger.info("parallelize: plan key %r matches nothing in %s; skipped", key, type(model).__name__)
            continue
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
    if not found:
        raise ValueError(f"parallelize: plan: expected at least one key to match a module of {type(model).__name__}, "
                         f"got none of {list(plan)}")
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
    if style in _PACKED:  # [gate; up] halves split on their own (packed.py)
        dim = 0 if _PACKED[style] == "col" else 1
        ParamShard(dim, 2).check(module.weight.shape, world, where=f"{where}: weight")
        return {"kind": _PACKED[style], "parts": 2, "gather_output": False, "input_is_parallel": True}
    if style in _ROWWISE:
        if module.in_features % world:
            raise ValueError(f"{where}: in_features: expected a multiple of the world size {world}, "
                             f"got {module.in_features}")
        config = getattr(model, "config", None)
        heads = {getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)} - {None}
        if module.out_features in heads and module.out_features != getattr(config, "hidden_size", None):
            raise ValueError(f"{where}: out_features: {module.out_features} is one feature per attention head, which "
                             f"the attention reads for its local heads only; a row-parallel layer returns every "
                             f"head (expected a layer with a hidden-size output, e.g. o_proj)")
        return {"kind": "row", "input_is_parallel": _ROWWISE[style]}
    parent = model.get_submodule(_parent(path))
    hd = _head_dim(model, parent)
    out = module.out_features
    if hd is not None and not _COLWISE[style] and out % hd == 0:  # heads (not e.g. one gate per head)
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
    group: Any,
    sequence_parallel: bool = False,
    chunks: int | None = None,
    kernel: str = "auto",
    comm: str = "torch",
    save_gathered_input: bool = True,
    loss_parallel: bool = False,
    fp8: Any = None,
) -> nn.Module:
    """Convert `model` in place for tensor parallelism over `group` (a ProcessGroup, a 1-D
    DeviceMesh, or one named dim of a bigger mesh, `mesh["tp"]`); return it.

    Pretrained weights are sharded, not re-initialized. Every rank must call it with the
    same model and plan. `chunks` / `kernel` / `comm` / `save_gathered_input` go to every
    parallel linear (`kernel` also to the grouped expert GEMMs). With
    `sequence_parallel=True`, a forward whose sequence length is a multiple of the world
    size runs the decoder layers on sequence shards; any other length (a decode step of one
    token, an odd prefill) runs them unsplit, with the same results. With
    `loss_parallel=True` (training a Hugging Face causal LM) the LM head stays split on the
    vocabulary: the model returns logits `[.., vocab/world]` and computes its loss with
    `vocab_parallel_cross_entropy`; a tied input embedding is split the same way. `fp8`
    (True or a `Float8Recipe`) runs the parallel linears' GEMMs in fp8 (layers/fp8.py: what
    is fp8, what stays high precision, what falls back) and the grouped expert GEMMs too
    (layers/moe.py); layers the plan leaves alone are untouched.
    """
    group = check_group(group, arg="parallelize: group")
    recipe = as_recipe(fp8, where="parallelize: fp8")
    check_parallelize_agrees(model, plan, group=group, settings=dict(  # ranks agree (agreement.py)
        sequence_parallel=sequence_parallel, loss_parallel=loss_parallel, fp8=recipe, chunks=chunks, kernel=kernel,
        comm=comm, save_gathered_input=save_gathered_input))
    world = dist.get_world_size(group)
    if isinstance(plan, Mapping) and string_plan(model, plan)[1] and not sequence_parallel:
        raise ValueError("parallelize: plan: its torch styles split the sequence (Shard(1) layouts or "
                         "SequenceParallel), expected sequence_parallel=True, got False")
    resolved = resolve_plan(model, plan)
    if loss_parallel:
        resolved = embedding.loss_parallel_plan(model, resolved)
    matches = _match(model, resolved, unmatched_ok=isinstance(plan, str))
    split_ties = complete_tied_plan(model, matches)  # a split tie's other member split the same way (ties.py)
    params = dict(model.named_parameters())

    # 1. Check everything (no comm), so a bad plan raises on every rank before any collective.
    linears = {p: m for p, m in matches.items() if p not in params and m[0] in (*_COLWISE, *_ROWWISE, *_PACKED)
               and not inside_experts(p, matches)}
    builds = {p: _plan_linear(model, p, s, k, world) for p, (s, k) in linears.items()}
    check_row_inputs(builds, matches)
    others = plan_styles(model, matches, params, world, kernel=kernel, comm=comm)  # styles.py
    region_name, region = _decoder_layers(model, matches) if sequence_parallel else ("", None)
    islands: set[str] = set()  # blocks run on the whole sequence inside the region (islands.py)
    if sequence_parallel:
        check_layer_inputs(region[0], region_name)
        islands = sequence_islands(matches, set(params), region_name, region)

    def in_region(path: str) -> bool:  # sequence-parallel: in the decoder layers, outside islands
        return (bool(region_name) and path.startswith(region_name + ".")
                and not any(path.startswith(i + ".") for i in islands))

    unplanned: dict[str, nn.Module] = {}
    try:  # decoder-layer models: unplanned modules with parameters in blocks with split layers
        unplanned = unplanned_modules(matches, *_decoder_layers(model, matches))
        if sequence_parallel:
            unplanned = {p: m for p, m in unplanned.items() if not in_region(p)}
    except _NoDecoderLayers:
        pass  # other models: a parameter next to parallel layers may see replicated inputs

    # 2. Convert the linears.
    state = SequenceRegion(world) if sequence_parallel else None
    knobs = dict(chunks=chunks, kernel=kernel, comm=comm, sequence_dim=-2)
    for path, b in builds.items():
        linear = model.get_submodule(path)
        sp = in_region(path)
        if b["kind"] == "row":
            row_cls = PackedRowParallelLinear if b.get("parts", 1) > 1 else RowParallelLinear
            new = row_cls.from_linear(linear, group=group, name=path, input_is_parallel=b["input_is_parallel"],
                                      sequence_parallel=sp, **knobs)
        elif b["kind"] == "rep":
            new = ReplicatedColumnLinear.from_linear(linear, group=group, parts=b["parts"], name=path,
                                                     sequence_parallel=sp, save_gathered_input=save_gathered_input,
                                                     **knobs)
        else:
            col_cls = PackedColumnParallelLinear if b.get("parts", 1) > 1 else ColumnParallelLinear
            new = col_cls.from_linear(linear, group=group, name=path, gather_output=b["gather_output"],
                                      sequence_parallel=sp, save_gathered_input=save_gathered_input, **knobs)
        if sp:
            new._fusedpar_region = state
        parent_path, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent_path), leaf, new)

    # 2b. The other styles: sharded parameters, experts, embeddings, hooks (styles.py).
    for apply in others:
        apply(group)
    retie(model, split_ties)
    # Every parameter a DTensor on the TP mesh (sharding.py): torch's tools see the shards.
    # Before any gradient hook below is registered: hooks hold on to parameter objects.
    replicate_parameters(model, group=group, owned=_PARALLEL_LINEARS)

    # 3. Replicated parameters whose gradients are per-rank partial sums: per-head norms
    #    always; sequence-parallel norms only while their region runs split.
    for path, (style, _) in matches.items():
        if style == "replicated_with_grad_allreduce":
            all_reduce_grads(model.get_submodule(path), group=group, comm=comm)
        elif style == "sequence_parallel" and sequence_parallel and in_region(path):
            # only inside the split region: a norm outside it (the final norm, torch's
            # SequenceParallel() on the root) sees every token, so its gradient is already whole
            all_reduce_grads(model.get_submodule(path), group=group, comm=comm, region=state)
    if unplanned:
        watch_unplanned(model, unplanned, group=group, comm=comm)
    if loss_parallel:
        embedding.install_loss_parallel(model, group=group, comm=comm)

    # 4. Attention modules: local head counts; fused column groups under each parent.
    _set_local_heads(model, builds, world)
    by_parent: dict[str, list[str]] = {}
    for path, b in builds.items():
        if b["kind"] in ("col", "rep") and not b.get("gather_output") and _reads_hidden(model, path):
            by_parent.setdefault(_parent(path), []).append(path)
    for parent_path, paths in by_parent.items():
        _install_group(model.get_submodule(parent_path), [model.get_submodule(p) for p in paths], parent_path)

    # 5. Sequence parallelism: split the residual stream inside the decoder layers.
    if sequence_parallel:
        assert region is not None and state is not None
        entry_check = install_input_check(model, region_name, group=group, planned=set(matches))
        _install_sequence_region(region, region_name, group=group, comm=comm, state=state, entry_check=entry_check)
        planned = set(matches)
        for i, layer in enumerate(region):
            for path, child in layer_blocks(layer, f"{region_name}.{i}"):  # lists opened: LongCat's two norms
                owns_params = any(True for _ in child.parameters(recurse=False))
                holds_plan = any(p == path or p.startswith(path + ".") for p in planned)
                if owns_params and not holds_plan and path not in islands:
                    all_reduce_grads(child, group=group, comm=comm, region=state)
        install_islands(model, islands, region, group=group, comm=comm, state=state)
    try:  # MoE blocks with a shared expert: one reduction where exact (block_reduction.py)
        install_block_reductions(model, matches, builds, islands, *_decoder_layers(model, matches), group=group,
                                 comm=comm)
    except _NoDecoderLayers:
        pass
    if recipe is not None:
        # The LM head stays high precision, as the recipe says, also when loss_parallel made
        # it column-parallel: fp8 logits would round the loss itself.
        head = model.get_output_embeddings() if loss_parallel else None
        for path in builds:
            layer = model.get_submodule(path)
            if layer is not head:
                enable_fp8(layer, recipe)
        for module in model.modules():  # the grouped expert GEMMs (layers/moe.py)
            if getattr(module, "_fusedpar_experts", None) == "grouped":
                enable_fp8(module, recipe)
    replicate_parameters(model, group=group, owned=_PARALLEL_LINEARS)  # any made since (idempotent)
    model._fusedpar_parallel = {"group": group, "sequence_parallel": sequence_parallel, "plan": dict(matches),
                                "region": state}
    return model


def _reads_hidden(model: nn.Module, path: str) -> bool:
    """Whether a column-parallel child can read its parent's input (the residual stream), so
    it may join the parent's fused group: DeepSeek's q_b_proj / kv_b_proj read latents, and a
    vocab-split LM head's parent, the whole model, reads token ids."""
    if "." not in path:
        return False
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = getattr(config, "hidden_size", None)
    return not isinstance(hidden, int) or model.get_submodule(path).in_features == hidden


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
            layer.__dict__["_fusedpar_precomputed"] = (x_full, y)  # not nn.Module.__setattr__: per forward
        return put(x_full)

    def post_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        unused = [type(l).__name__ for l in layers if l.__dict__.pop("_fusedpar_precomputed", None) is not None]
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


def _install_sequence_region(region: nn.ModuleList, name: str, *, group: Any, comm: str,
                             state: SequenceRegion, entry_check: Any) -> None:
    """Split the residual stream on the sequence dim before the first decoder layer and
    gather it after the last one, when the length divides by the world size; otherwise the
    region runs unsplit for this forward (`state.split`, read by its layers and norms)."""

    def split(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        x, put = _first_input(args, kwargs)
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


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's state dict with every parallel linear's and every sharded parameter's
    weights gathered whole.

    A collective: every rank of the group must call it. The keys are the original model's,
    so the result loads into a fresh single-process model.
    """
    sd = {k: local_tensor(v).detach().clone() for k, v in model.state_dict().items()}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, _PARALLEL_LINEARS):
            for k, v in module.full_state_dict().items():
                sd[prefix + k] = v
        for leaf in param_shards(module):
            if prefix + leaf in sd:
                sd[prefix + leaf] = gather_shard(module, leaf)
    return sd


def parallelize_module(module: nn.Module, device_mesh: Any, parallelize_plan: Mapping[str, Any], **kwargs: Any) -> nn.Module:
    """torch's `parallelize_module(module, device_mesh, parallelize_plan)` signature on
    fusedpar's overlapped layers: a plan of torch ParallelStyles (or fusedpar strings) over a
    1-D mesh (or `mesh["tp"]`). Sequence parallelism is on when the plan's styles say so
    (Shard(1) layouts, SequenceParallel); `kwargs` go to `parallelize`. Styles fusedpar cannot
    map are refused naming them (layers/torch_styles.py)."""
    if not isinstance(parallelize_plan, Mapping):
        raise TypeError(f"parallelize_module: parallelize_plan: expected a dict of {{module path: style}}, "
                        f"got {type(parallelize_plan).__name__}")
    kwargs.setdefault("sequence_parallel", string_plan(module, parallelize_plan)[1])
    return parallelize(module, parallelize_plan, group=device_mesh, **kwargs)
