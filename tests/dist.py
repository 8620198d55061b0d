"""A pool of real gloo ranks that lives across tests.

Launching a process group costs ~2 s per launch on the 2-core box (FACTS.md), so tests send
work to ranks that stay up: `pool.run(fn, *args)` calls `fn(group, *args)` on every rank and
returns the per-rank results. `fn` must be a module-level function (it is pickled by name).

Every task ends with an all-reduce(MAX) of a per-rank failure flag, so when one rank fails
all ranks report it together and the parent raises one error naming each failing rank and
its traceback (Transformer Engine's run_numerics.py does the same). After any failure or
timeout the pool is torn down: its group may be out of step, and the next task gets a
fresh one.
"""
from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import queue
import tempfile
import traceback
from typing import Any, Callable

_CTX = mp.get_context("spawn")


def rendezvous_file() -> str:
    """A `file://` init method on a fresh path. A TCP port picked in advance can be taken by
    another socket (gloo's own connections included) before rank 0 binds it; a file cannot."""
    handle, path = tempfile.mkstemp(prefix="fusedpar-rdzv-")
    os.close(handle)
    os.unlink(path)  # FileStore creates it; a stale file would hold an old group's keys
    return f"file://{path}"


def remove_rendezvous(init_method: str) -> None:
    """Delete a `rendezvous_file()` once its processes are gone (a rank that exits abruptly
    leaves it behind)."""
    try:
        os.unlink(init_method.removeprefix("file://"))
    except FileNotFoundError:
        pass


def _worker(rank: int, world: int, init_method: str, timeout_s: float, tasks: Any, results: Any) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # 2 cores shared by 2-4 ranks: oversubscription only slows gloo down
    dist.init_process_group(
        "gloo",
        init_method=init_method,
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    group = dist.new_group(list(range(world)), timeout=datetime.timedelta(seconds=timeout_s))
    results.put((rank, "ready", None))
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args, kwargs = task
        try:
            value, error = fn(group, *args, **kwargs), None
        except BaseException:  # report everything, including assertion failures
            value, error = None, traceback.format_exc()
        flag = torch.tensor([0.0 if error is None else 1.0])
        try:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=dist.group.WORLD)
        except RuntimeError as e:
            error = (error or "") + f"\n(failure-flag all_reduce also failed: {e})"
        results.put((rank, value if error is None else None, error))
    dist.destroy_process_group()


class DistPool:
    """`world` spawned gloo ranks that run test functions on request."""

    def __init__(self, world: int, *, timeout_s: float = 60.0) -> None:
        self.world = world
        self.timeout_s = timeout_s
        self._procs: list[Any] = []

    def _start(self) -> None:
        init_method = self._init_method = rendezvous_file()
        self._tasks = [_CTX.Queue() for _ in range(self.world)]
        self._results = _CTX.Queue()
        self._procs = [
            _CTX.Process(
                target=_worker,
                args=(r, self.world, init_method, self.timeout_s, self._tasks[r], self._results),
                daemon=True,
            )
            for r in range(self.world)
        ]
        for p in self._procs:
            p.start()
        for _ in range(self.world):
            self._get(120.0)

    def _get(self, timeout: float) -> tuple[int, Any, Any]:
        try:
            return self._results.get(timeout=timeout)
        except queue.Empty:
            dead = [r for r, p in enumerate(self._procs) if not p.is_alive()]
            self.close()
            raise TimeoutError(
                f"DistPool(world={self.world}): no answer within {timeout:.0f} s; dead ranks: {dead}"
            ) from None

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float = 240.0, **kwargs: Any) -> list[Any]:
        """Run `fn(group, *args, **kwargs)` on every rank; return results in rank order."""
        if not self._procs:
            self._start()
        for q in self._tasks:
            q.put((fn, args, kwargs))
        values: list[Any] = [None] * self.world
        errors: dict[int, str] = {}
        for _ in range(self.world):
            rank, value, error = self._get(timeout)
            values[rank] = value
            if error is not None:
                errors[rank] = error
        if errors:
            self.close()
            report = "\n".join(f"--- rank {r} of {self.world} ---\n{e}" for r, e in sorted(errors.items()))
            raise AssertionError(f"{fn.__name__} failed on ranks {sorted(errors)}:\n{report}")
        return values

    def close(self) -> None:
        for q in getattr(self, "_tasks", []):
            try:
                q.put(None)
            except (OSError, ValueError):
                pass
        for p in self._procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
        if self._procs:
            remove_rendezvous(self._init_method)
        self._procs = []


def rank_and_world(group: Any) -> tuple[int, int]:
    import torch.distributed as dist

    return dist.get_rank(group), dist.get_world_size(group)


def env_flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")
