"""The overlap schedules against float64 truth and their unfused references, on real gloo ranks.

Every rank builds the same full inputs from one seed, takes its shard with
`.chunk(world, dim)[rank]`, and checks the schedule's output against a float64 result
computed locally from the full (dtype-rounded) inputs. Outputs are poisoned with NaN first.
"""
from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from fusedpar import overlap
from fusedpar.overlap import split_rows

# Relative error ||y - ref|| / ||ref|| against float64 computed from the same dtype-rounded
# inputs, so only output rounding and accumulation order count: fp64 is exact up to
# summation order; fp32 accumulates ~K*eps32; fp16/bf16 round the result (and, in the
# reductions, the partial sums) to 11/8 significant bits.
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.double(), ref.double()
    if torch.isnan(y).any():
        return float("inf")
    return ((y - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _act64(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    f = torch.nn.functional
    return {
        None: lambda t: t,
        "relu": f.relu,
        "silu": f.silu,
        "gelu": f.gelu,
        "gelu_tanh": lambda t: f.gelu(t, approximate="tanh"),
    }[activation](y)


def _inputs(seed: int, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype) for name, shape in shapes.items()}


def _check(name: str, y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, case: str) -> None:
    assert y.shape == ref.shape, f"{name} {case}: shape {list(y.shape)} != {list(ref.shape)}"
    err = rel_err(y, ref)
    assert err <= TOL[dtype], f"{name} {case}: relative error {err:.3g} > {TOL[dtype]:.0e}"


# ---------------------------------------------------------------------------------------------
# Rank-side case runners (module level: they are pickled by name to the ranks)
# ---------------------------------------------------------------------------------------------


def _run_all_gather_matmul(group, *, dtype_name, kernel, chunk_values, iters, m, k, n, dim=0, seed=0,
                           bias=False, activation=None, fused=True, delay_rank=None):
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    dtype = DTYPES[dtype_name]
    fn = overlap.all_gather_matmul if fused else overlap.all_gather_matmul_reference
    for c in chunk_values:
        for it in range(iters):
            lead = (m * world, 3) if dim == 0 else (3, m * world)
            t = _inputs(seed + 1000 * it + (c or 0), {"x": (*lead, k), "w": (k, n * world), "b": (n * world,)}, dtype)
            x_shard = t["x"].chunk(world, dim)[rank]
            w = t["w"].chunk(world, 1)[rank]
            b = t["b"].chunk(world)[rank] if bias else None
            ref = _act64(t["x"].double() @ w.double() + (b.double() if bias else 0), activation)
            out = torch.full_like(ref, float("nan"), dtype=dtype)
            if delay_rank == rank:
                time.sleep(0.2)
            y, gathered = fn(x_shard, w, group=group, dim=dim, chunks=c, bias=b, activation=activation,
                             out=out, return_gathered=True, kernel=kernel)
            case = f"rank {rank} dtype={dtype_name} kernel={kernel} chunks={c} it={it} dim={dim}"
            assert y is out, f"{case}: the result must be written into out"
            _check("all_gather_matmul", y, ref, dtype, case)
            assert torch.equal(gathered, t["x"]), f"{case}: gathered input differs from all_gather(x_shard)"
    return True


def _run_matmul_reduce_scatter(group, *, dtype_name, kernel, chunk_values, iters, m, k, n, dim=0, seed=0,
                               bias=False, activation=None, fused=True, delay_rank=None):
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    dtype = DTYPES[dtype_name]
    fn = overlap.matmul_reduce_scatter if fused else overlap.matmul_reduce_scatter_reference
    for c in chunk_values:
        for it in range(iters):
            lead = (m * world, 3) if dim == 0 else (3, m * world)
            t = _inputs(seed + 1000 * it + (c or 0), {"x": (*lead, k * world), "w": (k * world, n), "b": (n,)}, dtype)
            x = t["x"].chunk(world, -1)[rank]          # row-parallel: K split across ranks
            w = t["w"].chunk(world, 0)[rank]
            b = t["b"] if bias else None
            full = _act64(t["x"].double() @ t["w"].double() + (t["b"].double() if bias else 0), activation)
            ref = full.chunk(world, dim)[rank]
            out = torch.full_like(ref, float("nan"), dtype=dtype)
            if delay_rank == rank:
                time.sleep(0.2)
            y = fn(x, w, group=group, dim=dim, chunks=c, bias=b, activation=activation, out=out, kernel=kernel)
            case = f"rank {rank} dtype={dtype_name} kernel={kernel} chunks={c} it={it} dim={dim}"
            assert y is out, f"{case}: the result must be written into out"
            _check("matmul_reduce_scatter", y, ref, dtype, case)
    return True


def _run_matmul_all_reduce(group, *, dtype_name, kernel, chunk_values, iters, m, k, n, seed=0,
                           bias=False, activation=None, fused=True, delay_rank=None):
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    dtype = DTYPES[dtype_name]
    fn = overlap.matmul_all_reduce if fused else overlap.matmul_all_reduce_reference
    for c in chunk_values:
        for it in range(iters):
            t = _inputs(seed + 1000 * it + (c or 0), {"x": (m, 2, k * world), "w": (k * world, n), "b": (n,)}, dtype)
            x = t["x"].chunk(world, -1)[rank]
            w = t["w"].chunk(world, 0)[rank]
            b = t["b"] if bias else None
            ref = _act64(t["x"].double() @ t["w"].double() + (t["b"].double() if bias else 0), activation)
            out = torch.full_like(ref, float("nan"), dtype=dtype)
            if delay_rank == rank:
                time.sleep(0.2)
            y = fn(x, w, group=group, chunks=c, bias=b, activation=activation, out=out, kernel=kernel)
            case = f"rank {rank} dtype={dtype_name} kernel={kernel} chunks={c} it={it}"
            assert y is out, f"{case}: the result must be written into out"
            _check("matmul_all_reduce", y, ref, dtype, case)
    return True


def _chunk_values(world: int) -> list[int | None]:
    return [*range(1, 2 * world + 1), None]


# ---------------------------------------------------------------------------------------------
# Pure helpers (no ranks)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,chunks", [(7, 3), (8, 4), (5, 8), (1, 2), (0, 3), (13, 1)])
def test_split_rows_covers_every_row_once(n, chunks):
    pieces = split_rows(n, chunks)
    assert [r for s, e in pieces for r in range(s, e)] == list(range(n))
    assert all(e > s for s, e in pieces)
    sizes = [e - s for s, e in pieces]
    assert not sizes or max(sizes) - min(sizes) <= 1
    assert len(pieces) == min(n, chunks)


# ---------------------------------------------------------------------------------------------
# Equivalence on 2 and 4 ranks
# ---------------------------------------------------------------------------------------------

RUNNERS = {
    "all_gather_matmul": _run_all_gather_matmul,
    "matmul_reduce_scatter": _run_matmul_reduce_scatter,
    "matmul_all_reduce": _run_matmul_all_reduce,
}


@pytest.mark.parametrize("op", list(RUNNERS))
@pytest.mark.parametrize("dtype_name", ["float64", "float32", "float16", "bfloat16"])
def test_schedules_match_float64_torch_kernel_2_ranks(dist2, op, dtype_name):
    # m=7 rows per rank: not divisible by chunks*world for most chunk counts
    dist2.run(RUNNERS[op], dtype_name=dtype_name, kernel="torch", chunk_values=_chunk_values(2),
              iters=1, m=7, k=24, n=10, bias=True, activation="gelu" if dtype_name == "float32" else None)


@pytest.mark.parametrize("op", list(RUNNERS))
@pytest.mark.parametrize("dtype_name", ["float64", "float32", "bfloat16"])
def test_schedules_match_float64_torch_kernel_4_ranks(dist4, op, dtype_name):
    dist4.run(RUNNERS[op], dtype_name=dtype_name, kernel="torch", chunk_values=_chunk_values(4),
              iters=1, m=5, k=12, n=9, bias=dtype_name != "float64", activation="silu")


@pytest.mark.parametrize("op", list(RUNNERS))
@pytest.mark.parametrize("dtype_name", ["float32", "float16", "bfloat16"])
def test_schedules_match_float64_triton_interpreted(dist2, op, dtype_name):
    dist2.run(RUNNERS[op], dtype_name=dtype_name, kernel="triton", chunk_values=[1, 3, None],
              iters=1, m=9, k=40, n=18, bias=True, activation="relu")


@pytest.mark.parametrize("op", ["all_gather_matmul", "matmul_reduce_scatter"])
def test_schedules_on_a_middle_dim(dist2, op):
    """Sequence parallelism on [batch, seq, hidden] gathers/scatters dim 1."""
    dist2.run(RUNNERS[op], dtype_name="float32", kernel="torch", chunk_values=[1, 2, 4], iters=1, m=6, k=8, n=5, dim=1)


@pytest.mark.parametrize("op", list(RUNNERS))
def test_references_match_float64(dist2, op):
    dist2.run(RUNNERS[op], dtype_name="float32", kernel="torch", chunk_values=[None], iters=1, m=7, k=24, n=10,
              bias=True, activation="gelu_tanh", fused=False)


@pytest.mark.parametrize("op", list(RUNNERS))
def test_buffer_reuse_over_iterations_with_a_delayed_rank(dist2, op):
    """Six iterations reusing the caching allocator's blocks; rank 1 arrives late every time."""
    dist2.run(RUNNERS[op], dtype_name="float32", kernel="torch", chunk_values=[4], iters=6, m=11, k=16, n=12,
              delay_rank=1)


# ---------------------------------------------------------------------------------------------
# Ordering: handles waited on late; backward blocks
# ---------------------------------------------------------------------------------------------


def _run_late_wait(group):
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    t = _inputs(5, {"x": (8 * world, 6 * world), "w": (6 * world, 7)}, torch.float32)
    x, w = t["x"].chunk(world, 1)[rank], t["w"].chunk(world, 0)[rank]
    full = t["x"].double() @ t["w"].double()
    pend_rs = overlap.matmul_reduce_scatter(x, w, group=group, chunks=3, async_op=True, kernel="torch")
    pend_ar = overlap.matmul_all_reduce(x, w, group=group, chunks=3, async_op=True, kernel="torch")
    # one chunk (the decode / small-dgrad path): 3-D x, into a poisoned out, epilogue after the wait
    bias = torch.randn(7, generator=torch.Generator().manual_seed(3))
    out = torch.full((2, 4 * world, 7), float("nan"))
    pend_one = overlap.matmul_all_reduce(x.reshape(2, 4 * world, x.shape[-1]), w, group=group, chunks=1, bias=bias,
                                         activation="gelu", out=out, async_op=True, kernel="torch")
    # Other work, and a straggler, before anyone waits.
    _ = torch.randn(64, 64) @ torch.randn(64, 64)
    time.sleep(0.1 * (rank + 1))
    _check("matmul_all_reduce async", pend_ar.wait(), full, torch.float32, f"rank {rank}")
    got = pend_one.wait()
    assert got is out, "matmul_all_reduce(chunks=1, out=...): expected the result in out"
    want = torch.nn.functional.gelu(full + bias.double()).reshape(2, 4 * world, 7)
    _check("matmul_all_reduce async, one chunk", got, want, torch.float32, f"rank {rank}")
    _check("matmul_reduce_scatter async", pend_rs.wait(), full.chunk(world)[rank], torch.float32, f"rank {rank}")
    return True


def test_handles_waited_on_late(dist2):
    dist2.run(_run_late_wait)


def _run_backward_blocks(group, *, chunks, dtype_name="float64"):
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    dtype = DTYPES[dtype_name]
    m, k, n = 5, 12, 8
    t = _inputs(11, {"x": (m * world, 2, k), "dy": (m * world, 2, n * world), "w": (k, n * world),
                     "x2": (m * world, 2, k * world), "w2": (k * world, n)}, dtype)
    case = f"rank {rank} chunks={chunks}"
    # Column-parallel, sequence-parallel: y = all_gather(x_shard) @ w_shard_n.
    w_col = t["w"].chunk(world, 1)[rank]
    dy_col = t["dy"].chunk(world, -1)[rank]                   # grad of this rank's output columns
    dx_ref = (t["dy"].double() @ t["w"].double().T).chunk(world, 0)[rank]
    dw_ref = t["x"].double().reshape(-1, k).T @ dy_col.double().reshape(-1, n)
    for keep in (True, False):
        x_arg = t["x"] if keep else t["x"].chunk(world, 0)[rank]
        dx, dw = overlap.matmul_reduce_scatter_with_wgrad(dy_col, w_col, x_arg, group=group, x_is_gathered=keep,
                                                          chunks=chunks, kernel="torch")
        _check("column-sp dgrad", dx, dx_ref, dtype, f"{case} keep={keep}")
        _check("column-sp wgrad", dw, dw_ref, dtype, f"{case} keep={keep}")
        assert dw.t().is_contiguous(), "wgrad must come out in the nn.Linear weight layout"
    # Column-parallel, no sequence parallelism: x replicated.
    dx, dw = overlap.matmul_all_reduce_with_wgrad(dy_col, w_col, t["x"], group=group, chunks=chunks, kernel="torch")
    _check("column dgrad", dx, t["dy"].double() @ t["w"].double().T, dtype, case)
    _check("column wgrad", dw, dw_ref, dtype, case)
    # Row-parallel, sequence-parallel: y_shard = reduce_scatter(x_shard_k @ w_shard_k).
    x_row, w_row = t["x2"].chunk(world, -1)[rank], t["w2"].chunk(world, 0)[rank]
    dy_full = t["dy"][..., :n]
    dy_shard = dy_full.chunk(world, 0)[rank]
    dx, dw = overlap.all_gather_matmul_with_wgrad(dy_shard, w_row, x_row, group=group, chunks=chunks, kernel="torch")
    _check("row-sp dgrad", dx, dy_full.double() @ w_row.double().T, dtype, case)
    _check("row-sp wgrad", dw, x_row.double().reshape(-1, k).T @ dy_full.double().reshape(-1, n), dtype, case)
    # Frozen weights: need_wgrad=False gives the same dgrad and no wgrad at all.
    frozen = [
        overlap.matmul_reduce_scatter_with_wgrad(dy_col, w_col, t["x"].chunk(world, 0)[rank], group=group,
                                                 x_is_gathered=False, chunks=chunks, need_wgrad=False, kernel="torch"),
        overlap.matmul_all_reduce_with_wgrad(dy_col, w_col, t["x"], group=group, chunks=chunks, need_wgrad=False,
                                             kernel="torch"),
        overlap.all_gather_matmul_with_wgrad(dy_shard, w_row, x_row, group=group, chunks=chunks, need_wgrad=False,
                                             kernel="torch"),
    ]
    for (dx_frozen, dw_frozen), ref in zip(frozen, (dx_ref, t["dy"].double() @ t["w"].double().T,
                                                     dy_full.double() @ w_row.double().T)):
        assert dw_frozen is None, f"{case}: need_wgrad=False still returned a wgrad"
        _check("frozen dgrad", dx_frozen, ref, dtype, case)
    return True


@pytest.mark.parametrize("chunks", [1, 2, 3, 5, None])
def test_backward_blocks_match_float64(dist2, chunks):
    dist2.run(_run_backward_blocks, chunks=chunks)


def test_backward_blocks_4_ranks(dist4):
    dist4.run(_run_backward_blocks, chunks=6, dtype_name="float32")


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument, raised before any collective
# ---------------------------------------------------------------------------------------------


def _run_bad_inputs(group):
    """Each fused op and its reference share one check path: both refuse each bad call with
    the same message."""
    import re

    world = dist.get_world_size(group)
    x, w = torch.randn(6, 8), torch.randn(8, 4)
    ag, rs, ar = "all_gather_matmul", "matmul_reduce_scatter", "matmul_all_reduce"
    cases = [
        (rs, (torch.randn(5, 8), w), dict(group=group), ValueError, r"x.shape\[0\].*multiple.*world size 2.*got 5"),
        (ag, (x, torch.randn(7, 4)), dict(group=group), ValueError, r"w: expected shape \[K, N\] with K = x_shard.shape\[-1\] = 8"),
        (ag, (x, w.double()), dict(group=group), TypeError, r"w: expected dtype torch.float32"),
        (ar, (x, w), dict(group=None), TypeError, r"group: expected a torch.distributed ProcessGroup"),
        (ar, (x, w), dict(group="world"), TypeError, r"group: expected a torch.distributed ProcessGroup or a 1-D DeviceMesh, got str"),
        (ar, (x, w), dict(group=group, bias=torch.randn(5)), ValueError, r"bias: expected shape \[4\]"),
        (ar, (x, w), dict(group=group, chunks=0), ValueError, r"chunks: expected None or an int >= 1, got 0"),
        (ar, (x, w), dict(group=group, activation="tanh"), ValueError, r"activation: expected one of"),
        (ag, (x, w), dict(group=group, out=torch.empty(6, 4)), ValueError, r"out: expected shape \[12, 4\]"),
        (rs, (x, w), dict(group=group, out=torch.empty(6, 4)), ValueError, r"out: expected shape \[3, 4\]"),
        (ag, (x, w), dict(group=group, dim=1), ValueError, r"dim: expected a row dim"),
        (ag, (torch.randn(8), w), dict(group=group), ValueError, r"x_shard: expected at least 2 dims"),
        (ar, (x, w), dict(group=group, comm="mpi"), ValueError, r"comm: expected one of"),
        (rs, (x, w), dict(group=group, x_scale=torch.ones(())), TypeError, r"x_scale: applies to fp8 operands only"),
        (ag, (x, w), dict(group=group, no_such_knob=1), TypeError, r"no_such_knob"),
    ]
    for i, (op, args, kwargs, exc, pattern) in enumerate(cases):
        for fn in (getattr(overlap, op), getattr(overlap, op + "_reference")):
            try:
                fn(*args, **kwargs)
            except exc as e:
                assert re.search(pattern, str(e)), f"case {i} ({fn.__name__}): message {str(e)!r} does not match {pattern!r}"
            else:
                raise AssertionError(f"case {i} ({fn.__name__}): no {exc.__name__} raised")
    # Nothing was issued by the failed calls: the group is still in step.
    y = overlap.matmul_all_reduce(torch.ones(2, 3), torch.ones(3, 2), group=group, chunks=2, kernel="torch")
    assert torch.equal(y, torch.full((2, 2), 3.0 * world)), y
    return True


def test_bad_input_raises_before_any_collective(dist2):
    dist2.run(_run_bad_inputs)


@pytest.mark.parametrize("op", ["all_gather_matmul", "matmul_reduce_scatter", "matmul_all_reduce"])
def test_reference_has_the_fused_signature(op):
    import inspect

    fused, ref = getattr(overlap, op), getattr(overlap, op + "_reference")
    assert inspect.signature(ref) == inspect.signature(fused)
    assert ref.__name__ == op + "_reference" and ref.__doc__.startswith(f"Unfused `{op}`")


def _run_debug_fingerprint(group):
    """Shapes that differ across ranks: in debug mode every rank gets the same clear error."""
    from fusedpar.checks import InconsistentCallError

    rank = dist.get_rank(group)
    x = torch.randn(4 + 2 * rank, 8)          # rank 1 has more rows than rank 0
    try:
        overlap.all_gather_matmul(x, torch.randn(8, 3), group=group, chunks=2, kernel="torch", debug=True)
    except InconsistentCallError as e:
        assert "rank 1 has x_shard=" in str(e) and "rank 0 has" in str(e), str(e)
    else:
        raise AssertionError("no InconsistentCallError for shapes that differ across ranks")
    # Consistent calls pass the check, and the chunk choice (None -> cost model) agrees.
    overlap.matmul_all_reduce(torch.randn(6, 8), torch.randn(8, 3), group=group, kernel="torch", debug=True)
    return True


def test_debug_mode_catches_shapes_that_differ_across_ranks(dist2):
    dist2.run(_run_debug_fingerprint)


# ---------------------------------------------------------------------------------------------
# Memory: the bounds stated in the docstrings
# ---------------------------------------------------------------------------------------------


def _run_peak_memory(group, *, chunk_values):
    """Peak bytes allocated inside each schedule vs inside its unfused reference.

    Docstring bounds: all_gather_matmul needs nothing beyond the gathered input and the
    output (what the unfused op holds too); matmul_reduce_scatter holds at most two piece
    buffers of 1/chunks of the [M, N] partial sum the unfused op allocates whole;
    matmul_all_reduce computes in place. So for every chunk count: fused ≤ 1.10 × unfused.
    """
    import gc

    from tests.memory import PeakMemory

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    m, k, n = 64, 48, 40
    x_ag, w = torch.randn(m, k), torch.randn(k, n)
    x_full, w_k = torch.randn(m * world, k), torch.randn(k, n)
    report = {}
    for op, args in (("all_gather_matmul", (x_ag, w)), ("matmul_reduce_scatter", (x_full, w_k)),
                     ("matmul_all_reduce", (x_full, w_k))):
        peaks = {}
        for c in chunk_values:
            for name, fn in (("fused", getattr(overlap, op)), ("unfused", getattr(overlap, op + "_reference"))):
                gc.collect()
                with PeakMemory() as mem:
                    y = fn(*args, group=group, chunks=c, kernel="torch")
                    del y
                peaks[name, c] = mem.peak
            assert peaks["unfused", c] > 0, f"{op}: the probe saw no allocation at all"
            assert peaks["fused", c] <= 1.10 * peaks["unfused", c], (
                f"rank {rank} {op} chunks={c}: peak {peaks['fused', c]} B > 1.10 x unfused {peaks['unfused', c]} B"
            )
        report[op] = {f"{name}@{c}": v for (name, c), v in peaks.items()}
    return report


def test_peak_memory_within_ten_percent_of_unfused(dist2):
    dist2.run(_run_peak_memory, chunk_values=[None, 1, 2, 3, 4, 8])


def test_peak_memory_probe_sees_allocations_and_frees():
    from tests.memory import PeakMemory

    with PeakMemory() as mem:
        a = torch.empty(1000)              # 4000 B
        b = a[:10]                         # a view: no new storage
        del a
        c = torch.empty(250)               # 1000 B, while a's storage lives on through b
        del b, c
        d = torch.empty(2000)              # 8000 B after both were freed
        del d
    assert mem.peak == 8000 and mem.live == 0, (mem.peak, mem.live)


def _run_bf16_wgrad_accumulation(group):
    """The row-parallel SP backward adds one wgrad term per ring piece: in bf16 each addition
    would round, so the error would grow with the piece count. Accumulated in fp32 it does not."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    t = _inputs(21, {"x": (512 * world, 64), "dy": (512 * world, 48), "w": (64, 48)}, torch.bfloat16)
    truth = t["x"].double().T @ t["dy"].double()
    errs = {}
    for c in (1, 16):
        _, dw = overlap.all_gather_matmul_with_wgrad(t["dy"].chunk(world)[rank], t["w"], t["x"], group=group,
                                                     chunks=c, kernel="torch")
        assert dw.dtype == torch.bfloat16
        errs[c] = rel_err(dw, truth)
    assert errs[16] <= 1.5 * errs[1] + 1e-4, f"rank {rank}: 16 ring pieces {errs[16]:.2e} vs one GEMM {errs[1]:.2e}"
    return errs


def test_bf16_wgrad_accumulates_in_fp32(dist2):
    dist2.run(_run_bf16_wgrad_accumulation)
