"""gated_matmul: interpreted Triton and the torch backend against a float64 reference."""
from __future__ import annotations

import pytest
import torch

from fusedpar.kernels import ACTIVATIONS, gated_matmul
from fusedpar.kernels import interpreter
from tests.kernels._helpers import DTYPES, LAYOUTS, SHAPES, TOL, Out, assert_close, make_a, reference_act

# sigmoid's exp(-x) overflows to inf for very negative x in numpy (the result, 0, is right)
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")

needs_interpreter = pytest.mark.skipif(
    not interpreter.is_interpreting(), reason="needs TRITON_INTERPRET=1 to run Triton on CPU")
KERNELS = [pytest.param("triton", marks=needs_interpreter), "torch"]


def make_gate_up(layout: str, K: int, N: int, dtype: torch.dtype, gen: torch.Generator):
    """(b_gate, b_up) [K, N]: the two halves of one concatenated weight, as column slices
    of ``[K, 2N]`` or, for "b_transposed", as ``w_cat[:N].T, w_cat[N:].T`` of ``[2N, K]``."""
    if layout == "b_transposed":
        w_cat = torch.randn(2 * N, K, generator=gen).to(dtype)
        return w_cat[:N].T, w_cat[N:].T
    b_cat = torch.randn(K, 2 * N, generator=gen).to(dtype)
    return b_cat[:, :N], b_cat[:, N:]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("return_preact", [False, True], ids=["y", "preact"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("activation", ACTIVATIONS, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gated_matmul_matches_reference(dtype, activation, layout, shape, return_preact, kernel):
    M, N, K = shape
    gen = torch.Generator().manual_seed(hash((M, N, K, layout, activation)) % 2**31)
    a = make_a(layout, M, K, dtype, gen)
    b_gate, b_up = make_gate_up(layout, K, N, dtype, gen)
    out = Out(layout, (*a.shape[:-1], N), dtype)

    result = gated_matmul(a, b_gate, b_up, activation=activation, out=out.view,
                          return_preact=return_preact, kernel=kernel)

    gate_ref = a.double() @ b_gate.double()
    up_ref = a.double() @ b_up.double()
    y_ref = reference_act(gate_ref, activation) * up_ref
    what = f"{dtype} {activation} {layout} {shape} {kernel}"
    if return_preact:
        y, gate, up = result
        assert gate.shape == up.shape == y.shape and gate.dtype == up.dtype == dtype
        assert_close(gate, gate_ref, TOL[dtype], what + " gate")
        assert_close(up, up_ref, TOL[dtype], what + " up")
    else:
        y = result
    assert y.data_ptr() == out.view.data_ptr()
    assert_close(y, y_ref, TOL[dtype], what)
    out.assert_outside_untouched()


@pytest.mark.parametrize("kernel", KERNELS)
def test_gated_matmul_allocates_and_writes_fp32_out(kernel):
    gen = torch.Generator().manual_seed(7)
    a = torch.randn(2, 6, 40, generator=gen).half()
    w_gate, w_up = (torch.randn(24, 40, generator=gen).half() for _ in range(2))
    y = gated_matmul(a, w_gate.T, w_up.T, kernel=kernel)
    assert y.shape == (2, 6, 24) and y.dtype == torch.float16
    ref = torch.nn.functional.silu(a.double() @ w_gate.T.double()) * (a.double() @ w_up.T.double())
    assert_close(y, ref, TOL[torch.float16])
    out = torch.full((2, 6, 24), float("nan"))
    gated_matmul(a, w_gate.T, w_up.T, out=out, kernel=kernel)
    assert_close(out, ref, 1e-3)  # fp32 out: only the fp16 inputs were rounded


@pytest.mark.parametrize("make_call, error, match", [
    (lambda a, g, u: gated_matmul(a[0], g, u), ValueError, r"a must have at least 2 dims.*got shape \(8,\)"),
    (lambda a, g, u: gated_matmul(a, g[None], u), ValueError, r"b_gate must be 2-D.*got shape \(1, 8, 5\)"),
    (lambda a, g, u: gated_matmul(a, g, u[:7]), ValueError, r"b_up must have K=8 rows.*got shape \(7, 5\)"),
    (lambda a, g, u: gated_matmul(a, g, u[:, :4]), ValueError, r"b_up must have N=5 columns.*got shape \(8, 4\)"),
    (lambda a, g, u: gated_matmul(a, g, u.double()), TypeError, r"b_up must have the dtype of a \(torch.float32\), got torch.float64"),
    (lambda a, g, u: gated_matmul(a, g.to("meta"), u), ValueError, r"b_gate must be on a's device \(cpu\), got meta"),
    (lambda a, g, u: gated_matmul(a, g, u, out=torch.empty(6, 6)), ValueError, r"out must have shape .*\(6, 5\), got \(6, 6\)"),
    (lambda a, g, u: gated_matmul(a, g, u, out=torch.empty(6, 5).bfloat16()), TypeError, r"out must have dtype torch.float32, got torch.bfloat16"),
    (lambda a, g, u: gated_matmul(a, g, u, activation="swish"), ValueError, r"activation must be one of .*got 'swish'"),
    (lambda a, g, u: gated_matmul(a, g, u, kernel="fast"), ValueError, r"kernel must be one of .*got 'fast'"),
], ids=["a_rank", "b_gate_rank", "k_mismatch", "n_mismatch", "dtype_mismatch", "device_mismatch",
        "out_shape", "out_dtype", "activation", "kernel"])
def test_bad_input_raises_naming_the_argument(make_call, error, match):
    with pytest.raises(error, match=match):
        make_call(torch.randn(6, 8), torch.randn(8, 5), torch.randn(8, 5))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: compiled Triton vs torch")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_compiled_gated_matches_torch(dtype):
    gen = torch.Generator(device="cuda").manual_seed(8)
    for M, N, K in [(1, 1792, 4096), (1000, 1536, 520), (2048, 3584, 4096)]:
        a = torch.randn(M, K, device="cuda", generator=gen).to(dtype)
        w_cat = (torch.randn(2 * N, K, device="cuda", generator=gen) / K**0.5).to(dtype)
        y, gate, up = gated_matmul(a, w_cat[:N].T, w_cat[N:].T, return_preact=True, kernel="triton")
        gate_ref = a.double() @ w_cat[:N].T.double()
        up_ref = a.double() @ w_cat[N:].T.double()
        # fp32 inputs may run as tf32 when torch allows it: ~1e-3
        tol = 2e-3 if dtype == torch.float32 else TOL[dtype]
        assert_close(gate, gate_ref, tol)
        assert_close(up, up_ref, tol)
        assert_close(y, torch.nn.functional.silu(gate_ref) * up_ref, tol)


@pytest.mark.parametrize("kernel", KERNELS)
def test_gated_num_sms_caps_the_grid(kernel):
    gen = torch.Generator().manual_seed(10)
    a = make_a("batched", 257 * 3, 70, torch.float16, gen)
    b_gate, b_up = make_gate_up("b_transposed", 70, 130, torch.float16, gen)
    out = Out("batched", (*a.shape[:-1], 130), torch.float16)
    y, gate, up = gated_matmul(a, b_gate, b_up, activation="gelu", out=out.view, return_preact=True,
                               kernel=kernel, num_sms=2)
    gate_ref, up_ref = a.double() @ b_gate.double(), a.double() @ b_up.double()
    assert_close(gate, gate_ref, TOL[torch.float16])
    assert_close(y, torch.nn.functional.gelu(gate_ref) * up_ref, TOL[torch.float16])
    out.assert_outside_untouched()
    with pytest.raises(ValueError, match="num_sms must be None or a positive int, got 0"):
        gated_matmul(a, b_gate, b_up, num_sms=0)
