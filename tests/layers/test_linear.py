"""ColumnParallelLinear / RowParallelLinear against one nn.Linear built from the same weights.

Each case runs forward, backward (input, weight and bias gradients, sliced to this rank's
shard) and one AdamW step on both, then compares the stepped weights and a second forward,
and gathers the full weights back with `full_state_dict`. Both sequence-parallel settings,
token counts not divisible by the world size where the layer allows it (no SP), world 2 and 4.
"""
from __future__ import annotations

import copy
import importlib
import itertools

import pytest
import torch
import torch.distributed as dist
from torch import nn

from fusedpar.layers import ColumnParallelLinear, RowParallelLinear
from tests.layers.common import DTYPES, check, randn


def _slices(kind: str, sp: bool, world: int, rank: int, *, gather_output: bool, input_is_parallel: bool):
    """How the single-process tensors map onto this rank's: (x, y, dx, weight, bias) slicers."""
    own = lambda dim: (lambda t: t.chunk(world, dim)[rank])  # noqa: E731
    ident = lambda t: t  # noqa: E731
    seq = own(-2) if sp else ident
    if kind == "col":
        y = ident if gather_output else own(-1)
        return dict(x=seq, y=y, dx=seq, w=own(0), b=own(0))
    x = own(-1) if input_is_parallel else ident
    return dict(x=x, y=seq, dx=x, w=own(1), b=ident)


def _run_linear_cases(group, cases):
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    for i, c in enumerate(cases):
        dtype = DTYPES[c["dtype"]]
        kind, sp, shape = c["kind"], c["sp"], c["shape"]
        k, n = c["k"], c["n"]
        case = f"rank {rank}/{world} case {i} {c}"
        torch.manual_seed(100 + i)
        ref = nn.Linear(k, n, bias=c["bias"]).to(dtype)
        layer_src = copy.deepcopy(ref)
        gather_output = c.get("gather_output", False)
        input_is_parallel = c.get("input_is_parallel", True)
        kw = dict(sequence_parallel=sp, chunks=c["chunks"], kernel=c.get("kernel", "torch"))
        if kind == "col":
            layer = ColumnParallelLinear.from_linear(layer_src, group=group, gather_output=gather_output,
                                                     save_gathered_input=c.get("save", True), **kw)
        else:
            layer = RowParallelLinear.from_linear(layer_src, group=group, input_is_parallel=input_is_parallel, **kw)
        sl = _slices(kind, sp, world, rank, gather_output=gather_output, input_is_parallel=input_is_parallel)
        opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
        opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
        for step in range(2):
            x = randn(1000 * i + step, *shape, k, dtype=dtype)
            dy = randn(1000 * i + step + 500, *shape, n, dtype=dtype)
            x_ref = x.clone().requires_grad_(True)
            y_ref = ref(x_ref)
            if c.get("inplace"):  # models modify the output in place (Llama 4: `out.add_(...)`)
                y_ref.mul_(1.5)
            (y_ref * dy).sum().backward()
            x_mine = sl["x"](x).clone().requires_grad_(True)
            y = layer(x_mine)
            if c.get("inplace"):
                y.mul_(1.5)  # raises if the output is a view made inside the layer's autograd Function
            check("forward", y, sl["y"](y_ref), dtype, f"{case} step {step}")
            (y * sl["y"](dy)).sum().backward()
            check("dx", x_mine.grad, sl["dx"](x_ref.grad), dtype, f"{case} step {step}")
            check("dweight", layer.weight.grad, sl["w"](ref.weight.grad), dtype, f"{case} step {step}")
            if c["bias"]:
                check("dbias", layer.bias.grad, sl["b"](ref.bias.grad), dtype, f"{case} step {step}")
            opt_ref.step(); opt.step(); opt_ref.zero_grad(); opt.zero_grad()  # noqa: E702
            check("weight after step", layer.weight, sl["w"](ref.weight), dtype, f"{case} step {step}")
        full = layer.full_state_dict()
        check("full_state_dict weight", full["weight"], ref.weight, dtype, case)
        if c["bias"]:
            check("full_state_dict bias", full["bias"], ref.bias, dtype, case)
    return len(cases)


def _cases(world: int) -> list[dict]:
    cases = []
    for dtype, kind, sp, bias in itertools.product(("float64", "float32"), ("col", "row"), (False, True), (True, False)):
        shape = (2, 4 * world) if sp else (7,)         # SP: the sequence dim divides; else any token count
        cases.append(dict(dtype=dtype, kind=kind, sp=sp, bias=bias, shape=shape, k=24, n=8 * world, chunks=None))
    for sp in (False, True):
        shape = (3, 2 * world) if sp else (3, 5)
        cases.append(dict(dtype="float32", kind="col", sp=sp, bias=True, shape=shape, k=16, n=4 * world, chunks=3,
                          save=False, gather_output=True))
        cases.append(dict(dtype="float32", kind="row", sp=sp, bias=True, shape=shape, k=8 * world, n=12, chunks=2,
                          input_is_parallel=False))
        cases.append(dict(dtype="float64", kind="col", sp=sp, bias=True, shape=(2 * world * 3,), k=16, n=2 * world,
                          chunks=1))
    for kind, chunks, bias in itertools.product(("col", "row"), (None, 1, 2), (True, False)):
        # [batch, seq, features] outputs modified in place before backward
        cases.append(dict(dtype="float64", kind=kind, sp=False, bias=bias, shape=(2, 3), k=8 * world, n=4 * world,
                          chunks=chunks, inplace=True))
    return cases


@pytest.mark.parametrize("world", [2, 4])
def test_linear_matches_nn_linear(world, dist2, dist4):
    pool = dist2 if world == 2 else dist4
    assert pool.run(_run_linear_cases, _cases(world)) == [len(_cases(world))] * world


def _run_triton_case(group):
    kernels = importlib.import_module("fusedpar.kernels.common")  # where the backend choice is logged

    kernels._logged_backends.discard(("cpu", "triton"))
    n = _run_linear_cases(group, [
        dict(dtype="float32", kind="col", sp=True, bias=True, shape=(1, 32), k=32, n=32, chunks=2, kernel="triton"),
        dict(dtype="float32", kind="row", sp=True, bias=True, shape=(1, 32), k=32, n=32, chunks=2, kernel="triton"),
    ])
    assert ("cpu", "triton") in kernels._logged_backends, "kernel='triton' did not launch the Triton kernel"
    return n


def test_linear_triton_kernel(dist2):
    assert dist2.run(_run_triton_case) == [2, 2]
