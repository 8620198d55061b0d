"""ParallelMLP, ParallelAttention and the sequence-parallel norms against single-process modules.

The reference is built from the same full weights in one process; the parallel block gets
this rank's shards through `from_linears` / `from_module`. Forward, input gradient, every
weight gradient (sliced as the block stores it) and the weights after SGD steps.
"""
from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fusedpar.layers import (
    ParallelAttention,
    ParallelMLP,
    ReplicatedColumnLinear,
    SequenceParallelLayerNorm,
    SequenceParallelRMSNorm,
)
from tests.layers.common import DTYPES, check, randn


def _shard_like(param_name: str, module: nn.Module, full: torch.Tensor, world: int, rank: int) -> torch.Tensor:
    """The slice of a full single-process tensor that `module`'s parameter `param_name` holds."""
    layer = module.get_submodule(param_name.rsplit(".", 1)[0]) if "." in param_name else module
    if isinstance(layer, ReplicatedColumnLinear):
        return full
    kind = type(layer).__name__
    if kind == "ColumnParallelLinear":
        return full.chunk(world, 0)[rank]
    if kind == "RowParallelLinear" and param_name.endswith("weight"):
        return full.chunk(world, 1)[rank]
    return full


class RefMLP(nn.Module):
    def __init__(self, h: int, f: int, gated: bool, bias: bool) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(h, f, bias=bias) if gated else None
        self.up_proj, self.down_proj = nn.Linear(h, f, bias=bias), nn.Linear(f, h, bias=bias)

    def forward(self, x):
        h = F.silu(self.gate_proj(x)) * self.up_proj(x) if self.gate_proj is not None else F.silu(self.up_proj(x))
        return self.down_proj(h)


class RefAttention(nn.Module):
    def __init__(self, h: int, heads: int, kv_heads: int, bias: bool) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.hd = heads, kv_heads, h // heads
        self.q_proj = nn.Linear(h, heads * self.hd, bias=bias)
        self.k_proj = nn.Linear(h, kv_heads * self.hd, bias=bias)
        self.v_proj = nn.Linear(h, kv_heads * self.hd, bias=bias)
        self.o_proj = nn.Linear(heads * self.hd, h, bias=bias)

    def forward(self, x):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.heads, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.kv_heads, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.kv_heads, self.hd).transpose(1, 2)
        rep = self.heads // self.kv_heads
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(o.transpose(1, 2).reshape(b, s, -1))


def _compare_block(ref, mine, x, dy, *, sp, dtype, world, rank, case, steps=2, grad_mode=True):
    seq = (lambda t: t.chunk(world, -2)[rank]) if sp else (lambda t: t)
    # SGD, not Adam: the key bias's gradient is zero up to rounding, and Adam's g/sqrt(v) would
    # turn that noise into a full-size step (harmless to outputs, but not comparable).
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    opt = torch.optim.SGD(mine.parameters(), lr=0.1, momentum=0.9)
    ref_params = dict(ref.named_parameters())
    for step in range(steps):
        x_ref = x[step].clone().requires_grad_(True)
        y_ref = ref(x_ref)
        (y_ref * dy[step]).sum().backward()
        x_mine = seq(x[step]).clone().requires_grad_(True)
        y = mine(x_mine)
        c = f"{case} step {step}"
        check("forward", y, seq(y_ref), dtype, c)
        (y * seq(dy[step])).sum().backward()
        check("dx", x_mine.grad, seq(x_ref.grad), dtype, c)
        for name, p in mine.named_parameters():
            check(f"d{name}", p.grad, _shard_like(name, mine, ref_params[name].grad, world, rank), dtype, c)
        opt_ref.step(); opt.step(); opt_ref.zero_grad(); opt.zero_grad()  # noqa: E702
        for name, p in mine.named_parameters():
            check(f"{name} after step", p, _shard_like(name, mine, ref_params[name], world, rank), dtype, c)
    with torch.no_grad():  # inference path (the gated kernel for the MLP without SP)
        check("no-grad forward", mine(seq(x[0])), seq(ref(x[0])), dtype, case)


def _run_block_cases(group, cases):
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    for i, c in enumerate(cases):
        dtype, sp = DTYPES[c["dtype"]], c["sp"]
        torch.manual_seed(7 + i)
        kw = dict(sequence_parallel=sp, chunks=c.get("chunks"), kernel="torch")
        if c["block"] == "mlp":
            ref = RefMLP(c["h"], c["f"], c["gated"], c["bias"]).to(dtype)
            src = copy.deepcopy(ref)
            mine = ParallelMLP.from_linears(gate=src.gate_proj, up=src.up_proj, down=src.down_proj, group=group,
                                            save_gathered_input=c.get("save", True), **kw)
        else:
            ref = RefAttention(c["h"], c["heads"], c["kv"], c["bias"]).to(dtype)
            src = copy.deepcopy(ref)
            mine = ParallelAttention.from_linears(q=src.q_proj, k=src.k_proj, v=src.v_proj, o=src.o_proj,
                                                  num_heads=c["heads"], num_kv_heads=c["kv"], group=group, **kw)
        b, s = c["bs"]
        x = [randn(100 * i + t, b, s, c["h"], dtype=dtype) for t in range(2)]
        dy = [randn(100 * i + t + 50, b, s, c["h"], dtype=dtype) for t in range(2)]
        _compare_block(ref, mine, x, dy, sp=sp, dtype=dtype, world=world, rank=rank,
                       case=f"rank {rank}/{world} case {i} {c}")
    return len(cases)


def _block_cases(world: int) -> list[dict]:
    cases = []
    for dtype, sp in itertools.product(("float64", "float32"), (False, True)):
        s = 4 * world if sp else 7                      # no SP: a sequence length the world does not divide
        cases.append(dict(block="mlp", dtype=dtype, sp=sp, h=16, f=8 * world, gated=True, bias=False, bs=(2, s)))
        cases.append(dict(block="mlp", dtype=dtype, sp=sp, h=16, f=4 * world, gated=False, bias=True, bs=(1, s),
                          save=False, chunks=2))
        # kv heads split (kv = world) and, for world 4, replicated (kv = 2 < world)
        cases.append(dict(block="attn", dtype=dtype, sp=sp, h=32, heads=2 * world, kv=world, bias=True, bs=(2, s)))
        cases.append(dict(block="attn", dtype=dtype, sp=sp, h=32, heads=world * 2, kv=2, bias=False, bs=(1, s),
                          chunks=3))
    return cases


@pytest.mark.parametrize("world", [2, 4])
def test_blocks_match_single_process(world, dist2, dist4):
    pool = dist2 if world == 2 else dist4
    assert pool.run(_run_block_cases, _block_cases(world)) == [len(_block_cases(world))] * world


def _run_norm_cases(group):
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    for i, (dtype_name, kind) in enumerate(itertools.product(("float64", "float32"), ("layer", "rms"))):
        dtype = DTYPES[dtype_name]
        torch.manual_seed(i)
        ref = (nn.LayerNorm(12) if kind == "layer" else nn.RMSNorm(12, eps=1e-6)).to(dtype)
        with torch.no_grad():
            for p in ref.parameters():
                p.add_(torch.randn_like(p))
        cls = SequenceParallelLayerNorm if kind == "layer" else SequenceParallelRMSNorm
        mine = cls.from_module(copy.deepcopy(ref), group=group)
        x = [randn(10 * i + t, 2, 2 * world, 12, dtype=dtype) for t in range(2)]
        dy = [randn(10 * i + t + 5, 2, 2 * world, 12, dtype=dtype) for t in range(2)]
        _compare_block(ref, mine, x, dy, sp=True, dtype=dtype, world=world, rank=rank,
                       case=f"rank {rank}/{world} {kind}norm {dtype_name}")
    return True


def test_sequence_parallel_norms(dist2):
    assert dist2.run(_run_norm_cases) == [True, True]


def _run_knob_cases(group):
    """The keyword arguments a block hands on (LinearKnobs) reach every linear, with the
    linears' own defaults where none is given; row layers keep their own save_gathered_input."""
    from fusedpar.layers import ColumnParallelLinear

    default = ColumnParallelLinear(8, 8, group=group).spec
    knobs = dict(sequence_parallel=True, chunks=3, kernel="torch", save_gathered_input=False, dtype=torch.float64)
    blocks = {
        "mlp": (ParallelMLP(8, 8, group=group), ParallelMLP(8, 8, group=group, sequence_dim=-3, **knobs)),
        "attention": (ParallelAttention(8, 2, group=group), ParallelAttention(8, 2, group=group, **knobs)),
    }
    for name, (plain, knobbed) in blocks.items():
        for (path, lin), (_, lin_k) in zip(plain.named_children(), knobbed.named_children()):
            assert lin.spec == default, f"{name}.{path}: {lin.spec}"
            expect_sd = -3 if name == "mlp" else -2
            got = (lin_k.spec.sequence_parallel, lin_k.spec.sequence_dim, lin_k.spec.chunks, lin_k.spec.kernel,
                   lin_k.spec.save_gathered_input, lin_k.weight.dtype)
            row = path in ("down_proj", "o_proj")
            assert got == (True, expect_sd, 3, "torch", row, torch.float64), f"{name}.{path}: {got}"
    return True


def test_blocks_hand_their_knobs_to_every_linear(dist2):
    assert dist2.run(_run_knob_cases) == [True, True]
