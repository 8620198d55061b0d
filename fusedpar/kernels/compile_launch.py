"""The launch the library itself would make for a :class:`~.compile_cases.Case`, built from
CPU tensors of the case's layout through the same planner and launch builders the kernels'
launchers use (:func:`~fusedpar.kernels.matmul._matmul_launch`,
:func:`~fusedpar.kernels.gated._gated_launch`, the grouped kernels' arguments). Nothing runs:
:mod:`.compile_cubin` compiles the launch for the case's target.
"""
from __future__ import annotations

from fusedpar.kernels.compile_cases import GROUPED_LAYOUTS, TARGETS, Case, parse_epilogue, torch_dtype

__all__ = ["build_launch"]


def _operands(case: Case):
    import torch

    dtype = b_dtype = torch_dtype(case.dtype)
    if case.dtype.startswith("float8_") and "-" in case.dtype:  # "float8_e5m2-e4m3fn": a's format, then b's
        b_dtype = getattr(torch, "float8_" + case.dtype.partition("-")[2])
    M, N, K = case.shape
    gated = parse_epilogue(case.epilogue).op == "gated"
    if case.layout == "x@w.T":  # x [M, K] @ w.T, w [N, K]: the Linear forward
        a = torch.empty(M, K, dtype=dtype)
        bs = [torch.empty(N, K, dtype=b_dtype).T for _ in range(1 + gated)]
    elif case.layout == "dy@w":  # dgrad: dy [M, K] @ w [K, N] (w row-major)
        a = torch.empty(M, K, dtype=dtype)
        bs = [torch.empty(K, N, dtype=b_dtype) for _ in range(1 + gated)]
    elif case.layout == "dy.T@x":  # wgrad: dy.T [M, K] (unit stride on M) @ x [K, N]
        a = torch.empty(K, M, dtype=dtype).T
        bs = [torch.empty(K, N, dtype=b_dtype) for _ in range(1 + gated)]
    elif case.layout in ("out_slice", "batched"):
        a = torch.empty(M, K, dtype=dtype)
        bs = [torch.empty(N, K, dtype=b_dtype).T for _ in range(1 + gated)]
        if case.layout == "batched":  # [B, m, K] rows of a received chunk, out rows of each block
            a = torch.empty(4, M // 4 + 8, K, dtype=dtype)[:, 8:]
    else:
        raise ValueError(f"unknown layout {case.layout!r}")
    out_dtype = torch.float32 if parse_epilogue(case.epilogue).accumulate else (
        torch.bfloat16 if dtype.itemsize == 1 else dtype)
    rows = a.shape[:-1]
    if case.layout == "out_slice":  # an odd column offset: TMA cannot take it
        out = torch.empty(*rows[:-1], rows[-1], N + 8, dtype=out_dtype)[..., 1:N + 1]
    elif case.layout == "batched":
        out = torch.empty(rows[0], rows[1] * 2, N, dtype=out_dtype)[:, rows[1]:]
    else:
        out = torch.empty(*rows, N, dtype=out_dtype)
    return a, bs, out


def _grouped_launch(case: Case):
    """The launch :func:`~fusedpar.kernels.grouped.grouped_matmul` (or its wgrad) would make."""
    import types

    import torch

    from fusedpar.kernels import grouped
    from fusedpar.kernels.common import _input_precision

    dtype = torch_dtype(case.dtype)
    torch.backends.cuda.matmul.allow_tf32 = case.dtype == "float32-tf32"
    (M, N, K), G = case.shape, 8
    fp8 = dtype.itemsize == 1
    x, ends = torch.empty(M, K, dtype=dtype), torch.empty(G, dtype=torch.int64)
    kind = "wgrad" if case.layout == "grouped_wgrad" else "fwd"
    precision = _input_precision(dtype, False)
    blocks = grouped._blocks(kind, precision, fp8=fp8)
    scaled = {}
    if kind == "fwd":
        w, y = torch.empty(G, N, K, dtype=dtype).transpose(1, 2), torch.empty(M, N, dtype=torch.bfloat16 if fp8
                                                                              else dtype)  # nn.Linear layout
        tiles = torch.empty(M // blocks["BLOCK_M"], dtype=torch.int32), torch.empty(M // blocks["BLOCK_M"],
                                                                                    dtype=torch.int64)
        xs, ws = (torch.empty(M, 1), torch.empty(G, N)) if fp8 else (y, y)
        fn, args = grouped._grouped_kernel, (x, w, y, xs, ws, *tiles, ends, N, K, *x.stride(), *w.stride(),
                                             *y.stride(), *((1, N, 1) if fp8 else (0, 0, 0)))
        scaled = dict(SCALED=fp8, MAX_IMPRECISE_ACC=blocks["BLOCK_K"] if fp8 else None)
    else:
        dy, dw = torch.empty(M, N, dtype=dtype), torch.empty(G, K, N, dtype=dtype)
        fn, args = grouped._grouped_wgrad_kernel, (x, dy, dw, ends, K, N, *x.stride(), *dy.stride(), *dw.stride())
    short = f"grp:{blocks['BLOCK_M']}x{blocks['BLOCK_N']}x{blocks['BLOCK_K']}/w4"
    plan = types.SimpleNamespace(path="grouped", config=types.SimpleNamespace(short=lambda: short))
    kwargs = dict(UPCAST_TO_FP32=False, INPUT_PRECISION=precision, **scaled, **blocks)
    return types.SimpleNamespace(fn=fn, args=args, kwargs=kwargs, plan=plan)


def build_launch(case: Case):
    """The launch :func:`~fusedpar.kernels.matmul.matmul` / ``gated_matmul`` / ``grouped_matmul`` would make."""
    import torch

    if case.layout in GROUPED_LAYOUTS:
        return _grouped_launch(case)

    import importlib

    from fusedpar.kernels import common, gated, plan

    mm = importlib.import_module("fusedpar.kernels.matmul")  # the module (the package exports the function)

    capability, sms, _ = TARGETS[case.target]
    torch.backends.cuda.matmul.allow_tf32 = case.dtype == "float32-tf32"
    a, bs, out = _operands(case)
    plan._PLAN_TARGET = (capability, sms)
    try:
        a3, out3 = common._as_batched(a, out)
        fp8 = a.dtype.itemsize == 1  # row-wise scales, as the layers use them
        a_scale = torch.empty((*a.shape[:-1], 1)) if fp8 else None
        b_scale = torch.empty(1, out.shape[-1]) if fp8 else None
        epi = parse_epilogue(case.epilogue)
        if epi.op == "gated":
            pre = epi.return_preact
            gate3 = torch.empty(out3.shape, dtype=out.dtype) if pre else out3
            up3 = torch.empty(out3.shape, dtype=out.dtype) if pre else out3
            return gated._gated_launch(a3, bs[0], bs[1], out3, gate3, up3, epi.activation, pre, None, case.config,
                                       scales=(a_scale, b_scale, b_scale) if fp8 else None,
                                       fast_accum=case.fast_accum)
        bias = torch.empty(out.shape[-1], dtype=out.dtype) if epi.bias else None
        return mm._matmul_launch(a3, bs[0], bias, out3, epi.activation, epi.accumulate, None, case.config,
                                 scales=(a_scale, b_scale) if fp8 else None, fast_accum=case.fast_accum)
    finally:
        plan._PLAN_TARGET = None
