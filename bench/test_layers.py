"""A Llama-style block (attention + gated MLP), TP=2 on gloo: fusedpar vs DTensor vs unchunked.

    fusedpar        parallelize(block, PLAN), chunks chosen by the cost model
    fusedpar_c1     the same with chunks=1 (one collective per op: no pipelining)
    dtensor         torch.distributed.tensor.parallel.parallelize_module with the same plan
                    (ColwiseParallel / RowwiseParallel)

Each variant is one pytest-benchmark test. Its timed function dispatches one fixed loop of
ITERS forward+backward steps to the 2-rank pool (identical iteration counts on every rank,
after a barrier) and returns; the ranks time the loop themselves, and the slower rank's
per-step time goes into `extra_info` (medians over the rounds, and ratios to the variants
run before it). Run:

    TRITON_INTERPRET=1 PYTHONPATH=. python -m pytest bench/test_layers.py --benchmark-only -q -p no:cacheprovider

On the 2-core CPU box, overlap cannot gain wall-clock time (FACTS.md): these numbers show the
overhead of chunking and of the layers on CPU; the speed-up is measured on a GPU.
"""
from __future__ import annotations

import os
import statistics
import time

if os.environ.get("FUSEDPAR_COMPILED_TRITON", "") in ("", "0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from tests.dist import DistPool  # noqa: E402

HIDDEN, HEADS, KV_HEADS, FFN = 256, 8, 4, 768
BATCH, SEQ = 2, 256
ITERS, ROUNDS = 4, 7
PLAN = {
    "attn.q_proj": "colwise", "attn.k_proj": "colwise", "attn.v_proj": "colwise", "attn.o_proj": "rowwise",
    "mlp.gate_proj": "colwise", "mlp.up_proj": "colwise", "mlp.down_proj": "rowwise",
}
VARIANTS = ("dtensor", "fusedpar", "fusedpar_c1")  # the peer first: it is the baseline
# CPU: torch GEMMs, like DTensor (the interpreted Triton kernel is a correctness tool, not a
# speed one); GPU: the Triton kernel.
KERNEL = "auto" if torch.cuda.is_available() else "torch"


class Attention(nn.Module):
    """Shapes come from the projections (`view(b, s, -1, head_dim)`), as in Hugging Face models."""

    def __init__(self) -> None:
        super().__init__()
        self.head_dim = HIDDEN // HEADS
        self.q_proj = nn.Linear(HIDDEN, HEADS * self.head_dim, bias=False)
        self.k_proj = nn.Linear(HIDDEN, KV_HEADS * self.head_dim, bias=False)
        self.v_proj = nn.Linear(HIDDEN, KV_HEADS * self.head_dim, bias=False)
        self.o_proj = nn.Linear(HEADS * self.head_dim, HIDDEN, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(o.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(HIDDEN, FFN, bias=False)
        self.up_proj = nn.Linear(HIDDEN, FFN, bias=False)
        self.down_proj = nn.Linear(FFN, HIDDEN, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.attn = nn.RMSNorm(HIDDEN), Attention()
        self.norm2, self.mlp = nn.RMSNorm(HIDDEN), MLP()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


_BUILT: dict[str, tuple[nn.Module, torch.Tensor, torch.Tensor]] = {}  # per rank process, per variant


def _build(group, variant: str):
    if variant in _BUILT:
        return _BUILT[variant]
    torch.manual_seed(0)
    block = Block()
    if variant == "dtensor":
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        mesh = DeviceMesh.from_group(group, "cpu")
        styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
        parallelize_module(block, mesh, {k: styles[v]() for k, v in PLAN.items()})
    else:
        from fusedpar.plan import parallelize

        parallelize(block, PLAN, group=group, chunks=1 if variant == "fusedpar_c1" else None, kernel=KERNEL)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, SEQ, HIDDEN, generator=g).requires_grad_(True)
    dy = torch.randn(BATCH, SEQ, HIDDEN, generator=g)
    _BUILT[variant] = (block, x, dy)
    return _BUILT[variant]


def _timed_loop(group, variant: str, iters: int) -> float:
    """Seconds per forward+backward step on this rank, over `iters` steps after a barrier."""
    block, x, dy = _build(group, variant)
    dist.barrier(group=group)
    t0 = time.perf_counter()
    for _ in range(iters):
        block(x).backward(dy)
    elapsed = time.perf_counter() - t0
    block.zero_grad(set_to_none=True)
    x.grad = None
    return elapsed / iters


@pytest.fixture(scope="module")
def pool():
    p = DistPool(2)
    p.run(_timed_loop, "fusedpar_c1", 1)  # start the ranks outside the timed rounds
    yield p
    p.close()


_MEDIANS: dict[str, float] = {}


def _kernel_name() -> str:
    from fusedpar.kernels import resolve_kernel

    return resolve_kernel(KERNEL, torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("variant", VARIANTS)
def test_block_fwd_bwd(benchmark, pool, variant):
    pool.run(_timed_loop, variant, 1)  # build + warm up this variant on every rank
    per_step: list[float] = []

    def one_round() -> None:
        per_step.append(max(pool.run(_timed_loop, variant, ITERS)))  # the slower rank

    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    med = statistics.median(per_step)
    _MEDIANS[variant] = med
    benchmark.extra_info.update({
        "variant": variant, "op": "llama_block_fwd_bwd", "baseline": variant == "dtensor", "m": BATCH * SEQ,
        "world": 2, "backend": "gloo", "device": "cpu",
        "shape": f"batch={BATCH} seq={SEQ} hidden={HIDDEN} heads={HEADS} kv_heads={KV_HEADS} ffn={FFN} fp32",
        "kernel": "n/a (DTensor: torch)" if variant == "dtensor" else _kernel_name(),
        "iters_per_round": ITERS, "rounds": ROUNDS,
        "median_step_ms_in_rank": round(med * 1e3, 3),
        "step_ms_in_rank": [round(t * 1e3, 3) for t in per_step],
    })
    for other in VARIANTS:
        if other != variant and other in _MEDIANS:
            benchmark.extra_info[f"ratio_vs_{other}"] = round(med / _MEDIANS[other], 3)
