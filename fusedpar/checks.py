"""Opt-in cross-rank consistency check: ranks compare a fingerprint of each call first.

Collectives whose sizes differ across ranks are not caught by the backends: gloo aborts one
process and returns garbage on the other (FACTS.md), NCCL hangs or corrupts. With
`FUSEDPAR_DEBUG=1` in the environment when fusedpar is imported (or `set_debug(True)`, or
`debug=True` on a call) every schedule first
all-gathers a small fingerprint (op, per-rank shapes, dtype, chunks, call number) and raises
the same `InconsistentCallError` on every rank if any field differs, naming the rank and the
field. It costs one small blocking collective per call, so it is off by default.
"""
from __future__ import annotations

import os
from typing import Any

from .comm import Communicator

__all__ = ["InconsistentCallError", "debug_enabled", "set_debug", "maybe_check_consistent", "check_consistent"]


class InconsistentCallError(ValueError):
    """Ranks called the same fusedpar op with different arguments (caught in debug mode)."""


# FUSEDPAR_DEBUG is read once, when fusedpar is imported (every schedule asks, on every
# call); `set_debug` changes it later in the process.
_DEBUG = [os.environ.get("FUSEDPAR_DEBUG", "") not in ("", "0")]


def set_debug(enabled: bool) -> None:
    """Turn the per-call consistency check on or off for calls that pass `debug=None`
    (what FUSEDPAR_DEBUG set before import does)."""
    _DEBUG[0] = bool(enabled)


def debug_enabled(debug: bool | None = None) -> bool:
    """`debug` if given, else whether debug mode is on (FUSEDPAR_DEBUG set to something
    other than 0/empty when fusedpar was imported, or `set_debug`)."""
    if debug is not None:
        return debug
    return _DEBUG[0]


_CALLS: dict[int, int] = {}  # per communicator: how many checked calls it has made


def check_consistent(comm: Communicator, op: str, **fields: Any) -> None:
    """All-gather `(op, call number, **fields)` over `comm`; raise on every rank if they differ."""
    seq = _CALLS.get(id(comm), 0)
    _CALLS[id(comm)] = seq + 1
    mine = {"op": op, "call": seq, **fields}
    everyone = comm.all_gather_object(mine)
    problems = []
    for rank, theirs in enumerate(everyone):
        for key in sorted(set(mine) | set(theirs)):
            if theirs.get(key) != everyone[0].get(key):
                problems.append(f"rank {rank} has {key}={theirs.get(key)!r} but rank 0 has {everyone[0].get(key)!r}")
    if problems:
        raise InconsistentCallError(
            f"fusedpar debug check failed for {op} (rank {comm.rank} of {comm.world_size}): "
            + "; ".join(problems)
        )


def maybe_check_consistent(comm: Communicator, op: str, debug: bool | None, **fields: Any) -> None:
    """`check_consistent` when debug mode is on (argument or FUSEDPAR_DEBUG), else nothing."""
    if comm.world_size > 1 and debug_enabled(debug):
        check_consistent(comm, op, **fields)
