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
            f"fault matrix: {len(MATRIX_CASES)} cases (op, layer or save_pretrained x fault) ended as documented, none hung"
        )
    for line in _versions():
        terminalreporter.write_line(line)


def _versions() -> list[str]:
    """The versions the run used; family-specific tests (tests/models, the HF styles) are
    written against the transformers release pinned in pyproject.toml's `test` extra."""
    import re

    import torch
    import triton

    lines = [f"fusedpar: torch {torch.__version__}, triton {triton.__version__}, "
             f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')}"]
    try:
        import transformers
    except ImportError:
        return lines + ["fusedpar: transformers not installed: the Hugging Face tests fail"]
    lines[0] += f", transformers {transformers.__version__}"
    pyproject = open(os.path.join(os.path.dirname(__file__), "..", "pyproject.toml")).read()
    pinned = re.search(r'"transformers==([^"]+)"', pyproject)
    if pinned and transformers.__version__ != pinned.group(1):
        lines.append(f"fusedpar: WARNING transformers {transformers.__version__}, but the tests pin "
                     f"{pinned.group(1)}: families and their plans differ between releases, so some "
                     f"family-specific tests fail or do not apply")
    return lines
