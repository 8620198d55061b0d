"""bench/gpu/emulated_link.py and overlap_emulated.py: the one-GPU overlap measurement.

On CPU: the schedules run unchanged through `EmulatedLinkCommunicator` (every emulated peer
holds this rank's data, so results are known in closed form), the byte accounting matches
the ring formulas, and the measurement script's --cpu-smoke writes every output file.
On CUDA (marked gpu): an emulated transfer takes about the link's time and overlaps a GEMM.
"""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fusedpar import costmodel, overlap

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench/gpu"))

from emulated_link import EmulatedLinkCommunicator, wire_bytes  # noqa: E402
from overlap_emulated import trace_gaps  # noqa: E402

WORLD, RANK = 4, 1
CHUNKS = (1, 2, 3, 4)
KERNELS = ("torch", "triton")  # triton runs interpreted here (tests/conftest.py)


@pytest.fixture
def comm() -> EmulatedLinkCommunicator:
    return EmulatedLinkCommunicator(world_size=WORLD, rank=RANK, device="cpu")


def _operands(rows: int, k: int = 24, n: int = 40):
    g = torch.Generator().manual_seed(0)
    return torch.randn(rows, k, generator=g), torch.randn(k, n, generator=g)


# ------------------------------------------------------------------ the schedules, CPU


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("chunks", CHUNKS)
def test_all_gather_matmul_is_tiled_shard_times_w(comm, chunks, kernel):
    x_shard, w = _operands(20)
    out = torch.full((WORLD * 20, 40), math.nan)
    y = overlap.all_gather_matmul(x_shard, w, group=comm, chunks=chunks, out=out, kernel=kernel)
    assert y.shape == (WORLD * 20, 40) and not y.isnan().any()
    torch.testing.assert_close(y, x_shard.repeat(WORLD, 1) @ w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("chunks", CHUNKS)
def test_matmul_reduce_scatter_is_world_times_own_block(comm, chunks, kernel):
    x, w = _operands(WORLD * 18)  # 18 rows per block: pieces of uneven size for chunks=4
    out = torch.full((18, 40), math.nan)
    y = overlap.matmul_reduce_scatter(x, w, group=comm, chunks=chunks, out=out, kernel=kernel)
    assert y.shape == (18, 40) and not y.isnan().any()
    torch.testing.assert_close(y, WORLD * (x @ w)[RANK * 18:(RANK + 1) * 18], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("chunks", CHUNKS)
def test_matmul_all_reduce_is_world_times_partial(comm, chunks, kernel):
    x, w = _operands(30)
    out = torch.full((30, 40), math.nan)
    y = overlap.matmul_all_reduce(x, w, group=comm, chunks=chunks, out=out, kernel=kernel)
    assert y.shape == (30, 40) and not y.isnan().any()
    torch.testing.assert_close(y, WORLD * (x @ w), rtol=1e-5, atol=1e-4)


def test_references_and_debug_check_run_without_a_process_group(comm):
    x_shard, w = _operands(8)
    y = overlap.all_gather_matmul_reference(x_shard, w, group=comm)
    torch.testing.assert_close(y, x_shard.repeat(WORLD, 1) @ w)
    x, _ = _operands(WORLD * 8)
    y = overlap.matmul_reduce_scatter_reference(x, w, group=comm)
    torch.testing.assert_close(y, WORLD * (x @ w)[8:16])
    # the debug fingerprint exchange goes through all_gather_object: every clone agrees
    overlap.matmul_all_reduce(x, w, group=comm, chunks=2, kernel="torch", debug=True)
    assert comm.group is None and comm.kind == "emulated"


def test_bad_arguments_raise(comm):
    with pytest.raises(ValueError, match="rank"):
        EmulatedLinkCommunicator(world_size=4, rank=4)
    with pytest.raises(ValueError, match="fill"):
        EmulatedLinkCommunicator(world_size=4, fill="sleep")
    with pytest.raises(ValueError, match="world_size=4 x input"):
        comm.all_gather(torch.empty(10), torch.empty(3))
    with pytest.raises(ValueError, match="world_size=4 x output"):
        comm.reduce_scatter(torch.empty(3), torch.empty(10))
    with pytest.raises(ValueError, match="dst=7"):
        comm.send_recv(torch.empty(3), 7, torch.empty(3), 0)
    with pytest.raises(ValueError, match="contiguous"):
        comm.all_reduce(torch.empty(4, 4).t())


# ------------------------------------------------------------------ byte accounting


def test_wire_bytes_follow_the_ring_formulas():
    mib = 2**20
    assert wire_bytes("all_gather", 8 * mib, 8) == 7 * mib  # (w-1)/w of the gathered tensor
    assert wire_bytes("reduce_scatter", 8 * mib, 8) == 7 * mib  # (w-1)/w of the input
    assert wire_bytes("all_reduce", 8 * mib, 8) == 14 * mib  # twice that
    assert wire_bytes("send_recv", 3 * mib, 8) == 3 * mib  # a hop moves its message once
    assert wire_bytes("all_reduce", 8 * mib, 1) == 0.0
    c = EmulatedLinkCommunicator(world_size=8, link_gbps=100.0, latency_us=5.0, device="cpu")
    # 7 MiB over 100 GB/s = 73.4 us, + 5 us latency
    assert c.transfer_seconds("all_gather", 8 * mib) == pytest.approx(5e-6 + 7 * mib / 100e9)
    spec = costmodel.DeviceSpec("emu", {"float32": 1.0}, link_gbps=100.0, link_latency_us=5.0, launch_us=0.0)
    for kind in ("all_gather", "reduce_scatter", "all_reduce"):
        assert c.transfer_seconds(kind, 8 * mib) == pytest.approx(costmodel.collective_time(kind, 8 * mib, 8, spec))
    assert c.transfer_seconds("send_recv", mib) == pytest.approx(costmodel.p2p_time(mib, spec))


def test_calls_count_the_bytes_they_move(comm):
    # all_gather_matmul with chunks=8 on 4 ranks: a ring of 3 steps x 2 pieces per shard
    x_shard, w = _operands(20)
    overlap.all_gather_matmul(x_shard, w, group=comm, chunks=8, kernel="torch")
    assert comm.calls == {"send_recv": 6}
    assert comm.bytes_on_wire == 3 * 20 * 24 * 4  # every other rank's shard, once
    assert comm.bytes_on_wire == wire_bytes("all_gather", WORLD * 20 * 24 * 4, WORLD)
    before = comm.bytes_on_wire
    x, _ = _operands(WORLD * 8)
    overlap.matmul_reduce_scatter(x, w, group=comm, chunks=2, kernel="torch")
    assert comm.calls["reduce_scatter"] == 2
    assert comm.bytes_on_wire - before == pytest.approx(0.75 * WORLD * 8 * 40 * 4)
    assert comm.emulated_seconds > 0


def test_cpu_mode_is_untimed_by_default_and_can_sleep():
    fast = EmulatedLinkCommunicator(world_size=2, link_gbps=1e-3, device="cpu")
    assert not fast.timed
    fast.all_reduce(torch.ones(1000)).wait()  # would be 8 s if it slept
    slow = EmulatedLinkCommunicator(world_size=2, link_gbps=1.0, latency_us=20_000, device="cpu", timed=True)
    import time
    t0 = time.perf_counter()
    slow.all_reduce(torch.ones(4)).wait()
    assert time.perf_counter() - t0 >= 0.02


# ------------------------------------------------------------------ the measurement script


def test_trace_gaps_on_a_hand_made_trace():
    def x(cat, name, ts, dur, **args):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "args": args}

    trace = {"traceEvents": [
        x("user_annotation", "mm piece 0", 0, 5), x("user_annotation", "mm piece 1", 12, 5),
        x("user_annotation", "mm piece 2", 40, 5),
        x("cuda_runtime", "cudaLaunchKernel", 1, 2, correlation=1),
        x("cuda_runtime", "cudaLaunchKernel", 13, 2, correlation=2),
        x("cuda_runtime", "cudaLaunchKernel", 41, 2, correlation=3),
        x("kernel", "gemm", 10, 20, stream=7, correlation=1),   # ends at 30
        x("kernel", "gemm", 32, 6, stream=7, correlation=2),    # gap 2, launched long before
        x("kernel", "gemm", 45, 10, stream=7, correlation=3),   # gap 7, 5 of them before launch
        x("gpu_memcpy", "Memcpy DtoD", 0, 60, stream=9),
        x("kernel", "mul", 20, 1, stream=9, correlation=4),     # comm stream: less kernel time
    ]}
    gaps = trace_gaps(trace)
    assert gaps["compute_stream"] == 7 and gaps["compute_kernels"] == 3 and gaps["chunk_launches"] == 3
    assert gaps["max_gap_us"] == 7 and gaps["total_gap_us"] == 9
    assert gaps["max_launch_gap_us"] == 5 and gaps["total_launch_gap_us"] == 5
    assert gaps["max_host_launch_interval_us"] == 28


def test_cpu_smoke_writes_json_csv_markdown_png(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(ROOT / "bench/gpu/overlap_emulated.py"), "--cpu-smoke",
                           "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "overlap-emulated.json").read_text())
    assert result["cpu_smoke"] and result["environment"]["torch"] == torch.__version__
    assert "NCCL's SM use is not modelled" in result["emulation"]["note"]
    rows = result["rows"]
    assert {r["op"] for r in rows} == {"all_gather_matmul", "matmul_reduce_scatter"}
    assert {r["kernel"] for r in rows} == {"torch", "triton"}
    for r in rows:
        assert "status" not in r, r.get("status")
        for key in ("C_ms", "M_ms", "serial_ms", "overlapped_ms", "pred_ms", "pred_table_ms"):
            assert r[key] > 0, key
        assert "gap_error" not in r, r["gap_error"]
    assert any(r["chunk_launches"] > 1 and r["max_host_launch_interval_us"] > 0 for r in rows)
    with (tmp_path / "overlap-emulated.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    md = (tmp_path / "overlap-emulated.md").read_text()
    assert "CPU smoke run" in md and "| case | op | kernel | chunks | C ms |" in md
    assert (tmp_path / "overlap-emulated.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ CUDA


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _cuda_ms(fn) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("fill", ["copy", "spin"])
def test_cuda_transfer_takes_the_link_time(fill):
    comm = EmulatedLinkCommunicator(world_size=8, link_gbps=370.0, fill=fill)
    assert comm.copy_gbps > 100 and comm.spin_cycles_per_s > 1e8
    x = torch.randn(8192, 1024, device="cuda", dtype=torch.bfloat16)  # 16 MiB shard
    out = torch.empty(8 * 8192, 1024, device="cuda", dtype=torch.bfloat16)
    ms = _cuda_ms(lambda: comm.all_gather(out, x).wait())
    want = comm.transfer_seconds("all_gather", out.numel() * 2) * 1e3  # ~0.32 ms
    assert want * 0.8 < ms < want * 1.3, (ms, want)
    torch.testing.assert_close(out.view(8, -1), x.view(1, -1).expand(8, -1), rtol=0, atol=0)


@pytest.mark.gpu
@needs_cuda
def test_cuda_transfer_overlaps_a_gemm_on_the_compute_stream():
    comm = EmulatedLinkCommunicator(world_size=8, link_gbps=370.0, fill="spin")
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    big = torch.empty(8 * 4096, 4096, device="cuda", dtype=torch.bfloat16)
    shard = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    gemm_ms = _cuda_ms(lambda: a @ a)
    comm_ms = _cuda_ms(lambda: comm.all_gather(big, shard).wait())

    def both():
        handle = comm.all_gather(big, shard)
        a @ a
        handle.wait()

    both_ms = _cuda_ms(both)
    assert both_ms < 0.8 * (gemm_ms + comm_ms), (gemm_ms, comm_ms, both_ms)


@pytest.mark.gpu
@needs_cuda
def test_cuda_schedules_match_the_clone_semantics():
    comm = EmulatedLinkCommunicator(world_size=4, rank=2)
    x_shard = torch.randn(256, 128, device="cuda")
    w = torch.randn(128, 96, device="cuda")
    for chunks in (1, 4, 8):
        y = overlap.all_gather_matmul(x_shard, w, group=comm, chunks=chunks, kernel="torch")
        torch.testing.assert_close(y, x_shard.repeat(4, 1) @ w, rtol=1e-3, atol=1e-3)
        x = torch.randn(4 * 64, 128, device="cuda")
        y = overlap.matmul_reduce_scatter(x, w, group=comm, chunks=chunks, kernel="torch")
        torch.testing.assert_close(y, 4 * (x @ w)[128:192], rtol=1e-3, atol=1e-2)


# ------------------------------------------------------------------------- timeline picture

def test_timeline_rows_are_streams_named_by_role(tmp_path):
    from timeline import draw, label_rows, rows_from_trace

    k = lambda name, ts, dur, stream: {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur,  # noqa: E731
                                       "args": {"stream": stream}}
    trace = {"traceEvents": [
        k("_matmul_tma_kernel", 100, 50, 7), k("_matmul_tma_kernel", 160, 50, 7),
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy DtoD (Device -> Device)", "ts": 110, "dur": 80,
         "args": {"stream": 21}},
        k("vectorized_elementwise_kernel", 215, 5, 7),
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 300, "tid": 1},  # host: not a row
    ]}
    rows = rows_from_trace(trace)
    assert set(rows) == {"stream 7", "stream 21"}
    assert rows["stream 7"][0] == (0.0, 50.0, "_matmul_tma_kernel")  # times from the first GPU event
    names = label_rows(rows)
    assert names == {"stream 7": "stream 7 (compute)", "stream 21": "stream 21 (comm)"}
    draw(rows, tmp_path / "t.png", "test")
    assert (tmp_path / "t.png").stat().st_size > 1000


def test_timeline_cpu_smoke_writes_its_files(tmp_path):
    out = tmp_path / "tl"
    run = subprocess.run([sys.executable, str(ROOT / "bench/gpu/timeline.py"), "--out", str(out), "--cpu-smoke",
                          "--kernel", "torch"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads((out / "timeline.json").read_text())
    assert "CPU smoke run" in summary["title"] and summary["rows"]
    assert (out / "timeline.png").stat().st_size > 1000 and (out / "trace.json").exists()
