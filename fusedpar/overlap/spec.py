"""The op spec every schedule and its unfused reference share: argument checks, output
shapes and dtypes, the row layout, chunk resolution, the per-call-key caches, the
compute/comm fork-join (`_Pipeline`) and `PendingOutput`.

Each check exists once: a forward op and its reference both pass their arguments through
`check_call`, which returns the call's `OpSpec`; `reference_of(fused)` gives a reference
the fused op's signature and runs it on that same path.

Row layout: a schedule views `x [..., M, ..., K]` split or gathered on `dim` as `[rows, K]`
with `dim` outermost (`_to_rows`), runs its GEMMs and collectives on rows, and puts the
output `[rows, N]` back with `dim` in place (`_from_rows`). fp8 operands carry one float32
scale per row (`_scale_rows`, `[rows, 1]`); outputs are `out_dtype` (bf16 by default).
"""
from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import checks, costmodel
from ..comm import CollectiveHandle, Communicator, get_communicator
from ..kernels import ACTIVATIONS
from ..kernels.fp8 import FP8_OUT_DTYPES, is_fp8, torch_scaled_product
from ..streams import StreamSet


MAX_IN_FLIGHT = 2  # reduce-scatter buffers alive at once: double buffering bounds extra memory


def split_rows(n: int, chunks: int) -> list[tuple[int, int]]:
    """`n` rows cut into `chunks` contiguous (start, stop) pieces of sizes differing by ≤ 1.

    Empty pieces are dropped, so `chunks > n` (few tokens) just yields fewer pieces.
    """
    base, extra = divmod(n, chunks)
    pieces, start = [], 0
    for i in range(chunks):
        stop = start + base + (1 if i < extra else 0)
        if stop > start:
            pieces.append((start, stop))
        start = stop
    return pieces


def _fmt(t: Tensor) -> str:
    return f"{list(t.shape)} {str(t.dtype).removeprefix('torch.')} on {t.device}"


def _check_operands(
    x: Tensor, w: Tensor, bias: Tensor | None, activation: str | None, *, x_name: str, dim: int | None
) -> int:
    """Check the local operands of `x @ w (+ bias)`; return `dim` normalised (or -1)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{x_name}: expected a torch.Tensor, got {type(x).__name__}")
    if not isinstance(w, Tensor):
        raise TypeError(f"w: expected a torch.Tensor, got {type(w).__name__}")
    if x.ndim < 2:
        raise ValueError(f"{x_name}: expected at least 2 dims [..., K], got shape {list(x.shape)}")
    if w.ndim != 2:
        raise ValueError(f"w: expected 2 dims [K, N], got shape {list(w.shape)}")
    if x.shape[-1] != w.shape[0]:
        raise ValueError(
            f"w: expected shape [K, N] with K = {x_name}.shape[-1] = {x.shape[-1]}, got {list(w.shape)}"
        )
    fp8 = is_fp8(x.dtype)
    if x.dtype != w.dtype and not (fp8 and is_fp8(w.dtype)):
        also = " or another fp8 dtype" if fp8 else ""
        raise TypeError(f"w: expected dtype {x.dtype} (the dtype of {x_name}){also}, got {w.dtype}")
    if x.device != w.device:
        raise ValueError(f"w: expected device {x.device} (the device of {x_name}), got {w.device}")
    if bias is not None:
        if bias.shape != (w.shape[1],):
            raise ValueError(f"bias: expected shape [{w.shape[1]}] (N of w), got {list(bias.shape)}")
        ok = bias.dtype in FP8_OUT_DTYPES if fp8 else bias.dtype == x.dtype
        if not ok or bias.device != x.device:
            want = f"one of {FP8_OUT_DTYPES}" if fp8 else str(x.dtype)
            raise TypeError(f"bias: expected {want} on {x.device}, got {bias.dtype} on {bias.device}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
    if dim is None:
        return -1
    if not -x.ndim <= dim < x.ndim - 1:
        raise ValueError(f"dim: expected a row dim of {x_name} (not the last, K), in [-{x.ndim}, {x.ndim - 2}], got {dim}")
    return dim % x.ndim


def _check_out(out: Tensor | None, shape: Sequence[int], like: Tensor, *, name: str = "out",
               dtype: torch.dtype | None = None) -> None:
    if out is None:
        return
    if list(out.shape) != list(shape):
        raise ValueError(f"{name}: expected shape {list(shape)}, got {list(out.shape)}")
    if out.dtype != (dtype or like.dtype):
        raise TypeError(f"{name}: expected dtype {dtype or like.dtype}, got {out.dtype}")
    if out.device != like.device:
        raise ValueError(f"{name}: expected device {like.device}, got {out.device}")


def _check_fp8(x: Tensor, w: Tensor, x_scale: Tensor | None, w_scale: Tensor | None, out_dtype: torch.dtype | None,
               *, x_name: str, out: Tensor | None = None) -> torch.dtype:
    """Check the fp8 arguments of a schedule; return the output dtype: x's own without fp8;
    with fp8 `out_dtype`, else `out`'s, else bf16."""
    if not is_fp8(x.dtype):
        for name, v in (("x_scale", x_scale), ("w_scale", w_scale)):
            if v is not None:
                raise TypeError(f"{name}: applies to fp8 operands only, but {x_name} has dtype {x.dtype}")
        if out_dtype is not None and out_dtype != x.dtype:
            raise TypeError(f"out_dtype: expected None or {x.dtype} (the dtype of {x_name}), got {out_dtype}")
        return x.dtype
    for name, v, shape in (("x_scale", x_scale, [*x.shape[:-1], 1]), ("w_scale", w_scale, [1, w.shape[1]])):
        if v is None:
            continue
        if not isinstance(v, Tensor) or v.dtype != torch.float32 or v.device != x.device:
            got = f"{v.dtype} on {v.device}" if isinstance(v, Tensor) else type(v).__name__
            raise TypeError(f"{name}: expected a float32 tensor on {x.device}, got {got}")
        if v.numel() != 1 and list(v.shape) != shape:
            raise ValueError(f"{name}: expected one element (per tensor) or shape {shape}, got {list(v.shape)}")
    if out_dtype is not None and out_dtype not in FP8_OUT_DTYPES:
        raise TypeError(f"out_dtype: expected one of {FP8_OUT_DTYPES} for fp8 operands, got {out_dtype}")
    if out_dtype is None and isinstance(out, Tensor) and out.dtype in FP8_OUT_DTYPES:
        return out.dtype
    return out_dtype or torch.bfloat16


def _scale_rows(x_scale: Tensor | None, x: Tensor, dim: int) -> Tensor:
    """An fp8 operand's scales as one float32 per row of `_to_rows(x, dim)`, `[rows, 1]`
    contiguous (a per-tensor scale repeated: gathered rows of different ranks need their own)."""
    if x_scale is None:
        x_scale = torch.ones((), dtype=torch.float32, device=x.device)
    rows, _ = _to_rows(x_scale.reshape(()).expand(*x.shape[:-1], 1) if x_scale.numel() == 1 else x_scale, dim)
    return rows.contiguous()


def _fp8_kw(a_scale: Tensor | None, w_scale: Tensor | None, fp8: bool) -> dict[str, Tensor | None]:
    """The scale arguments of `kernels.matmul` for one piece (none without fp8)."""
    return {"a_scale": a_scale, "b_scale": w_scale} if fp8 else {}


def _check_scatter_dim(x: Tensor, dim: int, world: int) -> None:
    if x.shape[dim] % world:
        raise ValueError(
            f"x.shape[{dim}]: expected a multiple of the group's world size {world} "
            f"(reduce-scatter splits it evenly), got {x.shape[dim]}"
        )


def _check_chunks(chunks: int | None) -> None:
    if chunks is not None and (not isinstance(chunks, int) or isinstance(chunks, bool) or chunks < 1):
        raise ValueError(f"chunks: expected None or an int >= 1, got {chunks!r}")


def _to_rows(x: Tensor, dim: int) -> tuple[Tensor, tuple[int, ...]]:
    """View (or, for dim != 0, copy) `x` as `[rows, K]` with `dim` outermost; return the row shape."""
    moved = x.movedim(dim, 0) if dim != 0 else x
    return moved.reshape(-1, x.shape[-1]), tuple(moved.shape[:-1])


def _from_rows(y: Tensor, row_shape: Sequence[int], dim: int) -> Tensor:
    """Inverse of `_to_rows` for an output `[rows, N]`: contiguous, with `dim` back in place."""
    y = y.view(*row_shape, y.shape[-1])
    return y.movedim(0, dim).contiguous() if dim != 0 else y


def _epilogue(y: Tensor, bias: Tensor | None, activation: str | None) -> None:
    """Bias and activation applied in place after a reduction (they must not be summed twice)."""
    if bias is not None:
        y.add_(bias)
    if activation == "relu":
        y.relu_()
    elif activation == "silu":
        y.copy_(F.silu(y))
    elif activation == "gelu":
        y.copy_(F.gelu(y))
    elif activation == "gelu_tanh":
        y.copy_(F.gelu(y, approximate="tanh"))


def _resolve_chunks(
    chunks: int | None, op: str, *, m: int, n: int, k: int, world: int, x: Tensor, dtype: torch.dtype | None = None
) -> int:
    """The chunk count to run: the caller's, or the cost model's choice from global shapes
    (in `dtype`, default x's: an fp8 reduction passes its output dtype, whose bytes move)."""
    if chunks is not None:
        return chunks
    dtype = dtype or x.dtype
    # the plan is a pure function of the shapes and the device spec: chosen once per key
    key = (op, m, n, k, world, dtype, x.device, costmodel._generation)
    found = _CHUNK_PLANS.get(key)
    if found is None:
        if len(_CHUNK_PLANS) >= 4096:  # shapes that keep changing (varying batches): bound it
            _CHUNK_PLANS.clear()
        found = _CHUNK_PLANS[key] = costmodel.choose_chunks(
            op, m=m, n=n, k=k, world_size=world, dtype=dtype, device=costmodel.device_spec_for(x.device)
        )
    return found


_CHUNK_PLANS: dict[tuple, int] = {}


def _call_key(x: Any, w: Any, bias: Any, out: Any, activation: Any, chunks: Any, out_dtype: Any,
              world: int) -> tuple | None:
    """What a schedule's checks and chunk plan depend on, or None where that is not plain
    tensors and hashable knobs (then the call is checked in full, and raises if it must)."""
    if not (isinstance(x, Tensor) and isinstance(w, Tensor) and (bias is None or isinstance(bias, Tensor))
            and (out is None or isinstance(out, Tensor)) and isinstance(activation, (str, type(None)))
            and isinstance(chunks, (int, type(None))) and isinstance(out_dtype, (torch.dtype, type(None)))):
        return None
    return (x.shape, x.dtype, x.device, w.shape, w.dtype, w.device,
            None if bias is None else (bias.shape, bias.dtype, bias.device),
            None if out is None else (out.shape, out.dtype, out.device),
            activation, chunks, out_dtype, world, costmodel._generation)


_CALL_PLANS: dict[tuple, tuple] = {}


def _remember(key: tuple, plan: tuple) -> None:
    if len(_CALL_PLANS) >= 4096:  # shapes that keep changing (varying batches): bound it
        _CALL_PLANS.clear()
    _CALL_PLANS[key] = plan


class _Pipeline:
    """Fork/join between the compute stream and the comm stream for one schedule.

    On CPU both are the host thread and each call is a plain call; on GPU, collectives are
    issued with the comm stream current, so NCCL orders them after exactly what the comm
    stream waited on (not after every GEMM queued on the compute stream before them).
    """

    def __init__(self, device: torch.device) -> None:
        self.streams = StreamSet.for_device(device)
        self.cuda = device.type == "cuda"

    @staticmethod
    def for_device(device: torch.device) -> _Pipeline:
        """One per device (it holds only the device's streams, read at use time)."""
        found = _PIPELINES.get(device)
        if found is None:
            found = _PIPELINES[device] = _Pipeline(device)
        return found

    def issue(self, start: Callable[[], CollectiveHandle], *, after: CollectiveHandle | None = None) -> CollectiveHandle:
        """Issue a collective ordered after the compute stream so far, or only after `after`."""
        if not self.cuda:
            if after is not None:
                after.wait()
            return start()
        comm, compute = self.streams.comm, self.streams.compute
        if after is None:
            comm.wait_stream(compute)
        with torch.cuda.stream(comm):
            if after is not None:
                after.wait()
            return start()


_PIPELINES: dict[torch.device, _Pipeline] = {}


class PendingOutput:
    """The output of a schedule whose last collectives are still in flight (`async_op=True`).

    `wait()` orders the caller after them, applies the epilogue and returns the output.
    """

    def __init__(self, finish: Callable[[], Tensor]) -> None:
        self._finish: Callable[[], Tensor] | None = finish
        self._value: Tensor | None = None

    def wait(self) -> Tensor:
        if self._finish is not None:
            self._value, self._finish = self._finish(), None
        assert self._value is not None
        return self._value


def _gathered_shape(row_shape: Sequence[int], world: int) -> tuple[int, ...]:
    """The row shape (gathered dim first) of `world` shards gathered on their first dim."""
    return (row_shape[0] * world, *row_shape[1:])


def _into(out: Tensor | None, y: Tensor) -> Tensor:
    """Return `out` holding `y` (copying unless `y` was computed in place), or `y`."""
    if out is None:
        return y
    if y.data_ptr() != out.data_ptr() or y.stride() != out.stride():
        out.copy_(y)
    return out


def _from_rows_out(y_rows: Tensor, row_shape: Sequence[int], dim: int, out: Tensor | None) -> Tensor:
    return _into(out, _from_rows(y_rows, row_shape, dim))


def _reference_product(x_rows: Tensor, w: Tensor, s_rows: Tensor, w_scale: Tensor | None,
                       out_dtype: torch.dtype) -> Tensor:
    """The references' fp8 product: fp32 from the scaled fp8 operands, in `out_dtype`."""
    ws = w_scale if w_scale is not None else s_rows.new_ones(())
    return torch_scaled_product(x_rows, w, s_rows, ws).to(out_dtype).contiguous()


def _done(y: Tensor, async_op: bool) -> Tensor | PendingOutput:
    return PendingOutput(lambda: y) if async_op else y


def _finish(handles: list[tuple[CollectiveHandle, tuple[int, int]]], y_rows: Tensor, bias: Tensor | None,
            activation: str | None, row_shape: Sequence[int], dim: int, out: Tensor | None, *, async_op: bool,
            whole: bool = False) -> Tensor | PendingOutput:
    """The end of a reduction schedule: wait for each piece's reduction, apply the epilogue
    to that piece (once, after the sum), and return the output in place of `dim` (now, or
    from `PendingOutput.wait()` with `async_op`). `whole`: one piece, the whole tensor."""
    def finish() -> Tensor:
        for handle, (s, e) in handles:
            handle.wait()
            _epilogue(y_rows if whole else y_rows[s:e], bias, activation)
        return _from_rows_out(y_rows, row_shape, dim, out)

    return PendingOutput(finish) if async_op else finish()


# --------------------------------------------------------------------------------------------
# The op spec: one check path for each fused op and its reference
# --------------------------------------------------------------------------------------------


class OpSpec(NamedTuple):
    """A forward schedule's call after its checks, shared by the fused op and its reference.

    `dim` is the row dim normalised (-1 for the all-reduce, which has none); `out_shape` the
    output's shape (`dim` gathered for the all-gather, split for the reduce-scatter, as x's
    for the all-reduce); `out_dtype` x's dtype, or for fp8 operands the output's.
    """

    communicator: Communicator
    world: int
    dim: int
    out_dtype: torch.dtype
    fp8: bool
    out_shape: list[int]


def check_call(op: str, x: Tensor, w: Tensor, group: Any, comm: str, *, dim: int | None,
               bias: Tensor | None, activation: str | None, chunks: int | None, out: Tensor | None,
               x_scale: Tensor | None, w_scale: Tensor | None, out_dtype: torch.dtype | None) -> OpSpec:
    """Every check of a forward schedule `op`'s arguments, run before its first collective
    so that a bad argument raises on the rank that has it; returns the call's `OpSpec`
    (its communicator over `group`, of `comm` kind)."""
    x_name = "x_shard" if op == "all_gather_matmul" else "x"
    dim = _check_operands(x, w, bias, activation, x_name=x_name, dim=dim)
    out_dtype = _check_fp8(x, w, x_scale, w_scale, out_dtype, x_name=x_name, out=out)
    _check_chunks(chunks)
    communicator = get_communicator(group, comm)
    world = communicator.world_size
    out_shape = list(x.shape[:-1]) + [w.shape[1]]
    if op == "all_gather_matmul":
        out_shape[dim] *= world
    elif op == "matmul_reduce_scatter":
        _check_scatter_dim(x, dim, world)
        out_shape[dim] //= world
    _check_out(out, out_shape, x, dtype=out_dtype)
    return OpSpec(communicator, world, dim, out_dtype, is_fp8(x.dtype), out_shape)


def reference_of(fused: Callable[..., Any]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Make the decorated `run(x, w, spec, args)` the unfused reference of `fused`: it takes
    `fused`'s signature (unknown or missing arguments refused the same way), its arguments
    pass `check_call` as the fused op's do, and `run` gets the checked `OpSpec` and the
    arguments by name, defaults filled in."""
    signature = inspect.signature(fused)
    params = signature.parameters.values()
    operands = [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]  # x (or x_shard), w
    knobs = frozenset(p.name for p in params if p.kind is p.KEYWORD_ONLY)
    required = frozenset(p.name for p in params if p.kind is p.KEYWORD_ONLY and p.default is p.empty)
    defaults = {p.name: p.default for p in params if p.default is not p.empty}

    def wrap(run: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(run)
        def reference(*args: Any, **kwargs: Any) -> Any:
            if len(args) == len(operands) and knobs.issuperset(kwargs) and required.issubset(kwargs):
                # the usual call, bound by hand: inspect's bind costs the unfused baseline
                # tens of microseconds of host time per call, which benchmarks would count
                x, w = args
                a = defaults.copy()
                a.update(kwargs)
            else:  # anything else: inspect binds it, or refuses it as a call of `fused` would be
                bound = signature.bind(*args, **kwargs)
                bound.apply_defaults()
                a = bound.arguments
                x, w = a[operands[0]], a[operands[1]]
            spec = check_call(fused.__name__, x, w, a["group"], a["comm"], dim=a.get("dim"),
                              bias=a["bias"], activation=a["activation"], chunks=a["chunks"], out=a["out"],
                              x_scale=a["x_scale"], w_scale=a["w_scale"], out_dtype=a["out_dtype"])
            return run(x, w, spec, a)

        reference.__signature__ = signature  # type: ignore[attr-defined]
        return reference

    return wrap


def check_consistent(communicator: Communicator, op: str, debug: bool | None, x_name: str, x: Tensor,
                     w: Tensor, chunks: int, *, dim: int | None = None, epilogue: bool = True,
                     bias: Tensor | None = None, activation: str | None = None) -> None:
    """With `FUSEDPAR_DEBUG=1` or `debug=True`, compare this call's fingerprint across ranks
    (fusedpar.checks); its fields are built only then (the per-call host cost stays nil)."""
    if not checks.debug_enabled(debug):
        return
    fields: dict[str, Any] = {x_name: (list(x.shape), str(x.dtype)), "w": list(w.shape)}
    if dim is not None:
        fields["dim"] = dim
    fields["chunks"] = chunks
    if epilogue:
        fields.update(bias=bias is not None, activation=activation)
    checks.maybe_check_consistent(communicator, op, debug, **fields)
