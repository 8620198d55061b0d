"""Styles as objects: each way fusedpar splits a module or a parameter is one small class.

The plan is data (a path pattern → a Hugging Face style string, or a torch ParallelStyle that
torch_styles.py reads into the same objects); the style is behaviour, as in torch's
`distributed/tensor/parallel/style.py`. `TABLE` is the one map from every string to the
class that does it (base.py: the `Style` and `Site` protocol). Each style has these steps:

    check(at)                 raise (no comm) if the module or parameter at `at` cannot take it
    apply(module, mesh, at)   convert it over `mesh` (the TP group); return what takes its place
    install_layouts(module, mesh, at)   a torch plan's layouts at the module's edges
                              (`style.layouts`, layouts.py): DTensor outputs and inputs, an
                              embedding's sequence-shard output; nothing in a Hugging Face plan

`at` is the plan entry at one path (`Site`): the model, the path and plan key, and what the
passes decide for it (what a linear builds, whether it runs on sequence shards). A style's
`stage` is the pass of `parallelize` that applies it: "linears" first, then "modules" (after
every linear is converted), then "grads" (after every parameter is a DTensor: gradient hooks
hold on to the parameter objects); `install_layouts` runs after those, on the module `apply`
left at the path.

    colwise, colwise_rep, colwise_gather_output      ColwiseLinear    ColumnParallelLinear (split heads,
                                                                      or kv heads replicated)
    rowwise, rowwise_rep, rowwise_split_input        RowwiseLinear    RowParallelLinear
    packed_colwise, packed_rowwise                   PackedLinear     [gate; up] halves split apart
    colwise, rowwise, packed_* on a bare parameter   ShardParameter   split in place (sharding.py)
    embedding_rowwise, embedding_colwise             EmbeddingStyle   vocab / hidden split (embedding.py)
    moe_tp_experts                                   ExpertsStyle     experts split, grouped GEMMs (moe.py)
    moe_identity_expert, all_reduce, mla_kv_a_proj   DivideInput, ReduceOutput, MlaKvAProj (partial.py)
    replicated_with_grad_allreduce                   GradAllReduce    gradients all-reduced (per-head norms)
    sequence_parallel                                SequenceNorm     the same, while on sequence shards
    replicate, local_params                          Unchanged        nothing: the module stays replicated
    torch PrepareModuleInput(Shard(1)→Replicate())   GatherInput      its column children gather (torch_styles.py)

GatherInput has no Hugging Face string (`plan_string` False): `plan_sites` gives it a Site at
every module its key matches. Parameters under a "moe_tp_experts" module are the experts' to
split (it checks them as a set), so their own entries, and linear styles on modules under it,
resolve to `Unchanged`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Mapping
from typing import Any, ClassVar

import torch.distributed as dist
from torch import nn

from ..layers import embedding, moe, partial
from ..layers.linear import ColumnParallelLinear, ReplicatedColumnLinear, RowParallelLinear
from ..layers.norm import all_reduce_grads
from ..layers.packed import PackedColumnParallelLinear, PackedRowParallelLinear
from ..layers.sharding import ParamShard, shard_parameter
from .base import PARAM_STYLES, Knobs, LinearBuild, ModuleOnly, Site, Style, key_regex
from .layouts import accept_dtensor_input, split_sequence_output

__all__ = ["Style", "Site", "Knobs", "LinearBuild", "TABLE", "STYLES", "style_for", "plan_sites", "key_regex",
           "param_shard", "inside_experts", "check_row_inputs", "PARAM_STYLES"]


def _parent(path: str) -> str:
    return path.rpartition(".")[0]


# ---------------------------------------------------------------- parallel linears


class _LinearStyle(Style):
    """A linear replaced by a fusedpar layer; `at.build` (a LinearBuild) says which."""

    stage = "linears"
    keeps: ClassVar[type | None] = None  # the fusedpar layer an earlier call may have built
    gather_output: bool | None = None
    input_is_parallel: bool | None = None

    def check(self, at: Site) -> None:
        module = at.module
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            # converted by an earlier call (torch's plans come module by module; a tied LM head
            # is split with its embedding): the style sets its output / input layout again
            col = isinstance(module, ColumnParallelLinear)
            ranks = dist.get_process_group_ranks(module.spec.group)
            if self.keeps is None or col != (self.keeps is ColumnParallelLinear) or ranks != at.ranks:
                raise TypeError(f"{at.where}: expected an nn.Linear (or a fusedpar layer of this style on this "
                                f"group), got {type(module).__name__} on ranks {ranks}")
            at.build = LinearBuild("keep", gather_output=bool(self.gather_output),
                                   input_is_parallel=self.input_is_parallel is not False)
            return
        if not isinstance(module, nn.Linear):
            raise TypeError(f"{at.where}: expected an nn.Linear, got {type(module).__name__}")
        at.build = self._plan(module, at)

    def _plan(self, module: nn.Linear, at: Site) -> LinearBuild:
        raise NotImplementedError

    def apply(self, module: nn.Module, mesh: dist.ProcessGroup, at: Site) -> nn.Module:
        b = at.build
        if b.kind == "keep":
            module.spec = dataclasses.replace(module.spec, sequence_parallel=at.sequence_parallel)
            if isinstance(module, ColumnParallelLinear):
                module.gather_output = b.gather_output
            else:
                module.input_is_parallel = b.input_is_parallel
            # the passes after apply see what the layer is
            at.build = dataclasses.replace(b, kind="col" if isinstance(module, ColumnParallelLinear) else "row")
            return module
        k = at.knobs
        knobs = dict(chunks=k.chunks, kernel=k.kernel, comm=k.comm, sequence_dim=-2)
        sp = at.sequence_parallel
        if b.kind == "row":
            row_cls = PackedRowParallelLinear if b.parts > 1 else RowParallelLinear
            new = row_cls.from_linear(module, group=mesh, name=at.path, input_is_parallel=b.input_is_parallel,
                                      sequence_parallel=sp, **knobs)
        elif b.kind == "rep":
            new = ReplicatedColumnLinear.from_linear(module, group=mesh, parts=b.parts, name=at.path,
                                                     sequence_parallel=sp, save_gathered_input=k.save_gathered_input,
                                                     **knobs)
        else:
            col_cls = PackedColumnParallelLinear if b.parts > 1 else ColumnParallelLinear
            new = col_cls.from_linear(module, group=mesh, name=at.path, gather_output=b.gather_output,
                                      sequence_parallel=sp, save_gathered_input=k.save_gathered_input, **knobs)
        if sp:
            new._fusedpar_region = at.region
        return new

    def on_parameter(self) -> Style:
        return ShardParameter(self.name) if self.name in PARAM_STYLES else ModuleOnly(self.name)

    def sequence_shards(self, at: Site) -> Collection[str]:
        # torch's layouts: a column layer whose input is Shard(1) gathers it in its GEMM, a row
        # layer whose output is Shard(1) reduce-scatters to it
        lay = self.layouts
        on_shards = lay is not None and (lay.sequence_input or (lay.sequence_output is not None
                                                                and at.build.kind == "row"))
        return (at.path,) if on_shards else ()

    def install_layouts(self, module: nn.Module, mesh: dist.ProcessGroup, at: Site) -> None:
        """A DTensor output (use_local_output=False); a DTensor input redistributed to what the
        layer computes on (Shard(-1) features, Replicate(), or the sequence shard) and taken
        apart, here and, for column layers fused in their parent's GEMM, at the parent."""
        if self.layouts is None:
            return
        super().install_layouts(module, mesh, at)
        b, parent_path = at.build, _parent(at.path)
        if b.kind == "row":
            layout = "shard(-1)" if b.input_is_parallel else "replicate"
        else:
            layout = "shard(-2)" if module.spec.sequence_parallel else "replicate"
        accept_dtensor_input(module, layout, group=mesh, where=f"parallelize: {at.path}")
        if b.kind in ("col", "rep") and parent_path and not b.gather_output:
            parent = at.model.get_submodule(parent_path)
            if not getattr(parent, "_fusedpar_accepts_dtensor", False):
                parent._fusedpar_accepts_dtensor = True  # before the fused group's pre-hook
                accept_dtensor_input(parent, layout, group=mesh, where=f"parallelize: {parent_path}", prepend=True)


class ColwiseLinear(_LinearStyle):
    """ColumnParallelLinear: output split on features (Shard(-1)), or gathered (Replicate()).
    Attention projections split whole heads; kv heads fewer than the ranks are replicated."""

    keeps = ColumnParallelLinear

    def __init__(self, name: str, *, gather_output: bool) -> None:
        super().__init__(name)
        self.gather_output = gather_output

    def _plan(self, module: nn.Linear, at: Site) -> LinearBuild:
        model, world = at.model, at.world
        hd = getattr(model.get_submodule(_parent(at.path)), "head_dim", None)
        hd = hd if isinstance(hd, int) and hd > 0 else None
        out = module.out_features
        if hd is not None and not self.gather_output and out % hd == 0:  # heads (not e.g. one gate per head)
            heads = out // hd
            if heads % world == 0:
                return LinearBuild("col", heads=heads, head_dim=hd)
            config = getattr(model, "config", None)
            n_kv = getattr(config, "num_key_value_heads", None)
            n_q = getattr(config, "num_attention_heads", None)
            if heads == n_kv and n_q is not None and heads < n_q and world % heads == 0:
                return LinearBuild("rep", parts=heads, heads=heads, head_dim=hd)
            raise ValueError(
                f"{at.where}: heads: expected the number of heads (out_features {out} / head_dim {hd}) to be a "
                f"multiple of the world size {world} (or, for kv heads, a divisor of it), got {heads}"
            )
        if out % world:
            raise ValueError(f"{at.where}: out_features: expected a multiple of the world size {world} (the output "
                             f"features are split across ranks), got {out}")
        return LinearBuild("col", gather_output=self.gather_output)


class RowwiseLinear(_LinearStyle):
    """RowParallelLinear: input split on features (Shard(-1)), or split here from a Replicate()
    input; partial sums reduced to a Replicate() output."""

    keeps = RowParallelLinear

    def __init__(self, name: str, *, input_is_parallel: bool) -> None:
        super().__init__(name)
        self.input_is_parallel = input_is_parallel

    def _plan(self, module: nn.Linear, at: Site) -> LinearBuild:
        world = at.world
        if module.in_features % world:
            raise ValueError(f"{at.where}: in_features: expected a multiple of the world size {world}, "
                             f"got {module.in_features}")
        config = getattr(at.model, "config", None)
        heads = {getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)} - {None}
        if module.out_features in heads and module.out_features != getattr(config, "hidden_size", None):
            raise ValueError(f"{at.where}: out_features: {module.out_features} is one feature per attention head, "
                             f"which the attention reads for its local heads only; a row-parallel layer returns "
                             f"every head (expected a layer with a hidden-size output, e.g. o_proj)")
        return LinearBuild("row", input_is_parallel=self.input_is_parallel)


class PackedLinear(_LinearStyle):
    """A fused [gate; up] weight whose halves are split apart (layers/packed.py): column- (dim
    0) or row-parallel (dim 1)."""

    def __init__(self, name: str, *, dim: int) -> None:
        super().__init__(name)
        self.dim = dim

    def _plan(self, module: nn.Linear, at: Site) -> LinearBuild:
        ParamShard(self.dim, 2).check(module.weight.shape, at.world, where=f"{at.where}: weight")
        return LinearBuild("col" if self.dim == 0 else "row", parts=2)


def check_row_inputs(sites: list[Site]) -> None:
    """A row-parallel layer that takes split features needs a column-parallel layer in its
    block to split them; otherwise an unplanned layer would hand it whole features."""
    matches = sites[0].matches if sites else {}
    splitting = [p for p, (style, _) in matches.items() if style in ("colwise", "packed_colwise")]
    for at in sites:
        b = at.build
        if at.style.stage == "linears" and b.kind == "row" and b.input_is_parallel:
            block = _parent(at.path)
            if not any(p != at.path and (not block or p.startswith(block + ".")) for p in splitting):
                raise ValueError(f"{at.where}: expected a column-parallel layer under {block or 'the model'} to split "
                                 f"its input features, got none (an unplanned layer would hand it whole features; "
                                 f"plan it 'colwise', or this one 'rowwise_split_input')")


# ---------------------------------------------------------------- parameters, embeddings, experts


def param_shard(style: str, leaf: str, ndim: int) -> ParamShard | None:
    """How `style` splits a bare parameter named `leaf` of `ndim` dims (None: replicated)."""
    if style == "rowwise" and leaf == "bias":
        return None
    matrix_dim, vector_dim, parts = PARAM_STYLES[style]
    return ParamShard(matrix_dim % ndim if ndim >= 2 else vector_dim, parts)


class ShardParameter(Style):
    """A bare parameter split in place (Hugging Face's colwise / rowwise / packed_* on a parameter)."""

    def check(self, at: Site) -> None:
        param = at.params[at.path]
        shard = param_shard(self.name, at.leaf, param.ndim)
        if shard is not None:
            shard.check(param.shape, at.world, where=at.where)

    def apply(self, module: nn.Module, mesh: dist.ProcessGroup, at: Site) -> nn.Module:
        shard = param_shard(self.name, at.leaf, at.params[at.path].ndim)
        if shard is not None:
            shard_parameter(module, at.leaf, shard, group=mesh, where=at.where)
        return module

    def on_parameter(self) -> Style:
        return self


class EmbeddingStyle(Style):
    """An nn.Embedding split on the vocabulary (rows) or the hidden dim (columns); output Replicate()."""

    def check(self, at: Site) -> None:
        embedding.check_embedding(at.module, self.name, at.world, where=at.where)

    def apply(self, module: nn.Module, mesh: dist.ProcessGroup, at: Site) -> nn.Module:
        embedding.shard_embedding(module, self.name, group=mesh, comm=at.knobs.comm, name=at.path,
                                  sequence_dim=self._sequence_dim(at) if self.name == "embedding_rowwise" else None)
        return module

    def _sequence_dim(self, at: Site) -> int | None:
        """The sequence dim a Shard(1) output taken literally puts on shards, else None."""
        dim = self.layouts.sequence_output if self.layouts is not None else None
        return dim if at.literal else None

    def install_layouts(self, module: nn.Module, mesh: dist.ProcessGroup, at: Site) -> None:
        """A Shard(1) output taken literally: sequence parallelism starts here. The vocab split
        reduce-scatters its partial lookups onto this rank's sequence shard (in `apply`, as
        torch's Partial -> Shard(1)); the hidden split's gathered output is cut to it. Then a
        DTensor output (use_local_output=False)."""
        dim = self._sequence_dim(at)
        if dim is not None and self.name != "embedding_rowwise":
            split_sequence_output(module, dim, group=mesh, comm=at.knobs.comm, where=f"parallelize: {at.path}")
        super().install_layouts(module, mesh, at)


def inside_experts(path: str, matches: Mapping[str, tuple[str, str]]) -> bool:
    """Whether `path` is a direct child (a weight) of a module planned "moe_tp_experts"."""
    return matches.get(_parent(path), ("",))[0] == "moe_tp_experts"


class ExpertsStyle(Style):
    """An experts module split on the intermediate dim, its weights planned as a set; grouped GEMMs."""

    def check(self, at: Site) -> None:
        own = {p.rpartition(".")[2]: m[0] for p, m in at.matches.items() if p in at.params and _parent(p) == at.path}
        at.build = moe.plan_experts(at.module, own, at.world, where=at.where)

    def apply(self, module: nn.Module, mesh: dist.ProcessGroup, at: Site) -> nn.Module:
        moe.shard_experts(module, at.build, group=mesh, comm=at.knobs.comm, kernel=at.knobs.kernel, name=at.path)
        return module


# ---------------------------------------------------------------- partial sums and gradient hooks


class DivideInput(Style):
    """An identity expert under experts that sum over ranks: its input divided by the world size."""

    def apply(self, module: nn.Module, mesh: dist.ProcessGroup, at: Site) -> nn.Module:
        partial.install_divide_input(module, world=at.world)
        return module


class ReduceOutput(Style):
    """A module whose output is a partial sum: all-reduced after its forward."""

    def apply(self, module: nn.Module, mesh: dist.ProcessGroup, at: Site) -> nn.Module:
        partial.install_reduce_output(module, group=mesh, comm=at.knobs.comm)
        return module


class MlaKvAProj(Style):
    """Latent attention's kv_a_proj: its rope features (the last qk_rope_head_dim) reduced."""

    def check(self, at: Site) -> None:
        config = getattr(at.model, "config", None)
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        rope_dim = getattr(config, "qk_rope_head_dim", None)
        if not isinstance(rope_dim, int) or not isinstance(at.module, nn.Linear) or \
                rope_dim >= at.module.out_features:
            raise ValueError(f"{at.where}: expected an nn.Linear whose output ends with config.qk_rope_head_dim "
                             f"rope features, got {type(at.module).__name__} and qk_rope_head_dim={rope_dim!r}")
        at.build = rope_dim

    def apply(self, module: nn.Module, mesh: dist.ProcessGroup, at: Site) -> nn.Module:
        partial.install_mla_kv_a_proj(module, rope_dim=at.build, group=mesh, comm=at.knobs.comm)
        return module


class GradAllReduce(Style):
    """An unchanged module whose gradients are per-rank partial sums (per-head norms): all-reduced."""

    stage = "grads"

    def apply(self, module: nn.Module, mesh: dist.ProcessGroup, at: Site) -> nn.Module:
        all_reduce_grads(module, group=mesh, comm=at.knobs.comm)
        return module


class SequenceNorm(Style):
    """An unchanged norm on sequence shards: gradients all-reduced while it runs on shards (a
    norm that sees every token, the final norm, already has whole gradients)."""

    stage = "grads"

    def sequence_shards(self, at: Site) -> Collection[str]:
        return (at.path,)  # torch's SequenceParallel(): the norm itself

    def apply(self, module: nn.Module, mesh: dist.ProcessGroup, at: Site) -> nn.Module:
        if at.sequence_parallel:
            all_reduce_grads(module, group=mesh, comm=at.knobs.comm, region=at.region)
        return module


class Unchanged(Style):
    """Nothing to do: the module or parameter stays replicated (every parameter becomes a
    Replicate() DTensor at the end of parallelize)."""

    def on_parameter(self) -> Style:
        return self


# ---------------------------------------------------------------- the table


TABLE: dict[str, Callable[[], Style]] = {  # Hugging Face's style string → the object that does it
    "colwise": lambda: ColwiseLinear("colwise", gather_output=False),
    "colwise_rep": lambda: ColwiseLinear("colwise_rep", gather_output=True),
    "colwise_gather_output": lambda: ColwiseLinear("colwise_gather_output", gather_output=True),
    "rowwise": lambda: RowwiseLinear("rowwise", input_is_parallel=True),
    "rowwise_rep": lambda: RowwiseLinear("rowwise_rep", input_is_parallel=False),
    "rowwise_split_input": lambda: RowwiseLinear("rowwise_split_input", input_is_parallel=False),
    "packed_colwise": lambda: PackedLinear("packed_colwise", dim=0),
    "packed_rowwise": lambda: PackedLinear("packed_rowwise", dim=1),
    "embedding_rowwise": lambda: EmbeddingStyle("embedding_rowwise"),
    "embedding_colwise": lambda: EmbeddingStyle("embedding_colwise"),
    "moe_tp_experts": lambda: ExpertsStyle("moe_tp_experts"),
    "moe_identity_expert": lambda: DivideInput("moe_identity_expert"),
    "mla_kv_a_proj": lambda: MlaKvAProj("mla_kv_a_proj"),
    "all_reduce": lambda: ReduceOutput("all_reduce"),
    "local_params": lambda: Unchanged("local_params"),
    "replicated_with_grad_allreduce": lambda: GradAllReduce("replicated_with_grad_allreduce"),
    "sequence_parallel": lambda: SequenceNorm("sequence_parallel"),
    "replicate": lambda: Unchanged("replicate"),
}
STYLES = tuple(TABLE)


def style_for(name: str, path: str, matches: Mapping[str, tuple[str, str]], params: Mapping[str, Any],
              given: Style | None = None) -> Style:
    """The style object for the plan entry `name` at `path` (a module or a bare parameter):
    `given` (what torch_styles.py read a torch style as) or the table's."""
    style = given if isinstance(given, Style) and given.name == name else TABLE[name]()
    if isinstance(given, Style) and style is not given:  # another style for the key's paths (loss_parallel's
        style.layouts = given.layouts  # head): the torch plan's layouts at its edges still hold
    if inside_experts(path, matches) and (path in params or style.stage == "linears"):
        return Unchanged(name)  # the experts module splits its own weights (ExpertsStyle)
    return style.on_parameter() if path in params else style


def plan_sites(model: nn.Module, matches: Mapping[str, tuple[str, str]], *, group: dist.ProcessGroup,
               knobs: Knobs, given: Mapping[str, Any] | None = None) -> list[Site]:
    """Every plan entry as a `Site` with its style object, in plan order (no comm). `given`:
    plan key → a style object already read (torch's ParallelStyles, torch_styles.py); one no
    string names (`plan_string` False) takes a Site at every module its key matches."""
    given = given or {}
    params = dict(model.named_parameters())
    ranks = dist.get_process_group_ranks(group)
    sites = []
    for path, (name, key) in matches.items():
        module = model.get_submodule(_parent(path) if path in params else path)
        style = style_for(name, path, matches, params, given.get(key))
        sites.append(Site(model, path, key, style, ranks, matches, params, knobs, module))
    for key, style in given.items():
        if isinstance(style, Style) and not style.plan_string:
            rx = key_regex(key)
            sites += [Site(model, path, key, style, ranks, matches, params, knobs, module)
                      for path, module in model.named_modules() if path and rx.match(path)]
    return sites
