"""Sharded loading and saving of Hugging Face checkpoints for parallelized models.

    model = fusedpar.from_pretrained(LlamaForCausalLM, path, group=tp, plan="auto")
    # or, step by step:
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    fusedpar.parallelize(model, "auto", group=tp)
    fusedpar.load_checkpoint(model, path)          # each rank reads only its slices
    fusedpar.save_pretrained(model, out_dir)       # a directory `from_pretrained` loads

Loading reads each parameter's slice for this rank straight from the safetensors files
(`safe_open(...).get_slice(key)[index]`: only those bytes are read), so a rank holds its
shards plus the replicated parameters, never the whole model. Parameters still on the meta
device are materialized as they are read; buffers left on the meta device (rotary
frequencies, which Hugging Face computes in `__init__` and never saves) are rebuilt by
re-running their module's constructor from its config. Parameters tied to another (the LM
head to the embedding) stay tied. Parameters stored under other names (MoE experts one
tensor per expert, fused in the model) are read through transformers' conversion mapping,
still slice by slice (key_conversion.py).

Saving gathers one tensor at a time to rank 0 (`dist.gather`: the other ranks only send),
which writes a shard file whenever `max_shard_size` bytes are pending, so rank 0 holds one
file's worth of tensors at most. The directory has Hugging Face's layout (safetensors
shards, `model.safetensors.index.json`, `config.json`) and names (conversions reverted).

Which slice a rank holds is read off the module that owns the parameter: a class attribute
`tp_shard_dims = {name: dim}` (the dim split evenly across the group in rank order, as the
column- and row-parallel linears declare), with `tp_shard_parts = {name: parts}` where the
dim packs several blocks split on their own (a fused [gate; up] weight); other parameters
are replicated.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .comm import check_group
from .key_conversion import converted_keys, revert_conversion

__all__ = ["load_checkpoint", "from_pretrained", "save_pretrained"]

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"


# --------------------------------------------------------------------------------------------
# Where each parameter comes from
# --------------------------------------------------------------------------------------------


def _model_group(model: nn.Module, group: Any, where: str) -> dist.ProcessGroup | None:
    """The tensor-parallel group: given, or the one `parallelize` recorded; None for an
    unparallelized model (every parameter whole)."""
    if group is not None:
        return check_group(group, arg=f"{where}: group")
    info = getattr(model, "_fusedpar_parallel", None)
    return info["group"] if info else None


def _shard_dim(module: nn.Module, name: str) -> int | None:
    return getattr(module, "tp_shard_dims", {}).get(name)


def _shard_parts(module: nn.Module, name: str) -> int:
    """Packed blocks along the split dim (`tp_shard_parts`, e.g. 2 for [gate; up]): each is
    split across the ranks on its own, so a rank holds chunk `rank` of every block."""
    return getattr(module, "tp_shard_parts", {}).get(name, 1)


def _entries(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, Tensor, bool]]:
    """(checkpoint key, owning module, attribute name, tensor, is_parameter) for every
    parameter and persistent buffer, each tensor once (tied parameters: the first name)."""
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        for name, p in module._parameters.items():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                yield prefix + name, module, name, p, True
        for name, b in module._buffers.items():
            if b is not None and name not in module._non_persistent_buffers_set and id(b) not in seen:
                seen.add(id(b))
                yield prefix + name, module, name, b, False


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


class _Files:
    """The checkpoint's tensors by key, opened lazily (safetensors, one file or an index)."""

    def __init__(self, path: Path, model: nn.Module | None = None, wanted: set[str] | None = None) -> None:
        from safetensors import safe_open

        self._open, self._handles = safe_open, {}
        if (path / _INDEX).exists():
            weight_map = json.loads((path / _INDEX).read_text())["weight_map"]
            self.where = {k: path / f for k, f in weight_map.items()}
        elif (path / _SINGLE).exists():
            with safe_open(str(path / _SINGLE), framework="pt") as f:
                self.where = {k: path / _SINGLE for k in f.keys()}
        else:
            raise FileNotFoundError(f"load_checkpoint: path: expected a directory with {_SINGLE} or {_INDEX}, "
                                    f"got {path} (contents: {sorted(os.listdir(path))[:8]})")
        # model keys stored under other names (per-expert tensors of a fused expert weight):
        # lazily assembled views, the stored keys each reads, and what cannot be read sliced
        self.views, self.sources, self.refused = {}, {}, {}
        if model is not None:
            self.views, self.sources, self.refused = converted_keys(
                model, list(self.where), (wanted or set()) - set(self.where), self._stored)

    def has(self, key: str) -> bool:
        return key in self.where or key in self.views

    def slice(self, key: str) -> Any:
        return self.views[key] if key in self.views else self._stored(key)

    def _stored(self, key: str) -> Any:
        file = self.where[key]
        if file not in self._handles:
            self._handles[file] = self._open(str(file), framework="pt").__enter__()
        return self._handles[file].get_slice(key)

    def close(self) -> None:
        for h in self._handles.values():
            h.__exit__(None, None, None)
        self._handles.clear()


def _read_local(files: _Files, key: str, dim: int | None, rank: int, world: int, local_shape: torch.Size,
                parts: int = 1) -> Tensor:
    """This rank's piece of checkpoint tensor `key`: all of it, or chunk `rank` of `world`
    along `dim` of each of its `parts` packed blocks (only those bytes are read)."""
    sl = files.slice(key)
    full = tuple(sl.get_shape())
    if dim is None:
        index: tuple[slice, ...] = tuple(slice(None) for _ in full)
        want = full
    else:
        if full[dim] % (world * parts):
            raise ValueError(f"load_checkpoint: {key}: dim {dim} of the stored shape {list(full)} is split across "
                             f"{world} ranks ({parts} packed part(s) each): expected a multiple of {world * parts}, "
                             f"got {full[dim]}")
        n = full[dim] // (world * parts)
        want = tuple(n * parts if d == dim else s for d, s in enumerate(full))
        if tuple(local_shape) == want and parts > 1:
            blocks = []
            for b in range(parts):
                start = (b * world + rank) * n
                blocks.append(sl[tuple(slice(start, start + n) if d == dim else slice(None) for d in range(len(full)))])
            return torch.cat(blocks, dim)
        index = tuple(slice(rank * n, (rank + 1) * n) if d == dim else slice(None) for d in range(len(full)))
    if tuple(local_shape) != want:
        raise ValueError(f"load_checkpoint: {key}: expected this rank's piece of the stored {list(full)} to have the "
                         f"model's shape {list(local_shape)}, got {list(want)}")
    return sl[index] if index else sl[:]


def _rebuild_meta_buffers(model: nn.Module, device: torch.device) -> None:
    """Modules whose non-persistent buffers are still on the meta device (Hugging Face's
    rotary embeddings: computed in `__init__`, never saved) are built again from their
    config, on `device`."""
    for mod_name, module in list(model.named_modules()):
        meta = [n for n, b in module._buffers.items() if b is not None and b.is_meta]
        if not meta:
            continue
        config = getattr(module, "config", None)
        try:
            fresh = type(module)(config) if config is not None else None
        except Exception as e:  # noqa: BLE001 - explained in the error below
            fresh, why = None, f"rebuilding {type(module).__name__}(config) failed: {e}"
        else:
            why = f"{type(module).__name__} has no config to rebuild it from"
        if fresh is None:
            raise RuntimeError(f"load_checkpoint: {mod_name}: buffers {meta} are on the meta device and not in the "
                               f"checkpoint; {why}. Build the model with real buffers (only parameters on meta)")
        for name in meta:
            module._buffers[name] = fresh._buffers[name].to(device)
        for attr, value in vars(fresh).items():  # e.g. attention_scaling, computed with inv_freq
            if not attr.startswith("_") and attr != "training" and not isinstance(value, (nn.Module, Tensor)):
                setattr(module, attr, value)


@torch.no_grad()
def load_checkpoint(model: nn.Module, path: str | os.PathLike, *, group: Any = None, strict: bool = True,
                    device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> nn.Module:
    """Fill `model` (parallelized or not, built on the meta device or not) from a Hugging
    Face checkpoint directory, each rank reading only the slices it holds; returns `model`.

    `group` defaults to the one `parallelize` recorded. Sharded parameters (see
    `tp_shard_dims`) get chunk `rank` of the stored tensor along their split dim; all
    others the whole tensor. Meta parameters are materialized on `device` (default: CPU,
    or the current CUDA device under NCCL) in `dtype` (default: the stored dtype). With
    `strict`, every parameter and persistent buffer must be in the checkpoint; keys of
    the checkpoint the model lacks are an error too.
    """
    where = "load_checkpoint"
    path = Path(path)
    group = _model_group(model, group, where)
    rank, world = (dist.get_rank(group), dist.get_world_size(group)) if group is not None else (0, 1)
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if (
            group is not None and dist.get_backend(group) == "nccl") else torch.device("cpu")
    device = torch.device(device)
    files = _Files(path, model, {key for key, *_ in _entries(model)})
    try:
        missing, loaded = [], set()
        replaced: dict[int, Tensor] = {}  # old tensor id -> new one, so tied parameters stay tied
        for key, module, name, tensor, is_param in _entries(model):
            if not files.has(key):
                missing.append(f"{key} ({files.refused[key]})" if key in files.refused else key)
                continue
            value = _read_local(files, key, _shard_dim(module, name) if is_param else None, rank, world, tensor.shape,
                                _shard_parts(module, name))
            loaded.update(files.sources.get(key, [key]))
            target_dtype = dtype if (dtype is not None and value.is_floating_point()) else value.dtype
            if tensor.is_meta or tensor.device != device or tensor.dtype != target_dtype:
                new = value.to(device=device, dtype=target_dtype)
                new = nn.Parameter(new, requires_grad=tensor.requires_grad) if is_param else new
                replaced[id(tensor)] = new
            else:
                tensor.copy_(value)
        # every other name of a replaced tensor (tied weights) gets the same new tensor
        for module in model.modules():
            for store in (module._parameters, module._buffers):
                for name, t in store.items():
                    if t is not None and id(t) in replaced:
                        store[name] = replaced[id(t)]
        _rebuild_meta_buffers(model, device)
    finally:
        files.close()
    unexpected = sorted(set(files.where) - loaded - _tied_aliases(model))
    left_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if strict and (missing or unexpected or left_meta):
        raise KeyError(f"{where}: {path}: expected the checkpoint's keys to match the model's; missing from the "
                       f"checkpoint: {missing[:10]}{' ...' if len(missing) > 10 else ''}; unexpected: "
                       f"{unexpected[:10]}; still on meta: {left_meta[:10]}")
    return model


def _tied_aliases(model: nn.Module) -> set[str]:
    """Names of parameters that are another parameter (a tied LM head): a checkpoint may
    hold them too (saved by a library that does not drop ties)."""
    first: dict[int, str] = {}
    aliases = set()
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for name, p in module._parameters.items():
            if p is None:
                continue
            key = f"{mod_name}.{name}" if mod_name else name
            if id(p) in first and first[id(p)] != key:
                aliases.add(key)
            first.setdefault(id(p), key)
    return aliases


def from_pretrained(model_cls: Any, path: str | os.PathLike, *, group: Any, plan: Any = "auto",
                    sequence_parallel: bool = False, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None, **parallelize_kwargs: Any) -> nn.Module:
    """`model_cls.from_pretrained(path)`, tensor-parallel over `group`, without any rank
    ever holding the whole model: the model is built on the meta device from the
    directory's config, parallelized (`plan`, `sequence_parallel` and the other keyword
    arguments go to :func:`fusedpar.parallelize`), then filled by :func:`load_checkpoint`.
    Returned in eval mode, like Hugging Face's."""
    from .layers import parallelize

    config = model_cls.config_class.from_pretrained(path)
    with torch.device("meta"):
        model = model_cls(config)
    parallelize(model, plan, group=group, sequence_parallel=sequence_parallel, **parallelize_kwargs)
    load_checkpoint(model, path, group=group, device=device, dtype=dtype)
    try:
        from transformers import GenerationConfig

        if (Path(path) / "generation_config.json").exists():
            model.generation_config = GenerationConfig.from_pretrained(path)
    except ImportError:  # pragma: no cover - transformers is what model_cls comes from
        pass
    return model.eval()


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    s = size.strip().upper()
    for unit, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * factor)
    return int(s)


@torch.no_grad()
def save_pretrained(model: nn.Module, path: str | os.PathLike, *, group: Any = None,
                    max_shard_size: int | str = "5GB") -> None:
    """Write the unsharded model as a Hugging Face directory (safetensors shards of at most
    `max_shard_size` bytes, the index, `config.json`), from rank 0 of `group`.

    A collective: every rank calls it. Tensors are gathered to rank 0 one at a time and
    written a file's worth at a time, so no rank ever holds the whole model. Tied
    parameters are saved once, under their first name (as Hugging Face does).
    """
    from safetensors.torch import save_file

    where = "save_pretrained"
    group = _model_group(model, group, where)
    rank, world = (dist.get_rank(group), dist.get_world_size(group)) if group is not None else (0, 1)
    limit = _parse_size(max_shard_size)
    entries = []
    for key, module, name, tensor, is_param in _entries(model):
        dim = _shard_dim(module, name) if is_param else None
        full = list(tensor.shape)
        if dim is not None and group is not None:
            full[dim] *= world
        entries.append((key, tensor, dim, torch.Size(full), _shard_parts(module, name)))
    # the files are planned from the full shapes every rank knows, before anything moves
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
    out = Path(path)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    dst = dist.get_global_rank(group, 0) if group is not None else 0
    weight_map = {}
    for fname, batch in zip(names, files):
        pending = {}
        for key, tensor, dim, full, packed in batch:
            local = tensor.detach().contiguous()
            if dim is not None and group is not None:
                parts = [torch.empty_like(local) for _ in range(world)] if rank == 0 else None
                dist.gather(local, parts, dst=dst, group=group)
                # packed blocks: every rank holds a chunk of each; the stored tensor is block-major
                value = torch.cat([p.chunk(packed, dim)[b] for b in range(packed) for p in parts], dim) \
                    if rank == 0 else None
            else:
                value = local
            if rank == 0:  # under the names Hugging Face stores (e.g. fused experts one by one)
                for stored_key, stored in revert_conversion(model, key, value).items():
                    pending[stored_key] = stored.cpu().clone(memory_format=torch.contiguous_format)
                    weight_map[stored_key] = fname
        if rank == 0:
            save_file(pending, str(out / fname), metadata={"format": "pt"})
        del pending
    if rank == 0:
        if total > 1:
            index = {"metadata": {"total_size": sum(e[3].numel() * e[1].element_size() for e in entries)},
                     "weight_map": weight_map}
            (out / _INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "save_pretrained"):
            config.save_pretrained(out)
        gen = getattr(model, "generation_config", None)
        if gen is not None and hasattr(gen, "save_pretrained"):
            gen.save_pretrained(out)
    if group is not None:
        dist.barrier(group=group)
