"""Shared benchmark fixtures, for `python -m fusedpar bench` (or pytest bench/ directly).

Suites time with ``fixed_bench(fn, flops=..., op=..., m=..., variant=...)``: a fixed number
of rounds, never pytest-benchmark's calibration, because ranks that calibrate separately
run different iteration counts and their collectives stop matching.

``extra_info`` keys the runner understands: op, m, n, k, dtype, world_size, variant
(overlapped / serial / peer / torch / cublas / ...), flops (TFLOP/s is derived from the
median), and baseline=True on the entry the rest of its group is compared with.
"""
from __future__ import annotations

import time

import pytest
import torch

_SESSION_START = pytest.StashKey[float]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fusedpar benchmarks")
    group.addoption("--fusedpar-quick", action="store_true",
                    help="tiny shapes and few rounds (CPU smoke runs)")
    group.addoption("--fusedpar-rounds", type=int, default=None,
                    help="timed rounds per benchmark (default 3 quick, 20 otherwise)")
    group.addoption("--fusedpar-budget-s", type=float, default=None,
                    help="skip the benchmarks that would start after this many seconds, so "
                         "a time-limited run still ends and writes its JSON")


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_SESSION_START] = time.monotonic()


def pytest_runtest_setup(item: pytest.Item) -> None:
    budget = item.config.getoption("--fusedpar-budget-s")
    if budget is not None and time.monotonic() - item.config.stash[_SESSION_START] > budget:
        pytest.skip(f"out of the {budget:.0f} s benchmark budget")


@pytest.fixture(scope="session")
def quick(request: pytest.FixtureRequest) -> bool:
    """True under --fusedpar-quick: suites should pick tiny shapes."""
    return bool(request.config.getoption("--fusedpar-quick"))


@pytest.fixture(scope="session")
def bench_rounds(request: pytest.FixtureRequest, quick: bool) -> int:
    """Timed rounds per benchmark: the same number on every rank."""
    rounds = request.config.getoption("--fusedpar-rounds")
    return rounds if rounds is not None else (3 if quick else 20)


@pytest.fixture
def fixed_bench(benchmark, bench_rounds: int):
    """``run(fn, *, flops=None, warmup=1, **info)``: time ``fn`` for ``bench_rounds``
    rounds of one call each, after ``warmup`` untimed calls; CUDA work is synchronised
    inside the timed region. ``info`` goes to ``benchmark.extra_info``."""

    def run(fn, *, flops: float | None = None, warmup: int = 1, **info):
        benchmark.extra_info.update(info)
        if flops is not None:
            benchmark.extra_info["flops"] = flops
        def timed():
            result = fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            return result
        return benchmark.pedantic(timed, rounds=bench_rounds, iterations=1,
                                  warmup_rounds=warmup)

    return run
