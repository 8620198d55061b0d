"""Local head counts (a pass of `parallelize`): attention modules that keep their head
counts in attributes get the counts of the heads this rank holds.

Reads: the built column layers with heads (their global count and whether they are
replicated) and the model's config when it has one. Installs: the attributes' new values.
"""
from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from .styles import LinearBuild

__all__ = ["set_local_heads"]


def _parent(path: str) -> str:
    return path.rsplit(".", 1)[0] if "." in path else ""


# attributes attention modules keep their head counts in: Hugging Face's, torch's example
# Transformer's and torchtitan's; the groups (q heads per kv head) are set from the two
_Q_HEAD_ATTRS = ("num_heads", "n_heads", "n_head", "num_attention_heads", "n_local_heads")
_KV_HEAD_ATTRS = ("num_key_value_heads", "n_kv_heads", "num_kv_heads", "n_local_kv_heads")
_GROUP_ATTRS = ("num_key_value_groups", "n_rep")


def set_local_heads(model: nn.Module, builds: Mapping[str, LinearBuild], world: int) -> None:
    """Tell attention modules their local head counts: every head-count attribute they
    already have whose value is a planned projection's global head count (from the model's
    config, else from the projection's width over the module's `head_dim`)."""
    config = getattr(model, "config", None)
    n_q, n_kv = getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)
    parents: dict[str, dict[str, int]] = {}
    for path, b in builds.items():
        if b.heads is None:
            continue
        local = 1 if b.kind == "rep" else b.heads // world
        counts = parents.setdefault(_parent(path), {})
        leaf = path.rpartition(".")[2]
        if b.heads == n_q or (n_q is None and leaf in ("q_proj", "wq", "query")):
            counts["q"], counts["q_global"] = local, b.heads
        if b.heads == n_kv or (n_kv is None and leaf in ("k_proj", "wk", "key")):
            counts["kv"], counts["kv_global"] = local, b.heads
    for parent_path, counts in parents.items():
        attn = model.get_submodule(parent_path)
        q, kv = counts.get("q"), counts.get("kv")
        for attrs, glob, loc in ((_Q_HEAD_ATTRS, counts.get("q_global"), q), (_KV_HEAD_ATTRS, counts.get("kv_global"), kv)):
            for attr in attrs:
                value = getattr(attn, attr, None)
                if loc is not None and type(value) is int and (value == glob or (config is not None and attr in (
                        "num_heads", "num_key_value_heads"))):
                    setattr(attn, attr, loc)
        if q is not None and kv is not None:
            for attr in _GROUP_ATTRS:
                if type(getattr(attn, attr, None)) is int:
                    setattr(attn, attr, q // kv)
