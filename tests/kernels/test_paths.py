"""The two kernels of each op (TMA and pointer), the planner that picks one, and the tiles.

Run interpreted on CPU: the interpreter executes the TMA kernel's tensor-descriptor loads
and stores with the same zero-fill and clipping rules, so both paths are checked against
float64 here; the compiled kernels are checked on a GPU (test_gpu_kernels.py).
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from fusedpar.kernels import GemmConfig, gated_matmul, interpreter, matmul, plan_gated_matmul, plan_matmul
from fusedpar.kernels import configs
from fusedpar.kernels.plan import _offset_dtype
from tests.kernels._helpers import TOL, assert_close, make_a, make_b, reference_act

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
needs_interpreter = pytest.mark.skipif(
    not interpreter.is_interpreting(), reason="needs TRITON_INTERPRET=1 to run Triton on CPU")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# TMA-aligned in every dtype (rows of 16-byte multiples) but no multiple of any tile
SHAPE = (200, 136, 72)
# (name, bias, activation, accumulate)
EPILOGUES = [("none", False, None, False), ("bias_gelu", True, "gelu", False), ("silu", False, "silu", False),
             ("gelu_tanh", False, "gelu_tanh", False), ("relu", False, "relu", False),
             ("accumulate", True, "silu", True)]
# the layouts TMA takes: x @ w (b row-major), x @ w.T, dy.T @ x (a transposed), a batch
TMA_LAYOUTS = ["contiguous", "b_transposed", "a_transposed", "batched"]


@needs_interpreter
@pytest.mark.parametrize("path", ["tma", "pointer"])
@pytest.mark.parametrize("layout", TMA_LAYOUTS)
@pytest.mark.parametrize("epilogue", EPILOGUES, ids=lambda e: e[0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_both_paths_match_float64(dtype, epilogue, layout, path):
    name, has_bias, activation, accumulate = epilogue
    M, N, K = SHAPE
    gen = torch.Generator().manual_seed(hash((name, layout, path)) % 2**31)
    a = make_a(layout, M, K, dtype, gen)
    if layout == "batched":  # the schedule's chunk consumer: rows of a contiguous gathered buffer
        a = torch.randn(3, 70, K, generator=gen).to(dtype)[:, 2:69]
    b = make_b(layout, K, N, dtype, gen)
    bias = torch.randn(N, generator=gen).to(dtype) if has_bias else None
    rows = a.shape[:-1]
    # NaN-poisoned; for the batch, rows 8.. of each block of a bigger buffer (16-byte aligned)
    big = torch.full((rows[0], rows[1] + 8, N) if layout == "batched" else (*rows, N), math.nan, dtype=dtype)
    out = big[:, 8:] if layout == "batched" else big
    if accumulate:
        out.copy_(torch.randn(out.shape, generator=gen))
    before = out.double().clone()

    plan = plan_matmul(a, b, bias=bias, activation=activation, out=out, accumulate=accumulate)
    assert plan.path == "tma", plan.reason  # aligned: the planner's own choice is TMA
    config = dataclasses.replace(plan.config, tma=path == "tma")
    matmul(a, b, bias=bias, activation=activation, out=out, accumulate=accumulate, kernel="triton", config=config)

    ref = a.double() @ b.double()
    if bias is not None:
        ref = ref + bias.double()
    ref = reference_act(ref, activation)
    if accumulate:
        ref = ref + before
    assert_close(out, ref, TOL[dtype], f"{dtype} {name} {layout} {path}")
    if layout == "batched":
        assert big[:, :8].isnan().all(), "rows outside out were written"


@needs_interpreter
@pytest.mark.parametrize("path", ["tma", "pointer"])
@pytest.mark.parametrize("activation", ["silu", "gelu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gated_both_paths_match_float64(dtype, activation, path):
    M, N, K = SHAPE
    gen = torch.Generator().manual_seed(7)
    a = torch.randn(M, K, generator=gen).to(dtype)
    w_cat = torch.randn(2 * N, K, generator=gen).to(dtype)  # [gate; up]: halves of one weight
    b_gate, b_up = w_cat[:N].T, w_cat[N:].T
    out = torch.full((M, N), math.nan, dtype=dtype)
    plan = plan_gated_matmul(a, b_gate, b_up, activation=activation, out=out, return_preact=True)
    assert plan.path == "tma", plan.reason
    config = dataclasses.replace(plan.config, tma=path == "tma")
    y, gate, up = gated_matmul(a, b_gate, b_up, activation=activation, out=out, return_preact=True,
                               kernel="triton", config=config)
    g_ref, u_ref = a.double() @ b_gate.double(), a.double() @ b_up.double()
    assert_close(gate, g_ref, TOL[dtype], "gate")
    assert_close(up, u_ref, TOL[dtype], "up")
    assert_close(y, reference_act(g_ref, activation) * u_ref, TOL[dtype], f"{dtype} {activation} {path}")


@needs_interpreter
@pytest.mark.parametrize("num_sms", [1, 3])
def test_tma_persistent_grid_covers_every_tile(num_sms):
    """Fewer programs than tiles: each loops over its share, every tile written once."""
    gen = torch.Generator().manual_seed(8)
    a = torch.randn(3, 300, 72, generator=gen)[:, 10:290]  # [3, 280, 72]: 3 x 3 x 2 tiles
    w = torch.randn(136 * 2, 72, generator=gen)
    out = torch.full((3, 280, 272), math.nan)
    plan = plan_matmul(a, w.T, out=out, num_sms=num_sms)
    assert plan.path == "tma" and plan.grid == num_sms
    matmul(a, w.T, out=out, num_sms=num_sms, kernel="triton")
    assert_close(out, a.double() @ w.T.double(), TOL[torch.float32])


# ----------------------------------------------------------------------------------------
# The planner: why a path, and errors
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("make, reason", [
    (lambda: (torch.randn(20, 70), torch.randn(70, 48), None), "a's strides"),            # 70*4 B rows
    (lambda: (torch.randn(20, 64), torch.randn(64, 52)[:, :48], None), None),              # aligned slice
    (lambda: (torch.randn(20, 64), torch.randn(64, 52)[:, 1:49], None), "b's strides"),     # odd offset
    (lambda: (torch.randn(20, 64), torch.randn(64, 48), torch.empty(20, 57)[:, 1:49]), "out's strides"),
], ids=["a_unaligned", "b_aligned_slice", "b_odd_offset", "out_odd_offset"])
def test_plan_says_why_tma_cannot_run(make, reason):
    a, b, out = make()
    plan = plan_matmul(a, b, out=out)
    if reason is None:
        assert plan.path == "tma" and plan.reason == "TMA: operands aligned"
    else:
        assert plan.path == "pointer" and reason in plan.reason, plan.reason


def test_forcing_tma_where_it_cannot_run_raises():
    a, b = torch.randn(20, 70), torch.randn(70, 48)
    forced = GemmConfig(64, 64, 64, tma=True)
    match = r"matmul: config asks for the TMA kernel, which cannot run here: a's strides \(70, 1\)"
    with pytest.raises(ValueError, match=match.replace("matmul:", "plan_matmul:")):
        plan_matmul(a, b, config=forced)
    if interpreter.is_interpreting():
        with pytest.raises(ValueError, match=match):
            matmul(a, b, kernel="triton", config=forced)


def test_tf32_needs_k_major_operands():
    a = torch.randn(32, 64).T  # [64, 32] with unit stride on M: a wgrad's dy.T
    b = torch.randn(32, 48)
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        plan = plan_matmul(a, b)  # the same choice as on a GPU, though the interpreter computes fp32 exactly
        assert plan.path == "pointer" and "tf32 tensor cores need K-contiguous a and b" in plan.reason
        torch.backends.cuda.matmul.allow_tf32 = False  # plain fp32 FMA reads either orientation
        assert plan_matmul(a, b).path == "tma"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.parametrize("kwargs, match", [
    (dict(block_m=48, block_n=64, block_k=64), "block_m must be a power of two >= 16, got 48"),
    (dict(block_m=64, block_n=8, block_k=64), "block_n must be a power of two >= 16, got 8"),
    (dict(block_m=64, block_n=32, block_k=64, epilogue_split=4), "epilogue_split must be 1, 2 or 4 and leave"),
    (dict(block_m=64, block_n=64, block_k=64, num_warps=3), "num_warps must be a power of two"),
])
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GemmConfig(**kwargs)


def test_config_of_the_wrong_type_raises():
    with pytest.raises(TypeError, match="config must be a fusedpar.kernels.GemmConfig or None, got dict"):
        matmul(torch.randn(4, 8), torch.randn(8, 4), config={"block_m": 64})


def test_offsets_are_int32_unless_an_operand_spans_2_31_elements():
    import triton.language as tl

    small = torch.empty(8192, 28672, device="meta")
    huge = torch.empty(2, 2**31, device="meta")
    assert _offset_dtype([small, small.T]) == tl.int32
    assert _offset_dtype([small, huge]) == tl.int64


# ----------------------------------------------------------------------------------------
# Tiles
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_fit_epilogue_keeps_the_tma_kernel_in_shared_memory(dtype):
    big = GemmConfig(128, 256, 64 if dtype != torch.float32 else 32, num_warps=8, num_stages=3, epilogue_split=2,
                     tma=True)
    plain = configs.tma_smem_bytes(big, dtype, dtype)
    assert plain <= configs.SMEM_BYTES
    assert configs.fit_epilogue(big, dtype, dtype) == big
    # an fp32 main_grad read back and written (wgrad accumulate): twice the staging, twice wider
    fitted = configs.fit_epilogue(big, dtype, torch.float32, reads_out=True)
    assert configs.tma_smem_bytes(fitted, dtype, torch.float32, reads_out=True) <= configs.SMEM_BYTES
    assert fitted.epilogue_split > big.epilogue_split or fitted.num_stages < big.num_stages


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn],
                         ids=lambda d: str(d).split(".")[1])
def test_rules_pick_only_candidate_tiles(dtype, monkeypatch):
    # The compile check (compile_report) compiles the candidates: a tile the rules pick that
    # is not one of them would reach the GPU unchecked (it did: fp8 128x128 tiles that spill).
    # The rules are host arithmetic; the interpreter's one-tile shortcut is switched off here.
    monkeypatch.setattr(configs.interpreter, "is_interpreting", lambda: False)
    for op in ("matmul", "gated"):
        for tma in (True, False):
            for tensor_cores in ((True, False) if dtype == torch.float32 else (True,)):
                for reads_out in ((False, True) if op == "matmul" else (False,)):
                    cands = {c.short() for c in configs.candidate_configs(
                        op, dtype, tma, tensor_cores=tensor_cores, reads_out=reads_out)}
                    for M in (1, 16, 17, 33, 65, 100, 129, 2048, 8192, 65536):
                        for N in (64, 128, 1000, 4096, 28672):
                            for num_sms in (132, 108, 16):
                                cfg = configs.pick_config(op, M, N, 4096, dtype, tma=tma, num_sms=num_sms,
                                                          tensor_cores=tensor_cores, reads_out=reads_out)
                                assert cfg.short() in cands, (op, tma, tensor_cores, reads_out, M, N, cfg.short())
                                assert cfg.tma == tma


def test_m_class_rounds_up_to_a_power_of_two():
    assert [configs.m_class(m) for m in (1, 2, 3, 16, 17, 1000, 1024)] == [1, 2, 4, 16, 32, 1024, 1024]


def test_interpreter_tile_is_the_one_large_block():
    if not interpreter.is_interpreting():
        pytest.skip("only interpreted runs use the large-block tile")
    cfg = configs.pick_config("matmul", 16, 4096, 4096, torch.bfloat16, tma=True, num_sms=132)
    assert (cfg.block_m, cfg.block_n, cfg.block_k) == (128, 128, 64)
