"""fp8 through the overlap schedules, on real gloo ranks: the gathered fp8 rows and scales,
the fp8 GEMM per piece, reductions in bf16/fp32, the fp8 dgrad of the backward blocks, and
the bytes the fp8 all-gather moves (measured: half of bf16's, plus 4 bytes of scale a row).

Every rank rebuilds every rank's operands from one seed and quantizes them with the torch
reference (bit-equal to the kernels, tests/kernels/test_fp8.py), so the float64 truth is the
product of the *dequantized* operands each rank actually used: the tolerance is the
schedule's own error (accumulation, and the bf16 rounding of the output and of the partial
sums), not fp8's. bf16 outputs: 2e-2, as for bf16 schedules (tests/test_overlap.py); fp32: 1e-5.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from fusedpar import overlap
from fusedpar.comm import TorchCommunicator
from fusedpar.kernels.quantize import dequantize, quantize_rowwise_reference, quantize_tensorwise_reference
from tests.test_overlap import rel_err

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
TOL = {torch.bfloat16: 2e-2, torch.float32: 1e-5}


def _q(x: torch.Tensor, scaling: str, dtype: torch.dtype = E4M3) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_rowwise_reference(x, dtype) if scaling == "row" else quantize_tensorwise_reference(x, dtype)


def _deq(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return dequantize(q, s, torch.float64)


def _randn(seed: int, *shape: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * torch.logspace(-1, 1, shape[-2])[:, None]


def _check(name: str, y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, case: str) -> None:
    assert y.shape == ref.shape and y.dtype == dtype, f"{name} {case}: {list(y.shape)} {y.dtype}"
    err = rel_err(y, ref)
    assert err <= TOL[dtype], f"{name} {case}: relative error {err:.3g} > {TOL[dtype]:.0e}"


def _weight(seed: int, n: int, k: int, scaling: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An nn.Linear-style weight [n, k] quantized per output row; returns (b, b_scale, deq b):
    b = w_q.T [k, n] K-major, b_scale [1, n] (or per tensor)."""
    w_q, w_s = _q(_randn(seed, n, k), scaling)
    b_s = w_s.T if scaling == "row" else w_s
    return w_q.T, b_s, _deq(w_q, w_s).T


# ---------------------------------------------------------------------------------------------
# Forward schedules
# ---------------------------------------------------------------------------------------------


def _run_fp8_schedules(group, *, kernel: str, chunk_values: list[int | None]):
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    m, k, n = 9, 48, 32
    for scaling in ("row", "tensor"):
        for out_dtype in (torch.bfloat16, torch.float32):
            for c in chunk_values:
                case = f"rank {rank}/{world} {kernel} {scaling} -> {out_dtype} chunks={c}"
                # all_gather_matmul, on the sequence dim of [batch, seq, K] (dim 1): each rank
                # quantizes its own shard, so per-tensor scales differ across ranks
                xs = [_q(_randn(100 + r, 2, m, k), scaling) for r in range(world)]
                b, b_s, b64 = _weight(7, n, k, scaling)
                bias = torch.randn(n, generator=torch.Generator().manual_seed(3))
                x_q, x_s = xs[rank]
                out = torch.full((2, m * world, n), float("nan"), dtype=out_dtype)
                y, x_full, s_full = overlap.all_gather_matmul(
                    x_q, b, x_scale=x_s, w_scale=b_s, bias=bias, activation="gelu", dim=1, chunks=c, out=out,
                    return_gathered=True, group=group, kernel=kernel)
                x64 = torch.cat([_deq(q, s) for q, s in xs], dim=1)
                ref = F.gelu(x64 @ b64 + bias.double())
                assert y is out, case
                _check("all_gather_matmul", y, ref, out_dtype, case)
                assert torch.equal(x_full.view(torch.uint8), torch.cat([q for q, _ in xs], 1).view(torch.uint8)), case
                assert torch.equal(_deq(x_full, s_full), x64), f"{case}: gathered scales"
                y_ref = overlap.all_gather_matmul_reference(x_q, b, x_scale=x_s, w_scale=b_s, bias=bias,
                                                            activation="gelu", dim=1, out_dtype=out_dtype, group=group)
                _check("all_gather_matmul_reference", y_ref, ref, out_dtype, case)

                # matmul_reduce_scatter / matmul_all_reduce: every rank holds a K-shard of x and w
                parts = [(_q(_randn(200 + r, m * world, k), scaling), _weight(300 + r, n, k, scaling))
                         for r in range(world)]
                (x_q, x_s), (b, b_s, _) = parts[rank]
                full = sum(_deq(q, s) @ b64_ for (q, s), (_, _, b64_) in parts)
                y = overlap.matmul_reduce_scatter(x_q, b, x_scale=x_s, w_scale=b_s, bias=bias, activation="relu",
                                                  chunks=c, out_dtype=out_dtype, group=group, kernel=kernel)
                _check("matmul_reduce_scatter", y, F.relu(full.chunk(world)[rank] + bias.double()), out_dtype, case)
                y = overlap.matmul_all_reduce(x_q, b, x_scale=x_s, w_scale=b_s, bias=bias, chunks=c,
                                              out_dtype=out_dtype, group=group, kernel=kernel)
                _check("matmul_all_reduce", y, full + bias.double(), out_dtype, case)
                for fn, want in ((overlap.matmul_reduce_scatter_reference, full.chunk(world)[rank]),
                                 (overlap.matmul_all_reduce_reference, full)):
                    y = fn(x_q, b, x_scale=x_s, w_scale=b_s, out_dtype=out_dtype, group=group)
                    _check(fn.__name__, y, want, out_dtype, case)
    return True


def test_fp8_schedules_match_float64_of_dequantized_operands_torch_kernel(dist2):
    dist2.run(_run_fp8_schedules, kernel="torch", chunk_values=[1, 2, 3, None])


def test_fp8_schedules_match_float64_triton_interpreted(dist2):
    dist2.run(_run_fp8_schedules, kernel="triton", chunk_values=[1, 4])


def test_fp8_schedules_4_ranks(dist4):
    dist4.run(_run_fp8_schedules, kernel="torch", chunk_values=[4, 8])


# ---------------------------------------------------------------------------------------------
# Backward blocks with an fp8 dgrad
# ---------------------------------------------------------------------------------------------


def _run_fp8_backward_blocks(group, *, kernel: str, chunks: int):
    """dx from e5m2(dy * w_scale) @ w_q (the fp8 weight's K-major copy) against float64 of
    exactly those operands; dw from the unquantized dy and x, in the fp32 master's dtype."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    m, k, n = 6, 32, 48
    case = f"rank {rank}/{world} {kernel} chunks={chunks}"
    for scaling in ("row", "tensor"):
        w_master = _randn(11, n, k)                  # the nn.Linear weight [N, K], fp32
        w_q, w_s = _q(w_master, scaling)
        wt_q = w_q.t().contiguous().t()              # [N, K] stored K-major: the TMA layout
        ws = w_s.reshape(-1)                         # per N (or one)
        w = w_master.t()                             # the schedule's [K, N] operand (dw's shape and dtype)

        # column-parallel, sequence-parallel: dx_shard = reduce_scatter(dy @ w.T), dw = x.T @ dy
        dy = _randn(20 + rank, m * world, n).bfloat16()        # each rank's own dy_part
        x_full = _randn(30, m * world, k).bfloat16()
        dx, dw = overlap.matmul_reduce_scatter_with_wgrad(
            dy, w, x_full, x_is_gathered=True, chunks=chunks, group=group, kernel=kernel, dgrad_fp8=(wt_q, ws))
        dys = [_randn(20 + r, m * world, n).bfloat16() for r in range(world)]
        ref = sum(_deq_dgrad(d, w_q, ws) for d in dys)
        _check("rs dgrad", dx, ref.chunk(world)[rank], torch.bfloat16, case + f" {scaling}")
        assert dw.dtype == torch.float32
        _check("rs wgrad", dw, x_full.double().T @ dy.double(), torch.float32, case)

        # column-parallel: dx = all_reduce(dy @ w.T)
        dx, dw = overlap.matmul_all_reduce_with_wgrad(dy, w, x_full, chunks=chunks, group=group, kernel=kernel,
                                                      dgrad_fp8=(wt_q, ws))
        _check("ar dgrad", dx, ref, torch.bfloat16, case)
        _check("ar wgrad", dw, x_full.double().T @ dy.double(), torch.float32, case)

        # row-parallel, sequence-parallel: dx = all_gather(dy_shard) @ w.T, dw = x.T @ all_gather(dy_shard)
        dy_shard = dys[rank][:m]
        x_part = _randn(40 + rank, m * world, k).bfloat16()
        dx, dw = overlap.all_gather_matmul_with_wgrad(dy_shard, w, x_part, chunks=chunks, group=group,
                                                       kernel=kernel, dgrad_fp8=(wt_q, ws))
        dy_full = torch.cat([d[:m] for d in dys])
        _check("ag dgrad", dx, _deq_dgrad(dy_full, w_q, ws), torch.bfloat16, case)
        _check("ag wgrad", dw, x_part.double().T @ dy_full.double(), torch.float32, case)
    return True


def _deq_dgrad(dy: torch.Tensor, w_q: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    """float64 of what the fp8 dgrad multiplies: e5m2(dy * w_scale) rows times the e4m3 weight."""
    dq, ds = quantize_rowwise_reference(dy, E5M2, col_scale=ws)
    return _deq(dq, ds) @ w_q.double()


def test_fp8_dgrad_backward_blocks_torch_kernel(dist2):
    dist2.run(_run_fp8_backward_blocks, kernel="torch", chunks=3)


def test_fp8_dgrad_backward_blocks_triton_interpreted(dist2):
    dist2.run(_run_fp8_backward_blocks, kernel="triton", chunks=2)


# ---------------------------------------------------------------------------------------------
# Bytes moved by the all-gather
# ---------------------------------------------------------------------------------------------


class _CountingCommunicator(TorchCommunicator):
    """The real gloo communicator, counting the bytes this rank receives, per dtype."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        super().__init__(group)
        self.received: dict[str, int] = {}

    def _count(self, t: torch.Tensor, nbytes: int) -> None:
        key = str(t.dtype).removeprefix("torch.")
        self.received[key] = self.received.get(key, 0) + nbytes

    def send_recv(self, send, dst, recv, src):
        self._count(recv, recv.numel() * recv.element_size())
        return super().send_recv(send, dst, recv, src)

    def all_gather(self, output, input):
        self._count(output, (output.numel() - input.numel()) * output.element_size())
        return super().all_gather(output, input)


def _run_gathered_bytes(group):
    world = dist.get_world_size(group)
    m, k, n = 40, 256, 32
    x = _randn(1, m, k)
    w = _randn(2, n, k)
    results = {}
    for chunks in (1, 2, 4):
        comm_bf16, comm_fp8 = _CountingCommunicator(group), _CountingCommunicator(group)
        overlap.all_gather_matmul(x.bfloat16(), w.bfloat16().T, chunks=chunks, group=comm_bf16, kernel="torch")
        x_q, x_s = quantize_rowwise_reference(x, E4M3)
        w_q, w_s = quantize_rowwise_reference(w, E4M3)
        overlap.all_gather_matmul(x_q, w_q.T, x_scale=x_s, w_scale=w_s.T, chunks=chunks, group=comm_fp8,
                                  kernel="torch")
        bf16, fp8 = comm_bf16.received, comm_fp8.received
        rows = (world - 1) * m  # every other rank's rows arrive here
        assert bf16 == {"bfloat16": rows * k * 2}, bf16
        # one packed message per piece: each row's K fp8 bytes, then its fp32 scale, padded to 16
        assert fp8 == {"uint8": rows * (k + 16)}, fp8
        results[chunks] = (rows * k / bf16["bfloat16"], fp8["uint8"] / bf16["bfloat16"])
    return results


def test_fp8_all_gather_moves_half_the_bytes_of_bf16(dist2):
    results = dist2.run(_run_gathered_bytes)
    for per_rank in results:
        for chunks, (data_ratio, total_ratio) in per_rank.items():
            assert data_ratio == 0.5, (chunks, data_ratio)  # the activations: exactly half
            # with the 16 bytes of scale and alignment per row: (K + 16) / 2K, 0.531 at K = 256
            # (0.502 at K = 4096)
            assert total_ratio == (256 + 16) / (2 * 256), (chunks, total_ratio)


# ---------------------------------------------------------------------------------------------
# Bad fp8 arguments raise before any collective
# ---------------------------------------------------------------------------------------------


def _run_fp8_bad_inputs(group):
    x_q = torch.zeros(4, 16, dtype=E4M3)
    b = torch.zeros(16, 8, dtype=E4M3)
    cases = [
        (lambda: overlap.all_gather_matmul(x_q, b.bfloat16(), group=group), TypeError,
         "w: expected dtype torch.float8_e4m3fn (the dtype of x_shard) or another fp8 dtype, got torch.bfloat16"),
        (lambda: overlap.all_gather_matmul(x_q, b, x_scale=torch.ones(4), group=group), ValueError,
         "x_scale: expected one element (per tensor) or shape [4, 1], got [4]"),
        (lambda: overlap.matmul_reduce_scatter(x_q, b, w_scale=torch.ones(1, 8, dtype=torch.float64), group=group),
         TypeError, "w_scale: expected a float32 tensor on cpu, got torch.float64 on cpu"),
        (lambda: overlap.matmul_all_reduce(x_q, b, out_dtype=E4M3, group=group), TypeError,
         "out_dtype: expected one of"),
        (lambda: overlap.matmul_all_reduce(x_q.float(), b.float(), x_scale=torch.ones(()), group=group), TypeError,
         "x_scale: applies to fp8 operands only, but x has dtype torch.float32"),
        (lambda: overlap.matmul_all_reduce_with_wgrad(torch.zeros(4, 8), torch.zeros(16, 8), torch.zeros(4, 16),
                                                      group=group, dgrad_fp8=(b, None)), TypeError,
         "dgrad_fp8: expected wt_q of an fp8 dtype and shape [8, 16] (w.T), got torch.float8_e4m3fn [16, 8]"),
    ]
    for call, error, message in cases:
        try:
            call()
        except error as e:
            assert message in str(e), f"expected {message!r}, got {e!r}"
        else:
            raise AssertionError(f"expected {error.__name__}: {message}")
    return True


def test_fp8_bad_input_raises_before_any_collective(dist2):
    dist2.run(_run_fp8_bad_inputs)
