"""The communicator: the few collectives fusedpar issues, over one process group.

    comm = get_communicator(group)              # torch.distributed (nccl on GPU, gloo on CPU)
    comm = get_communicator(group, "cupy")      # CuPy NCCL on a CUDA stream fusedpar owns
    h = comm.all_gather(out_flat, shard)        # async; h.wait() orders the caller after it
    h.wait()

Every call is asynchronous and returns a `CollectiveHandle`. `wait()` orders the caller
after the collective: on GPU that is a stream wait (the host does not block), on CPU the
gloo work is waited on. A failure inside a collective (a peer crashed, a peer stalled past
the group's timeout) surfaces from `wait()` as a `CollectiveError` that says which op, which
rank and why, instead of a bare backend message.

The process group is always an argument: nothing here falls back to the world group.
"""
from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .streams import StreamSet

__all__ = [
    "CollectiveError",
    "CollectiveHandle",
    "Communicator",
    "TorchCommunicator",
    "CupyCommunicator",
    "get_communicator",
    "check_group",
    "init_distributed",
    "new_group",
    "DEFAULT_TIMEOUT",
    "device_mesh",
]

# torch's default collective timeout is 30 minutes: a stalled peer would look like a hang.
DEFAULT_TIMEOUT = datetime.timedelta(seconds=int(os.environ.get("FUSEDPAR_TIMEOUT_S", "300")))


class CollectiveError(RuntimeError):
    """A collective failed: a peer rank crashed, stalled past the timeout, or desynchronized."""


def _mesh_group(mesh: Any, arg: str) -> dist.ProcessGroup:
    """The process group of a 1-D DeviceMesh (or of one named dim of a bigger mesh,
    `mesh["tp"]`, which is itself 1-D); a mesh of more dims is ambiguous and refused."""
    if mesh.ndim != 1:
        names = getattr(mesh, "mesh_dim_names", None)
        dims = ", ".join(f"{n!r}" for n in names) if names else "unnamed"
        pick = f'e.g. mesh["{names[-1]}"]' if names else "a 1-D mesh, or mesh.get_group(dim)"
        raise ValueError(
            f"{arg}: expected a ProcessGroup or a 1-D DeviceMesh (the tensor-parallel dim, {pick}), "
            f"got a {mesh.ndim}-D DeviceMesh of shape {tuple(mesh.shape)} with dims ({dims})"
        )
    group = mesh.get_group()
    _MESHES[(id(group), mesh.device_type)] = (group, mesh)
    return group


# (id(group), device type) -> (group, the DeviceMesh sharded parameters live on). A mesh the
# user passed is kept as is: FSDP2 over a 2-D mesh needs the TP parameters on `mesh["tp"]`
# itself (the same root mesh as `mesh["dp"]`), not on a new mesh made from its group.
_MESHES: dict[tuple[int, str], tuple[dist.ProcessGroup, Any]] = {}


def device_mesh(group: dist.ProcessGroup, device_type: str) -> Any:
    """The 1-D DeviceMesh over `group` for tensors on `device_type` ("cpu", "cuda"): the mesh
    the user passed for this group if any, else one made once from the group."""
    key = (id(group), device_type)
    found = _MESHES.get(key)
    if found is None or found[0] is not group:
        from torch.distributed.device_mesh import DeviceMesh

        found = _MESHES[key] = (group, DeviceMesh.from_group(group, device_type))
    return found[1]


def check_group(group: Any, *, arg: str = "group") -> dist.ProcessGroup:
    """Validate a process group argument before any collective is issued; return it.

    A 1-D `DeviceMesh`, or one named dim of an N-D mesh (`mesh["tp"]`), stands for its
    process group."""
    if group is None:
        raise TypeError(
            f"{arg}: expected a torch.distributed ProcessGroup or a 1-D DeviceMesh (fusedpar never "
            f"falls back to the world group), got None"
        )
    if isinstance(group, Communicator):
        return group.group
    if _is_device_mesh(group):
        group = _mesh_group(group, arg)
    if group is dist.GroupMember.NON_GROUP_MEMBER:  # what new_group returns on ranks outside it
        raise ValueError(
            f"{arg}: this process is not a member of the group (new_group returned NON_GROUP_MEMBER here)"
        )
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{arg}: expected a torch.distributed ProcessGroup or a 1-D DeviceMesh, "
                        f"got {type(group).__name__}")
    if not dist.is_initialized():
        raise ValueError(f"{arg}: torch.distributed is not initialized (or was destroyed)")
    try:
        rank = dist.get_rank(group)
    except (RuntimeError, ValueError) as e:  # destroyed or foreign group
        raise ValueError(f"{arg}: the process group is not usable: {e}") from e
    if rank < 0:
        raise ValueError(f"{arg}: this process (global rank {dist.get_rank()}) is not a member of the group")
    return group


def _is_device_mesh(obj: Any) -> bool:
    if isinstance(obj, dist.ProcessGroup):  # the common case: no import on the call path
        return False
    try:
        from torch.distributed.device_mesh import DeviceMesh
    except ImportError:  # pragma: no cover - torch builds without distributed
        return False
    return isinstance(obj, DeviceMesh)


class CollectiveHandle:
    """A collective in flight. `wait()` orders the caller's current stream after it.

    `wait()` may be called from several streams, once on each: the ring schedule first
    makes the comm stream wait for a piece's arrival (so the next hop forwards it) and then
    the compute stream (so the GEMM reads it). On CPU the first call blocks until the
    collective is done and later calls return at once.

    The handle holds references to the tensors the collective reads and writes for as long
    as it lives, so the caching allocator cannot hand their memory to other work while a
    side stream still uses it (see streams.py); schedules drop their handles only after
    the compute stream has waited.
    """

    def __init__(
        self,
        *,
        works: Sequence[Any] = (),
        event: Any = None,
        keep: Sequence[Tensor] = (),
        describe: Callable[[], str] = lambda: "collective",
    ) -> None:
        self._works = list(works)
        self._event = event
        self._keep = list(keep)
        self._describe = describe
        # Only GPU work needs ordering per stream; a gloo work is done once the host has
        # waited, and waiting on a finished gloo send/recv again blocks until its timeout.
        # (one device per collective: its first tensor says which)
        self._per_stream = event is not None or (bool(self._keep) and self._keep[0].is_cuda)
        self._host_done = False

    def wait(self) -> None:
        if self._host_done:
            return
        try:
            for work in self._works:
                work.wait()  # NCCL: the current stream waits; gloo: the host waits
        except RuntimeError as e:
            raise CollectiveError(
                f"fusedpar: {self._describe()} failed: a peer rank crashed, stalled past the "
                f"group timeout, or issued a different collective. Backend said: {e}"
            ) from e
        if self._event is not None:
            torch.cuda.current_stream().wait_event(self._event)
        self._host_done = not self._per_stream

    def is_completed(self) -> bool:
        if self._event is not None:
            return bool(self._event.query())
        return all(w.is_completed() for w in self._works)


class Communicator:
    """Async all-gather, reduce-scatter, all-reduce and ring send/recv on flat buffers.

    Buffers must be contiguous. `all_gather` writes the flat rank-major concatenation of
    every rank's `input` into `output`; `reduce_scatter` sums `input` (rank-major blocks)
    across ranks and leaves block `rank` in `output`; `all_reduce` sums in place.
    Ranks passed to `send_recv` are ranks within the group.
    """

    kind = "abstract"

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = check_group(group)
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def all_gather(self, output: Tensor, input: Tensor) -> CollectiveHandle:
        raise NotImplementedError

    def reduce_scatter(self, output: Tensor, input: Tensor) -> CollectiveHandle:
        raise NotImplementedError

    def all_reduce(self, tensor: Tensor) -> CollectiveHandle:
        raise NotImplementedError

    def send_recv(self, send: Tensor, dst: int, recv: Tensor, src: int) -> CollectiveHandle:
        raise NotImplementedError

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Blocking: every rank's `obj`, in rank order (for small metadata such as fingerprints)."""
        out: list[Any] = [None] * self.world_size
        try:
            dist.all_gather_object(out, obj, group=self.group)
        except RuntimeError as e:
            raise CollectiveError(
                f"fusedpar: all_gather_object on rank {self.rank} of {self.world_size} failed: "
                f"a peer rank crashed or stalled past the group timeout. Backend said: {e}"
            ) from e
        return out

    def _describe(self, op: str, *tensors: Tensor) -> Callable[[], str]:
        # formatted only when an error needs it: shapes as text cost more than issuing a
        # small collective (the handle keeps the tensors alive anyway)
        def describe() -> str:
            shapes = ", ".join(f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}" for t in tensors)
            return f"{op}({shapes}) on rank {self.rank} of {self.world_size} ({self.kind})"

        return describe

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, world_size={self.world_size})"


def _require_contiguous(**tensors: Tensor) -> None:
    for name, t in tensors.items():
        if not t.is_contiguous():
            raise ValueError(f"{name}: collectives need a contiguous buffer, got strides {t.stride()}")


# torch 2.13 renamed the flat collectives (and warns on the old names); 2.11 has only the old.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _sum_options() -> Any:
    """An async SUM `AllreduceOptions`, or None where torch has no such class (then
    `dist.all_reduce` is called)."""
    try:
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.SUM
        opts.asyncOp = True
    except (AttributeError, TypeError):  # pragma: no cover - other torch builds
        return None
    return opts


class TorchCommunicator(Communicator):
    """Collectives through torch.distributed (NCCL queues them on its own internal streams)."""

    kind = "torch"

    def __init__(self, group: dist.ProcessGroup) -> None:
        super().__init__(group)
        self.backend = dist.get_backend(group)
        self._global = [dist.get_global_rank(group, r) for r in range(self.world_size)]
        self._sum_options = _sum_options()

    def _run(self, op: str, issue: Callable[[], Any], *tensors: Tensor) -> CollectiveHandle:
        describe = self._describe(op, *tensors)
        try:
            work = issue()
        except RuntimeError as e:  # gloo reports a dead peer at issue time too
            raise CollectiveError(f"fusedpar: {describe()} failed to start: {e}") from e
        works = work if isinstance(work, list) else [work]
        return CollectiveHandle(works=works, keep=tensors, describe=describe)

    def _flat(self, op: str, collective: Callable[..., Any], output: Tensor, input: Tensor) -> CollectiveHandle:
        """A flat all-gather or reduce-scatter (torch's ``(output, input)`` collectives)."""
        _require_contiguous(output=output, input=input)
        return self._run(op, lambda: collective(output, input, group=self.group, async_op=True), output, input)

    def all_gather(self, output: Tensor, input: Tensor) -> CollectiveHandle:
        return self._flat("all_gather", _all_gather_flat, output, input)

    def reduce_scatter(self, output: Tensor, input: Tensor) -> CollectiveHandle:
        return self._flat("reduce_scatter", _reduce_scatter_flat, output, input)

    def all_reduce(self, tensor: Tensor) -> CollectiveHandle:
        if not tensor.is_contiguous():
            _require_contiguous(tensor=tensor)
        if tensor.is_complex() or self._sum_options is None:
            return self._run(
                "all_reduce", lambda: dist.all_reduce(tensor, group=self.group, async_op=True), tensor
            )
        # the process group's own allreduce: what dist.all_reduce ends in, without its
        # per-call argument checks and logging wrapper (a decode step's all-reduces are
        # host-bound; its options are fixed per communicator)
        return self._run("all_reduce", lambda: self.group.allreduce([tensor], self._sum_options), tensor)

    def send_recv(self, send: Tensor, dst: int, recv: Tensor, src: int) -> CollectiveHandle:
        _require_contiguous(send=send, recv=recv)
        ops = [
            dist.P2POp(dist.isend, send, self._global[dst], self.group),
            dist.P2POp(dist.irecv, recv, self._global[src], self.group),
        ]
        return self._run("send_recv", lambda: dist.batch_isend_irecv(ops), send, recv)


class CupyCommunicator(Communicator):
    """NCCL through CuPy (`cupy.cuda.nccl`), on the comm stream of fusedpar's StreamSet.

    Needs the `cuda12` or `cuda13` extra. The NCCL unique id is created on group rank 0 and
    broadcast over the torch process group. NCCL calls here do not honour the torch
    group's timeout: a dead peer is reported by torch's own collectives (e.g. the debug
    fingerprint exchange), not by these.
    """

    kind = "cupy"

    def __init__(self, group: dist.ProcessGroup) -> None:
        super().__init__(group)
        try:
            from cupy.cuda import nccl
        except ImportError as e:
            raise ImportError(
                "comm='cupy' needs CuPy with NCCL: pip install 'fusedpar[cuda12]' or 'fusedpar[cuda13]'"
            ) from e
        if not torch.cuda.is_available() or not nccl.available:
            raise RuntimeError("comm='cupy' needs a CUDA device and NCCL (cupy.cuda.nccl.available is False)")
        self._nccl = nccl
        uid = [nccl.get_unique_id() if self.rank == 0 else None]
        dist.broadcast_object_list(uid, src=dist.get_global_rank(group, 0), group=group)
        self.device = torch.device("cuda", torch.cuda.current_device())
        self._comm = nccl.NcclCommunicator(self.world_size, uid[0], self.rank)
        self._streams = StreamSet.for_device(self.device)
        self._dtypes = {
            torch.float32: nccl.NCCL_FLOAT32,
            torch.float16: nccl.NCCL_FLOAT16,
            torch.float64: nccl.NCCL_FLOAT64,
        }
        if hasattr(nccl, "NCCL_BFLOAT16"):
            self._dtypes[torch.bfloat16] = nccl.NCCL_BFLOAT16

    def _dtype(self, t: Tensor) -> int:
        try:
            return self._dtypes[t.dtype]
        except KeyError:
            raise TypeError(f"comm='cupy': dtype {t.dtype} is not supported by this NCCL build") from None

    def _launch(self, op: str, call: Callable[[int], None], *tensors: Tensor) -> CollectiveHandle:
        comm_stream = self._streams.comm
        comm_stream.wait_stream(torch.cuda.current_stream(self.device))  # inputs are ready
        call(comm_stream.cuda_stream)
        done = torch.cuda.Event()
        done.record(comm_stream)
        return CollectiveHandle(event=done, keep=tensors, describe=self._describe(op, *tensors))

    def all_gather(self, output: Tensor, input: Tensor) -> CollectiveHandle:
        _require_contiguous(output=output, input=input)
        return self._launch(
            "all_gather",
            lambda s: self._comm.allGather(input.data_ptr(), output.data_ptr(), input.numel(), self._dtype(input), s),
            output,
            input,
        )

    def reduce_scatter(self, output: Tensor, input: Tensor) -> CollectiveHandle:
        _require_contiguous(output=output, input=input)
        return self._launch(
            "reduce_scatter",
            lambda s: self._comm.reduceScatter(
                input.data_ptr(), output.data_ptr(), output.numel(), self._dtype(input), self._nccl.NCCL_SUM, s
            ),
            output,
            input,
        )

    def all_reduce(self, tensor: Tensor) -> CollectiveHandle:
        _require_contiguous(tensor=tensor)
        return self._launch(
            "all_reduce",
            lambda s: self._comm.allReduce(
                tensor.data_ptr(), tensor.data_ptr(), tensor.numel(), self._dtype(tensor), self._nccl.NCCL_SUM, s
            ),
            tensor,
        )

    def send_recv(self, send: Tensor, dst: int, recv: Tensor, src: int) -> CollectiveHandle:
        _require_contiguous(send=send, recv=recv)

        def call(s: int) -> None:
            self._nccl.groupStart()
            self._comm.send(send.data_ptr(), send.numel(), self._dtype(send), dst, s)
            self._comm.recv(recv.data_ptr(), recv.numel(), self._dtype(recv), src, s)
            self._nccl.groupEnd()

        return self._launch("send_recv", call, send, recv)


_COMMUNICATORS: dict[tuple[int, str], Communicator] = {}
_KINDS: dict[str, type[Communicator]] = {"torch": TorchCommunicator, "cupy": CupyCommunicator}


def get_communicator(group: Any, comm: str = "torch") -> Communicator:
    """The cached communicator of `comm` kind ("torch" or "cupy") over `group`.

    Passing a `Communicator` returns it unchanged. The choice is explicit: "cupy" never
    silently falls back to "torch" or the reverse.
    """
    if isinstance(group, Communicator):
        return group
    if comm not in _KINDS:
        raise ValueError(f"comm: expected one of {sorted(_KINDS)}, got {comm!r}")
    group = check_group(group)
    key = (id(group), comm)
    found = _COMMUNICATORS.get(key)
    if found is None or found.group is not group:
        found = _COMMUNICATORS[key] = _KINDS[comm](group)
    return found


def init_distributed(
    backend: str | None = None, *, timeout: datetime.timedelta = DEFAULT_TIMEOUT, **kwargs: Any
) -> dist.ProcessGroup:
    """`init_process_group` with a short default timeout; returns the world group.

    Backend defaults to nccl when CUDA is available, gloo otherwise. A peer that dies then
    surfaces as an error within `timeout` instead of torch's 30-minute default. On NCCL the
    group's streams are high priority (see `_high_priority_nccl`).
    """
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        options = _high_priority_nccl(backend)
        if options is not None:
            kwargs.setdefault("pg_options", options)
        dist.init_process_group(backend, timeout=timeout, **kwargs)
    return dist.group.WORLD


def new_group(
    ranks: Sequence[int] | None = None, *, timeout: datetime.timedelta = DEFAULT_TIMEOUT, backend: str | None = None
) -> dist.ProcessGroup:
    """`dist.new_group` with fusedpar's short default timeout (see `DEFAULT_TIMEOUT`) and,
    on NCCL, high-priority streams."""
    return dist.new_group(ranks=list(ranks) if ranks is not None else None, timeout=timeout, backend=backend,
                          pg_options=_high_priority_nccl(backend or dist.get_backend()))


def _high_priority_nccl(backend: str) -> Any:
    """NCCL options asking for high-priority streams, or None off NCCL.

    With comm="torch", NCCL kernels run on the process group's own streams; at default
    priority the scheduler may queue them behind a wave of GEMM blocks, which delays every
    chunk the schedules are trying to hide."""
    if backend != "nccl" or not hasattr(dist, "ProcessGroupNCCL"):
        return None
    options = dist.ProcessGroupNCCL.Options()
    options.is_high_priority_stream = True
    return options
