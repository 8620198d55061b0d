"""Test-wide set-up: the Triton interpreter, and pools of gloo ranks shared across tests."""
from __future__ import annotations

import os

# The interpreter is chosen when @triton.jit decorates a kernel, i.e. at import time, so it
# must be on before anything imports fusedpar.kernels (FACTS.md). On a CUDA machine run with
# FUSEDPAR_COMPILED_TRITON=1 to test the compiled kernels instead.
if os.environ.get("FUSEDPAR_COMPILED_TRITON", "") in ("", "0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from tests.dist import DistPool  # noqa: E402

_POOLS: dict[int, DistPool] = {}


def _pool(world: int) -> DistPool:
    if world not in _POOLS:
        _POOLS[world] = DistPool(world)
    return _POOLS[world]


@pytest.fixture(scope="session")
def dist2() -> DistPool:
    """Two gloo ranks, started once and reused (restarted after a failure)."""
    return _pool(2)


@pytest.fixture(scope="session")
def dist4() -> DistPool:
    """Four gloo ranks, started once and reused (restarted after a failure)."""
    return _pool(4)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    for pool in _POOLS.values():
        pool.close()


def pytest_terminal_summary(terminalreporter, exitstatus: int, config) -> None:
    from tests.faults import MATRIX_CASES

    if MATRIX_CASES:
        terminalreporter.write_line(
            f"fault matrix: {len(MATRIX_CASES)} cases (op or layer x fault) ended in their documented error, none hung"
        )
