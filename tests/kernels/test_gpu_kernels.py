"""Compiled Triton on a CUDA device against a float64 reference: both kernel paths (TMA and
pointer), every dtype (fp32 with TF32 on and off), the layouts the library launches and
the epilogues. Skipped without CUDA; run with ``FUSEDPAR_COMPILED_TRITON=1`` so the
kernels are compiled rather than interpreted (tests/conftest.py).
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from fusedpar.kernels import gated_matmul, interpreter, matmul
from fusedpar.kernels import plan_gated_matmul, plan_matmul
from tests.kernels._helpers import TOL, assert_close

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: compiled Triton on a GPU"),
    pytest.mark.skipif(interpreter.is_interpreting(),
                       reason="Triton is interpreted: run with FUSEDPAR_COMPILED_TRITON=1 to compile the kernels"),
]

# name -> (dtype, allow tf32)
DTYPES = {"bf16": (torch.bfloat16, False), "fp16": (torch.float16, False),
          "fp32-tf32": (torch.float32, True), "fp32-ieee": (torch.float32, False)}
# (M, N, K): TMA-aligned (16-byte rows) but no multiple of any tile; a decode row; a tiny one
SHAPES = [(1000, 1160, 520), (1, 4096, 4096), (257, 136, 72)]
# (layout, epilogue): every layout the library launches, each with an epilogue that runs it
CASES = [
    ("x@w.T", "bias_gelu"), ("x@w.T", "none"), ("x@w.T", "silu"), ("x@w.T", "gelu_tanh"), ("x@w.T", "relu"),
    ("dy@w", "none"), ("dy.T@x", "accumulate_fp32"), ("out_slice", "bias"), ("batched", "bias_silu"),
]


def _tol(dtype: torch.dtype, tf32: bool) -> float:
    return 2e-3 if (dtype == torch.float32 and tf32) else TOL[dtype] if dtype != torch.float32 else 1e-5


def _operands(layout, M, N, K, dtype, gen):
    dev = "cuda"
    r = lambda *s: torch.randn(*s, device=dev, generator=gen).to(dtype)  # noqa: E731
    if layout == "x@w.T":
        return r(M, K), r(N, K).T / math.sqrt(K)
    if layout == "dy@w":
        return r(M, K), r(K, N) / math.sqrt(K)
    if layout == "dy.T@x":
        return r(K, M).T, r(K, N) / math.sqrt(K)
    if layout == "out_slice":
        return r(M, K), r(N, K).T / math.sqrt(K)
    if layout == "batched":
        B, m = 3, max(1, M // 3)
        return r(B + 1, m + 5, K)[1:, 2:2 + m], r(N, K).T / math.sqrt(K)
    raise ValueError(layout)


def _out(layout, shape, dtype):
    """NaN-poisoned output; for out_slice a view at an odd column offset (TMA cannot take
    it), for batched the rows of each block of a bigger buffer."""
    if layout == "out_slice":
        big = torch.full((shape[0] + 3, shape[1] + 9), math.nan, device="cuda", dtype=dtype)
        return big, big[1:1 + shape[0], 1:1 + shape[1]]
    if layout == "batched":
        big = torch.full((shape[0], 2 * shape[1], shape[2]), math.nan, device="cuda", dtype=dtype)
        return big, big[:, shape[1]:]
    big = torch.full(shape, math.nan, device="cuda", dtype=dtype)
    return big, big


@pytest.fixture
def tf32(request):
    before = torch.backends.cuda.matmul.allow_tf32
    yield lambda on: setattr(torch.backends.cuda.matmul, "allow_tf32", on)
    torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.parametrize("path", ["tma", "pointer"])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("layout, epilogue", CASES, ids=[f"{a}-{b}" for a, b in CASES])
def test_compiled_matmul_matches_float64(layout, epilogue, dtype_name, path, tf32):
    dtype, allow_tf32 = DTYPES[dtype_name]
    tf32(allow_tf32)
    gen = torch.Generator(device="cuda").manual_seed(hash((layout, epilogue, dtype_name)) % 2**31)
    for M, N, K in SHAPES:
        a, b = _operands(layout, M, N, K, dtype, gen)
        has_bias = epilogue.startswith("bias")
        activation = {"bias_gelu": "gelu", "bias_silu": "silu", "silu": "silu", "gelu_tanh": "gelu_tanh",
                      "relu": "relu"}.get(epilogue)
        accumulate = epilogue == "accumulate_fp32"
        bias = torch.randn(N, device="cuda", generator=gen).to(dtype) if has_bias else None
        out_dtype = torch.float32 if accumulate else dtype
        big, out = _out(layout, (*a.shape[:-1], N), out_dtype)
        if accumulate:
            out.copy_(torch.randn(out.shape, device="cuda", generator=gen))
        before = out.double().clone()

        plan = plan_matmul(a, b, bias=bias, activation=activation, out=out, accumulate=accumulate)
        if path == "tma" and plan.path != "tma":
            continue  # out_slice, or a 1-row operand without aligned strides: the pointer rows cover it
        config = dataclasses.replace(plan.config, tma=path == "tma")
        matmul(a, b, bias=bias, activation=activation, out=out, accumulate=accumulate, kernel="triton",
               config=config)

        ref = a.double() @ b.double()
        if bias is not None:
            ref = ref + bias.double()
        ref = {None: lambda x: x, "gelu": F.gelu, "silu": F.silu, "relu": F.relu,
               "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}[activation](ref)
        if accumulate:
            ref = ref + before
        tol = _tol(dtype, allow_tf32)
        assert_close(out, ref, tol, f"{dtype_name} {layout} {epilogue} {path} {(M, N, K)}")
        outside = torch.ones_like(big, dtype=torch.bool)
        outside.as_strided(out.shape, out.stride(), out.storage_offset() - big.storage_offset()).fill_(False)
        assert big[outside].isnan().all(), f"{layout} {path}: wrote outside out"


@pytest.mark.parametrize("path", ["tma", "pointer"])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("return_preact", [False, True])
def test_compiled_gated_matches_float64(return_preact, dtype_name, path, tf32):
    dtype, allow_tf32 = DTYPES[dtype_name]
    tf32(allow_tf32)
    gen = torch.Generator(device="cuda").manual_seed(11)
    for M, N, K in [(1000, 584, 520), (1, 1792, 4096), (2048, 3584, 4096)]:
        a = torch.randn(M, K, device="cuda", generator=gen).to(dtype)
        w_cat = (torch.randn(2 * N, K, device="cuda", generator=gen) / K**0.5).to(dtype)
        b_gate, b_up = w_cat[:N].T, w_cat[N:].T
        out = torch.full((M, N), math.nan, device="cuda", dtype=dtype)
        plan = plan_gated_matmul(a, b_gate, b_up, out=out, return_preact=return_preact)
        assert plan.path == "tma", plan.reason  # H100: aligned halves of a concatenated weight
        config = dataclasses.replace(plan.config, tma=path == "tma")
        res = gated_matmul(a, b_gate, b_up, out=out, return_preact=return_preact, kernel="triton", config=config)
        gate_ref, up_ref = a.double() @ b_gate.double(), a.double() @ b_up.double()
        tol = _tol(dtype, allow_tf32)
        assert_close(out, F.silu(gate_ref) * up_ref, tol, f"{dtype_name} {path} y {(M, N, K)}")
        if return_preact:
            assert_close(res[1], gate_ref, tol, "gate")
            assert_close(res[2], up_ref, tol, "up")


def test_tma_is_chosen_for_the_layers_layouts_on_hopper():
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("TMA needs sm_90")
    x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(1024, 4096, device="cuda", dtype=torch.bfloat16)
    assert plan_matmul(x, w.T).path == "tma"                     # forward
    assert plan_matmul(x[:, :1024], w).path == "tma"             # dgrad: dy @ w
    assert plan_matmul(x.T, x[:, :1024]).path == "tma"           # wgrad: x.T @ dy
    odd = torch.empty(4096, 1031, device="cuda", dtype=torch.bfloat16)[:, 3:1027]
    plan = plan_matmul(x, w.T, out=odd)
    assert plan.path == "pointer" and "out's strides" in plan.reason


def test_num_sms_caps_the_persistent_grid():
    x = torch.randn(2048, 1024, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(2048, 1024, device="cuda", dtype=torch.bfloat16)
    for num_sms in (1, 7, 64):
        plan = plan_matmul(x, w.T, num_sms=num_sms)
        assert plan.grid == num_sms
        y = matmul(x, w.T, num_sms=num_sms, kernel="triton")
        assert_close(y, x.double() @ w.T.double(), TOL[torch.bfloat16], f"num_sms={num_sms}")
