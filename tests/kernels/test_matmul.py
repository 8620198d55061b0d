"""matmul: interpreted Triton and the torch backend against a float64 reference."""
from __future__ import annotations

import importlib
import logging

import pytest
import torch

from fusedpar.kernels import ACTIVATIONS, matmul, resolve_kernel
from fusedpar.kernels import interpreter
from tests.kernels._helpers import (
    DTYPES, LAYOUTS, SHAPES, TOL, Out, assert_close, make_a, make_b, reference_act)

# sigmoid's exp(-x) overflows to inf for very negative x in numpy (the result, 0, is right)
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")

needs_interpreter = pytest.mark.skipif(
    not interpreter.is_interpreting(), reason="needs TRITON_INTERPRET=1 to run Triton on CPU")

# name -> (bias, activation, accumulate)
EPILOGUES = {
    "none": (False, None, False),
    "bias": (True, None, False),
    **{act: (False, act, False) for act in ACTIVATIONS if act is not None},
    "bias_gelu": (True, "gelu", False),
    "accumulate": (True, "silu", True),
}
KERNELS = [pytest.param("triton", marks=needs_interpreter), "torch"]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("epilogue", list(EPILOGUES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matmul_matches_reference(dtype, epilogue, layout, shape, kernel):
    M, N, K = shape
    has_bias, activation, accumulate = EPILOGUES[epilogue]
    gen = torch.Generator().manual_seed(hash((M, N, K, layout, epilogue)) % 2**31)
    a = make_a(layout, M, K, dtype, gen)
    b = make_b(layout, K, N, dtype, gen)
    bias = torch.randn(N, generator=gen).to(dtype) if has_bias else None
    out = Out(layout, (*a.shape[:-1], N), dtype)
    if accumulate:
        out.view.copy_(torch.randn(out.view.shape, generator=gen))
    before = out.view.double().clone()

    y = matmul(a, b, bias=bias, activation=activation, out=out.view, accumulate=accumulate, kernel=kernel)

    ref = a.double() @ b.double()
    if bias is not None:
        ref = ref + bias.double()
    ref = reference_act(ref, activation)
    if accumulate:
        ref = ref + before
    assert y.data_ptr() == out.view.data_ptr() and y.shape == out.view.shape
    assert_close(y, ref, TOL[dtype], f"{dtype} {epilogue} {layout} {shape} {kernel}")
    out.assert_outside_untouched()


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matmul_allocates_output_of_input_dtype(dtype, kernel):
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(2, 5, 40, generator=gen).to(dtype)  # leading dims flattened into M
    w = torch.randn(24, 40, generator=gen).to(dtype)
    y = matmul(a, w.T, kernel=kernel)
    assert y.shape == (2, 5, 24) and y.dtype == dtype and y.is_contiguous()
    assert_close(y, a.double() @ w.T.double(), TOL[dtype])


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_wgrad_accumulates_into_fp32_main_grad(dtype, kernel):
    """``main_grad += dy.T @ x`` with low-precision dy, x and an fp32 main_grad
    (Megatron's gradient_accumulation_fusion), everything read through strides."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(150, 70, generator=gen).to(dtype)
    dy = torch.randn(150, 90, generator=gen).to(dtype)
    main_grad = torch.randn(90, 70, generator=gen)
    ref = main_grad.double().clone()
    for _ in range(2):  # twice: the second call adds to the first
        matmul(dy.T, x, out=main_grad, accumulate=True, kernel=kernel)
        ref += dy.double().T @ x.double()
    # fp32 out: the product is never rounded to fp16/bf16, only its inputs were
    assert_close(main_grad, ref, 1e-5)


@pytest.mark.parametrize("kernel", KERNELS)
def test_batched_a_merges_but_out_does_not(kernel):
    """The all-gather consumer: ``a = gathered.view(world, m, K)[2:4]`` (contiguous) and
    ``out = big.view(world, m_total, N)[:, s:e]`` (batch dim that cannot merge)."""
    gen = torch.Generator().manual_seed(3)
    world, m, K, N, m_total = 4, 9, 48, 40, 30
    gathered = torch.randn(world * m, K, generator=gen)
    w = torch.randn(N, K, generator=gen)
    big = torch.full((world * m_total, N), float("nan"))
    a = gathered.view(world, m, K)[2:4]
    out = big.view(world, m_total, N)[2:4, 11:11 + m]
    matmul(a, w.T, out=out, kernel=kernel)
    assert_close(out, a.double() @ w.T.double(), TOL[torch.float32])
    written = torch.zeros_like(big, dtype=torch.bool)
    written.view(world, m_total, N)[2:4, 11:11 + m] = True
    assert big[~written].isnan().all()


@pytest.mark.parametrize("kernel", KERNELS)
def test_four_dim_out_that_does_not_view_as_3d(kernel):
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(2, 3, 5, 16, generator=gen).transpose(0, 1)  # [3, 2, 5, 16], unmergeable
    w = torch.randn(16, 20, generator=gen)
    big = torch.full((2, 3, 7, 20), float("nan"))
    out = big[:, :, 1:6].transpose(0, 1)  # [3, 2, 5, 20]
    matmul(a, w, out=out, activation="relu", kernel=kernel)
    assert_close(out, torch.relu(a.double() @ w.double()), TOL[torch.float32])


@pytest.mark.parametrize("kernel", KERNELS)
def test_empty_and_k_zero(kernel):
    a = torch.randn(0, 8)
    assert matmul(a, torch.randn(8, 4), kernel=kernel).shape == (0, 4)
    bias = torch.randn(4)
    y = matmul(torch.randn(3, 0), torch.randn(0, 4), bias=bias, activation="relu", kernel=kernel)
    assert_close(y, torch.relu(bias.double()).expand(3, 4), 1e-6)


def test_float64_runs_on_torch_and_triton_rejects_it():
    a, b = torch.randn(5, 7, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    assert_close(matmul(a, b, kernel="torch"), a @ b, TOL[torch.float64])
    assert_close(matmul(a, b), a @ b, TOL[torch.float64])  # auto picks torch for fp64
    if interpreter.is_interpreting():
        with pytest.raises(TypeError, match="kernel='triton'.*float64"):
            matmul(a, b, kernel="triton")


# ----------------------------------------------------------------------------------------
# Backend choice
# ----------------------------------------------------------------------------------------

def test_resolve_kernel(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_kernel("torch", cpu) == "torch"
    assert resolve_kernel("auto", cuda) == "triton"
    assert resolve_kernel("auto", cuda, torch.float64) == "torch"
    monkeypatch.setattr(interpreter, "_INTERPRETING", True)
    assert resolve_kernel("auto", cpu) == "triton"
    assert resolve_kernel("triton", cpu) == "triton"
    monkeypatch.setattr(interpreter, "_INTERPRETING", False)
    assert resolve_kernel("auto", cpu) == "torch"
    with pytest.raises(ValueError, match="kernel='triton' needs CUDA tensors.*TRITON_INTERPRET"):
        resolve_kernel("triton", cpu)
    with pytest.raises(ValueError, match="kernel must be one of.*'cutlass'"):
        resolve_kernel("cutlass", cpu)


def test_backend_choice_is_logged_once(caplog, monkeypatch):
    common = importlib.import_module("fusedpar.kernels.common")
    monkeypatch.setattr(common, "_logged_backends", set())
    with caplog.at_level(logging.INFO, logger="fusedpar"):
        for _ in range(3):
            matmul(torch.randn(4, 4), torch.randn(4, 4), kernel="torch")
    messages = [r.getMessage() for r in caplog.records if r.name == "fusedpar"]
    assert messages == ["fusedpar GEMMs on cpu tensors run on the torch backend"]


# ----------------------------------------------------------------------------------------
# Bad inputs: the error names the argument, the expected and the actual value
# ----------------------------------------------------------------------------------------

def _ok():
    return torch.randn(6, 8), torch.randn(8, 5)


@pytest.mark.parametrize("make_call, error, match", [
    (lambda a, b: matmul(a[0], b), ValueError, r"a must have at least 2 dims.*got shape \(8,\)"),
    (lambda a, b: matmul(a, b[None]), ValueError, r"b must be 2-D \[K, N\].*got shape \(1, 8, 5\)"),
    (lambda a, b: matmul(a, b[:7]), ValueError, r"b must have K=8 rows.*got shape \(7, 5\)"),
    (lambda a, b: matmul(a, b.half()), TypeError, r"b must have the dtype of a \(torch.float32\), got torch.float16"),
    (lambda a, b: matmul(a.int(), b.int()), TypeError, r"a must have dtype in .*got torch.int32"),
    (lambda a, b: matmul(a, b.to("meta")), ValueError, r"b must be on a's device \(cpu\), got meta"),
    (lambda a, b: matmul(a, "b"), TypeError, r"b must be a torch.Tensor, got str"),
    (lambda a, b: matmul(a, b, bias=torch.randn(4)), ValueError, r"bias must have shape \(N,\) = \(5,\), got \(4,\)"),
    (lambda a, b: matmul(a, b, bias=torch.randn(5).half()), TypeError, r"bias must have the dtype of a.*got torch.float16"),
    (lambda a, b: matmul(a, b, bias=torch.randn(5, device="meta")), ValueError, r"bias must be on a's device.*got meta"),
    (lambda a, b: matmul(a, b, out=torch.empty(6, 4)), ValueError, r"out must have shape .*\(6, 5\), got \(6, 4\)"),
    (lambda a, b: matmul(a, b, out=torch.empty(6, 5).half()), TypeError, r"out must have dtype torch.float32, got torch.float16"),
    (lambda a, b: matmul(a.half(), b.half(), out=torch.empty(6, 5).bfloat16()), TypeError, r"out must have dtype torch.float16 or torch.float32, got torch.bfloat16"),
    (lambda a, b: matmul(a, b, out=torch.empty(6, 5, device="meta")), ValueError, r"out must be on a's device.*got meta"),
    (lambda a, b: matmul(a, b, accumulate=True), ValueError, r"accumulate=True needs out=.*got out=None"),
    (lambda a, b: matmul(a, b, activation="tanh"), ValueError, r"activation must be one of .*got 'tanh'"),
    (lambda a, b: matmul(a, b, kernel="cuda"), ValueError, r"kernel must be one of .*got 'cuda'"),
], ids=["a_rank", "b_rank", "k_mismatch", "dtype_mismatch", "dtype_unsupported", "device_mismatch",
        "not_tensor", "bias_length", "bias_dtype", "bias_device", "out_shape", "out_dtype",
        "out_dtype_half", "out_device", "accumulate_without_out", "activation", "kernel"])
def test_bad_input_raises_naming_the_argument(make_call, error, match):
    with pytest.raises(error, match=match):
        make_call(*_ok())


# ----------------------------------------------------------------------------------------
# GPU: compiled Triton against torch
# ----------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: compiled Triton vs torch")
@pytest.mark.parametrize("allow_tf32", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_compiled_matches_torch(dtype, allow_tf32, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", allow_tf32)
    gen = torch.Generator(device="cuda").manual_seed(5)
    for M, N, K in [(1, 4096, 4096), (1000, 1536, 520), (2048, 2048, 1024)]:
        a = torch.randn(M, K, device="cuda", generator=gen).to(dtype)
        w = torch.randn(N, K, device="cuda", generator=gen).to(dtype) / K**0.5
        bias = torch.randn(N, device="cuda", generator=gen).to(dtype)
        y = matmul(a, w.T, bias=bias, activation="gelu_tanh", kernel="triton")
        ref = torch.nn.functional.gelu(a.double() @ w.T.double() + bias.double(), approximate="tanh")
        # tf32 rounds fp32 inputs to a 10-bit mantissa: ~1e-3 relative
        tol = 2e-3 if dtype == torch.float32 and allow_tf32 else TOL[dtype]
        assert_close(y, ref, tol, f"{dtype} tf32={allow_tf32} {M}x{N}x{K}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: compiled Triton vs torch")
def test_gpu_batched_strided_out_and_accumulate():
    gen = torch.Generator(device="cuda").manual_seed(6)
    world, m, K, N = 4, 300, 512, 768
    a = torch.randn(world, m + 8, K, device="cuda", generator=gen, dtype=torch.bfloat16)[:, 4:4 + m]
    w = torch.randn(N, K, device="cuda", generator=gen, dtype=torch.bfloat16)
    big = torch.randn(world, 2 * m, N, device="cuda", generator=gen)
    out = big[:, m:]
    before = out.double().clone()
    matmul(a, w.T, out=out, accumulate=True, kernel="triton")
    assert_close(out, before + a.double() @ w.T.double(), 1e-5)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("num_sms", [1, 3])
def test_num_sms_caps_the_grid_and_programs_loop_over_tiles(num_sms, kernel):
    """Fewer programs than tiles (3 batches x 3 x 2 tiles under the interpreter): every
    tile must still be written exactly once, accumulate included."""
    gen = torch.Generator().manual_seed(9)
    a = make_a("batched", 257 * 3, 70, torch.float32, gen)  # [3, 257, 70], unmergeable
    w = torch.randn(130, 70, generator=gen)
    bias = torch.randn(130, generator=gen)
    out = Out("batched", (*a.shape[:-1], 130), torch.float32)
    out.view.copy_(torch.randn(out.view.shape, generator=gen))
    ref = out.view.double() + torch.relu(a.double() @ w.T.double() + bias.double())
    matmul(a, w.T, bias=bias, activation="relu", out=out.view, accumulate=True, kernel=kernel, num_sms=num_sms)
    assert_close(out.view, ref, TOL[torch.float32])
    out.assert_outside_untouched()


@pytest.mark.parametrize("num_sms", [0, -2, 1.5, True])
def test_bad_num_sms(num_sms):
    with pytest.raises(ValueError, match=r"num_sms must be None or a positive int, got"):
        matmul(*_ok(), num_sms=num_sms)


@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"), reason="torch < 2.9 has no fp32_precision")
def test_fp32_runs_after_tf32_was_set_with_the_new_api():
    """Reading the legacy allow_tf32 flag after the new API was used raises in torch >= 2.9."""
    from fusedpar.kernels.common import _tf32_allowed

    before = torch.backends.cuda.matmul.fp32_precision
    try:
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        assert _tf32_allowed()
        a, b = torch.randn(20, 30), torch.randn(30, 10)
        for kernel in ("torch", "triton") if interpreter.is_interpreting() else ("torch",):
            torch.testing.assert_close(matmul(a, b, kernel=kernel), a @ b, rtol=1e-3, atol=1e-3)
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        assert not _tf32_allowed()
    finally:
        torch.backends.cuda.matmul.fp32_precision = before
