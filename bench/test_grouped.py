"""Benchmarks: mixture-of-experts GEMMs of one rank, grouped vs a Python loop over experts.

    PYTHONPATH=. python bench/test_grouped.py [--rounds 6]     # interleaved table + JSON in bench/results/<device>/
    PYTHONPATH=. python -m pytest bench/test_grouped.py --benchmark-only -q -p no:cacheprovider
    python -m fusedpar bench --suite bench/test_grouped.py

Run as a script, the variants of a shape alternate round by round and each keeps its fastest
forward and backward, so load from other processes on a shared machine hits all of them
alike (pytest-benchmark times one variant after the other).

Each row times forward + backward of the routed experts of one TP rank (weights split on the
intermediate dim, as `moe_tp_experts` leaves them): gate_up, SiLU gate, down, routing-weight
combine. Variants:

    loop          transformers' eager experts: for each expert hit, index its tokens, two
                  F.linear, index_add (what an unconverted Hugging Face model runs)
    grouped       fusedpar: tokens sorted by expert once, one grouped GEMM launch per
                  projection (torch backend on CPU: mm per non-empty group into one output)
    padded_bmm    tokens scattered into [experts, max_tokens, H], one torch.bmm per projection
    hf_grouped_mm transformers' "grouped_mm" experts (torch.nn.functional.grouped_mm)

Shapes: a Mixtral-like layer (8 experts, top-2, few large groups) and a DeepSeek-like one
(64 experts, top-6, many small groups), hidden 512 on CPU (bf16 4096/7168 on a GPU).
Nothing passes or fails on speed; numbers live in bench/results/<device>/.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fusedpar.kernels.grouped import group_ends
from fusedpar.layers import grouped_experts

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
KERNEL = "triton" if ON_GPU else "torch"
TP = 2

# name → (tokens, hidden, intermediate per expert (before TP), experts, top-k)
SHAPES = {
    "mixtral-like": (1024, 512, 1792, 8, 2),
    "deepseek-like": (1024, 512, 512, 64, 6),
}
GPU_SHAPES = {
    "mixtral-8x7b": (8192, 4096, 14336, 8, 2),
    "deepseek-v3": (8192, 7168, 2048, 256, 8),
}
QUICK = {"tiny": (64, 64, 64, 8, 2)}


def _problem(tokens: int, hidden: int, inter: int, experts: int, top_k: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    local = inter // TP
    x = torch.randn(tokens, hidden, generator=g).to(DEVICE, DTYPE)
    logits = torch.randn(tokens, experts, generator=g)
    weights, index = torch.topk(logits.softmax(-1), top_k, dim=-1)
    return dict(
        x=x.requires_grad_(),
        index=index.to(DEVICE),
        weights=weights.to(DEVICE, DTYPE).requires_grad_(),
        gate_up=(torch.randn(experts, 2 * local, hidden, generator=g) / hidden ** 0.5).to(DEVICE, DTYPE)
        .requires_grad_(),
        down=(torch.randn(experts, hidden, local, generator=g) / local ** 0.5).to(DEVICE, DTYPE).requires_grad_(),
    )


def _loop(p: dict) -> torch.Tensor:
    x, index, weights, gate_up, down = p["x"], p["index"], p["weights"], p["gate_up"], p["down"]
    out = torch.zeros_like(x)
    mask = F.one_hot(index, num_classes=gate_up.shape[0]).permute(2, 1, 0)
    for e in torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero():
        e = e[0]
        pos, tok = torch.where(mask[e])
        gate, up = F.linear(x[tok], gate_up[e]).chunk(2, dim=-1)
        h = F.linear(F.silu(gate) * up, down[e]) * weights[tok, pos, None]
        out.index_add_(0, tok, h)
    return out


def _sorted(p: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids, order = torch.sort(p["index"].reshape(-1), stable=True)
    return ids, order, order // p["index"].shape[-1]


def _grouped(p: dict) -> torch.Tensor:
    ids, order, token = _sorted(p)
    ends = group_ends(ids, p["gate_up"].shape[0])
    gate, up = grouped_experts(p["x"][token], p["gate_up"].transpose(1, 2), ends, kernel=KERNEL).chunk(2, dim=-1)
    h = grouped_experts(F.silu(gate) * up, p["down"].transpose(1, 2), ends, kernel=KERNEL)
    h = h * p["weights"].reshape(-1)[order].unsqueeze(-1)
    return torch.zeros_like(p["x"]).index_add(0, token, h)


def _padded_bmm(p: dict) -> torch.Tensor:
    ids, order, token = _sorted(p)
    experts = p["gate_up"].shape[0]
    counts = torch.bincount(ids, minlength=experts)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(ids.numel(), device=ids.device) - starts[ids]
    width = int(counts.max())
    x_pad = p["x"].new_zeros(experts, width, p["x"].shape[-1]).index_put((ids, slot), p["x"][token])
    gate, up = torch.bmm(x_pad, p["gate_up"].transpose(1, 2)).chunk(2, dim=-1)
    h = torch.bmm(F.silu(gate) * up, p["down"].transpose(1, 2))[ids, slot]
    h = h * p["weights"].reshape(-1)[order].unsqueeze(-1)
    return torch.zeros_like(p["x"]).index_add(0, token, h)


def _hf_grouped_mm(p: dict) -> torch.Tensor:
    from transformers.integrations.moe import grouped_mm_experts_forward

    class _Experts:  # the attributes transformers' experts forward reads
        num_experts, has_gate, has_bias, is_transposed = p["gate_up"].shape[0], True, False, False
        has_post_expert_norm, _is_expert_parallel = False, False
        gate_up_proj, down_proj = p["gate_up"], p["down"]

        def _apply_gate(self, h: torch.Tensor) -> torch.Tensor:
            gate, up = h.chunk(2, dim=-1)
            return F.silu(gate) * up

    return grouped_mm_experts_forward(_Experts(), p["x"], p["index"], p["weights"])


VARIANTS = {"loop": _loop, "grouped": _grouped, "padded_bmm": _padded_bmm, "hf_grouped_mm": _hf_grouped_mm}


def _shapes() -> dict:
    return GPU_SHAPES if ON_GPU else SHAPES


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("shape", list(SHAPES) + list(GPU_SHAPES) + list(QUICK))
def test_experts_fwd_bwd(fixed_bench, quick, shape, variant):
    table = QUICK if quick else _shapes()
    if shape not in table:
        pytest.skip(f"{shape} is not in this run's shape set")
    tokens, hidden, inter, experts, top_k = table[shape]
    p = _problem(tokens, hidden, inter, experts, top_k)
    fn = VARIANTS[variant]
    dy = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(1)).to(DEVICE, DTYPE)
    ref = _loop(p).detach()
    got = fn(p).detach()
    err = ((got.double() - ref.double()).norm() / ref.double().norm()).item()
    assert err < (1e-2 if DTYPE == torch.bfloat16 else 1e-5), f"{variant} differs from the loop: {err:.3g}"

    def step() -> None:
        for t in ("x", "weights", "gate_up", "down"):
            p[t].grad = None
        fn(p).backward(dy)

    flops = 3 * 2 * tokens * top_k * hidden * 3 * (inter // TP)  # (fwd + 2 bwd) x 3 GEMM widths
    fixed_bench(step, flops=flops, op=f"moe_experts_{shape}", m=tokens * top_k, n=3 * (inter // TP), k=hidden,
                dtype=str(DTYPE).removeprefix("torch."), variant=variant, baseline=variant == "loop",
                experts=experts, top_k=top_k, tp=TP, device=DEVICE)


def interleaved(shape: str, rounds: int) -> dict[str, dict[str, float]]:
    """`{variant: {"fwd_ms", "bwd_ms", "total_ms"}}`: the fastest of `rounds` alternating rounds."""
    p = _problem(*{**SHAPES, **GPU_SHAPES, **QUICK}[shape])
    dy = torch.randn(p["x"].shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, DTYPE)
    best: dict[str, list[float]] = {v: [float("inf"), float("inf")] for v in VARIANTS}
    for r in range(rounds + 1):  # round 0 warms up
        for name, fn in VARIANTS.items():
            for t in ("x", "weights", "gate_up", "down"):
                p[t].grad = None
            t0 = time.perf_counter()
            y = fn(p)
            if ON_GPU:
                torch.cuda.synchronize()
            t1 = time.perf_counter()
            y.backward(dy)
            if ON_GPU:
                torch.cuda.synchronize()
            t2 = time.perf_counter()
            if r:
                best[name] = [min(best[name][0], t1 - t0), min(best[name][1], t2 - t1)]
    return {v: {"fwd_ms": f * 1e3, "bwd_ms": b * 1e3, "total_ms": (f + b) * 1e3} for v, (f, b) in best.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/<device>/)")
    args = parser.parse_args(argv)
    from fusedpar.cli._common import device_slug, run_metadata, timestamp

    rows = {}
    for shape, dims in _shapes().items():
        rows[shape] = {"dims": dict(zip(("tokens", "hidden", "intermediate", "experts", "top_k"), dims)),
                       "tp": TP, "variants": interleaved(shape, args.rounds)}
        base = rows[shape]["variants"]["loop"]["total_ms"]
        for name, t in rows[shape]["variants"].items():
            print(f"{shape:14s} {name:14s} fwd {t['fwd_ms']:8.1f} ms  bwd {t['bwd_ms']:8.1f} ms  "
                  f"total {t['total_ms']:8.1f} ms  ({base / t['total_ms']:.2f}x the loop)")
    out = args.out or Path(__file__).parent / "results" / device_slug() / f"grouped-{timestamp()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": run_metadata(), "dtype": str(DTYPE), "kernel": KERNEL, "rounds": args.rounds,
                               "statistic": "fastest round, variants alternating", "shapes": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
