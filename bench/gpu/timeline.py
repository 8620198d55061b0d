"""A timeline picture of one overlapped sequence-parallel MLP block, forward + backward, on
one GPU over the emulated link: one row per CUDA stream, drawn from a torch.profiler trace,
so a reader sees the comm stream's transfers under the compute stream's GEMMs.

    python3 bench/gpu/timeline.py --out DIR [--tokens 8192 --hidden 4096 --ffn 14336 --tp 8]
    python3 bench/gpu/timeline.py --out DIR --cpu-smoke        # the plumbing, on CPU

The block is the sequence of calls the layers make (fusedpar/layers/linear_autograd.py), with the
collectives on `EmulatedLinkCommunicator` (emulated_link.py; its limits apply):

    forward   h = gelu(all_gather_matmul(x_shard, w_up))            ring all-gather ‖ GEMMs
              y_shard = matmul_reduce_scatter(h, w_down)             GEMMs ‖ chunked reduce-scatter
    backward  dh, dw_down = all_gather_matmul_with_wgrad(dy, w_down, h)     all-gather(dy) ‖ dgrad, wgrad
              dx, dw_up = matmul_reduce_scatter_with_wgrad(dh', w_up, x)    reduce-scatter(dx) ‖ wgrad

Writes timeline.png, timeline.json (per stream: busy time, events) and trace.json. On CPU
(`--cpu-smoke`) there are no streams: the rows are the profiler's threads and the shapes
tiny; it checks that the picture is drawn, not what it shows.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from emulated_link import EMULATION_NOTE, EmulatedLinkCommunicator  # noqa: E402
from fusedpar import overlap  # noqa: E402


def block_step(comm, x_shard, w_up, w_down, *, chunks: int, kernel: str) -> None:
    """Forward and backward of the SP MLP block as the layers' autograd Functions run it."""
    knobs = dict(group=comm, chunks=chunks, kernel=kernel)
    y_up, x_full = overlap.all_gather_matmul(x_shard, w_up, return_gathered=True, **knobs)
    h = F.gelu(y_up)
    y = overlap.matmul_reduce_scatter(h, w_down, **knobs)
    dy = torch.ones_like(y)
    dh, _ = overlap.all_gather_matmul_with_wgrad(dy, w_down, h, **knobs)
    dy_up = dh * 0.5  # stands in for gelu's backward: an elementwise kernel of the same size
    overlap.matmul_reduce_scatter_with_wgrad(dy_up, w_up, x_full, x_is_gathered=True, **knobs)


def rows_from_trace(trace: dict) -> dict[str, list[tuple[float, float, str]]]:
    """{row: [(start us, duration us, name)]}: one row per CUDA stream (kernels and memcpys),
    or, in a trace without GPU events, per host thread (CPU ops)."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    gpu = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    rows: dict[str, list[tuple[float, float, str]]] = {}
    if gpu:
        for e in gpu:
            rows.setdefault(f"stream {e.get('args', {}).get('stream', '?')}", []).append(
                (float(e["ts"]), float(e["dur"]), str(e.get("name", ""))))
    else:
        for e in events:
            if e.get("cat") == "cpu_op":
                rows.setdefault(f"thread {e.get('tid', '?')}", []).append(
                    (float(e["ts"]), float(e["dur"]), str(e.get("name", ""))))
    t0 = min((s for evs in rows.values() for s, _, _ in evs), default=0.0)
    return {k: sorted((s - t0, d, n) for s, d, n in v) for k, v in rows.items()}


def kind(name: str) -> str:
    low = name.lower()
    if "matmul" in low or "gemm" in low or "sm90" in low or "cutlass" in low or low.startswith("aten::mm"):
        return "GEMM"
    if "memcpy" in low or "copy" in low or "spin" in low:
        return "transfer"
    return "other"


def label_rows(rows: dict[str, list]) -> dict[str, str]:
    """Name each row by role: the stream with the most GEMM time computes; the one with the
    most transfer time is the comm stream."""
    def busy(evs, k):
        return sum(d for _, d, n in evs if kind(n) == k)
    names = {r: r for r in rows}
    if rows:
        compute = max(rows, key=lambda r: busy(rows[r], "GEMM"))
        names[compute] = f"{compute} (compute)"
        others = [r for r in rows if r != compute]
        if others:
            comm = max(others, key=lambda r: busy(rows[r], "transfer"))
            names[comm] = f"{comm} (comm)"
    return names


def draw(rows: dict[str, list], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"GEMM": "#1f77b4", "transfer": "#ff7f0e", "other": "#9a9a9a"}
    names = label_rows(rows)
    order = sorted(rows, key=lambda r: ("compute" not in names[r], "comm" not in names[r], r))
    fig, ax = plt.subplots(figsize=(14, 1.2 + 0.7 * len(order)))
    for i, r in enumerate(order):
        for k in colors:
            bars = [(s / 1e3, max(d / 1e3, 1e-4)) for s, d, n in rows[r] if kind(n) == k]
            if bars:
                ax.broken_barh(bars, (i - 0.35, 0.7), facecolors=colors[k], label=k if i == 0 or k != "GEMM" else None)
    ax.set_yticks(range(len(order)), [names[r] for r in order])
    ax.set_xlabel("ms")
    ax.set_title(title, fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    ax.legend(handles, list(colors), loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--ffn", type=int, default=14336)
    ap.add_argument("--tp", type=int, default=8)
    ap.add_argument("--chunks", type=int, default=None, help="default: the cost model's choice")
    ap.add_argument("--link-gbps", type=float, default=370.0)
    ap.add_argument("--kernel", default="auto")
    ap.add_argument("--cpu-smoke", action="store_true")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.cpu_smoke
    if not cuda and not args.cpu_smoke:
        print("timeline: needs a CUDA device (or --cpu-smoke)", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    if args.cpu_smoke:
        args.tokens, args.hidden, args.ffn, args.tp = 64, 32, 64, 4
    comm = EmulatedLinkCommunicator(world_size=args.tp, rank=0, link_gbps=args.link_gbps)
    gen = torch.Generator(device=device).manual_seed(0)
    x_shard = torch.randn(args.tokens // args.tp, args.hidden, device=device, generator=gen).to(dtype)
    w_up = (torch.randn(args.hidden, args.ffn // args.tp, device=device, generator=gen) / args.hidden**0.5).to(dtype)
    w_down = (torch.randn(args.ffn // args.tp, args.hidden, device=device, generator=gen) / args.ffn**0.5).to(dtype)
    step = lambda: block_step(comm, x_shard, w_up, w_down, chunks=args.chunks, kernel=args.kernel)  # noqa: E731
    for _ in range(3):  # warm: compiles, allocator, the cost model's chunk choice
        step()
    if cuda:
        torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(p))
        trace = json.loads(p.read_text())
    (args.out / "trace.json").write_text(json.dumps(trace))
    rows = rows_from_trace(trace)
    names = label_rows(rows)
    shape = (f"SP MLP block fwd+bwd, tokens {args.tokens}, hidden {args.hidden}, ffn {args.ffn}/{args.tp}, "
             f"{str(dtype).replace('torch.', '')}, emulated TP={args.tp} link {args.link_gbps:.0f} GB/s")
    title = shape + (f" - {torch.cuda.get_device_name()}" if cuda else " - CPU smoke run (no streams)")
    draw(rows, args.out / "timeline.png", title)
    summary = {"title": title, "emulation": EMULATION_NOTE,
               "rows": {names[r]: {"events": len(v), "busy_ms": sum(d for _, d, _ in v) / 1e3,
                                   "span_ms": (max(s + d for s, d, _ in v) - min(s for s, _, _ in v)) / 1e3}
                        for r, v in rows.items()}}
    (args.out / "timeline.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary["rows"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
