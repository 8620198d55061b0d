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

Loading copies into the model's own tensors in place (a DTensor: its local shard), cast to
their dtype, so optimizers, hooks and ties keep pointing at them; only meta tensors are
replaced by new ones. A cast that would change what the values mean (to or from fp8, float
to integer, an overflow) is refused naming the tensor.

Saving gathers one tensor at a time to rank 0 (`dist.gather`: the other ranks only send),
which writes a shard file whenever `max_shard_size` bytes are pending, so rank 0 holds one
file's worth of tensors at most. The directory has Hugging Face's layout (safetensors
shards, `model.safetensors.index.json`, `config.json`) and names (conversions reverted).
It is written atomically (checkpoint_io.py): staged next to the target, voted complete by
every rank, swapped in by rename.

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

from .checkpoint_io import SaveError, interrupted_swap_hint
from .comm import check_group
from .key_conversion import converted_keys

__all__ = ["load_checkpoint", "from_pretrained", "SaveError"]  # save_pretrained: checkpoint_save.py

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
# Local pieces and in-place writes (plain tensors and DTensors alike)
# --------------------------------------------------------------------------------------------


def _is_dtensor(t: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return False
    return isinstance(t, DTensor)


def _local(t: Tensor) -> Tensor:
    """This rank's tensor: a DTensor's local shard in the layout the checkpoint slices use
    (packed parts flattened back, layers/sharding.py), anything else itself."""
    from .layers.sharding import local_tensor

    return local_tensor(t)


def _local_shape(t: Tensor) -> torch.Size:
    return _local(t).shape


def _kind(dtype: torch.dtype) -> str:
    name = str(dtype)
    if "float8" in name or "float4" in name:
        return "fp8"  # scaled formats: a value means nothing without its scale
    if dtype.is_complex:
        return "complex"
    if dtype.is_floating_point:
        return "float"
    return "bool" if dtype == torch.bool else "int"


def _cast(value: Tensor, dtype: torch.dtype, *, key: str) -> Tensor:
    """`value` in `dtype`; refused (naming `key`) where the cast would change what the values
    mean: to or from fp8, across float / integer / bool / complex, or out of range."""
    if value.dtype == dtype:
        return value
    src, dst = _kind(value.dtype), _kind(dtype)
    why = ""
    if src != dst or src == "fp8":
        why = "fp8 values need their scales" if "fp8" in (src, dst) else f"{src} and {dst} values are different things"
    else:
        out = value.to(dtype)
        if dst == "int" and not torch.equal(out.to(value.dtype), value):
            why = f"some values do not fit in {dtype}"
        elif dst == "float" and not torch.equal(torch.isfinite(out), torch.isfinite(value)):
            why = f"some values overflow {dtype} (largest magnitude {value.abs().max().item():.4g})"
        if not why:
            return out
    raise TypeError(f"load_checkpoint: {key}: the checkpoint stores {value.dtype}, the model's tensor is {dtype}: "
                    f"refusing the cast because {why}. Build the model in {value.dtype}, or convert the checkpoint")


def _copy_into(target: Tensor, value: Tensor, *, key: str) -> None:
    """Write `value` into `target` in place (a DTensor: into its local shard), cast to its
    dtype: whatever holds `target` (an optimizer, a hook, a tied module) sees the new values."""
    local = _local(target)
    if local.shape != value.shape:  # _read_local checked it; a guard against a wrong caller
        raise ValueError(f"load_checkpoint: {key}: expected this rank's piece of shape {list(local.shape)}, "
                         f"got {list(value.shape)}")
    with torch.no_grad():
        local.copy_(_cast(value, local.dtype, key=key))


def _materialize(target: Tensor, value: Tensor, *, key: str, device: torch.device, dtype: torch.dtype,
                 is_param: bool) -> Tensor:
    """A real tensor for a meta `target`, holding `value` in `dtype` on `device` (a DTensor
    keeps its mesh and placements)."""
    new = _cast(value, dtype, key=key).to(device)
    packed = getattr(target, "_fusedpar_packed", None)
    if _is_dtensor(target):
        from torch.distributed.tensor import DTensor

        new = DTensor.from_local(new.reshape(target._local_tensor.shape), target.device_mesh, target.placements,
                                 run_check=False, shape=target.shape, stride=target.stride())
    new = nn.Parameter(new, requires_grad=target.requires_grad) if is_param else new
    if _is_dtensor(target):
        new._fusedpar_packed = packed  # the packed layout travels with the parameter (sharding.py)
    return new


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _unreadable(file: Path, key: str | None, e: BaseException) -> ValueError:
    what = f"reading tensor {key!r}" if key else "opening it"
    return ValueError(f"load_checkpoint: {file}: not a complete safetensors file ({what}: {e}); it is empty, "
                      f"truncated or not safetensors (an interrupted copy or download?)")


class _Files:
    """The checkpoint's tensors by key, opened lazily (safetensors, one file or an index)."""

    def __init__(self, path: Path, model: nn.Module | None = None, wanted: set[str] | None = None) -> None:
        from safetensors import safe_open

        self._open, self._handles = safe_open, {}
        if (path / _INDEX).exists():
            self.where = {k: path / f for k, f in _read_index(path / _INDEX).items()}
        elif (path / _SINGLE).exists():
            try:
                with safe_open(str(path / _SINGLE), framework="pt") as f:
                    self.where = {k: path / _SINGLE for k in f.keys()}
            except Exception as e:  # noqa: BLE001 - safetensors' own error type, re-raised named
                raise _unreadable(path / _SINGLE, None, e) from e
        else:
            contents = sorted(os.listdir(path)) if path.is_dir() else "it does not exist"
            raise FileNotFoundError(f"load_checkpoint: path: expected a directory with {_SINGLE} or {_INDEX}, "
                                    f"got {path} (contents: {contents[:8] if isinstance(contents, list) else contents})"
                                    f"{interrupted_swap_hint(path)}")
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

    def file_of(self, key: str) -> str:
        """Where `key` is stored, for error messages."""
        if key in self.where:
            return str(self.where[key])
        return f"stored as {self.sources.get(key, ['?'])[:2]}... in {self.where[self.sources[key][0]].parent}" \
            if self.sources.get(key) else "?"

    def _stored(self, key: str) -> Any:
        file = self.where[key]
        if file not in self._handles:
            if not file.exists():
                raise FileNotFoundError(f"load_checkpoint: {file.parent / _INDEX} maps tensor {key!r} to {file.name}, "
                                        f"which does not exist")
            try:
                self._handles[file] = self._open(str(file), framework="pt").__enter__()
            except Exception as e:  # noqa: BLE001 - safetensors' own error type, re-raised named
                raise _unreadable(file, key, e) from e
        try:
            return self._handles[file].get_slice(key)
        except Exception as e:  # noqa: BLE001 - the index names a tensor the file lacks
            raise ValueError(f"load_checkpoint: {file}: the index maps tensor {key!r} here, but reading it failed: "
                             f"{e}") from e

    def close(self) -> None:
        for h in self._handles.values():
            h.__exit__(None, None, None)
        self._handles.clear()


def _read_index(index: Path) -> dict[str, str]:
    """The index's weight map (tensor name -> file name), or an error naming the file."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError(f"weight_map is a {type(weight_map).__name__}, not a mapping of tensor name -> file name")
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"load_checkpoint: {index}: not a valid safetensors index: expected JSON with a "
                         f'"weight_map" of tensor name -> file name ({type(e).__name__}: {e})') from e
    return weight_map


def _read_local(files: _Files, key: str, dim: int | None, rank: int, world: int, local_shape: torch.Size,
                parts: int = 1) -> Tensor:
    """This rank's piece of checkpoint tensor `key`: all of it, or chunk `rank` of `world`
    along `dim` of each of its `parts` packed blocks (only those bytes are read)."""
    sl = files.slice(key)
    full = tuple(sl.get_shape())
    model_full = [s * world if d == dim else s for d, s in enumerate(local_shape)]

    def mismatch(detail: str) -> ValueError:
        differ = [d for d in range(max(len(full), len(model_full)))
                  if d >= len(full) or d >= len(model_full) or full[d] != model_full[d]]
        split = f" ({world} ranks split dim {dim}, this rank holds {list(local_shape)})" if dim is not None else ""
        return ValueError(f"load_checkpoint: {key} ({files.file_of(key)}): the checkpoint stores shape {list(full)}, "
                          f"the model's is {model_full}{split}; they differ in dim(s) {differ}{detail}. "
                          f"Was the model built from another config?")

    if dim is None:
        index: tuple[slice, ...] = tuple(slice(None) for _ in full)
        want = full
    else:
        if len(full) != len(local_shape) or full[dim] % (world * parts):
            raise mismatch(f": dim {dim} of the stored tensor must split into {world} ranks x {parts} packed "
                           f"part(s)" if len(full) == len(local_shape) else "")
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
        raise mismatch(f"; this rank's piece of the stored tensor would be {list(want)}" if dim is not None else "")
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
    others the whole tensor. Values are copied into the model's tensors in place, cast to
    their dtype (optimizers and hooks keep working). Meta tensors are materialized on
    `device` (default: CPU, or the current CUDA device under NCCL) in `dtype` (default: the
    meta tensor's own dtype); `dtype` must match tensors that are already materialized.
    With `strict`, every parameter and persistent buffer must be in the checkpoint; keys of
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
        replaced: dict[int, Tensor] = {}  # meta tensor id -> its new tensor, so tied parameters stay tied
        for key, module, name, tensor, is_param in _entries(model):
            if not files.has(key):
                missing.append(f"{key} ({files.refused[key]})" if key in files.refused else key)
                continue
            value = _read_local(files, key, _shard_dim(module, name) if is_param else None, rank, world,
                                _local_shape(tensor), _shard_parts(module, name))
            loaded.update(files.sources.get(key, [key]))
            want = dtype if (dtype is not None and tensor.is_floating_point()) else tensor.dtype
            if tensor.is_meta:
                replaced[id(tensor)] = _materialize(tensor, value, key=key, device=device, dtype=want,
                                                    is_param=is_param)
            elif want != tensor.dtype:
                raise ValueError(f"{where}: dtype: expected None or the model's dtype {tensor.dtype} (loading copies "
                                 f"into the model's tensors in place, so optimizers keep them), got {dtype} for {key}; "
                                 f"convert the model first (model.to({dtype}))")
            else:
                _copy_into(tensor, value, key=key)
        # every other name of a materialized meta tensor (tied weights) gets the same new tensor
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


_SAFETENSORS_FLOATS = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _resolve_dtype(dtype: Any, config: Any, path: Path) -> torch.dtype:
    """The one dtype transformers' `from_pretrained` gives the model: `dtype` as given (a
    torch.dtype or its name); for "auto" (its default, also for None) the config's `dtype`,
    else the index's metadata "dtype", else the first floating (not fp8) stored tensor's."""
    if dtype is None or dtype == "auto":
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if dtype is None and (path / _INDEX).exists():
            dtype = json.loads((path / _INDEX).read_text()).get("metadata", {}).get("dtype")
        if dtype is None:
            from safetensors import safe_open

            for file in sorted(path.glob("*.safetensors")):
                with safe_open(str(file), framework="pt") as f:
                    found = [_SAFETENSORS_FLOATS[d] for d in (f.get_slice(k).get_dtype() for k in f.keys())
                             if d in _SAFETENSORS_FLOATS]
                dtype = found[0] if found else None
                break
        if dtype is None:
            return torch.get_default_dtype()
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype.removeprefix("torch."), None), torch.dtype):
        dtype = getattr(torch, dtype.removeprefix("torch."))
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or _kind(dtype) == "fp8":
        raise TypeError(f"from_pretrained: dtype: expected 'auto', a floating torch.dtype or its name (e.g. "
                        f"torch.bfloat16, 'float32'), got {dtype!r}")
    return dtype


def from_pretrained(model_cls: Any, path: str | os.PathLike, *, group: Any, plan: Any = "auto",
                    sequence_parallel: bool = False, dtype: torch.dtype | str | None = "auto",
                    device: torch.device | str | None = None, **parallelize_kwargs: Any) -> nn.Module:
    """`model_cls.from_pretrained(path)`, tensor-parallel over `group`, without any rank
    ever holding the whole model: the model is built on the meta device from the
    directory's config, parallelized (`plan`, `sequence_parallel` and the other keyword
    arguments go to :func:`fusedpar.parallelize`), then filled by :func:`load_checkpoint`.
    Every floating parameter comes out in one dtype, chosen by transformers' rule
    (`dtype`, or its old name `torch_dtype`: see `_resolve_dtype`). Returned in eval mode,
    like Hugging Face's."""
    from .plan import parallelize

    torch_dtype = parallelize_kwargs.pop("torch_dtype", None)  # transformers' older name for dtype
    if torch_dtype is not None and dtype in (None, "auto"):
        dtype = torch_dtype
    path = Path(path)
    config = model_cls.config_class.from_pretrained(path)
    dtype = _resolve_dtype(dtype, config, path)
    config.dtype = dtype  # as transformers does, so a later save records it
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters a module creates in the default dtype start in this one
    try:
        with torch.device("meta"):
            model = model_cls(config)
    finally:
        torch.set_default_dtype(previous)
    parallelize(model, plan, group=group, sequence_parallel=sequence_parallel, **parallelize_kwargs)
    load_checkpoint(model, path, group=group, device=device, dtype=dtype)
    try:
        from transformers import GenerationConfig

        if (path / "generation_config.json").exists():
            model.generation_config = GenerationConfig.from_pretrained(path)
    except ImportError:  # pragma: no cover - transformers is what model_cls comes from
        pass
    return model.eval()

