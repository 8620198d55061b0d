"""Chunked collective + matmul schedules, forward and backward, and the unfused reference of each.

One file per schedule family: all_gather.py (all-gather + matmul), reduce_scatter.py
(matmul + reduce-scatter), all_reduce.py (matmul + all-reduce), backward.py (the
`*_with_wgrad` blocks), fp8_rows.py (fp8 rows packed with their scales), and spec.py, the
checks, shapes, layouts and caches each fused op shares with its reference.

Layouts, in one vocabulary everywhere: *shard* = split across ranks on the row (token)
dim, *full* = replicated / gathered, *partial* = a partial sum that a reduction completes.
`w` is always the caller's local `[K, N]` operand (`linear.weight.T` of a sharded linear,
a view, no copy).

    all_gather_matmul      all_gather(x_shard, dim) @ w                  ring of P2P sends
    matmul_reduce_scatter  reduce_scatter(x @ w, dim)                    chunked reduce-scatter
    matmul_all_reduce      all_reduce(x @ w)                             chunked all-reduce

and the backward blocks the tensor-parallel layers use, each overlapping a dgrad collective
with the wgrad GEMM:

    matmul_reduce_scatter_with_wgrad   column-parallel, sequence-parallel backward
    matmul_all_reduce_with_wgrad       column-parallel backward
    all_gather_matmul_with_wgrad       row-parallel, sequence-parallel backward

`chunks` is the number of pieces the schedule pipelines; 1 means no pipelining (one
collective and one GEMM, the right choice for decode-sized inputs). `chunks=None` asks the
cost model (fusedpar.costmodel), which decides from global shapes, world size, dtype and
device kind only, so every rank issues the same collectives in the same order.

fp8 (`x` and `w` in float8_e4m3fn / float8_e5m2, with `x_scale` / `w_scale` as for
`kernels.matmul`): the GEMMs run in fp8 and write `out_dtype` (bf16 by default).
`all_gather_matmul` gathers the fp8 rows with their per-row scales, half the bytes of bf16;
`matmul_reduce_scatter` and `matmul_all_reduce` reduce in `out_dtype`, never in fp8, because
the partial sums of different ranks have different ranges: summing them in fp8 would need a
common scale (one more collective, for the amax, before any data can move) and would round
every partial and every hop of the ring to 3 mantissa bits, where bf16/fp32 partials lose
nothing the fp8 GEMM had not already. The backward blocks take `dgrad_fp8=(wt_q, w_scale)`
to run the dgrad in fp8 (dy quantized to e5m2 per row) while the wgrad stays in dy's dtype.

Validation happens before the first collective is issued, so a bad argument raises on the
rank that has it instead of leaving its peers waiting. With `FUSEDPAR_DEBUG=1` (or
`debug=True`) ranks also compare a fingerprint of the call first (fusedpar.checks).
"""
from __future__ import annotations

from ..kernels import matmul  # noqa: F401  (the GEMM every schedule runs; tests/faults.py wraps it)
from .all_gather import (  # noqa: F401
    _pipeline_single_all_gather,
    _ring_all_gather,
    all_gather_matmul,
    all_gather_matmul_reference,
)
from .all_reduce import matmul_all_reduce, matmul_all_reduce_reference
from .backward import (  # noqa: F401
    _check_backward,
    _check_backward_args,
    _fp8_dgrad,
    _new_wgrad,
    _start_dgrad,
    all_gather_matmul_with_wgrad,
    matmul_all_reduce_with_wgrad,
    matmul_reduce_scatter_with_wgrad,
    weight_grad,
)
from .fp8_rows import _as_bytes, _fp8_row_layout, _pack_fp8_rows, _unpack_fp8_rows  # noqa: F401
from .reduce_scatter import matmul_reduce_scatter, matmul_reduce_scatter_reference
from .spec import (  # noqa: F401
    _CALL_PLANS,
    _CHUNK_PLANS,
    _PIPELINES,
    MAX_IN_FLIGHT,
    PendingOutput,
    _call_key,
    _check_chunks,
    _check_fp8,
    _check_operands,
    _check_out,
    _check_scatter_dim,
    _done,
    _epilogue,
    _fmt,
    _fp8_kw,
    _from_rows,
    _from_rows_out,
    _gathered_shape,
    _into,
    _Pipeline,
    _reference_product,
    _remember,
    _resolve_chunks,
    _scale_rows,
    _to_rows,
    split_rows,
)

__all__ = [
    "all_gather_matmul",
    "all_gather_matmul_reference",
    "matmul_reduce_scatter",
    "matmul_reduce_scatter_reference",
    "matmul_all_reduce",
    "matmul_all_reduce_reference",
    "matmul_reduce_scatter_with_wgrad",
    "matmul_all_reduce_with_wgrad",
    "all_gather_matmul_with_wgrad",
    "weight_grad",
    "PendingOutput",
    "split_rows",
]
