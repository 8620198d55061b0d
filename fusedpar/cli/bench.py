"""`python -m fusedpar bench`: run the pytest-benchmark suites under bench/, tabulate,
save JSON + CSV + PNG under bench/results/<device>/; or print cost-model predictions
(``--predict``) or measure the GEMM table (``--calibrate``).

Suites report through ``benchmark.extra_info`` (see bench/conftest.py): ``op``, ``m``,
``n``, ``k``, ``dtype``, ``variant`` and ``flops`` (TFLOP/s is derived from the median),
and ``baseline: True`` on the entry the others in its group are compared with.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import torch

from fusedpar import costmodel
from fusedpar.cli._common import REPO_ROOT, default_device, device_slug, run_metadata, timestamp

# Variants that serve as the baseline of their group when none is flagged explicitly.
BASELINE_VARIANTS = ("serial", "unfused", "reference", "torch", "cublas")

# Llama projections as (name, in_features, out_features, parallel style).
# Column-parallel layers gather the sequence-sharded input (all_gather_matmul);
# row-parallel layers reduce-scatter (sequence parallel) or all-reduce their output.
LLAMA_LAYERS = {
    "llama-8b": [("q", 4096, 4096, "col"), ("k", 4096, 1024, "col"), ("v", 4096, 1024, "col"),
                 ("o", 4096, 4096, "row"), ("gate", 4096, 14336, "col"),
                 ("up", 4096, 14336, "col"), ("down", 14336, 4096, "row")],
    "llama-70b": [("q", 8192, 8192, "col"), ("k", 8192, 1024, "col"), ("v", 8192, 1024, "col"),
                  ("o", 8192, 8192, "row"), ("gate", 8192, 28672, "col"),
                  ("up", 8192, 28672, "col"), ("down", 28672, 8192, "row")],
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `bench`."""
    parser.add_argument("--suite", action="append", default=None, metavar="PATH",
                        help="benchmark file or directory (repeatable; default bench/test_*.py)")
    parser.add_argument("-k", dest="keyword", default=None, help="pytest -k expression")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default bench/results/<device>)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke runs)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no benchmark after this many seconds (the run still "
                             "writes what it measured)")
    parser.add_argument("--compare", type=Path, default=None, metavar="JSON",
                        help="an earlier results JSON: print old/new ratios after the run")
    parser.add_argument("--predict", action="store_true",
                        help="print the cost model's per-layer speed-ups for Llama-8B/70B")
    parser.add_argument("--spec", default="h100-sxm", choices=sorted(costmodel.DEVICES),
                        help="device spec for --predict")
    parser.add_argument("--tokens", type=int, default=8192, help="global m for --predict")
    parser.add_argument("--tp-style", choices=("sp", "ar"), default="sp",
                        help="--predict: sequence parallel (AG + RS) or all-reduce (AR)")
    parser.add_argument("--calibrate", action="store_true",
                        help="measure the GEMM throughput table and save it")


def run(args: argparse.Namespace) -> int:
    """Dispatch: --predict and --calibrate run alone; otherwise run the suites."""
    if args.predict or args.calibrate:
        if args.predict:
            print_predictions(spec=costmodel.DEVICES[args.spec], tokens=args.tokens,
                              style=args.tp_style)
        if args.calibrate:
            run_calibration(args)
        return 0
    return run_suites(args)


# ---------------------------------------------------------------------------- suites


def run_suites(args: argparse.Namespace) -> int:
    """Run pytest-benchmark, then write results, print the table, plot, compare."""
    out_dir = args.out or REPO_ROOT / "bench" / "results" / device_slug()
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"bench-{timestamp()}"
    raw_path = stem.with_suffix(".raw.json")
    suites = [str(Path(s).resolve()) for s in args.suite] if args.suite else \
        sorted(str(p) for p in (REPO_ROOT / "bench").glob("test_*.py"))
    if not suites:
        print("no benchmark suites found under bench/", file=sys.stderr)
        return 2
    cmd = [sys.executable, "-m", "pytest", *suites, "-q", "-p", "no:cacheprovider",
           "--rootdir", str(REPO_ROOT), "--benchmark-only", "--benchmark-disable-gc",
           "--benchmark-columns=min,median,max,rounds",
           f"--benchmark-json={raw_path}"]
    if args.keyword:
        cmd += ["-k", args.keyword]
    if args.quick:
        cmd.append("--fusedpar-quick")
    if args.budget_s is not None:
        cmd.append(f"--fusedpar-budget-s={args.budget_s}")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    if not torch.cuda.is_available():
        # Triton kernels can only run interpreted here; it must be set before import.
        env.setdefault("TRITON_INTERPRET", "1")
    print("+", " ".join(cmd), flush=True)
    rc = subprocess.run(cmd, env=env, cwd=REPO_ROOT).returncode
    if raw_path.exists():
        raw = json.loads(raw_path.read_text())
        raw_path.unlink()  # kept inside our JSON below
    elif rc in (0, 5):  # every benchmark skipped or deselected: pytest-benchmark writes nothing
        print("no benchmark ran", file=sys.stderr)
        raw = {"benchmarks": []}
    else:
        print(f"pytest exited {rc} without writing {raw_path}", file=sys.stderr)
        return rc

    rows = rows_from_pytest_benchmark(raw)
    meta = run_metadata(argv=getattr(args, "argv", None))
    meta["pytest_exit_code"] = rc
    json_path = stem.with_suffix(".json")
    json_path.write_text(json.dumps({"meta": meta, "rows": rows, "pytest_benchmark": raw},
                                    indent=1))
    write_csv(rows, stem.with_suffix(".csv"))
    print(format_table(rows))
    for png in plot_rows(rows, stem):
        print(f"plot: {png}")
    print(f"results: {json_path} (+ .csv)")
    if args.compare:
        print(format_comparison(load_rows(args.compare), rows))
    return rc


def rows_from_pytest_benchmark(raw: dict) -> list[dict]:
    """One flat row per benchmark, with TFLOP/s and its baseline's median and ratio."""
    rows = []
    for bench in raw.get("benchmarks", []):
        info = dict(bench.get("extra_info") or {})
        median = bench["stats"]["median"]
        tflops = info.get("tflops")
        if tflops is None and info.get("flops"):
            tflops = info["flops"] / median / 1e12
        rows.append({
            "name": bench["name"], "group": bench.get("group") or _group_of(info),
            "variant": info.get("variant"), "op": info.get("op"), "m": info.get("m"),
            "n": info.get("n"), "k": info.get("k"), "dtype": info.get("dtype"),
            "world_size": info.get("world_size"), "median_ms": median * 1e3,
            "min_ms": bench["stats"]["min"] * 1e3, "rounds": bench["stats"]["rounds"],
            "tflops": tflops, "is_baseline": bool(info.get("baseline")),
            "baseline": None, "baseline_ms": None, "speedup": None,
        })
    by_group = defaultdict(list)
    for row in rows:
        if row["group"]:
            by_group[row["group"]].append(row)
    for row, bench in zip(rows, raw.get("benchmarks", [])):
        # Suites that time their own baseline inside each test report the ratio instead.
        ratio = (bench.get("extra_info") or {}).get("ratio_to_torch")
        if ratio:
            row["baseline"], row["speedup"] = "torch (same test)", ratio
            row["baseline_ms"] = row["median_ms"] * ratio
    for members in by_group.values():
        base = next((r for r in members if r["is_baseline"]), None) or next(
            (r for v in BASELINE_VARIANTS for r in members if r["variant"] == v), None)
        if base is None:
            continue
        for row in members:
            row["baseline"], row["baseline_ms"] = base["name"], base["median_ms"]
            row["speedup"] = base["median_ms"] / row["median_ms"]
    return rows


def _group_of(info: dict) -> str | None:
    """Benchmarks of one op on one shape share a group unless the suite names one."""
    if info.get("op") is None or info.get("m") is None:
        return None
    return "/".join(f"{key}={info[key]}" for key in ("op", "m", "n", "k", "dtype", "world_size")
                    if info.get(key) is not None)


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: list[dict]) -> str:
    """Plain-text table: baseline first, then the benchmark's median, TFLOP/s, speed-up."""
    header = ("baseline", "base ms", "name", "ms (median)", "TFLOP/s", "x baseline")
    lines = [(r["baseline"] or "-", _fmt(r["baseline_ms"], ".3f"), r["name"],
              _fmt(r["median_ms"], ".3f"), _fmt(r["tflops"], ".4g"), _fmt(r["speedup"], ".3g"))
             for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h)
              for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" if i in (0, 2) else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths)),
                      *(fmt.format(*line) for line in lines)])


def write_csv(rows: list[dict], path: Path) -> None:
    """The rows as CSV, one column per key."""
    keys = list(rows[0]) if rows else ["name", "median_ms"]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def plot_rows(rows: list[dict], stem: Path) -> list[Path]:
    """TFLOP/s vs M, one PNG per op, one line per variant (for rows that carry op, m
    and TFLOP/s); a bar chart of medians for the rest. Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    curves = [r for r in rows if r["op"] and r["m"] and r["tflops"]]
    by_op = defaultdict(lambda: defaultdict(list))
    for r in curves:
        shape = ", ".join(f"{key}={r[key]}" for key in ("n", "k", "dtype", "world_size")
                          if r[key] is not None)
        by_op[r["op"]][f"{r['variant'] or r['name']} ({shape})"].append((r["m"], r["tflops"]))
    for op, lines in by_op.items():
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, points in sorted(lines.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("M (global rows)")
        ax.set_ylabel("TFLOP/s")
        ax.set_title(op)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        path = stem.parent / f"{stem.name}-{op}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    rest = [r for r in rows if r not in curves]
    if rest:
        fig, ax = plt.subplots(figsize=(7, 0.8 + 0.3 * len(rest)))
        ax.barh([r["name"] for r in rest], [r["median_ms"] for r in rest])
        ax.invert_yaxis()
        ax.set_xlabel("median ms")
        ax.tick_params(axis="y", labelsize=7)
        path = stem.parent / f"{stem.name}-medians.png"
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def load_rows(path: Path) -> list[dict]:
    """Rows from one of our results JSONs or from a raw pytest-benchmark JSON."""
    data = json.loads(Path(path).read_text())
    return data["rows"] if "rows" in data else rows_from_pytest_benchmark(data)


def format_comparison(old: list[dict], new: list[dict]) -> str:
    """Per benchmark name: old and new medians and old/new (above 1: faster now)."""
    old_ms = {r["name"]: r["median_ms"] for r in old}
    lines = [f"{'name':<50} {'old ms':>10} {'new ms':>10} {'old/new':>8}"]
    for r in new:
        before = old_ms.get(r["name"])
        ratio = "-" if before is None else f"{before / r['median_ms']:.2f}"
        lines.append(f"{r['name']:<50} {_fmt(before, '.3f'):>10} {r['median_ms']:>10.3f} "
                     f"{ratio:>8}")
    return "\n".join(lines)


# ------------------------------------------------------------------------ predictions


def predictions(*, spec: costmodel.DeviceSpec, tokens: int, style: str = "sp",
                tps: tuple[int, ...] = (2, 4, 8)) -> list[dict]:
    """Predicted speed-up of each Llama projection at each TP degree (bf16)."""
    rows = []
    for model, layers in LLAMA_LAYERS.items():
        for tp in tps:
            for layer, d_in, d_out, kind in layers:
                if kind == "col":
                    op = "all_gather_matmul" if style == "sp" else None
                    n, k = d_out // tp, d_in
                else:
                    op = "matmul_reduce_scatter" if style == "sp" else "matmul_all_reduce"
                    n, k = d_out, d_in // tp
                if op is None:  # replicated input: nothing to communicate
                    c = costmodel.gemm_time(tokens, n, k, torch.bfloat16, spec)
                    pred = costmodel.Prediction("matmul", 1, c, 0.0, c, c, 1.0, 1.0)
                else:
                    chunks = costmodel.choose_chunks(op, m=tokens, n=n, k=k, world_size=tp,
                                                     dtype=torch.bfloat16, device=spec)
                    pred = costmodel.predict(op, m=tokens, n=n, k=k, world_size=tp,
                                             dtype=torch.bfloat16, chunks=chunks, device=spec)
                rows.append({"model": model, "tp": tp, "layer": layer, "m": tokens, "n": n,
                             "k": k, **dataclasses.asdict(pred)})
    return rows


def print_predictions(*, spec: costmodel.DeviceSpec, tokens: int, style: str = "sp") -> None:
    """Print `predictions` as a table, with a whole-block line per model and TP."""
    print(f"cost model: {spec.name}, bf16, m={tokens} tokens, "
          f"{'sequence parallel (AG + RS)' if style == 'sp' else 'all-reduce'}; "
          "bound = (C+M)/max(C,M)")
    head = (f"{'model':<10} {'tp':>3} {'layer':<6} {'op':<22} {'n':>6} {'k':>6} {'chunks':>6} "
            f"{'C ms':>8} {'M ms':>8} {'serial':>8} {'overlap':>8} {'speedup':>7} {'bound':>6}")
    print(head)
    print("-" * len(head))
    rows = predictions(spec=spec, tokens=tokens, style=style)
    block = defaultdict(lambda: [0.0, 0.0, 0.0])
    for r in rows:
        print(f"{r['model']:<10} {r['tp']:>3} {r['layer']:<6} {r['op']:<22} {r['n']:>6} "
              f"{r['k']:>6} {r['chunks']:>6} {r['compute_s'] * 1e3:>8.3f} "
              f"{r['comm_s'] * 1e3:>8.3f} {r['serial_s'] * 1e3:>8.3f} "
              f"{r['overlapped_s'] * 1e3:>8.3f} {r['speedup']:>7.2f} {r['bound']:>6.2f}")
        acc = block[(r["model"], r["tp"])]
        acc[0] += max(r["compute_s"], r["comm_s"])  # each layer overlaps only itself
        acc[1] += r["serial_s"]
        acc[2] += r["overlapped_s"]
    print()
    for (model, tp), (longest, serial, overlapped) in block.items():
        print(f"{model:<10} tp={tp}: all projections serial {serial * 1e3:.3f} ms, "
              f"overlapped {overlapped * 1e3:.3f} ms, speedup {serial / overlapped:.2f} "
              f"(bound {serial / longest:.2f})")


# ------------------------------------------------------------------------ calibration


def run_calibration(args: argparse.Namespace) -> Path:
    """Measure GEMM TFLOP/s (torch, and fusedpar kernels on GPU), save and print them."""
    device = default_device()
    if device.type == "cuda":
        dtypes = (torch.bfloat16, torch.float16, torch.float32)
        # The model keeps one peak per dtype, reached by big squares; few shapes also
        # keep Triton's per-shape autotuning inside run_all.sh's time limit.
        sizes = (4096,) if args.quick else (2048, 4096, 8192)
        backends = ["torch", "fusedpar"]
    else:
        # Interpreted Triton is too slow to say anything about throughput: torch only.
        dtypes = (torch.float32,)
        sizes = (64, 128) if args.quick else (256, 512, 1024)
        backends = ["torch"]
    shapes = [(s, s, s) for s in sizes]
    rows = []
    for backend in backends:
        rows += costmodel.measure_gemm(device, dtypes=dtypes, shapes=shapes, backend=backend,
                                       reps=3 if args.quick else 10)
    base = costmodel.device_spec_for(device)
    # The model prices our kernels: prefer their numbers where they were measured.
    best: dict[str, float] = {}
    for backend in ("torch", "fusedpar"):
        table = {}
        for r in rows:
            if r["backend"] == backend:
                table[r["dtype"]] = max(table.get(r["dtype"], 0.0), r["tflops"])
        best.update(table)
    spec = dataclasses.replace(base, name=f"{base.name}-calibrated",
                               gemm_tflops={**base.gemm_tflops, **best})
    out_dir = args.out or REPO_ROOT / "bench" / "results" / device_slug()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"calibrate-{timestamp()}.json"
    path.write_text(json.dumps({"meta": run_metadata(device, getattr(args, "argv", None)),
                                "measurements": rows, "default_spec": dataclasses.asdict(base),
                                "calibrated_spec": dataclasses.asdict(spec)}, indent=1))
    print(f"{'backend':<9} {'dtype':<9} {'shape':>16} {'ms':>9} {'TFLOP/s':>9} {'table':>8}")
    for r in rows:
        print(f"{r['backend']:<9} {r['dtype']:<9} {r['m']:>5}x{r['n']}x{r['k']:<5} "
              f"{r['median_s'] * 1e3:>9.3f} {r['tflops']:>9.4g} "
              f"{base.gemm_tflops.get(r['dtype'], float('nan')):>8.3g}")
    print(f"calibration: {path}")
    return path
