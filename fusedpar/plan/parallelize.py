"""`parallelize(model, plan, group=...)`: convert a model's linears in place from a plain-data plan.

    parallelize(model, {"layers.*.self_attn.q_proj": "colwise", ...}, group=group)
    parallelize(hf_causal_lm, "auto", group=group, sequence_parallel=True)

`plan` maps module paths (`*` matches one path component) to the style strings Hugging Face
uses; "auto" reads the model's own `config.base_model_tp_plan` (keys relative to the base
model, so a `...ForCausalLM` gets them under its `model.` prefix). Embeddings and the LM
head stay replicated unless the plan names them. Every check (plan keys, styles, module
types, divisibility of heads / features) runs before the first conversion, so a bad plan
raises on every rank alike and no collective is ever left waiting.

Styles (a key may name a module or a parameter), each one object of styles.py's table:
    colwise                          ColumnParallelLinear (output split on features); on a
                                     bare parameter: split dim ndim-2 (layers/sharding.py)
    colwise_rep, colwise_gather_output   ColumnParallelLinear(gather_output=True)
    rowwise                          RowParallelLinear (input split on features); on a bare
                                     parameter: split its last dim
    rowwise_rep, rowwise_split_input RowParallelLinear(input_is_parallel=False)
    packed_colwise, packed_rowwise   fused [gate; up] weights split per part (layers/packed.py)
    embedding_rowwise / _colwise     vocab- / hidden-parallel embedding (layers/embedding.py)
    moe_tp_experts                   experts split on their intermediate dim, grouped GEMMs (layers/moe.py)
    moe_identity_expert, all_reduce, mla_kv_a_proj   partial-sum hooks (layers/partial.py)
    replicated_with_grad_allreduce   unchanged module, gradients all-reduced (per-head norms)
    sequence_parallel                unchanged norm on sequence shards, gradients all-reduced
    replicate, local_params          unchanged
Unplanned modules with parameters next to column-parallel layers get their gradients
all-reduced when their first forward finds them reading split data (unplanned.py). MoE
blocks with a shared expert reduce both partial sums once where exact (block_reduction.py).

Column-parallel siblings that read their parent's input (q/k/v in attention, gate/up in
the MLP) run as one fused GEMM (`column_parallel_group`), computed in a pre-hook of the
parent: one gather and one backward reduction for the group (groups.py). With
`sequence_parallel=True` the residual stream inside the decoder layers is split on the
sequence dim: a pre-hook on the first decoder layer splits it (after the model has built
its causal mask and rotary embeddings from the full length) and a hook on the last one
gathers it back, so the final norm and the head see the whole sequence (region.py). The parent
pre-hook hands the attention / MLP module the gathered input, so modules that take shapes
from their input (`view(*input_shape, -1, head_dim)`) work unchanged; norms directly inside
each decoder layer run on shards with their gradients all-reduced. Blocks that cannot take
shards (MoE, latent attention, gathered-output styles) run on the gathered sequence
(islands.py).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any

import torch.distributed as dist
from torch import Tensor, nn

from ..comm import check_group
from ..layers import embedding
from ..layers.fp8 import as_recipe, enable_fp8
from ..layers.linear import ColumnParallelLinear, ReplicatedColumnLinear, RowParallelLinear, SequenceRegion
from ..layers.norm import all_reduce_grads
from ..layers.sharding import gather_shard, local_tensor, param_shards, replicate_parameters
from .agreement import check_parallelize_agrees, install_input_check
from .block_reduction import install_block_reductions
from .groups import install_column_group, reads_hidden
from .heads import set_local_heads
from .blocks import layer_blocks
from .islands import check_layer_inputs, install_islands, sequence_islands
from .region import NoDecoderLayers, decoder_layers, has_decoder_layers, install_sequence_region
from .styles import STYLES, Knobs, LinearBuild, Site, check_row_inputs, plan_sites
from .ties import complete_tied_plan, retie
from .torch_styles import TorchPlan, key_regex, read_plan
from .unplanned import unplanned_modules, watch_unplanned

__all__ = ["parallelize", "full_state_dict", "STYLES", "resolve_plan"]

logger = logging.getLogger("fusedpar")

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
    return read_plan(model, plan).strings  # torch's ParallelStyle objects read as strings (torch_styles.py)


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
        return sum(any(key_regex(prefix + key).match(n) for n in names) for key in base_plan)

    return max(candidates, key=hits)  # the first of the best


def _targets(model: nn.Module) -> list[str]:
    """Paths a plan key may name: every submodule and every parameter."""
    return [name for name, _ in model.named_modules() if name] + [name for name, _ in model.named_parameters()]


def _match(model: nn.Module, plan: dict[str, str], *, unmatched_ok: bool = False) -> dict[str, tuple[str, str]]:
    """`{module or parameter path: (style, plan key)}`; no path two styles. Every key must
    match, except with `unmatched_ok` (a model's own plan covers variants the model may not
    build, e.g. dense and MoE MLPs): then at least one must."""
    names = _targets(model)
    found: dict[str, tuple[str, str]] = {}
    for key, style in plan.items():
        rx = key_regex(key)
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


@dataclass
class _Checked:
    """A plan read into style objects and checked (no comm): what the passes read."""

    matches: dict[str, tuple[str, str]]  # {module or parameter path: (style string, plan key)}
    sites: list[Site]  # every entry with its style object, in plan order (styles.py)
    split_ties: list[list[tuple[str, str]]]  # ties the plan splits (ties.py)
    literal: bool  # torch's sequence layouts taken literally (module by module plans)
    region_name: str  # fusedpar's sequence-parallel region: the decoder layers' path ("" when off)
    region: Any  # ... and the layers themselves (None when off)
    state: SequenceRegion | None
    islands: set[str]  # blocks run on the whole sequence inside the region (islands.py)
    unplanned: dict[str, nn.Module]  # modules next to split layers, watched (unplanned.py)

    @property
    def builds(self) -> dict[str, LinearBuild]:
        """What each linear builds (styles.py), by path: read again after apply, which
        records what a layer converted by an earlier call is."""
        return {at.path: at.build for at in self.sites if at.style.stage == "linears"}


def _check(model: nn.Module, plan: Mapping[str, Any] | str, *, group: Any, sequence_parallel: bool,
           loss_parallel: bool, knobs: Knobs) -> _Checked:
    """Read `plan` into style objects and check everything (no comm), so a bad plan raises on
    every rank before any collective: the plan keys, the linears (what each builds), what
    their inputs need, every other style, then the sequence layout."""
    world = dist.get_world_size(group)
    torch_plan = read_plan(model, plan) if isinstance(plan, Mapping) else TorchPlan()
    if torch_plan.sequence and not sequence_parallel:
        raise ValueError("parallelize: plan: its torch styles split the sequence (Shard(1) layouts or "
                         "SequenceParallel), expected sequence_parallel=True, got False")
    resolved = resolve_plan(model, plan)
    if loss_parallel:
        resolved = embedding.loss_parallel_plan(model, resolved)
    matches = _match(model, resolved, unmatched_ok=isinstance(plan, str))
    split_ties = complete_tied_plan(model, matches)  # a split tie's other member split the same way (ties.py)
    sites = plan_sites(model, matches, group=group, knobs=knobs, given=torch_plan.styles)
    params = dict(model.named_parameters())
    # A torch plan applied module by module (no decoder layers in its keys: torchtitan calls
    # parallelize_module per block) means its layouts literally: the sequence is split where
    # a style's output is Shard(1) and gathered where an input is (layouts.py, the styles'
    # `sequence_shards`). Otherwise sequence parallelism is fusedpar's region over the decoder
    # layers, whatever the layouts.
    literal = sequence_parallel and torch_plan.has_torch and not has_decoder_layers(model, matches)
    linears = [at for at in sites if at.style.stage == "linears"]
    for at in linears:
        at.style.check(at)
    builds = {at.path: at.build for at in linears}
    check_row_inputs(linears)
    for at in sites:
        at.literal, at.builds = literal, builds
        if at.style.stage != "linears":
            at.style.check(at)
    literal_sp = {p for at in sites for p in at.style.sequence_shards(at)} if literal else set()
    region_name, region = decoder_layers(model, matches) if sequence_parallel and not literal else ("", None)
    islands: set[str] = set()
    if region is not None:
        check_layer_inputs(region[0], region_name)
        islands = sequence_islands(matches, set(params), region_name, region)

    def in_region(path: str) -> bool:  # sequence-parallel: in the decoder layers, outside islands
        return (bool(region_name) and path.startswith(region_name + ".")
                and not any(path.startswith(i + ".") for i in islands))

    unplanned: dict[str, nn.Module] = {}
    try:  # decoder-layer models: unplanned modules with parameters in blocks with split layers
        unplanned = unplanned_modules(matches, *decoder_layers(model, matches))
        if region is not None:
            unplanned = {p: m for p, m in unplanned.items() if not in_region(p)}
    except NoDecoderLayers:
        pass  # other models: a parameter next to parallel layers may see replicated inputs
    state = SequenceRegion(world) if region is not None else None
    for at in sites:  # which modules run on sequence shards
        if literal:  # torch's layouts: the linears and SequenceParallel() norms found above
            at.sequence_parallel = at.path in literal_sp
        else:  # fusedpar's region (a norm outside it, e.g. the final one, sees every token)
            at.sequence_parallel = in_region(at.path)
        at.region = state
    return _Checked(matches, sites, split_ties, literal, region_name, region, state, islands, unplanned)


def _apply(model: nn.Module, sites: list[Site], stage: str, group: Any) -> None:
    """Apply every style of `stage` (styles.py), in plan order; a module a style replaces
    takes its place."""
    for at in sites:
        if at.style.stage != stage:
            continue
        new = at.style.apply(at.module, group, at)
        if new is not at.module:
            parent_path, _, leaf = at.path.rpartition(".")
            setattr(model.get_submodule(parent_path), leaf, new)


def _install_layouts(model: nn.Module, sites: list[Site], group: Any) -> None:
    """Each style of a torch plan sets its module's edges from its layouts (DTensor outputs
    and inputs, an embedding's sequence shard: layouts.py), on the module apply left there."""
    for at in sites:
        if at.style.layouts is not None and at.path not in at.params:
            at.style.install_layouts(model.get_submodule(at.path) if at.path else model, group, at)


def _column_groups(model: nn.Module, builds: dict[str, LinearBuild]) -> None:
    """Column-parallel siblings that read their parent's input: one fused GEMM per parent and
    sequence layout (groups.py)."""
    by_parent: dict[str, list[str]] = {}
    for path, b in builds.items():
        if b.kind in ("col", "rep") and not b.gather_output and reads_hidden(model, path):
            by_parent.setdefault(_parent(path), []).append(path)
    for parent_path, paths in by_parent.items():
        layers = [model.get_submodule(p) for p in paths]
        for sp in sorted({layer.spec.sequence_parallel for layer in layers}):  # one fused GEMM per layout
            install_column_group(model.get_submodule(parent_path), [l for l in layers if l.spec.sequence_parallel == sp],
                           parent_path)


def _sequence_region(model: nn.Module, c: _Checked, *, group: Any, comm: str) -> None:
    """Split the residual stream inside the decoder layers (region.py); norms and other
    unplanned blocks with parameters there all-reduce their gradients; islands run on the
    whole sequence (islands.py)."""
    assert c.region is not None and c.state is not None
    entry_check = install_input_check(model, c.region_name, group=group, planned=set(c.matches))
    install_sequence_region(c.region, c.region_name, group=group, comm=comm, state=c.state, entry_check=entry_check)
    planned = set(c.matches)
    for i, layer in enumerate(c.region):
        for path, child in layer_blocks(layer, f"{c.region_name}.{i}"):  # lists opened: LongCat's two norms
            owns_params = any(True for _ in child.parameters(recurse=False))
            holds_plan = any(p == path or p.startswith(path + ".") for p in planned)
            if owns_params and not holds_plan and path not in c.islands:
                all_reduce_grads(child, group=group, comm=comm, region=c.state)
    install_islands(model, c.islands, c.region, group=group, comm=comm, state=c.state)


def _block_reductions(model: nn.Module, c: _Checked, *, group: Any, comm: str) -> None:
    """MoE blocks with a shared expert: one reduction where exact (block_reduction.py)."""
    try:
        install_block_reductions(model, c.matches, c.builds, c.islands, *decoder_layers(model, c.matches),
                                 group=group, comm=comm)
    except NoDecoderLayers:
        pass


def _fp8(model: nn.Module, builds: dict[str, LinearBuild], recipe: Any, *, loss_parallel: bool) -> None:
    """The parallel linears' and the grouped expert GEMMs in fp8 (layers/fp8.py). The LM head
    stays high precision, as the recipe says, also when loss_parallel made it column-parallel:
    fp8 logits would round the loss itself."""
    head = model.get_output_embeddings() if loss_parallel else None
    for path in builds:
        layer = model.get_submodule(path)
        if layer is not head:
            enable_fp8(layer, recipe)
    for module in model.modules():  # the grouped expert GEMMs (layers/moe.py)
        if getattr(module, "_fusedpar_experts", None) == "grouped":
            enable_fp8(module, recipe)


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
        comm=comm, save_gathered_input=save_gathered_input), resolve=resolve_plan)
    c = _check(model, plan, group=group, sequence_parallel=sequence_parallel, loss_parallel=loss_parallel,
               knobs=Knobs(chunks, kernel, comm, save_gathered_input))  # raises before any conversion

    _apply(model, c.sites, "linears", group)  # the parallel linears
    _apply(model, c.sites, "modules", group)  # sharded parameters, experts, embeddings, partial-sum hooks
    retie(model, c.split_ties)  # a split tie's members share one parameter again (ties.py)
    # Every parameter a DTensor on the TP mesh (sharding.py): torch's tools see the shards.
    # Before any gradient hook is registered: hooks hold on to parameter objects.
    replicate_parameters(model, group=group, owned=_PARALLEL_LINEARS)
    _apply(model, c.sites, "grads", group)  # replicated parameters whose gradients are partial sums
    _install_layouts(model, c.sites, group)  # DTensors and sequence shards at the modules' edges
    if c.unplanned:
        watch_unplanned(model, c.unplanned, group=group, comm=comm)
    if loss_parallel:
        embedding.install_loss_parallel(model, group=group, comm=comm)
    # attention whose projections hand on DTensors views them with the global head count
    heads = {at.path: at.build for at in c.sites if at.style.stage == "linears"
             and (at.style.layouts is None or at.style.layouts.dtensor_placement is None)}
    set_local_heads(model, heads, dist.get_world_size(group))  # attention modules' local head counts (heads.py)
    _column_groups(model, c.builds)
    if c.region is not None:
        _sequence_region(model, c, group=group, comm=comm)
    _block_reductions(model, c, group=group, comm=comm)
    if recipe is not None:
        _fp8(model, c.builds, recipe, loss_parallel=loss_parallel)
    replicate_parameters(model, group=group, owned=_PARALLEL_LINEARS)  # any made since (idempotent)
    model._fusedpar_parallel = {"group": group, "sequence_parallel": sequence_parallel, "plan": dict(c.matches),
                                "region": c.state}
    return model


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


