"""Fault scenarios on fresh gloo groups: crashed, stalled and inconsistent ranks.

The long-lived pool in tests/dist.py cannot host these: a crashed rank takes its group with
it. `run_scenarios` spawns `world` processes that each run a list of scenarios in order,
building a fresh process group (new rendezvous file, short timeout) for each one and destroying it
after, so every scenario after the first also proves that fusedpar works again once the
group is rebuilt. Each rank reports, per scenario, whether it raised, what, and how long
the call took. A rank that crashes reports nothing more, so a crash must come last.

Faults are injected into real runs, never by mocking a collective or a kernel: the victim
rank wraps `fusedpar.overlap`'s `matmul` so that its n-th GEMM kills the process (SIGKILL or
exit) mid-schedule, or sleeps past the timeout before the call, or passes different
arguments than its peers.
"""
from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import queue
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tests.dist import remove_rendezvous, rendezvous_file

_CTX = mp.get_context("spawn")
VICTIM = 1
MATRIX_CASES: list[str] = []  # fault-matrix cases that ended as documented; counted in the summary


@dataclass
class Outcome:
    scenario: str
    rank: int
    ok: bool
    error_type: str = ""
    message: str = ""
    elapsed: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def inject_gemm_fault(kind: str, at_call: int) -> None:
    """In this process, make the `at_call`-th GEMM of any fusedpar schedule crash the rank."""
    import fusedpar.overlap as ov
    from fusedpar.overlap import all_gather, all_reduce, backward, reduce_scatter

    real = ov.matmul
    calls = [0]

    def faulty(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == at_call:
            if kind == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)
            os._exit(3)
        return real(*args, **kwargs)

    for module in (ov, all_gather, reduce_scatter, all_reduce, backward):  # each family calls its own import
        module.matmul = faulty


def _worker(rank: int, world: int, rendezvous: list[str], timeout_s: float, module: str,
            scenarios: list[tuple[str, dict[str, Any]]], results: Any) -> None:
    import importlib

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    table: dict[str, Callable[..., Any]] = importlib.import_module(module).SCENARIOS
    for (name, kwargs), init_method in zip(scenarios, rendezvous):
        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
        group = dist.group.WORLD
        start = time.monotonic()
        try:
            extra = table[name](group, rank, world, **kwargs) or {}
            outcome = Outcome(name, rank, True, elapsed=time.monotonic() - start, extra=extra)
        except Exception as e:  # the point: report what each rank raised
            outcome = Outcome(name, rank, False, type(e).__name__, str(e)[:2000], time.monotonic() - start)
        results.put(outcome)
        print(f"[rank {rank}] destroying group after {name}", file=sys.stderr, flush=True)
        try:
            dist.destroy_process_group()
        except Exception:  # a group broken by the fault may refuse a clean teardown
            pass
        print(f"[rank {rank}] destroyed group after {name}", file=sys.stderr, flush=True)
    # Leave without running C++ static destructors: once a peer has died, gloo's teardown at
    # interpreter exit has (rarely, under load) aborted with "terminate called without an
    # active exception". Every report is flushed first, so nothing is lost by skipping it.
    results.close()
    results.join_thread()
    sys.stdout.flush()
    os._exit(0)


def run_scenarios(world: int, module: str, scenarios: list[tuple[str, dict[str, Any]]], *,
                  timeout_s: float = 3.0, limit_s: float = 120.0) -> tuple[dict[str, dict[int, Outcome]], list[int | None]]:
    """Run `scenarios` (names in `module.SCENARIOS`) on `world` fresh ranks; outcomes + exit codes."""
    rendezvous = [rendezvous_file() for _ in scenarios]
    results = _CTX.Queue()
    procs = [_CTX.Process(target=_worker, args=(r, world, rendezvous, timeout_s, module, scenarios, results))
             for r in range(world)]
    for p in procs:
        p.start()
    outcomes: dict[str, dict[int, Outcome]] = {name: {} for name, _ in scenarios}
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline and any(p.is_alive() for p in procs):
        try:
            o = results.get(timeout=0.2)
            outcomes[o.scenario][o.rank] = o
        except queue.Empty:
            pass
    while True:
        try:
            o = results.get(timeout=0.2)
            outcomes[o.scenario][o.rank] = o
        except queue.Empty:
            break
    codes = []
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()
            codes.append(None)  # hung: the test fails on this
        else:
            codes.append(p.exitcode)
    for init_method in rendezvous:
        remove_rendezvous(init_method)
    return outcomes, codes
