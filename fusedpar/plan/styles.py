"""The plan styles that are not linears: checked up front, applied after the linears.

`plan_styles` turns every such plan entry into one `apply(group)` closure, after checking it
(no comm), so `parallelize` raises on a bad entry before anything is converted:

    a bare parameter planned colwise / rowwise / packed_*   shard it in place (sharding.py)
    moe_tp_experts                                          experts block (moe.py)
    embedding_rowwise / embedding_colwise                   vocab / hidden split (embedding.py)
    moe_identity_expert, all_reduce, mla_kv_a_proj          hooks (partial.py)
    local_params, replicate                                 nothing: fusedpar's parameters are local tensors

Parameters named under a "moe_tp_experts" module are sharded by that block, which checks
them as a set (layout flags, packed parts).
"""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

from ..layers import embedding, moe, partial
from ..layers.sharding import ParamShard, shard_parameter

__all__ = ["plan_styles", "param_shard", "inside_experts", "check_row_inputs", "PARAM_STYLES"]

# style on a bare parameter → (dim for >= 2-D, dim for 1-D, packed parts); Hugging Face: colwise
# splits dim ndim-2 (dim 0 of a vector), rowwise the last dim (a bias stays replicated)
PARAM_STYLES = {"colwise": (-2, 0, 1), "rowwise": (-1, -1, 1), "packed_colwise": (-2, -1, 2),
                "packed_rowwise": (-1, -1, 2)}


def _parent(path: str) -> str:
    return path.rpartition(".")[0]


def param_shard(style: str, leaf: str, ndim: int) -> ParamShard | None:
    """How `style` splits a bare parameter named `leaf` of `ndim` dims (None: replicated)."""
    if style == "rowwise" and leaf == "bias":
        return None
    matrix_dim, vector_dim, parts = PARAM_STYLES[style]
    return ParamShard(matrix_dim % ndim if ndim >= 2 else vector_dim, parts)


def inside_experts(path: str, matches: dict[str, tuple[str, str]]) -> bool:
    """Whether `path` is a direct child (a weight) of a module planned "moe_tp_experts"."""
    return matches.get(_parent(path), ("",))[0] == "moe_tp_experts"


def check_row_inputs(builds: dict[str, dict[str, Any]], matches: dict[str, tuple[str, str]]) -> None:
    """A row-parallel layer that takes split features needs a column-parallel layer in its
    block to split them; otherwise an unplanned layer would hand it whole features."""
    splitting = [p for p, (style, _) in matches.items() if style in ("colwise", "packed_colwise")]
    for path, b in builds.items():
        if b["kind"] == "row" and b["input_is_parallel"]:
            block = _parent(path)
            if not any(p != path and (not block or p.startswith(block + ".")) for p in splitting):
                style, key = matches[path]
                raise ValueError(f"parallelize: {path} (plan key {key!r}, style {style!r}): expected a column-parallel "
                                 f"layer under {block or 'the model'} to split its input features, got none (an "
                                 f"unplanned layer would hand it whole features; plan it 'colwise', or this one "
                                 f"'rowwise_split_input')")


def plan_styles(model: nn.Module, matches: dict[str, tuple[str, str]], params: dict[str, Any], world: int,
                *, kernel: str, comm: str) -> list[Callable[[Any], None]]:
    """Check every plan entry that is not a linear (no comm); return one `apply(group)` each."""
    applies: list[Callable[[Any], None]] = []
    for path, (style, key) in matches.items():
        where = f"parallelize: {path} (plan key {key!r}, style {style!r})"
        if path in params:
            if inside_experts(path, matches) or style in ("replicate", "local_params"):
                continue
            if style not in PARAM_STYLES:
                raise ValueError(f"{where}: expected a module for this style, got a parameter "
                                 f"(parameters take {sorted(PARAM_STYLES)})")
            owner_path, _, leaf = path.rpartition(".")
            shard = param_shard(style, leaf, params[path].ndim)
            if shard is not None:
                shard.check(params[path].shape, world, where=where)
                owner = model.get_submodule(owner_path)
                applies.append(lambda g, o=owner, n=leaf, sh=shard, w=where: shard_parameter(o, n, sh, group=g, where=w))
            continue
        module = model.get_submodule(path)
        if style == "moe_tp_experts":
            own = {p.rpartition(".")[2]: m[0] for p, m in matches.items() if p in params and _parent(p) == path}
            shards = moe.plan_experts(module, own, world, where=where)
            applies.append(lambda g, m=module, sh=shards, n=path: moe.shard_experts(m, sh, group=g, comm=comm,
                                                                                    kernel=kernel, name=n))
        elif style in embedding.EMBEDDING_STYLES:
            embedding.check_embedding(module, style, world, where=where)
            applies.append(lambda g, m=module, st=style, n=path: embedding.shard_embedding(m, st, group=g, comm=comm,
                                                                                           name=n))
        elif style == "moe_identity_expert":
            applies.append(lambda g, m=module: partial.install_divide_input(m, world=world))
        elif style == "all_reduce":
            applies.append(lambda g, m=module: partial.install_reduce_output(m, group=g, comm=comm))
        elif style == "mla_kv_a_proj":
            config = getattr(model, "config", None)
            config = config.get_text_config() if hasattr(config, "get_text_config") else config
            rope_dim = getattr(config, "qk_rope_head_dim", None)
            if not isinstance(rope_dim, int) or not isinstance(module, nn.Linear) or rope_dim >= module.out_features:
                raise ValueError(f"{where}: expected an nn.Linear whose output ends with config.qk_rope_head_dim "
                                 f"rope features, got {type(module).__name__} and qk_rope_head_dim={rope_dim!r}")
            applies.append(lambda g, m=module, r=rope_dim: partial.install_mla_kv_a_proj(m, rope_dim=r, group=g,
                                                                                         comm=comm))
    return applies
