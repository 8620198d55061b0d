"""Ranks that must agree, checked: `parallelize`'s inputs, and each sequence-parallel forward.

Tensor parallelism assumes every rank of the group holds the same model, got the same plan
and settings, and feeds batches of the same shape. Nothing in the collectives says when
that is false (issue 24): ranks given different plans raised on one rank while the other
returned logits 38 % off; ranks built from different seeds each trained a different model
without a word; sequence lengths 8 and 7 (one rank splits, the other does not) waited for the
group timeout, 8 and 6 aborted one process inside gloo. So, by default:

* `check_parallelize_agrees` (called first thing by `parallelize`) compares a 32-byte
  digest of the world, the resolved plan, the settings (sequence parallelism, loss
  parallelism, fp8, chunks, kernel, comm) and the model: its class, every parameter's name,
  shape and dtype, and a checksum of every parameter's bits (taken before anything is
  sharded, so the weights every rank slices are compared whole) across ranks in one
  all-reduce (:func:`_all_equal`). Equal digests: done. Different: a second exchange of
  the readable pieces, and every rank raises `RanksDisagreeError` naming the first
  difference.
* `install_input_check` makes every forward of a sequence-parallel model compare the shapes
  of its tensor inputs across ranks before its first collective (a pre-hook on the model,
  and on the first decoder layer for calls that enter there): one all-reduce of two int64,
  started in the model's pre-hook and awaited at the first decoder layer when nothing
  communicates in between (it overlaps the embedding and mask work); a mismatch raises on
  every rank naming both shapes. No existing collective can carry it: entering the
  sequence-parallel region is local (each rank keeps its rows), and the first collective
  after it differs by mode (an all-gather when the length divides by the world size, an
  all-reduce when not), which is exactly what differs when lengths do.

`FUSEDPAR_CHECK_AGREEMENT=0` turns both off (each forward's check ends in a wait for the
collective: on a GPU the host waits for the device once per forward).
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..checks import InconsistentCallError
from ..comm import CollectiveError, get_communicator

__all__ = ["RanksDisagreeError", "agreement_enabled", "check_parallelize_agrees", "install_input_check",
           "parameter_checksums"]

_CHUNK = 1 << 22  # elements per checksum step: bounds the int64 temporaries (32 MiB each)
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class RanksDisagreeError(InconsistentCallError):
    """Ranks of one tensor-parallel group were given different models, plans, settings or
    input shapes; raised on every rank, naming the first difference."""


def agreement_enabled() -> bool:
    """Whether the checks run: unless ``FUSEDPAR_CHECK_AGREEMENT`` is 0 / false / off."""
    return os.environ.get("FUSEDPAR_CHECK_AGREEMENT", "1").strip().lower() not in ("0", "false", "no", "off")


def parameter_checksums(model: nn.Module) -> dict[str, tuple[int, int] | None]:
    """``{name: (sum of the bits, sum of bits x position)}`` per parameter, computed on the
    parameter's device in exact int64 arithmetic (wrapping), so equal weights give equal
    checksums on every rank and any change of value or order changes them. None for
    parameters on the meta device (nothing to compare yet). One host sync in all."""
    names, sums = [], []
    for name, p in model.named_parameters():
        names.append(name)
        if hasattr(p, "placements"):  # a DTensor from an earlier parallelize: replicas agree, shards differ
            if not all(pl.is_replicate() for pl in p.placements):
                sums.append(None)
                continue
            p = p.to_local()
        if p.is_meta or p.element_size() not in _INT_OF_SIZE or p.is_complex():
            sums.append(None)
            continue
        bits = p.detach().reshape(-1).view(_INT_OF_SIZE[p.element_size()])
        acc = torch.zeros(2, dtype=torch.int64, device=p.device)
        for start in range(0, bits.numel(), _CHUNK):
            b = bits[start:start + _CHUNK].to(torch.int64)
            pos = torch.arange(start + 1, start + 1 + b.numel(), dtype=torch.int64, device=p.device)
            acc += torch.stack([b.sum(), (b * pos).sum()])
        sums.append(acc)
    values = iter(torch.stack([s.cpu() for s in sums if s is not None]).tolist() if any(
        s is not None for s in sums) else [])
    return {name: (None if s is None else tuple(next(values))) for name, s in zip(names, sums)}


def _device(group: Any) -> torch.device:
    """Where the group's collectives take their tensors (NCCL: the current GPU)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _issue(words: list[int], group: Any, device: torch.device | None = None) -> tuple[Any, Tensor]:
    """Start the all-reduce(MAX) of ``words + [-w for w in words]`` (:func:`_all_equal`)."""
    t = torch.tensor(words + [-w for w in words], dtype=torch.int64, device=device or _device(group))
    try:
        return dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group, async_op=True), t
    except RuntimeError as e:  # gloo reports a dead peer at issue time too
        raise _collective_error(t, group, e) from e


def _settle(work: Any, t: Tensor, group: Any) -> bool:
    """Wait for an all-reduce :func:`_issue` started; whether every rank held the same words."""
    try:
        work.wait()
    except RuntimeError as e:
        raise _collective_error(t, group, e) from e
    n = t.numel() // 2
    return bool(torch.equal(t[:n], -t[n:]))


def _collective_error(t: Tensor, group: Any, e: Exception) -> CollectiveError:
    return CollectiveError(
        f"fusedpar: the ranks' agreement check (all_reduce of {t.numel()} int64) on rank "
        f"{dist.get_rank(group)} of {dist.get_world_size(group)} failed: a peer rank crashed, "
        f"stalled past the group timeout, or issued a different collective. Backend said: {e}")


def _all_equal(words: list[int], group: Any, device: torch.device | None = None) -> bool:
    """Whether every rank of ``group`` holds the same ``words``: one all-reduce(MAX) of
    ``words + [-w for w in words]`` (the max and minus the min of each word agree only where
    every rank agrees). An all-reduce, not an all-gather: on gloo it takes about half the
    time for a few words (measured: 290-560 us against 660-990 us on a loaded 2-core box)."""
    return _settle(*_issue(words, group, device), group)


def _digest_words(obj: object, n: int) -> list[int]:
    """``n`` int64 words (62 bits each, so negating them cannot overflow) of a deterministic
    hash of ``repr(obj)`` (Python's own ``hash`` is salted per process: it differs across ranks)."""
    raw = hashlib.blake2b(repr(obj).encode(), digest_size=8 * n).digest()
    return [int.from_bytes(raw[8 * i:8 * i + 8], "little") >> 2 for i in range(n)]


def _first_difference(ours: Any, theirs: Any) -> str:
    """A short account of the first place two pieces differ (dicts by key in rank 0's order,
    lists by index)."""
    if isinstance(ours, Mapping) and isinstance(theirs, Mapping):
        for key in [*ours, *(k for k in theirs if k not in ours)]:
            a, b = ours.get(key, "<absent>"), theirs.get(key, "<absent>")
            if a != b:
                return f"{key!r}: {a!r} vs {b!r}"
    if isinstance(ours, (list, tuple)) and isinstance(theirs, (list, tuple)):
        for i, (a, b) in enumerate(zip(ours, theirs)):
            if a != b:
                return f"item {i}: {a!r} vs {b!r}"
        if len(ours) != len(theirs):
            return f"{len(ours)} items vs {len(theirs)}"
    return f"{ours!r} vs {theirs!r}"


def _raise_first_difference(where: str, pieces: dict[str, Any], group: Any, hint: str) -> None:
    """Second exchange, after digests differed: every rank gets every rank's pieces and
    raises the same error, naming the first piece (in ``pieces``' order) where a rank
    differs from rank 0."""
    communicator = get_communicator(group)
    everyone = communicator.all_gather_object(pieces)
    for key in pieces:
        for rank, theirs in enumerate(everyone[1:], start=1):
            if theirs.get(key) != everyone[0].get(key):
                detail = _first_difference(everyone[0].get(key), theirs.get(key))
                raise RanksDisagreeError(
                    f"{where}: ranks disagree on {key}: rank 0 vs rank {rank}: {detail}; {hint} "
                    f"(raised on rank {communicator.rank} of {communicator.world_size})")
    raise RanksDisagreeError(f"{where}: ranks' digests differ but no piece does (rank {communicator.rank}); {hint}")


def check_parallelize_agrees(model: nn.Module, plan: Mapping[str, str] | str, *, group: Any,
                             settings: Mapping[str, Any], resolve: Callable[[nn.Module, Any], dict]) -> None:
    """Raise `RanksDisagreeError` on every rank unless all ranks of ``group`` call
    `parallelize` with the same world, plan, settings and model (structure and weights).

    A plan that fails to resolve on a rank takes part as its error message, so ranks whose
    plans fail alike re-raise that error together afterwards and no rank is left waiting.
    `resolve(model, plan)` is parallelize's `resolve_plan` (passed in: parallelize imports this)."""
    if not agreement_enabled() or dist.get_world_size(group) == 1:
        return
    error: Exception | None = None
    try:
        resolved: Any = sorted(resolve(model, plan).items())
    except (TypeError, ValueError) as e:
        error, resolved = e, f"fails to resolve: {type(e).__name__}: {e}"
    pieces = {
        "world": f"{dist.get_world_size(group)} ranks, global ranks {dist.get_process_group_ranks(group)}",
        "plan": dict(resolved) if isinstance(resolved, list) else resolved,
        "settings": dict(settings),
        "model class": type(model).__name__,
        "parameters (name, shape, dtype)": [(n, tuple(p.shape), str(p.dtype)) for n, p in model.named_parameters()],
        "parameter checksums (ranks built from different seeds or checkpoints?)": parameter_checksums(model),
    }
    if not _all_equal(_digest_words(list(pieces.values()), 4), group):
        _raise_first_difference("parallelize", pieces, group,
                                "expected every rank of the group to call parallelize with the same model "
                                "(same seed or checkpoint), plan and settings")
    if error is not None:
        raise error


def _tensor_shapes(args: tuple, kwargs: dict) -> dict[str, list[int]]:
    """The shapes of a call's tensor arguments, by position or keyword."""
    shapes = {f"argument {i}": list(a.shape) for i, a in enumerate(args) if isinstance(a, Tensor)}
    shapes.update({k: list(v.shape) for k, v in kwargs.items() if isinstance(v, Tensor)})
    return shapes


def _check_shapes(where: str, shapes: dict[str, list[int]], group: Any, device: torch.device | None = None,
                  issued: tuple[Any, Tensor] | None = None) -> None:
    """One all-reduce of a one-word digest of ``shapes`` (:func:`_all_equal`; ``issued``: the
    one already started for them); on a mismatch a second exchange and `RanksDisagreeError`
    on every rank, naming the first input whose shapes differ and every rank's shape of it
    (so both sequence lengths)."""
    work, t = issued or _issue(_digest_words(sorted(shapes.items()), 1), group, device)
    if _settle(work, t, group):
        return
    communicator = get_communicator(group)
    everyone = communicator.all_gather_object(shapes)
    for name in sorted(set().union(*everyone)):
        seen = [s.get(name) for s in everyone]
        if any(s != seen[0] for s in seen):
            per_rank = ", ".join(f"{s} on rank {r}" for r, s in enumerate(seen))
            raise RanksDisagreeError(
                f"{where}: {name}: expected the same shape on every rank (sequence parallelism splits "
                f"the sequence across them), got {per_rank} (raised on rank {communicator.rank} of "
                f"{communicator.world_size})")
    raise RanksDisagreeError(f"{where}: the ranks' input digests differ but no shape does: {shapes}")


def _quiet_before_layers(model: nn.Module, region_name: str, planned: set[str]) -> bool:
    """Whether no planned module runs (and communicates) before the decoder layers: every
    planned path lies in the layers or in the output embeddings (the LM head runs after)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    after = [n for n, m in model.named_modules() if head is not None and m is head]
    return all(any(p.startswith(prefix + ".") or p == prefix for prefix in [region_name, *after]) for p in planned)


def install_input_check(model: nn.Module, region_name: str, *, group: Any,
                        planned: set[str]) -> Callable[[Tensor], None]:
    """Check every forward's input shapes across ranks before its first collective: a
    pre-hook on ``model`` (before embeddings, whose vocab-parallel forms communicate), and
    the returned function, which the first decoder layer's split calls with its input.

    When no ``planned`` module runs before the decoder layers (``region_name``), the
    pre-hook only starts the all-reduce and the first layer waits for it, so its latency
    overlaps the embedding, mask and rotary work in between. A forward that enters the
    layers without coming through ``model`` checks there, synchronously."""
    if not agreement_enabled() or dist.get_world_size(group) == 1:
        return lambda x: None
    device, where = _device(group), f"{region_name}.0"
    defer = _quiet_before_layers(model, region_name, planned)
    # set by the model's pre-hook for the forward now running: True (checked), or the
    # (where, shapes, started all-reduce) to settle before the first collective; None: no
    # pre-hook ran (the layers were called directly), so the first layer checks itself
    state: list[Any] = [None]

    def settle() -> None:
        pending, state[0] = state[0], None
        if isinstance(pending, tuple):
            _check_shapes(pending[0], pending[1], group, device, issued=pending[2])

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        where_model, shapes = f"{type(module).__name__} forward", _tensor_shapes(args, kwargs)
        if defer:
            state[0] = (where_model, shapes, _issue(_digest_words(sorted(shapes.items()), 1), group, device))
        else:
            _check_shapes(where_model, shapes, group, device)
            state[0] = True

    def at_first_layer(x: Tensor) -> None:
        if state[0] is None:
            _check_shapes(f"{where} forward", {"hidden_states": list(x.shape)}, group, device)
        settle()

    def post_hook(module: nn.Module, args: tuple, output: Any) -> None:
        settle()  # a forward that never reached the layers still completes its check

    if next(iter(model.get_submodule(region_name).children())) is not model:  # a ModuleList or ModuleDict
        model.register_forward_pre_hook(pre_hook, with_kwargs=True)
        model.register_forward_hook(post_hook)
    return at_first_layer
