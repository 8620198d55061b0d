"""`save_pretrained`: a parallelized model written back as a Hugging Face directory, atomically.

Rank 0 gathers one tensor at a time and writes a file's worth at a time into a staged
directory; every rank votes after each file; the staged directory replaces the target by
rename only once every rank voted it complete (checkpoint_io.py has the staging, the votes
and the check-in every rank does first).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .checkpoint import (_INDEX, _SINGLE, _entries, _local, _local_shape, _model_group, _read_index, _shard_dim,
                         _shard_parts)
from .checkpoint_io import (JOIN_TIMEOUT_S, SaveError, StagedDir, Votes, describe, group_timeout_s, join,
                            parse_size)
from .key_conversion import revert_conversion

__all__ = ["save_pretrained"]


def _plan_files(model: nn.Module, group: dist.ProcessGroup | None, world: int, limit: int) -> tuple[list, list, list]:
    """(entries, files, names): every tensor with its full shape, grouped into files of at
    most `limit` bytes; planned from the full shapes every rank knows, before anything moves."""
    entries = []
    for key, module, name, tensor, is_param in _entries(model):
        if tensor.is_meta:
            raise ValueError(f"{key} is on the meta device: load or initialize it before saving")
        dim = _shard_dim(module, name) if is_param else None
        full = list(_local_shape(tensor))
        if dim is not None and group is not None:
            full[dim] *= world
        entries.append((key, tensor, dim, torch.Size(full), _shard_parts(module, name)))
    files, size = [[]], 0
    for e in entries:  # (key, tensor, dim, full shape, packed parts)
        nbytes = e[3].numel() * e[1].element_size()
        if files[-1] and size + nbytes > limit:
            files.append([])
            size = 0
        files[-1].append(e)
        size += nbytes
    total = len(files)
    names = [_SINGLE] if total == 1 else [f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i in range(total)]
    return entries, files, names


@torch.no_grad()
def save_pretrained(model: nn.Module, path: str | os.PathLike, *, group: Any = None,
                    max_shard_size: int | str = "5GB", join_timeout: float | None = None) -> None:
    """Write the unsharded model as a Hugging Face directory (safetensors shards of at most
    `max_shard_size` bytes, the index, `config.json`), from rank 0 of `group`.

    A collective: every rank calls it, and each must enter within `join_timeout` seconds
    (default: the group's timeout, at most 60 s). Tensors are gathered to rank 0 one at a
    time and written a file's worth at a time, so no rank ever holds the whole model. Tied
    parameters are saved once, under their first name (as Hugging Face does).

    Atomic: the new directory is staged next to `path` (so its parent must be writable),
    every rank votes it complete, then it replaces `path` by rename; weight files of an
    earlier layout are gone, other files (tokenizer, ...) are kept. On any failure, on any
    rank, every rank raises `SaveError` naming the rank and the cause, and `path` holds
    the old checkpoint unchanged.
    """
    from safetensors.torch import save_file

    where = "save_pretrained"
    group = _model_group(model, group, where)
    rank, world = (dist.get_rank(group), dist.get_world_size(group)) if group is not None else (0, 1)
    out = Path(path)
    # a bad argument raises here, before any communication (a rank that alone passes one
    # leaves the others to time out at the check-in below, naming it)
    limit = parse_size(max_shard_size, arg=f"{where}: max_shard_size")
    entries, files, names, error = [], [], [], None
    try:  # reported in the first vote, so every rank raises it
        entries, files, names = _plan_files(model, group, world, limit)
    except Exception as e:  # noqa: BLE001 - carried to every rank below
        error = f"planning the files: {describe(e)}"
    if group is not None:
        join(group, where, min(group_timeout_s(group), JOIN_TIMEOUT_S) if join_timeout is None else join_timeout, out)
    votes = Votes(group, where, out)
    staged = StagedDir(out) if rank == 0 else None
    try:
        if rank == 0 and error is None:
            try:
                staged.prepare()
            except Exception as e:  # noqa: BLE001 - e.g. a read-only parent directory
                error = f"{describe(e)} (making {staged.tmp})"
        plans = votes.round("preparing the save", error,
                            (names, [(k, list(full), str(t.dtype)) for k, t, _, full, _ in entries]))
        differ = [r for r, p in enumerate(plans) if p != plans[0]]
        if differ:
            r = differ[0]
            raise SaveError(f"{where}: rank {r} of {world} would save {len(plans[r][1])} tensors in {plans[r][0]}, "
                            f"rank 0 {len(plans[0][1])} in {plans[0][0]}: every rank must save the same model with "
                            f"the same max_shard_size; {votes.outcome()}")
        dst = dist.get_global_rank(group, 0) if group is not None else 0
        weight_map: dict[str, str] = {}
        for fname, batch in zip(names, files):
            error, pending = None, {}
            for key, tensor, dim, full, packed in batch:
                try:
                    local = _local(tensor).detach().contiguous()
                except Exception as e:  # noqa: BLE001 - keep sending (zeros) so no peer waits; voted below
                    error = error or f"reading {key}: {describe(e)}"
                    local = torch.zeros(_local_shape(tensor), dtype=tensor.dtype, device=tensor.device)
                value = local
                if dim is not None and group is not None:
                    parts = [torch.empty_like(local) for _ in range(world)] if rank == 0 else None
                    try:
                        dist.gather(local, parts, dst=dst, group=group)
                    except RuntimeError as e:  # the group is broken: no further collective can work
                        raise votes.lost(f"gathering {key}", e) from e
                    # packed blocks: every rank holds a chunk of each; the stored tensor is block-major
                    value = torch.cat([p.chunk(packed, dim)[b] for b in range(packed) for p in parts], dim) \
                        if rank == 0 else None
                if rank == 0 and error is None:  # under the names Hugging Face stores (fused experts one by one)
                    try:
                        for stored_key, stored in revert_conversion(model, key, value).items():
                            pending[stored_key] = stored.cpu().clone(memory_format=torch.contiguous_format)
                            weight_map[stored_key] = fname
                    except Exception as e:  # noqa: BLE001 - voted below
                        error = f"converting {key}: {describe(e)}"
            if rank == 0 and error is None:
                try:
                    save_file(pending, str(staged.tmp / fname), metadata={"format": "pt"})
                except Exception as e:  # noqa: BLE001 - a full disk, a quota: voted below
                    error = f"{describe(e)} (into {staged.tmp})"
            del pending
            votes.round(f"writing {fname}", error)
        error = None
        if rank == 0:
            try:
                _finish(model, staged, names, weight_map, entries)
            except Exception as e:  # noqa: BLE001 - voted below
                error = f"{describe(e)} (in {staged.tmp})"
        votes.round("writing the index and configs and checking every file", error)
        votes.swapping, error = True, None
        if rank == 0:
            try:
                staged.commit()
                votes.committed = True
            except Exception as e:  # noqa: BLE001 - voted below
                error = describe(e)
        votes.round("swapping the new directory in", error)
        votes.committed = True
    finally:
        if rank == 0 and not votes.committed:
            staged.abort()


def _finish(model: nn.Module, staged: StagedDir, names: list[str], weight_map: dict[str, str], entries: list) -> None:
    """Rank 0: the index and configs into the staged directory, the old directory's other
    files linked over, every weight file re-opened and checked, all of it flushed to disk."""
    out = staged.tmp
    if len(names) > 1:
        index = {"metadata": {"total_size": sum(e[3].numel() * e[1].element_size() for e in entries)},
                 "weight_map": weight_map}
        (out / _INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "save_pretrained"):
        config.save_pretrained(out)
    gen = getattr(model, "generation_config", None)
    if gen is not None and hasattr(gen, "save_pretrained"):
        gen.save_pretrained(out)
    staged.carry_over()
    from safetensors import safe_open

    for fname in names:  # safe_open checks the header and that the data covers the whole file
        want = {k for k, f in weight_map.items() if f == fname}
        with safe_open(str(out / fname), framework="pt") as f:
            if set(f.keys()) != want:
                raise ValueError(f"{fname}: expected tensors {sorted(want)[:5]}..., found {sorted(f.keys())[:5]}...")
    if len(names) > 1:
        _read_index(out / _INDEX)
    staged.seal()
