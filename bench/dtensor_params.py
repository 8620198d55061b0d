"""What DTensor parameters cost per call: one column- and one row-parallel linear, forward and
forward+backward, with the parameters as DTensors (what parallelize and the layers make) and
as the plain local tensors they were before (the same layer, its parameters swapped back).

Host time only: torch's fake process group makes every collective a no-op (FACTS.md), so what
is timed is the work of issuing kernels and collectives, which bounds a decode step on a GPU.
Variants alternate round by round; medians over rounds (SHAPES says how many). Run:

    python bench/dtensor_params.py            # writes bench/results/cpu/dtensor-params-<date>.json
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

# (tokens, hidden, rounds, calls per round): the decode shape is the one host time bounds
# (hidden 256, as the tiny Llama of the decode benchmarks); the block one is GEMM-bound
SHAPES = {"decode (1 token, H=256)": (1, 256, 40, 50), "block (64 tokens, H=512)": (64, 512, 15, 10)}


def _plain(layer: nn.Module) -> nn.Module:
    """The layer as it was before DTensor parameters: plain local tensors."""
    from fusedpar.layers.sharding import local_tensor

    for name, p in list(layer._parameters.items()):
        if p is not None:
            layer._parameters[name] = nn.Parameter(local_tensor(p).detach().clone(), requires_grad=p.requires_grad)
    return layer


def _calls(kind: str, tokens: int, hidden: int, group) -> dict[str, callable]:
    import fusedpar

    torch.manual_seed(0)
    if kind == "column":
        make = lambda: fusedpar.ColumnParallelLinear(hidden, 4 * hidden, group=group, kernel="torch")  # noqa: E731
        x = torch.randn(tokens, hidden, requires_grad=True)
    else:
        make = lambda: fusedpar.RowParallelLinear(4 * hidden, hidden, group=group, kernel="torch")  # noqa: E731
        x = torch.randn(tokens, 4 * hidden // dist.get_world_size(group), requires_grad=True)
    layers = {"dtensor": make(), "plain": _plain(make())}
    out = {}
    for variant, layer in layers.items():
        def fwd(layer=layer):
            with torch.no_grad():
                layer(x)

        def fwd_bwd(layer=layer):
            layer.zero_grad(set_to_none=True)
            layer(x).sum().backward()

        out[f"{kind} forward|{variant}"] = fwd
        out[f"{kind} fwd+bwd|{variant}"] = fwd_bwd
    return out


def main() -> None:
    from torch.testing._internal.distributed.fake_pg import FakeStore

    torch.set_num_threads(1)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    group = dist.group.WORLD
    results: dict[str, dict[str, float]] = {}
    for shape_name, (tokens, hidden, rounds, n_calls) in SHAPES.items():
        calls = {**_calls("column", tokens, hidden, group), **_calls("row", tokens, hidden, group)}
        for f in calls.values():  # warm up (caches, first-call allocations)
            for _ in range(5):
                f()
        times: dict[str, list[float]] = {k: [] for k in calls}
        for _ in range(rounds):
            for key, f in calls.items():
                t0 = time.perf_counter()
                for _ in range(n_calls):
                    f()
                times[key].append((time.perf_counter() - t0) / n_calls * 1e6)
        for key, ts in times.items():
            call, variant = key.split("|")
            results.setdefault(f"{shape_name}: {call}", {})[variant] = statistics.median(ts)
    rows = []
    for name, v in results.items():
        extra = v["dtensor"] - v["plain"]
        v["extra_us"], v["extra_pct"] = extra, 100 * extra / v["plain"]
        v["within_budget"] = extra <= max(2.0, 0.02 * v["plain"])  # the bound: 2 µs or 2 %
        rows.append(f"| {name} | {v['plain']:.1f} | {v['dtensor']:.1f} | {extra:+.1f} ({v['extra_pct']:+.1f} %) |")
    print("| call | plain params (µs) | DTensor params (µs) | extra |\n|---|---|---|---|")
    print("\n".join(rows))
    meta = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "python": sys.version.split()[0],
            "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "threads": 1,
            "shapes": {k: dict(zip(("tokens", "hidden", "rounds", "calls_per_round"), v)) for k, v in SHAPES.items()},
            "group": "fake (collectives are no-ops), world 2",
            "kernel": "torch"}
    out_dir = os.path.join(os.path.dirname(__file__), "results", "cpu")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"dtensor-params-{datetime.date.today().strftime('%Y%m%d')}.json")
    with open(path, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    print(f"wrote {path}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
