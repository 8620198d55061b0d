"""fp8 against bf16 for the sequence-parallel all-gather + GEMM, on one GPU over an emulated link.

    python3 bench/gpu/fp8_overlap.py --out DIR [--tp 8] [--tokens 8192] [--budget-s 60]
    python3 bench/gpu/fp8_overlap.py --out DIR --cpu-smoke      # plumbing only, on CPU

For the column-parallel projections of Llama-3 8B and 70B (q, k/v, gate/up) at TP ``--tp``
and ``--tokens`` tokens, the same shape in bf16 and in fp8 (x e4m3 with one scale per row,
w e4m3 per output channel, bf16 out), every collective on `EmulatedLinkCommunicator`
(emulated_link.py: the comm stream spends the time a ring collective over a
``--link-gbps`` link would, in copies that contend with the GEMM for the GPU):

    C    the GEMM alone on the gathered input
    M    the emulated all-gather alone: bf16 rows move 2K bytes, fp8 rows K + 16 (the row's
         fp32 scale and 16-byte alignment travel with it)
    Q    fp8 only: quantizing this rank's shard, which the layer does every forward
    T    all_gather_matmul at chunk counts 1, tp and 2 tp (fp8: T + Q is what a layer pays)

and per shape fp8's speed-up over bf16, T_bf16 / (T_fp8 + Q), at each one's best chunk
count. Writes fp8-overlap.json / .md under --out after every case; cases that would start
after --budget-s are recorded as skipped. The emulation's limits (emulated_link.py) hold: NCCL's
own SM use is not modelled.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from emulated_link import EMULATION_NOTE, EmulatedLinkCommunicator  # noqa: E402
from overlap_emulated import environment, time_call  # noqa: E402
from fusedpar import overlap  # noqa: E402
from fusedpar.kernels import matmul  # noqa: E402
from fusedpar.kernels.quantize import quantize_rowwise  # noqa: E402

STEM = "fp8-overlap"
# (model, layer, in_features, out_features): the column-parallel (all-gathered) projections
LAYERS = [("llama-8b", "q", 4096, 4096), ("llama-8b", "k/v", 4096, 1024), ("llama-8b", "gate/up", 4096, 14336),
          ("llama-70b", "q", 8192, 8192), ("llama-70b", "k/v", 8192, 1024), ("llama-70b", "gate/up", 8192, 28672)]
SMOKE = [("tiny", "up", 64, 96)]


def measure(model: str, layer: str, k: int, n_full: int, tp: int, tokens: int, comm, device, reps: int,
            warmup: int, kernel: str) -> dict:
    n = n_full // tp
    m = tokens // tp
    g = torch.Generator(device="cpu").manual_seed(0)
    x_shard = torch.randn(m, k, generator=g).to(device)
    w = (torch.randn(n, k, generator=g) * 0.02).to(device)
    x16, w16 = x_shard.bfloat16(), w.bfloat16()
    x_q, x_s = quantize_rowwise(x_shard, kernel=kernel)
    w_q, w_s = quantize_rowwise(w, kernel=kernel)
    gathered16 = torch.randn(tokens, k, generator=g).to(device=device, dtype=torch.bfloat16)
    gathered_q, gathered_s = quantize_rowwise(gathered16, kernel=kernel)
    packed = torch.empty(tokens, overlap._fp8_row_layout(k)[1], dtype=torch.uint8, device=device)
    y = torch.empty(tokens, n, device=device, dtype=torch.bfloat16)
    t = lambda fn: time_call(fn, device, reps=reps, warmup=warmup)[0]  # noqa: E731
    row = {"case": f"{model} {layer} tp{tp} m{tokens}", "model": model, "layer": layer, "tp": tp, "tokens": tokens,
           "n": n, "k": k, "kernel": kernel}
    row["C_bf16_ms"] = t(lambda: matmul(gathered16, w16.T, out=y, kernel=kernel))
    row["C_fp8_ms"] = t(lambda: matmul(gathered_q, w_q.T, a_scale=gathered_s, b_scale=w_s.T, out=y, kernel=kernel))
    row["M_bf16_ms"] = t(lambda: comm.all_gather(gathered16, x16).wait())
    row["M_fp8_ms"] = t(lambda: comm.all_gather(packed, packed[:m].contiguous()).wait())
    row["wire_bytes_ratio"] = packed.shape[1] / (2 * k)
    row["Q_ms"] = t(lambda: quantize_rowwise(x_shard.bfloat16(), kernel=kernel))
    for chunks in sorted({1, tp, 2 * tp}):
        row[f"T_bf16_c{chunks}_ms"] = t(lambda: overlap.all_gather_matmul(x16, w16.T, group=comm, chunks=chunks,
                                                                          kernel=kernel))
        row[f"T_fp8_c{chunks}_ms"] = t(lambda: overlap.all_gather_matmul(
            x_q, w_q.T, x_scale=x_s, w_scale=w_s.T, group=comm, chunks=chunks, kernel=kernel))
    best16 = min(v for key, v in row.items() if key.startswith("T_bf16_c"))
    best8 = min(v for key, v in row.items() if key.startswith("T_fp8_c"))
    row.update(T_bf16_best_ms=best16, T_fp8_best_ms=best8, fp8_speedup=best16 / (best8 + row["Q_ms"]),
               fp8_speedup_gemm=row["C_bf16_ms"] / row["C_fp8_ms"], status="ok")
    return row


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"## fp8 vs bf16 all-gather + GEMM on an emulated link ({env['device']})", ""]
    if result["cpu_smoke"]:
        lines += ["**CPU smoke run: tiny shapes, no transfer time; the numbers are meaningless.**", ""]
    lines += [f"- {env['date']}; torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, "
              f"driver {env['driver']}",
              f"- link {result['link_gbps']} GB/s + {result['latency_us']} us; {EMULATION_NOTE}",
              "- speed-up = T bf16 / (T fp8 + Q), each at its best chunk count; wire = fp8 bytes / bf16 bytes", "",
              "| case | C bf16 | C fp8 | M bf16 | M fp8 | wire | Q | T bf16 | T fp8 | speed-up | GEMM speed-up |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        if r.get("status") != "ok":
            lines.append(f"| {r['case']} | {r['status']} |||||||||")
            continue
        lines.append(f"| {r['case']} | {r['C_bf16_ms']:.3f} | {r['C_fp8_ms']:.3f} | {r['M_bf16_ms']:.3f} | "
                     f"{r['M_fp8_ms']:.3f} | {r['wire_bytes_ratio']:.3f} | {r['Q_ms']:.3f} | "
                     f"{r['T_bf16_best_ms']:.3f} | {r['T_fp8_best_ms']:.3f} | {r['fp8_speedup']:.2f} | "
                     f"{r['fp8_speedup_gemm']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU: the plumbing, numbers meaningless")
    p.add_argument("--tp", type=int, default=8)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--link-gbps", type=float, default=370.0)
    p.add_argument("--latency-us", type=float, default=10.0)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--budget-s", type=float, default=60.0, help="start no case after this many seconds")
    args = p.parse_args(argv)
    t0 = time.monotonic()
    if args.cpu_smoke:
        device, layers, tp, tokens, reps, kernel = torch.device("cpu"), SMOKE, 2, 32, 2, "torch"
    else:
        if not torch.cuda.is_available():
            print("fp8_overlap: no CUDA device; use --cpu-smoke to test the plumbing", file=sys.stderr)
            return 2
        device, layers, tp, tokens, reps, kernel = torch.device("cuda"), LAYERS, args.tp, args.tokens, args.reps, "triton"
    comm = EmulatedLinkCommunicator(world_size=tp, rank=0, link_gbps=args.link_gbps, latency_us=args.latency_us,
                                    device=device)
    result = {"environment": environment(device), "cpu_smoke": args.cpu_smoke, "link_gbps": args.link_gbps,
              "latency_us": args.latency_us, "emulation": comm.describe(), "reps": reps, "rows": []}
    args.out.mkdir(parents=True, exist_ok=True)
    for model, layer, k, n_full in layers:
        if time.monotonic() - t0 > args.budget_s:
            result["rows"].append({"case": f"{model} {layer}", "status": f"skipped: budget {args.budget_s:.0f} s"})
            continue
        try:
            row = measure(model, layer, k, n_full, tp, tokens, comm, device, reps, 2, kernel)
        except Exception as e:  # noqa: BLE001 - one failing case must not lose the others
            row = {"case": f"{model} {layer}", "status": f"failed: {type(e).__name__}: {e}"}
        result["rows"].append(row)
        print(" ".join(f"{key}={v:.3g}" if isinstance(v, float) else f"{key}={v}" for key, v in row.items()),
              flush=True)
        (args.out / f"{STEM}.json").write_text(json.dumps(result, indent=1))
        (args.out / f"{STEM}.md").write_text(markdown(result))
    result["seconds"] = time.monotonic() - t0
    (args.out / f"{STEM}.json").write_text(json.dumps(result, indent=1))
    (args.out / f"{STEM}.md").write_text(markdown(result))
    print(f"{STEM}: wrote {args.out}/{STEM}.{{json,md}} in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
