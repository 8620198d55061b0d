"""Overlap on one GPU against an emulated link (issue #8): C, M, serial, overlapped, hidden.

    python3 bench/gpu/overlap_emulated.py --out DIR [--quick] [--budget-s 100]
    python3 bench/gpu/overlap_emulated.py --out DIR --cpu-smoke      # plumbing only, on CPU

For all_gather_matmul (column-parallel q, k/v, gate/up) and matmul_reduce_scatter
(row-parallel o, down) at Llama-3-8B and Llama-70B projection shapes, TP 8 (``--tp``),
bf16, ``--tokens`` tokens, with every collective on `EmulatedLinkCommunicator`
(emulated_link.py: the comm stream spends the time a ring collective over a
``--link-gbps`` link would, as D2D copies that contend with the GEMM for the GPU):

    C       the per-rank GEMM alone ([tokens, k] @ [k, n]), per GEMM kernel (torch, triton)
    M       the emulated collective alone (the whole all-gather / reduce-scatter)
    serial  the unfused reference on the emulated link (collective then GEMM, or the reverse)
    T       the overlapped schedule at several chunk counts (the cost model's choice marked)
    hidden  (C + M - T) / min(C, M): the share of the shorter side that overlap hid (goal 0.90)
    pred    costmodel.predict with the GEMM table calibrated on this shape's C and the link
            set to the emulated one; err = pred / T - 1 (goal |err| <= 0.15)

Launch gaps: one profiled call per case (torch.profiler); on the compute stream, the GPU
idle time between consecutive kernels that was spent waiting for the host to launch the
next one (`max_launch_gap_us`), all idle time (`max_gap_us`, which includes waiting for a
transfer), and on the host the longest interval between consecutive chunk launches.

Results: overlap-emulated.json / .csv / .md / .png under --out, with device, driver,
versions, date, and the emulation with its limits. Every case is written as soon as it is
measured, and cases that would start after --budget-s are recorded as skipped, so a run cut
short still leaves its results. cuBLAS (kernel=torch) runs for every case first; the Triton
kernel's autotuning costs seconds per new shape, so it comes second.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from emulated_link import EMULATION_NOTE, EmulatedLinkCommunicator  # noqa: E402
from fusedpar import costmodel, overlap  # noqa: E402
from fusedpar.kernels import interpreter, matmul  # noqa: E402

STEM = "overlap-emulated"
HIDDEN_GOAL, PRED_TOL = 0.90, 0.15

# (model, layer, in_features, out_features, style); gate/up and k/v share a shape.
LAYERS = [
    ("llama-8b", "gate/up", 4096, 14336, "col"), ("llama-8b", "down", 14336, 4096, "row"),
    ("llama-70b", "gate/up", 8192, 28672, "col"), ("llama-70b", "down", 28672, 8192, "row"),
    ("llama-8b", "q", 4096, 4096, "col"), ("llama-8b", "o", 4096, 4096, "row"),
    ("llama-70b", "q", 8192, 8192, "col"), ("llama-70b", "o", 8192, 8192, "row"),
    ("llama-8b", "k/v", 4096, 1024, "col"), ("llama-70b", "k/v", 8192, 1024, "col"),
]
SHORT = {"all_gather_matmul": "AG+GEMM", "matmul_reduce_scatter": "GEMM+RS"}
QUICK_LAYERS = {"gate/up", "down"}
SMOKE_LAYERS = [("tiny", "up", 64, 96, "col"), ("tiny", "down", 96, 64, "row")]


@dataclasses.dataclass(frozen=True)
class Case:
    model: str
    layer: str
    op: str
    tp: int
    tokens: int
    n: int
    k: int

    @property
    def name(self) -> str:
        return f"{self.model} {self.layer} tp{self.tp} m{self.tokens}"


def make_cases(layers, tps, tokens) -> list[Case]:
    cases = []
    for m in tokens:
        for tp in tps:
            for model, layer, d_in, d_out, style in layers:
                if style == "col":  # x sharded on tokens, gathered; w a column shard
                    cases.append(Case(model, layer, "all_gather_matmul", tp, m, d_out // tp, d_in))
                else:  # x full on tokens, K sharded; partial sums reduce-scattered
                    cases.append(Case(model, layer, "matmul_reduce_scatter", tp, m, d_out, d_in // tp))
    return cases


# ------------------------------------------------------------------------------ timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device: torch.device, *, reps: int, warmup: int) -> tuple[float, float]:
    """(median GPU ms, median host ms of issuing the call) over `reps` isolated calls.

    Each call starts on an idle device (synchronised before), so launch costs count."""
    for _ in range(warmup):
        fn()
    _sync(device)
    gpu, host = [], []
    for _ in range(reps):
        _sync(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            h0 = time.perf_counter()
            fn()
            h1 = time.perf_counter()
            end.record()
            end.synchronize()
            gpu.append(start.elapsed_time(end))
        else:
            h0 = time.perf_counter()
            fn()
            h1 = time.perf_counter()
            gpu.append((h1 - h0) * 1e3)
        host.append((h1 - h0) * 1e3)
    return statistics.median(gpu), statistics.median(host)


# ------------------------------------------------------------------------- launch gaps

CHUNK_RANGES = ("mm piece", "consume")  # overlap/'s nvtx_range labels of chunk launches


def trace_gaps(trace: dict) -> dict:
    """Gaps of one profiled schedule call, from a torch.profiler Chrome trace.

    GPU (when the trace has kernels): the compute stream is the one with the most kernel
    time; between consecutive kernels on it, `gap` is all idle time and `launch gap` the
    part of it before the host had finished launching the next kernel (the GPU waited
    for the host, which is what eats overlap). Host: the longest start-to-start interval
    between consecutive chunk ranges (CHUNK_RANGES), i.e. between chunk launches."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    chunk = sorted((e for e in events if e.get("cat") == "user_annotation"
                    and str(e.get("name", "")).startswith(CHUNK_RANGES)), key=lambda e: e["ts"])
    starts = [e["ts"] for e in chunk]
    intervals = [b - a for a, b in zip(starts, starts[1:])]
    out = {"chunk_launches": len(chunk),
           "max_host_launch_interval_us": max(intervals) if intervals else None,
           "compute_kernels": 0, "max_gap_us": None, "total_gap_us": None,
           "max_launch_gap_us": None, "total_launch_gap_us": None}
    kernels = [e for e in events if e.get("cat") == "kernel"]
    if not kernels:
        return out
    busy: dict = {}
    for e in kernels:
        s = e.get("args", {}).get("stream")
        busy[s] = busy.get(s, 0.0) + e.get("dur", 0.0)
    stream = max(busy, key=busy.get)
    compute = sorted((e for e in kernels if e.get("args", {}).get("stream") == stream), key=lambda e: e["ts"])
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    gaps, launch_gaps = [], []
    for prev, nxt in zip(compute, compute[1:]):
        prev_end = prev["ts"] + prev.get("dur", 0.0)
        gaps.append(max(0.0, nxt["ts"] - prev_end))
        launch = launches.get(nxt.get("args", {}).get("correlation"))
        if launch is not None:
            issued = launch["ts"] + launch.get("dur", 0.0)
            launch_gaps.append(max(0.0, min(nxt["ts"], issued) - prev_end))
    out.update(compute_stream=stream, compute_kernels=len(compute),
               max_gap_us=max(gaps, default=0.0), total_gap_us=sum(gaps),
               max_launch_gap_us=max(launch_gaps, default=0.0) if launch_gaps else None,
               total_launch_gap_us=sum(launch_gaps) if launch_gaps else None)
    return out


def profile_gaps(fn, device: torch.device, trace_path: Path | None) -> dict:
    """Profile one call of `fn` (already warm) and return `trace_gaps` of it."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _sync(device)
    with profile(activities=activities) as prof:
        fn()
        _sync(device)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        text = path.read_text()
    if trace_path is not None:
        trace_path.parent.mkdir(parents=True, exist_ok=True)
        trace_path.write_text(text)
    return trace_gaps(json.loads(text))


# ------------------------------------------------------------------------- measurement


def calibrated_spec(base: costmodel.DeviceSpec, comm: EmulatedLinkCommunicator, dtype: torch.dtype,
                    tflops: float) -> costmodel.DeviceSpec:
    """`base` with the GEMM table set to `tflops` for `dtype` and the link to the emulated one."""
    return dataclasses.replace(
        base, name=f"{base.name}-emulated", gemm_tflops={**base.gemm_tflops, costmodel.dtype_name(dtype): tflops},
        link_gbps=comm.link_gbps, link_latency_us=comm.latency_us, comm_overlaps_compute=True)


def shape_tflops(case: Case, c_ms: float, launch_us: float) -> float:
    """TFLOP/s that make the model's gemm_time of the whole GEMM equal the measured C."""
    compute_s = max(c_ms * 1e-3 - launch_us * 1e-6, 1e-9)
    return 2.0 * case.tokens * case.n * case.k / compute_s / 1e12


def chunk_candidates(case: Case, chosen: set[int], quick: bool) -> list[int]:
    if case.op == "all_gather_matmul":  # the ring moves whole shards: pieces = ceil(c / tp)
        extra = [case.tp, 2 * case.tp] if quick else [case.tp, 2 * case.tp, 4 * case.tp]
        chosen = {max(c, case.tp) if c > 1 else 1 for c in chosen}  # 2..tp all run 1 piece/shard
    else:
        extra = [2, 4] if quick else [2, 4, 8]
    return sorted(set(extra) | chosen)


def measure_case(case: Case, comm: EmulatedLinkCommunicator, *, dtype, device, kernel: str,
                 base: costmodel.DeviceSpec, reps: int, warmup: int, quick: bool,
                 trace_dir: Path | None, shared: dict, profile_all: bool = False) -> list[dict]:
    """Rows for one case and GEMM kernel: one per chunk count. The model's choice (every
    row with `profile_all`) is profiled once for its launch gaps."""
    g = torch.Generator(device="cpu").manual_seed(0)
    tp, m, n, k = case.tp, case.tokens, case.n, case.k
    w = (torch.randn(k, n, generator=g) * 0.02).to(device=device, dtype=dtype)
    fused = getattr(overlap, case.op)
    reference = getattr(overlap, case.op + "_reference")
    if case.op == "all_gather_matmul":
        x = torch.randn(m // tp, k, generator=g).to(device=device, dtype=dtype)
        gathered = torch.randn(m, k, generator=g).to(device=device, dtype=dtype)  # C's input too
        transfer = lambda: comm.all_gather(gathered, x).wait()  # noqa: E731
        gemm_in = gathered
    else:
        x = torch.randn(m, k, generator=g).to(device=device, dtype=dtype)
        partial = torch.randn(m, n, generator=g).to(device=device, dtype=dtype)
        y_shard = torch.empty(m // tp, n, device=device, dtype=dtype)
        transfer = lambda: comm.reduce_scatter(y_shard, partial).wait()  # noqa: E731
        gemm_in = x
    y_full = torch.empty(m, n, device=device, dtype=dtype)

    c_ms, _ = time_call(lambda: matmul(gemm_in, w, out=y_full, kernel=kernel), device, reps=reps, warmup=warmup)
    if "M" not in shared:  # M and serial do not depend on the GEMM kernel
        shared["M"] = time_call(transfer, device, reps=reps, warmup=warmup)[0]
        shared["serial"] = time_call(lambda: reference(x, w, group=comm), device, reps=reps, warmup=warmup)[0]
    m_ms, serial_ms = shared["M"], shared["serial"]
    spec = calibrated_spec(base, comm, dtype, shape_tflops(case, c_ms, base.launch_us))
    kw = dict(m=m, n=n, k=k, world_size=tp, dtype=dtype)
    model_choice = costmodel.choose_chunks(case.op, **kw, device=spec)
    default_choice = costmodel.choose_chunks(case.op, **kw, device=costmodel.device_spec_for(device))
    rows = []
    for chunks in chunk_candidates(case, {model_choice, default_choice}, quick):
        call = lambda chunks=chunks: fused(x, w, group=comm, chunks=chunks, kernel=kernel)  # noqa: E731
        t_ms, host_ms = time_call(call, device, reps=reps, warmup=warmup)
        pred = costmodel.predict(case.op, **kw, chunks=chunks, device=spec)
        short = min(c_ms, m_ms)
        row = {
            **dataclasses.asdict(case), "case": case.name, "dtype": costmodel.dtype_name(dtype), "kernel": kernel,
            "chunks": chunks,
            "pieces_per_shard": costmodel.ring_pieces(chunks, tp) if case.op == "all_gather_matmul" and chunks > 1 else None,
            "model_choice": chunks == (max(model_choice, tp) if case.op == "all_gather_matmul" and model_choice > 1 else model_choice),
            "default_choice": default_choice,
            "C_ms": c_ms, "M_ms": m_ms, "M_emulated_ms": comm.transfer_seconds(
                "all_gather" if case.op == "all_gather_matmul" else "reduce_scatter",
                m * (k if case.op == "all_gather_matmul" else n) * dtype.itemsize) * 1e3,
            "serial_ms": serial_ms, "C_plus_M_ms": c_ms + m_ms, "overlapped_ms": t_ms, "host_ms": host_ms,
            "hidden_fraction": (c_ms + m_ms - t_ms) / short if short > 0 else None,
            "speedup_vs_C_plus_M": (c_ms + m_ms) / t_ms if t_ms > 0 else None,
            "gemm_tflops_calibrated": spec.gemm_tflops[costmodel.dtype_name(dtype)],
            "pred_ms": pred.overlapped_s * 1e3, "pred_err": pred.overlapped_s * 1e3 / t_ms - 1 if t_ms > 0 else None,
        }
        if (row["model_choice"] or profile_all) and trace_dir is not None:
            try:
                tag = f"{case.model}-{case.layer.replace('/', '')}-tp{tp}-m{m}-{kernel}-c{chunks}"
                row.update(profile_gaps(call, device, trace_dir / f"{tag}.json"))
            except Exception as e:  # the profiler is a nice-to-have: never lose the timings
                row["gap_error"] = f"{type(e).__name__}: {e}"
        rows.append(row)
    return rows


def add_table_predictions(rows: list[dict], base: costmodel.DeviceSpec, comm, dtype) -> None:
    """pred_table_ms: the prediction with ONE calibrated table per kernel (the best TFLOP/s
    measured over all shapes, as costmodel.calibrate would make), for every row."""
    best: dict[str, float] = {}
    for r in rows:
        if r.get("gemm_tflops_calibrated"):
            best[r["kernel"]] = max(best.get(r["kernel"], 0.0), r["gemm_tflops_calibrated"])
    for r in rows:
        if "overlapped_ms" not in r:
            continue
        spec = calibrated_spec(base, comm, dtype, best[r["kernel"]])
        pred = costmodel.predict(r["op"], m=r["tokens"], n=r["n"], k=r["k"], world_size=r["tp"],
                                 dtype=dtype, chunks=r["chunks"], device=spec)
        r["pred_table_ms"] = pred.overlapped_s * 1e3
        r["pred_table_err"] = r["pred_table_ms"] / r["overlapped_ms"] - 1


# ------------------------------------------------------------------------------ output


def environment(device: torch.device) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    driver = None
    if device.type == "cuda":
        try:
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=10).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            pass
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "driver": driver, "cuda": torch.version.cuda, "torch": torch.__version__, "triton": triton_version,
            "python": platform.python_version(), "host": platform.node()}


def _f(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def markdown(result: dict) -> str:
    env, rows = result["environment"], [r for r in result["rows"] if "overlapped_ms" in r]
    lines = [f"## Overlap on an emulated link ({env['device']})", ""]
    if result["cpu_smoke"]:
        lines += ["**CPU smoke run: tiny shapes, no real transfer time; the numbers are meaningless "
                  "(only the pipeline is exercised).**", ""]
    lines += [f"- {env['date']}; driver {env['driver']}, CUDA {env['cuda']}, torch {env['torch']}, "
              f"triton {env['triton']}",
              f"- link: {result['emulation']['link_gbps']} GB/s bus bandwidth + "
              f"{result['emulation']['latency_us']} us, fill={result['emulation']['fill']}, measured D2D copy "
              f"rate {_f(result['emulation']['copy_gbps'], '.0f')} GB/s",
              f"- {EMULATION_NOTE}",
              f"- hidden = (C + M - T) / min(C, M), goal >= {HIDDEN_GOAL}; err = pred / T - 1, goal "
              f"|err| <= {PRED_TOL} (pred: GEMM table calibrated on this shape; table: one table per kernel)",
              "- launch gap: compute-stream idle time spent waiting for the host to launch (max, us); "
              "host: longest interval between chunk launches (us)", "",
              "### At the cost model's chunk choice", "",
              "| case | op | kernel | chunks | C ms | M ms | serial ms | T ms | hidden | pred ms | err "
              "| table err | launch gap | host |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["model_choice"]:
            lines.append(
                f"| {r['case']} | {r['op']} | {r['kernel']} | {r['chunks']} | {r['C_ms']:.3f} | {r['M_ms']:.3f} | "
                f"{r['serial_ms']:.3f} | {r['overlapped_ms']:.3f} | {_f(r['hidden_fraction'], '.2f')} | "
                f"{r['pred_ms']:.3f} | {_f(r['pred_err'], '+.1%')} | {_f(r.get('pred_table_err'), '+.1%')} | "
                f"{_f(r.get('max_launch_gap_us'), '.1f')} | {_f(r.get('max_host_launch_interval_us'), '.0f')} |")
    lines += ["", "### Every chunk count", "",
              "| case | kernel | chunks | T ms | hidden | pred ms | err |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['kernel']} | {r['chunks']}{' *' if r['model_choice'] else ''} | "
                     f"{r['overlapped_ms']:.3f} | {_f(r['hidden_fraction'], '.2f')} | {r['pred_ms']:.3f} | "
                     f"{_f(r['pred_err'], '+.1%')} |")
    skipped = [r for r in result["rows"] if "overlapped_ms" not in r]
    if skipped:
        lines += ["", "Not measured: " + "; ".join(f"{r['case']} {r['kernel']} ({r['status']})" for r in skipped)]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "overlapped_ms" in r and r["model_choice"]]
    kernels = sorted({r["kernel"] for r in rows}) or ["-"]
    fig, axes = plt.subplots(len(kernels), 1, figsize=(max(6, 1.2 * len(rows) / len(kernels) + 3), 3.5 * len(kernels)),
                             squeeze=False)
    for ax, kernel in zip(axes[:, 0], kernels):
        sel = [r for r in rows if r["kernel"] == kernel]
        xs = range(len(sel))
        for i, (key, label) in enumerate((("C_ms", "C (GEMM)"), ("M_ms", "M (transfer)"),
                                          ("serial_ms", "serial"), ("overlapped_ms", "overlapped"))):
            ax.bar([x + (i - 1.5) * 0.2 for x in xs], [r[key] for r in sel], width=0.2, label=label)
        ax.set_xticks(list(xs), [f"{r['case']}\n{SHORT[r['op']]} c={r['chunks']}" for r in sel],
                      fontsize=6, rotation=30, ha="right")
        ax.set_ylabel("ms (median)")
        ax.set_title(f"kernel={kernel}, emulated {result['emulation']['link_gbps']} GB/s link, "
                     f"{result['environment']['device']}" + (" (CPU smoke: meaningless)" if result["cpu_smoke"] else ""),
                     fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(result: dict, out: Path, *, png: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{STEM}.json").write_text(json.dumps(result, indent=1))
    rows = result["rows"]
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with (out / f"{STEM}.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    (out / f"{STEM}.md").write_text(markdown(result))
    if png:
        plot(result, out / f"{STEM}.png")


# -------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--quick", action="store_true", help="gate/up and down only, fewer reps and chunk counts")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU: tests the plumbing, numbers meaningless")
    p.add_argument("--tp", default="8", help="comma-separated TP degrees (default 8)")
    p.add_argument("--tokens", default="8192", help="comma-separated token counts m (default 8192)")
    p.add_argument("--kernels", default="torch,triton", help="GEMM kernels, in order (default torch,triton)")
    p.add_argument("--link-gbps", type=float, default=370.0)
    p.add_argument("--latency-us", type=float, default=10.0)
    p.add_argument("--fill", choices=("copy", "spin"), default="copy")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--budget-s", type=float, default=100.0, help="start no case after this many seconds")
    args = p.parse_args(argv)
    t0 = time.monotonic()

    if args.cpu_smoke:
        device, dtype = torch.device("cpu"), torch.float32
        cases = make_cases(SMOKE_LAYERS, (4,), (128,))
        reps, warmup = args.reps or 2, 1
        kernels = ["torch"] + (["triton"] if interpreter.is_interpreting() else [])
    else:
        if not torch.cuda.is_available():
            print("overlap_emulated: no CUDA device; use --cpu-smoke to test the plumbing", file=sys.stderr)
            return 2
        device, dtype = torch.device("cuda", torch.cuda.current_device()), torch.bfloat16
        layers = [layer for layer in LAYERS if not args.quick or layer[1] in QUICK_LAYERS]
        cases = make_cases(layers, [int(t) for t in args.tp.split(",")], [int(t) for t in args.tokens.split(",")])
        reps, warmup = args.reps or (5 if args.quick else 15), 3
        kernels = [k for k in args.kernels.split(",") if k]
    comms = {tp: EmulatedLinkCommunicator(world_size=tp, rank=0, link_gbps=args.link_gbps, latency_us=args.latency_us,
                                          device=device, fill=args.fill) for tp in sorted({c.tp for c in cases})}
    first = next(iter(comms.values()))
    base = costmodel.DEVICES["h100-sxm"] if device.type != "cuda" else costmodel.device_spec_for(device)
    result = {"environment": environment(device), "cpu_smoke": args.cpu_smoke, "emulation": first.describe(),
              "base_spec": base.name, "dtype": costmodel.dtype_name(dtype), "reps": reps, "warmup": warmup,
              "goals": {"hidden_fraction": HIDDEN_GOAL, "pred_rel_err": PRED_TOL}, "rows": []}
    print(f"{STEM}: {len(cases)} cases x {kernels} on {result['environment']['device']}; "
          f"copy rate {_f(first.copy_gbps, '.0f')} GB/s", flush=True)
    shared: dict[Case, dict] = {}
    for kernel in kernels:
        for case in cases:
            elapsed = time.monotonic() - t0
            if elapsed > args.budget_s:
                result["rows"].append({**dataclasses.asdict(case), "case": case.name, "kernel": kernel,
                                       "status": f"skipped: budget {args.budget_s:.0f} s spent"})
                continue
            try:
                rows = measure_case(case, comms[case.tp], dtype=dtype, device=device, kernel=kernel, base=base,
                                    reps=reps, warmup=warmup, quick=args.quick or args.cpu_smoke,
                                    trace_dir=args.out / "traces", shared=shared.setdefault(case, {}),
                                    profile_all=args.cpu_smoke)
            except Exception as e:  # one failing case must not lose the others
                result["rows"].append({**dataclasses.asdict(case), "case": case.name, "kernel": kernel,
                                       "status": f"failed: {type(e).__name__}: {e}"})
                print(f"  {case.name} {kernel}: FAILED {e}", flush=True)
                continue
            result["rows"] += rows
            best = next(r for r in rows if r["model_choice"])
            print(f"  {case.name} {case.op} {kernel}: C {best['C_ms']:.3f} M {best['M_ms']:.3f} "
                  f"T {best['overlapped_ms']:.3f} (c={best['chunks']}) hidden {_f(best['hidden_fraction'], '.2f')} "
                  f"pred err {_f(best['pred_err'], '+.1%')} [{time.monotonic() - t0:.0f} s]", flush=True)
            add_table_predictions(result["rows"], base, first, dtype)
            write(result, args.out, png=True)
    add_table_predictions(result["rows"], base, first, dtype)
    result["seconds"] = time.monotonic() - t0
    write(result, args.out, png=True)
    print(f"{STEM}: wrote {args.out}/{STEM}.{{json,csv,md,png}} in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
