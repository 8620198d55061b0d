"""Cost model: formulas checked against hand-computed numbers, then sanity properties."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fusedpar import costmodel as cm

# Round numbers so every expected value below can be worked out by hand:
# 1 MFLOP/s of fp32, 1 MB/s of link, no latency, no launch cost, no memory limit.
EASY = cm.DeviceSpec(
    name="easy", gemm_tflops={"float32": 1e-6}, link_gbps=1e-3, link_latency_us=0.0,
    launch_us=0.0, mem_gbps=1e9, tile_m=1, min_piece_rows=1,
)
F32 = torch.float32


@pytest.fixture(autouse=True)
def _no_override():
    yield
    cm.set_device_spec(None)


# ------------------------------------------------------------------------ formulas


def test_gemm_time_by_hand():
    # 2 * 100 * 100 * 100 flop at 1e6 flop/s.
    assert cm.gemm_time(100, 100, 100, F32, EASY) == pytest.approx(2.0)
    # Launch cost is added once per call.
    spec = dataclasses.replace(EASY, launch_us=1000.0)
    assert cm.gemm_time(100, 100, 100, F32, spec) == pytest.approx(2.001)


def test_gemm_time_tile_padding_and_memory_roofline():
    # One row costs a whole 128-row tile: 2 * 128 * 10 * 10 / 1e6.
    tiled = dataclasses.replace(EASY, tile_m=128)
    assert cm.gemm_time(1, 10, 10, F32, tiled) == pytest.approx(0.0256)
    assert cm.gemm_time(129, 10, 10, F32, tiled) == pytest.approx(2 * 0.0256)
    # Memory-bound: (4*8 + 8*2 + 4*2) * 4 bytes = 224 B at 1 kB/s = 0.224 s,
    # more than the 2 * 4 * 2 * 8 / 1e6 = 0.000128 s of arithmetic.
    slow_mem = dataclasses.replace(EASY, mem_gbps=1e-6)
    assert cm.gemm_time(4, 2, 8, F32, slow_mem) == pytest.approx(0.224)


def test_collective_time_by_hand():
    # Ring all-gather of a 1 MB tensor over 4 ranks moves 3/4 of it per rank.
    assert cm.collective_time("all_gather", 1e6, 4, EASY) == pytest.approx(0.75)
    assert cm.collective_time("reduce_scatter", 1e6, 4, EASY) == pytest.approx(0.75)
    assert cm.collective_time("all_reduce", 1e6, 4, EASY) == pytest.approx(1.5)
    spec = dataclasses.replace(EASY, link_latency_us=300.0, launch_us=200.0)
    assert cm.collective_time("all_reduce", 1e6, 2, spec) == pytest.approx(1.0005)
    assert cm.collective_time("all_reduce", 1e6, 1, spec) == 0.0


def test_split_rows_matches_tensor_split():
    for rows in (0, 1, 7, 64, 100):
        for chunks in (1, 2, 3, 8):
            want = [len(p) for p in torch.arange(rows).tensor_split(chunks)]
            assert cm.split_rows(rows, chunks) == want


# ---------------------------------------------------------------------- schedules


def test_reduce_scatter_one_chunk_is_serial():
    # m=100, n=100, k=2, w=2: C = 2*100*100*2 / 1e6 = 0.04 s,
    # M = 1/2 * 100*100*4 B / 1e6 B/s = 0.02 s. One chunk: compute, then comm.
    p = cm.predict("matmul_reduce_scatter", m=100, n=100, k=2, world_size=2,
                   dtype=F32, chunks=1, device=EASY)
    assert p.compute_s == pytest.approx(0.04)
    assert p.comm_s == pytest.approx(0.02)
    assert p.serial_s == pytest.approx(0.06)
    assert p.overlapped_s == pytest.approx(0.06)
    assert p.speedup == pytest.approx(1.0)
    assert p.bound == pytest.approx(1.5)


def test_reduce_scatter_two_chunks_by_hand():
    # Two 50-row pieces: mm 0.02 s each, rs 0.01 s each.
    #   compute: [mm0 0-.02][mm1 .02-.04]
    #   comm:              [rs0 .02-.03]  [rs1 .04-.05]
    p = cm.predict("matmul_reduce_scatter", m=100, n=100, k=2, world_size=2,
                   dtype=F32, chunks=2, device=EASY)
    assert p.overlapped_s == pytest.approx(0.05)
    assert p.speedup == pytest.approx(0.06 / 0.05)


def test_max_in_flight_serialises():
    # One buffer: mm1 waits for rs0 to free it (.03), so nothing overlaps but mm1 / rs0's tail.
    #   compute: [mm0 0-.02]      [mm1 .03-.05]
    #   comm:              [rs0 .02-.03]      [rs1 .05-.06]
    p = cm.predict("matmul_reduce_scatter", m=100, n=100, k=2, world_size=2,
                   dtype=F32, chunks=2, device=EASY, max_in_flight=1)
    assert p.overlapped_s == pytest.approx(0.06)


def test_all_reduce_two_chunks_by_hand():
    # m=100, n=100, k=2, w=2: C = 0.04; M = 2 * 1/2 * 40000 / 1e6 = 0.04.
    # Pieces: mm 0.02, ar 0.02. compute [0-.02][.02-.04]; comm [.02-.04][.04-.06].
    p = cm.predict("matmul_all_reduce", m=100, n=100, k=2, world_size=2,
                   dtype=F32, chunks=2, device=EASY)
    assert p.comm_s == pytest.approx(0.04)
    assert p.overlapped_s == pytest.approx(0.06)
    assert p.bound == pytest.approx(2.0)


def test_all_gather_ring_by_hand():
    # m=400, k=100, n=1, w=4: C = 2*400*1*100 / 1e6 = 0.08,
    # M = 3/4 * 400*100*4 / 1e6 = 0.12, serial 0.20; c=1 is the unfused op: 0.20.
    kw = dict(m=400, n=1, k=100, world_size=4, dtype=F32, device=EASY)
    p1 = cm.predict("all_gather_matmul", chunks=1, **kw)
    assert p1.compute_s == pytest.approx(0.08)
    assert p1.comm_s == pytest.approx(0.12)
    assert p1.serial_s == pytest.approx(0.20)
    assert p1.overlapped_s == pytest.approx(0.20)
    # c=2..4: a ring with one piece per shard. The local shard (100 rows, 0.02 s) needs no
    # comm; each of the 3 hops moves a shard (100*100*4 B, 0.04 s), each GEMM 0.02 s.
    #   comm:    [hop1 0-.04][hop2 .04-.08][hop3 .08-.12]
    #   compute: [local 0-.02]  [mm1 .04-.06]  [mm2 .08-.10]  [mm3 .12-.14]
    for c in (2, 3, 4):
        assert cm.predict("all_gather_matmul", chunks=c, **kw).overlapped_s == \
            pytest.approx(0.14)
    # c=5..8: two 50-row pieces per shard: 6 hops of 0.02 s, 6 GEMMs of 0.01 s.
    #   comm:    [.02][.04][.06][.08][.10][.12]  (hop ends)
    #   compute: local to .02, then pieces end .03 .05 .07 .09 .11 .13
    assert cm.predict("all_gather_matmul", chunks=8, **kw).overlapped_s == \
        pytest.approx(0.13)
    # The hops of one shard add up to the ring all-gather formula.
    assert 3 * cm.p2p_time(400 // 4 * 100 * 4, EASY) == pytest.approx(p1.comm_s)


def test_ties_go_to_fewer_chunks():
    # m=100, k=100, n=2, w=2: c=1 is serial (C 0.04 + M 0.02 = 0.06). Every ring
    # (c=2..8) predicts 0.04: the local GEMM (0.02) hides all hops (0.02 in total) and
    # the remote rows cost 0.02 however they are cut. The answer must be 2, not 8.
    kw = dict(m=100, n=2, k=100, world_size=2, dtype=F32, device=EASY)
    assert cm.predict("all_gather_matmul", chunks=1, **kw).overlapped_s == pytest.approx(0.06)
    for c in (2, 3, 4, 8):
        assert cm.predict("all_gather_matmul", chunks=c, **kw).overlapped_s == \
            pytest.approx(0.04)
    assert cm.choose_chunks("all_gather_matmul", **kw) == 2


def test_schedule_bounds_match_the_implementation():
    overlap = pytest.importorskip("fusedpar.overlap")
    assert cm.SCHEDULE_MAX_IN_FLIGHT["matmul_reduce_scatter"] == overlap.MAX_IN_FLIGHT


def test_world_size_one_has_nothing_to_overlap():
    p = cm.predict("matmul_all_reduce", m=64, n=64, k=64, world_size=1, dtype=F32,
                   chunks=4, device=EASY)
    assert p.comm_s == 0.0 and p.overlapped_s == p.compute_s and p.bound == 1.0
    assert cm.choose_chunks("matmul_all_reduce", m=4096, n=64, k=64, world_size=1,
                            dtype=F32, device=EASY) == 1


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown op"):
        cm.predict("all_to_all_matmul", m=8, n=8, k=8, world_size=2, dtype=F32, chunks=1)
    with pytest.raises(ValueError, match="chunks"):
        cm.predict("matmul_all_reduce", m=8, n=8, k=8, world_size=2, dtype=F32, chunks=0)
    with pytest.raises(ValueError, match="no GEMM throughput"):
        cm.gemm_time(8, 8, 8, torch.float16, EASY)


# ---------------------------------------------------------------------- sanity


@pytest.mark.parametrize("op", cm.OPS)
@pytest.mark.parametrize("chunks", [1, 2, 4, 8])
def test_more_bandwidth_or_flops_is_not_slower(op, chunks):
    base = cm.DEVICES["h100-sxm"]
    kw = dict(m=8192, n=1792, k=4096, world_size=8, dtype=torch.bfloat16, chunks=chunks)
    t = cm.predict(op, device=base, **kw).overlapped_s
    faster_link = dataclasses.replace(base, link_gbps=2 * base.link_gbps)
    faster_gemm = dataclasses.replace(
        base, gemm_tflops={**base.gemm_tflops, "bfloat16": 2 * base.gemm_tflops["bfloat16"]})
    assert cm.predict(op, device=faster_link, **kw).overlapped_s <= t
    assert cm.predict(op, device=faster_gemm, **kw).overlapped_s <= t


@pytest.mark.parametrize("op", cm.OPS)
def test_decode_sized_m_gets_one_chunk(op):
    for name in ("h100-sxm", "a100-sxm", "cpu-gloo"):
        for m in (1, 8, 32, 64):
            assert cm.choose_chunks(op, m=m, n=4096, k=4096, world_size=8,
                                    dtype=torch.bfloat16, device=cm.DEVICES[name]) == 1


@pytest.mark.parametrize("op", cm.OPS)
def test_prefill_sized_m_chunks_on_h100(op):
    # Balanced compute and comm at a large m: overlap must pay.
    spec = cm.DEVICES["h100-sxm"]
    c = cm.choose_chunks(op, m=16384, n=4096, k=4096, world_size=8,
                         dtype=torch.bfloat16, device=spec)
    assert c > 1
    p = cm.predict(op, m=16384, n=4096, k=4096, world_size=8, dtype=torch.bfloat16,
                   chunks=c, device=spec)
    assert 1.0 < p.speedup <= p.bound


def test_too_many_chunks_lose():
    # 100 us per launch makes every extra piece expensive: the best count is small.
    spec = dataclasses.replace(cm.DEVICES["h100-sxm"], launch_us=100.0)
    kw = dict(m=8192, n=4096, k=4096, world_size=8, dtype=torch.bfloat16, device=spec)
    t = {c: cm.predict("matmul_reduce_scatter", chunks=c, **kw).overlapped_s
         for c in (1, 2, 8)}
    assert t[8] > t[2]
    assert cm.choose_chunks("matmul_reduce_scatter", max_chunks=8, **kw) < 8


@settings(derandomize=True, database=None, max_examples=150, deadline=None)
@given(
    op=st.sampled_from(cm.OPS),
    world=st.sampled_from([1, 2, 4, 8]),
    shard_rows=st.integers(1, 8192),
    n=st.integers(1, 16384),
    k=st.integers(1, 16384),
    dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
    spec_name=st.sampled_from(["h100-sxm", "h100-pcie", "a100-sxm", "gpu-generic"]),
    max_chunks=st.integers(1, 8),
)
def test_choose_chunks_is_rank_independent_and_bounded(op, world, shard_rows, n, k, dtype,
                                                        spec_name, max_chunks):
    spec = cm.DEVICES[spec_name]
    m = shard_rows * world  # what every rank computes from its own shard shape
    answers = set()
    for _rank in range(world):
        # Each "rank" rebuilds the global shape from its shard and a fresh spec object.
        mine = dataclasses.replace(spec)
        answers.add(cm.choose_chunks(op, m=shard_rows * world, n=n, k=k, world_size=world,
                                     dtype=dtype, device=mine, max_chunks=max_chunks))
    assert len(answers) == 1
    c = answers.pop()
    assert 1 <= c <= max_chunks
    # It is the argmin of the model (ties to fewer chunks) over the counts it may use.
    allowed = [j for j in range(1, max_chunks + 1) if j == 1 or cm.piece_rows(
        op, m=m, world_size=world, chunks=j) >= spec.min_piece_rows]
    times = {j: cm.predict(op, m=m, n=n, k=k, world_size=world, dtype=dtype, chunks=j,
                           device=spec).overlapped_s for j in allowed}
    if world > 1 and m >= 2 * world * spec.min_piece_rows:
        assert c in times
        assert times[c] <= min(times.values()) * (1 + 1e-3)
    else:
        assert c == 1  # nothing to overlap, or decode-sized m


# ------------------------------------------------------------------ device specs


def test_device_spec_lookup_and_override():
    assert cm.device_spec_for("cpu").name == "cpu-gloo"
    assert cm.spec_name_for_gpu("NVIDIA H100 80GB HBM3") == "h100-sxm"
    assert cm.spec_name_for_gpu("NVIDIA H100 PCIe") == "h100-pcie"
    assert cm.spec_name_for_gpu("NVIDIA H200") == "h200"
    assert cm.spec_name_for_gpu("NVIDIA A100-SXM4-80GB") == "a100-sxm"
    assert cm.spec_name_for_gpu("Tesla T4") == "gpu-generic"
    cm.set_device_spec("h100-sxm")
    assert cm.device_spec_for("cpu").name == "h100-sxm"
    cm.set_device_spec(EASY)
    assert cm.device_spec_for(None) is EASY
    cm.set_device_spec(None)
    assert cm.device_spec_for("cpu").name == "cpu-gloo"
    with pytest.raises(ValueError, match="unknown device spec"):
        cm.set_device_spec("tpu-v9")


def test_h100_table_matches_the_brief():
    h100 = cm.DEVICES["h100-sxm"]
    assert h100.gemm_tflops["bfloat16"] == pytest.approx(790, rel=0.05)
    assert h100.link_gbps == pytest.approx(370, rel=0.05)
    assert cm.DEVICES["h100-pcie"].link_gbps == pytest.approx(50, rel=0.05)


def test_cpu_gloo_matches_measured_collectives():
    # shared/FACTS.md: 4 MiB fp32 per rank, 2 ranks: all_reduce 7.0 ms, all_gather 5.5 ms,
    # reduce_scatter 3.8 ms. The round-figure fit should land within a factor of 1.5.
    spec, mib4 = cm.DEVICES["cpu-gloo"], 4 * 2**20
    for kind, nbytes, measured in (("all_reduce", mib4, 7.0e-3),
                                   ("all_gather", 2 * mib4, 5.5e-3),
                                   ("reduce_scatter", mib4, 3.8e-3)):
        predicted = cm.collective_time(kind, nbytes, 2, spec)
        assert measured / 1.5 < predicted < measured * 1.5, (kind, predicted)


def test_calibrate_on_cpu_measures_a_table():
    spec = cm.calibrate("cpu", dtypes=(torch.float32,), shapes=((64, 64, 64), (128, 64, 32)),
                        reps=2)
    assert spec.name == "cpu-gloo-calibrated"
    assert spec.gemm_tflops["float32"] > 0
    assert spec.link_gbps == cm.DEVICES["cpu-gloo"].link_gbps
    cm.set_device_spec(spec)
    assert cm.device_spec_for("cpu") is spec
