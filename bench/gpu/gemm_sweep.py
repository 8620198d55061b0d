"""fusedpar's GEMMs against cuBLAS on a GPU, and the tile sweep behind configs.pick_config.

    python3 bench/gpu/gemm_sweep.py --out DIR [--parts problems,fp8,moe,epilogues,sweep] [--budget-s 300]

problems   the TP-sharded Llama-3 8B/70B projections (column-parallel ones split on N,
           row-parallel ones on K, TP 1/2/8) at M in {16, 128, 2048, 8192}, plus 8192^3, in
           bf16 and fp16: ``matmul(x, w.T)`` (the tile the rules pick) and ``torch.matmul``
           timed side by side, TFLOP/s and the ratio per shape (> 1: fusedpar faster).
fp8        the same problems (M >= 2048) in fp8 against bf16 at the same shapes: fusedpar's bf16
           GEMM, its fp8 GEMM (e4m3, row-wise scales, bf16 out; partial sums promoted to fp32
           per BLOCK_K, and with fast_accum), the fp8 GEMM plus quantizing x (what a layer pays
           per call: its input is quantized each forward), and torch._scaled_mm row-wise (cuBLAS
           fp8) where this torch has it. TFLOP/s and the fp8 / bf16 speed-up per shape.
moe        the grouped expert GEMMs (tokens sorted by expert, one launch) at Mixtral-8x7B and
           Qwen3-30B-A3B TP-8 shapes, 8192 tokens: bf16 and fp8 grouped GEMMs against a loop
           of torch.matmul over the experts (what Hugging Face's eager experts do) and
           torch's grouped_mm where this torch has it.
epilogues  bias+GELU in one kernel vs torch's addmm + gelu; SwiGLU in one kernel vs torch's
           two matmuls, silu and multiply (the unfused sequence a user would write).
sweep      every candidate tile (TMA and pointer kernels) on a representative subset of the
           problems: the data the rules in fusedpar/kernels/configs.py are read from.

Timing: ``triton.testing.do_bench`` (CUDA events, L2 flushed before every call, median),
the two sides of a ratio measured back to back on the same inputs. Random normal inputs
(never zeros: they run faster). Kernels are compiled before timing, in parallel worker
processes that fill Triton's on-disk cache (fusedpar.kernels.compile_report builds the very
launch the library makes, so the timed call finds its binary there).

Writes gemm-<part>.json / .csv per part and gemm-summary.md (medians per dtype) under --out;
every row is written as soon as it is measured.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

from fusedpar.kernels import compile_report, gated_matmul, matmul  # noqa: E402
from fusedpar.kernels.configs import candidate_configs  # noqa: E402
from fusedpar.kernels import plan_gated_matmul, plan_matmul  # noqa: E402
from fusedpar.kernels.quantize import quantize_rowwise  # noqa: E402

# (model, projection, N, K, split): "col" shards N by TP, "row" shards K
LLAMA_PROJECTIONS = [
    ("llama3-8b", "q", 4096, 4096, "col"), ("llama3-8b", "kv", 1024, 4096, "col"),
    ("llama3-8b", "o", 4096, 4096, "row"), ("llama3-8b", "gate_up", 14336, 4096, "col"),
    ("llama3-8b", "down", 4096, 14336, "row"),
    ("llama3-70b", "q", 8192, 8192, "col"), ("llama3-70b", "kv", 1024, 8192, "col"),
    ("llama3-70b", "o", 8192, 8192, "row"), ("llama3-70b", "gate_up", 28672, 8192, "col"),
    ("llama3-70b", "down", 8192, 28672, "row"),
]
MS = (16, 128, 2048, 8192)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def problems() -> list[tuple[str, int, int, int]]:
    rows = []
    for model, proj, n, k, split in LLAMA_PROJECTIONS:
        for tp in (1, 2, 8):
            n_rank, k_rank = (n // tp, k) if split == "col" else (n, k // tp)
            for m in MS:
                rows.append((f"{model}-{proj}-tp{tp}-M{m}", m, n_rank, k_rank))
    rows.append(("square-8192", 8192, 8192, 8192))
    return rows


def sweep_problems() -> list[tuple[str, int, int, int]]:
    """A subset covering the shape classes the rules separate: every M, wide and narrow N,
    short and long K."""
    keep = {"llama3-8b-q-tp1", "llama3-8b-kv-tp8", "llama3-8b-down-tp8", "llama3-70b-gate_up-tp8",
            "llama3-70b-o-tp2", "llama3-8b-gate_up-tp2"}
    return [p for p in problems() if p[0].rsplit("-M", 1)[0] in keep] + [("square-8192", 8192, 8192, 8192)]


def bench_ms(fn) -> float:
    return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))


class Writer:
    """Rows to <out>/gemm-<part>.json and .csv, rewritten after every row."""

    def __init__(self, out: Path, part: str, meta: dict) -> None:
        self.json, self.csv, self.meta, self.rows = out / f"gemm-{part}.json", out / f"gemm-{part}.csv", meta, []

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.json.write_text(json.dumps({"meta": self.meta, "rows": self.rows}, indent=1))
        keys = list(dict.fromkeys(k for r in self.rows for k in r))
        with self.csv.open("w", newline="") as f:
            w = csv.DictWriter(f, keys)
            w.writeheader()
            w.writerows(self.rows)
        print(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)


def precompile(cases: list[compile_report.Case], jobs: int) -> float:
    """Fill Triton's cache with every launch the run will make; returns seconds."""
    t0 = time.perf_counter()
    results = compile_report.run_cases(cases, jobs)
    bad = [r for r in results if not r.ok]
    print(f"precompiled {len(results) - len(bad)}/{len(results)} launches in {time.perf_counter() - t0:.0f} s "
          f"({jobs} processes)", flush=True)
    for r in bad[:10]:
        print(f"  failed: {r.case} {r.error}", flush=True)
    return time.perf_counter() - t0


def make(m: int, n: int, k: int, dtype: torch.dtype, n_weights: int = 1, seed: int = 0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, k, device="cuda", generator=gen, dtype=torch.float32).to(dtype)
    ws = [(torch.randn(n, k, device="cuda", generator=gen) / k**0.5).to(dtype) for _ in range(n_weights)]
    return x, ws


def run_problems(out: Path, meta: dict, deadline: float) -> None:
    w = Writer(out, "problems", meta)
    for dname, dtype in DTYPES.items():
        for name, m, n, k in problems():
            if time.monotonic() > deadline:
                w.add({"name": name, "dtype": dname, "status": "skipped (budget)"})
                continue
            x, (wt,) = make(m, n, k, dtype)
            y = torch.empty(m, n, device="cuda", dtype=dtype)
            plan = plan_matmul(x, wt.T, out=y)
            ours = bench_ms(lambda: matmul(x, wt.T, out=y))
            ref = torch.matmul(x, wt.T)
            err = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
            theirs = bench_ms(lambda: torch.matmul(x, wt.T, out=y))
            flops = 2.0 * m * n * k
            w.add({"name": name, "dtype": dname, "m": m, "n": n, "k": k, "path": plan.path,
                   "config": plan.config.short(), "fusedpar_ms": ours, "torch_ms": theirs,
                   "fusedpar_tflops": flops / ours / 1e9, "torch_tflops": flops / theirs / 1e9,
                   "ratio": theirs / ours, "rel_err_vs_torch": err, "status": "ok"})


def fp8_problems() -> list[tuple[str, int, int, int]]:
    """The problem set at training / prefill M (>= 2048), where fp8's compute rate matters; a
    decode-sized GEMM is bound by reading the weight, and the run's budget is better spent
    on the tile sweep."""
    return [p for p in problems() if p[1] >= 2048]


def _scaled_mm(x_q, w_q, x_s, w_s):
    """torch._scaled_mm with row-wise scales (cuBLAS fp8), or None when this torch lacks it
    or refuses the layout: a private API whose signature moved between torch versions."""
    fn = getattr(torch, "_scaled_mm", None)
    if fn is None:
        return None
    try:
        fn(x_q, w_q.T, scale_a=x_s, scale_b=w_s.T, out_dtype=torch.bfloat16)
    except Exception as e:  # noqa: BLE001
        print(f"  torch._scaled_mm unavailable here: {type(e).__name__}: {str(e)[:100]}", flush=True)
        return None
    return lambda: fn(x_q, w_q.T, scale_a=x_s, scale_b=w_s.T, out_dtype=torch.bfloat16)


def run_fp8(out: Path, meta: dict, deadline: float) -> None:
    w = Writer(out, "fp8", meta)
    scaled_mm_ok = True
    for name, m, n, k in fp8_problems():
        if time.monotonic() > deadline:
            w.add({"name": name, "status": "skipped (budget)"})
            continue
        x, (wt,) = make(m, n, k, torch.bfloat16)
        x_q, x_s = quantize_rowwise(x)
        w_q, w_s = quantize_rowwise(wt)
        y = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        flops = 2.0 * m * n * k
        row = {"name": name, "m": m, "n": n, "k": k, "path": plan_matmul(x_q, w_q.T).path,
               "config": plan_matmul(x_q, w_q.T).config.short()}
        row["bf16_ms"] = bench_ms(lambda: matmul(x, wt.T, out=y))
        row["fp8_ms"] = bench_ms(lambda: matmul(x_q, w_q.T, a_scale=x_s, b_scale=w_s.T, out=y))
        ref = (x_q.float() * x_s) @ (w_q.float() * w_s).T
        row["fp8_rel_err"] = ((y.float() - ref).norm() / ref.norm()).item()
        row["fp8_fast_ms"] = bench_ms(lambda: matmul(x_q, w_q.T, a_scale=x_s, b_scale=w_s.T, out=y, fast_accum=True))
        row["fp8_fast_rel_err"] = ((y.float() - ref).norm() / ref.norm()).item()

        def layer_call():
            q, s = quantize_rowwise(x)
            matmul(q, w_q.T, a_scale=s, b_scale=w_s.T, out=y)
        row["quantize_plus_fp8_ms"] = bench_ms(layer_call)
        scaled = _scaled_mm(x_q, w_q, x_s, w_s) if scaled_mm_ok else None
        scaled_mm_ok = scaled is not None
        row["torch_scaled_mm_ms"] = bench_ms(scaled) if scaled is not None else None
        for key in ("bf16", "fp8", "fp8_fast", "quantize_plus_fp8", "torch_scaled_mm"):
            ms = row[f"{key}_ms"]
            row[f"{key}_tflops"] = flops / ms / 1e9 if ms else None
        row["fp8_speedup"] = row["bf16_ms"] / row["fp8_ms"]
        row["layer_speedup"] = row["bf16_ms"] / row["quantize_plus_fp8_ms"]
        row["status"] = "ok"
        w.add(row)


def run_epilogues(out: Path, meta: dict, deadline: float) -> None:
    w = Writer(out, "epilogues", meta)
    shapes = [p for p in problems() if "-q-" in p[0] or "-gate_up-" in p[0]]
    for dname, dtype in DTYPES.items():
        for name, m, n, k in shapes:
            if time.monotonic() > deadline:
                w.add({"name": name, "dtype": dname, "status": "skipped (budget)"})
                continue
            if "-q-" in name:
                x, (wt,) = make(m, n, k, dtype)
                bias = torch.randn(n, device="cuda", dtype=dtype)
                y = torch.empty(m, n, device="cuda", dtype=dtype)
                plan = plan_matmul(x, wt.T, bias=bias, activation="gelu", out=y)
                ours = bench_ms(lambda: matmul(x, wt.T, bias=bias, activation="gelu", out=y))
                theirs = bench_ms(lambda: F.gelu(torch.addmm(bias, x, wt.T)))
                op, flops = "bias_gelu", 2.0 * m * n * k
            else:  # gate_up: N is the width of gate and of up; SwiGLU over [gate; up]
                n_half = n // 2
                x, (wg, wu) = make(m, n_half, k, dtype, n_weights=2)
                y = torch.empty(m, n_half, device="cuda", dtype=dtype)
                plan = plan_gated_matmul(x, wg.T, wu.T, out=y)
                ours = bench_ms(lambda: gated_matmul(x, wg.T, wu.T, out=y))
                theirs = bench_ms(lambda: F.silu(x @ wg.T) * (x @ wu.T))
                op, flops = "swiglu", 2.0 * 2 * m * n_half * k
            w.add({"name": name, "dtype": dname, "op": op, "m": m, "n": n, "k": k, "path": plan.path,
                   "config": plan.config.short(), "fusedpar_ms": ours, "torch_unfused_ms": theirs,
                   "fusedpar_tflops": flops / ours / 1e9, "ratio": theirs / ours, "status": "ok"})


def run_sweep(out: Path, meta: dict, deadline: float) -> None:
    w = Writer(out, "sweep", meta)
    dtype = torch.bfloat16
    for name, m, n, k in sweep_problems():
        x, (wt,) = make(m, n, k, dtype)
        y = torch.empty(m, n, device="cuda", dtype=dtype)
        torch_ms = bench_ms(lambda: torch.matmul(x, wt.T, out=y))
        rule = plan_matmul(x, wt.T, out=y).config.short()
        for tma in (True, False):
            for cfg in candidate_configs("matmul", dtype, tma):
                if time.monotonic() > deadline:
                    w.add({"name": name, "config": cfg.short(), "status": "skipped (budget)"})
                    continue
                try:
                    ms = bench_ms(lambda: matmul(x, wt.T, out=y, config=cfg))
                    status = "ok"
                except Exception as e:  # noqa: BLE001 - a tile that fails is a row, not the end
                    ms, status = float("nan"), f"error: {type(e).__name__}: {str(e)[:120]}"
                w.add({"name": name, "m": m, "n": n, "k": k, "config": cfg.short(), "is_rule": cfg.short() == rule,
                       "ms": ms, "torch_ms": torch_ms, "ratio": torch_ms / ms, "status": status})


# (model, projection, experts, top-k, N, K) per rank at TP 8: gate_up [2I/8, H], down [H, I/8]
MOE_PROBLEMS = [
    ("mixtral-8x7b", "gate_up", 8, 2, 2 * 14336 // 8, 4096), ("mixtral-8x7b", "down", 8, 2, 4096, 14336 // 8),
    ("qwen3-30b-a3b", "gate_up", 128, 8, 2 * 768 // 8, 2048), ("qwen3-30b-a3b", "down", 128, 8, 2048, 768 // 8),
]
MOE_TOKENS = 8192


def moe_groups(tokens: int, experts: int, top_k: int, device: str, seed: int = 0) -> torch.Tensor:
    """Cumulative group ends of `tokens * top_k` routed rows over `experts`, from random
    routing (uneven groups, as a router makes them)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    ids = torch.rand(tokens, experts, device=device, generator=gen).topk(top_k, -1).indices.reshape(-1)
    return torch.bincount(ids, minlength=experts).cumsum(0)


def run_moe(out: Path, meta: dict, deadline: float, device: str = "cuda") -> None:
    from fusedpar.kernels import grouped_matmul

    w = Writer(out, "moe", meta)
    grouped_mm = getattr(F, "grouped_mm", None)
    for model, proj, experts, top_k, n, k in MOE_PROBLEMS:
        name = f"{model}-{proj}-tp8"
        if time.monotonic() > deadline:
            w.add({"name": name, "status": "skipped (budget)"})
            continue
        ends = moe_groups(MOE_TOKENS, experts, top_k, device)
        rows = int(ends[-1])
        gen = torch.Generator(device=device).manual_seed(1)
        x = torch.randn(rows, k, device=device, generator=gen).to(torch.bfloat16)
        w_nk = (torch.randn(experts, n, k, device=device, generator=gen) / k**0.5).to(torch.bfloat16)
        x_q, x_s = quantize_rowwise(x)
        w_q, w_s = quantize_rowwise(w_nk)
        y = torch.empty(rows, n, device=device, dtype=torch.bfloat16)
        bounds = [0] + ends.tolist()

        def loop():
            for e in range(experts):
                torch.matmul(x[bounds[e]:bounds[e + 1]], w_nk[e].T, out=y[bounds[e]:bounds[e + 1]])

        flops = 2.0 * rows * n * k
        row = {"name": name, "rows": rows, "experts": experts, "n": n, "k": k}
        row["torch_loop_ms"] = bench_ms(loop)
        row["bf16_ms"] = bench_ms(lambda: grouped_matmul(x, w_nk.transpose(1, 2), ends, out=y))
        row["fp8_ms"] = bench_ms(lambda: grouped_matmul(x_q, w_q.transpose(1, 2), ends, x_scale=x_s,
                                                        w_scale=w_s.squeeze(-1), out=y))
        ref = torch.cat([(x_q[a:b].float() * x_s[a:b]) @ (w_q[e].float() * w_s[e]).T
                         for e, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))])
        row["fp8_rel_err"] = ((y.float() - ref).norm() / ref.norm()).item()
        row["torch_grouped_mm_ms"] = None
        if grouped_mm is not None:
            try:
                offs = ends.to(torch.int32)
                grouped_mm(x, w_nk.transpose(1, 2), offs=offs)
                row["torch_grouped_mm_ms"] = bench_ms(lambda: grouped_mm(x, w_nk.transpose(1, 2), offs=offs))
            except Exception as e:  # noqa: BLE001 - a private-ish API whose constraints move
                print(f"  torch grouped_mm unavailable here: {type(e).__name__}: {str(e)[:100]}", flush=True)
        for key in ("torch_loop", "bf16", "fp8", "torch_grouped_mm"):
            ms = row[f"{key}_ms"]
            row[f"{key}_tflops"] = flops / ms / 1e9 if ms else None
        row["bf16_vs_loop"] = row["torch_loop_ms"] / row["bf16_ms"]
        row["fp8_vs_bf16"] = row["bf16_ms"] / row["fp8_ms"]
        row["status"] = "ok"
        w.add(row)


def summary(out: Path, meta: dict) -> str:
    lines = [f"# GEMM vs cuBLAS: {meta['device']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}, driver {meta['driver']}, "
             f"{meta['date']}", "", f"command: `{meta['command']}`", ""]
    p = out / "gemm-problems.json"
    if p.exists():
        rows = [r for r in json.loads(p.read_text())["rows"] if r.get("status") == "ok"]
        lines += ["## matmul(x, w.T) vs torch.matmul (ratio > 1: fusedpar faster)", "",
                  "| dtype | shapes | median ratio | min | max | M=16 | M=128 | M=2048 | M=8192 |", "|---|---|---|---|---|---|---|---|---|"]
        for d in DTYPES:
            rs = [r["ratio"] for r in rows if r["dtype"] == d]
            if not rs:
                continue
            by_m = [statistics.median([r["ratio"] for r in rows if r["dtype"] == d and r["m"] == m] or [float("nan")])
                    for m in MS]
            lines.append(f"| {d} | {len(rs)} | {statistics.median(rs):.3f} | {min(rs):.3f} | {max(rs):.3f} | "
                         + " | ".join(f"{v:.3f}" for v in by_m) + " |")
        sq = [r for r in rows if r["name"] == "square-8192"]
        for r in sq:
            lines.append(f"\n8192^3 {r['dtype']}: fusedpar {r['fusedpar_tflops']:.0f} TFLOP/s, "
                         f"torch {r['torch_tflops']:.0f} TFLOP/s ({r['config']})")
        lines.append("")
    p = out / "gemm-fp8.json"
    if p.exists():
        rows = [r for r in json.loads(p.read_text())["rows"] if r.get("status") == "ok"]
        lines += ["## fp8 vs bf16 at the same shapes (fusedpar kernels; speed-up > 1: fp8 faster)", "",
                  "| shapes | fp8 / bf16 median | min | max | with quantizing x | fast_accum / precise | "
                  "fp8 rel err (precise, fast) |", "|---|---|---|---|---|---|---|"]
        if rows:
            sp = [r["fp8_speedup"] for r in rows]
            lay = [r["layer_speedup"] for r in rows]
            fast = [r["fp8_ms"] / r["fp8_fast_ms"] for r in rows]
            lines.append(f"| {len(rows)} | {statistics.median(sp):.3f} | {min(sp):.3f} | {max(sp):.3f} | "
                         f"{statistics.median(lay):.3f} | {statistics.median(fast):.3f} | "
                         f"{statistics.median(r['fp8_rel_err'] for r in rows):.2e}, "
                         f"{statistics.median(r['fp8_fast_rel_err'] for r in rows):.2e} |")
            for r in rows:
                if r["name"].startswith("square-8192"):
                    cublas = r["torch_scaled_mm_tflops"]
                    lines.append(f"\n8192^3: bf16 {r['bf16_tflops']:.0f}, fp8 {r['fp8_tflops']:.0f} "
                                 f"(fast_accum {r['fp8_fast_tflops']:.0f}), torch._scaled_mm "
                                 f"{'-' if cublas is None else format(cublas, '.0f')} TFLOP/s ({r['config']})")
        lines.append("")
    p = out / "gemm-moe.json"
    if p.exists():
        rows = [r for r in json.loads(p.read_text())["rows"] if r.get("status") == "ok"]
        lines += ["## MoE expert GEMMs: grouped (one launch) vs a loop over experts, bf16 and fp8", "",
                  "| problem | routed rows | loop TFLOP/s | grouped bf16 | grouped fp8 | torch grouped_mm | "
                  "bf16 / loop | fp8 / bf16 |", "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            gm = r["torch_grouped_mm_tflops"]
            lines.append(f"| {r['name']} | {r['rows']} | {r['torch_loop_tflops']:.0f} | {r['bf16_tflops']:.0f} | "
                         f"{r['fp8_tflops']:.0f} | {'-' if gm is None else format(gm, '.0f')} | "
                         f"{r['bf16_vs_loop']:.2f} | {r['fp8_vs_bf16']:.2f} |")
        lines.append("")
    p = out / "gemm-epilogues.json"
    if p.exists():
        rows = [r for r in json.loads(p.read_text())["rows"] if r.get("status") == "ok"]
        lines += ["## Fused epilogues vs the unfused torch sequence", "", "| dtype | op | shapes | median ratio | min | max |",
                  "|---|---|---|---|---|---|"]
        for d in DTYPES:
            for op in ("bias_gelu", "swiglu"):
                rs = [r["ratio"] for r in rows if r["dtype"] == d and r["op"] == op]
                if rs:
                    lines.append(f"| {d} | {op} | {len(rs)} | {statistics.median(rs):.3f} | {min(rs):.3f} | {max(rs):.3f} |")
        lines.append("")
    p = out / "gemm-sweep.json"
    if p.exists():
        rows = [r for r in json.loads(p.read_text())["rows"] if r.get("status") == "ok"]
        lines += ["## Tile sweep (bf16): best tile per shape vs the rules' pick", "",
                  "| shape | best | best ratio | rule's ratio |", "|---|---|---|---|"]
        for name in dict.fromkeys(r["name"] for r in rows):
            rs = [r for r in rows if r["name"] == name and r["ms"] == r["ms"]]
            best = min(rs, key=lambda r: r["ms"])
            rule = [r for r in rs if r["is_rule"]]
            lines.append(f"| {name} | {best['config']} | {best['ratio']:.3f} | "
                         f"{rule[0]['ratio']:.3f} |" if rule else f"| {name} | {best['config']} | {best['ratio']:.3f} | - |")
    text = "\n".join(lines) + "\n"
    (out / "gemm-summary.md").write_text(text)
    return text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--parts", default="problems,fp8,moe,epilogues,sweep")
    ap.add_argument("--budget-s", type=float, default=300.0, help="start no new row after this")
    ap.add_argument("--jobs", type=int, default=min(16, os.cpu_count() or 1))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gemm_sweep: needs a CUDA device", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    parts = args.parts.split(",")
    try:
        import subprocess
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception:  # noqa: BLE001
        driver = "unknown"
    meta = {"device": torch.cuda.get_device_name(), "sms": torch.cuda.get_device_properties(0).multi_processor_count,
            "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda, "driver": driver,
            "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": "python3 " + " ".join(sys.argv), "timing": "triton.testing.do_bench median, warmup 10 ms, rep 40 ms"}

    cases = []
    if "problems" in parts or "sweep" in parts:
        for dname in DTYPES:
            for _, m, n, k in problems():
                cases.append(compile_report.Case("sm_90a", {"bf16": "bfloat16", "fp16": "float16"}[dname],
                                                 "x@w.T", "none", shape=(m, n, k)))
    if "fp8" in parts:
        for _, m, n, k in fp8_problems():
            cases.append(compile_report.Case("sm_90a", "bfloat16", "x@w.T", "none", shape=(m, n, k)))
            for fast in (False, True):
                cases.append(compile_report.Case("sm_90a", "float8_e4m3fn", "x@w.T", "none", shape=(m, n, k),
                                                 fast_accum=fast))
    if "epilogues" in parts:
        for dname in DTYPES:
            for name, m, n, k in problems():
                dt = {"bf16": "bfloat16", "fp16": "float16"}[dname]
                if "-q-" in name:
                    cases.append(compile_report.Case("sm_90a", dt, "x@w.T", "bias_gelu", shape=(m, n, k)))
                elif "-gate_up-" in name:
                    cases.append(compile_report.Case("sm_90a", dt, "x@w.T", "gated_silu", shape=(m, n // 2, k)))
    if "sweep" in parts:
        for tma in (True, False):
            for cfg in candidate_configs("matmul", torch.bfloat16, tma):
                for _, m, n, k in sweep_problems():
                    cases.append(compile_report.Case("sm_90a", "bfloat16", "x@w.T", "none", shape=(m, n, k),
                                                     config=cfg))
    meta["precompile_s"] = precompile(list(dict.fromkeys(cases)), args.jobs)
    deadline = t0 + args.budget_s
    for part in parts:
        {"problems": run_problems, "fp8": run_fp8, "moe": run_moe, "epilogues": run_epilogues,
         "sweep": run_sweep}[part](
            args.out, meta, deadline)
    print(summary(args.out, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
