"""`python -m fusedpar profile`: trace one chunked workload on every rank.

CPU (default): gloo ranks, each writes a torch.profiler Chrome trace
(``trace-rank<r>.json``, opens in Perfetto / chrome://tracing).
GPU (``--gpu``): NCCL ranks; warm-up first, then the timed steps inside a
cudaProfilerStart/Stop capture range with NVTX ranges, for
``nsys profile --capture-range=cudaProfilerApi`` (see bench/nsys/).

The workload is whatever ``build_workload`` returns; point it at a layer by swapping
that one function.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from fusedpar import costmodel
from fusedpar.cli._common import REPO_ROOT, run_metadata
from fusedpar.streams import emit_nvtx, nvtx_range


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `profile`."""
    parser.add_argument("--gpu", action="store_true",
                        help="CUDA + NCCL with an nsys capture range (default: CPU + gloo)")
    parser.add_argument("--world", type=int, default=None,
                        help="ranks (default 2 on CPU, 1 on GPU: one rank per GPU)")
    parser.add_argument("--shape", type=int, nargs=3, metavar=("M", "N", "K"), default=None,
                        help="global GEMM [M,K] @ [K,N] (default 256 128 128 CPU, "
                             "8192 4096 4096 GPU)")
    parser.add_argument("--chunks", type=int, default=None,
                        help="row chunks (default 4 on CPU, costmodel.choose_chunks on GPU)")
    parser.add_argument("--dtype", default=None, help="default float32 CPU, bfloat16 GPU")
    parser.add_argument("--kernel", default="auto",
                        help="fusedpar.kernels matmul: auto / triton / torch")
    parser.add_argument("--workload", choices=("layer", "overlap"), default="layer",
                        help="layer: fwd+bwd of a sequence-parallel MLP block (column ring "
                             "all-gather, row chunked reduce-scatter); overlap: the bare "
                             "matmul_all_reduce schedule")
    parser.add_argument("--warmup", type=int, default=2, help="untraced steps first")
    parser.add_argument("--steps", type=int, default=3, help="traced steps")
    parser.add_argument("--torch-trace", action="store_true",
                        help="with --gpu: also write a torch.profiler trace")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "traces",
                        help="folder for traces (default traces/)")


def build_workload(args: argparse.Namespace, *, group: dist.ProcessGroup,
                   device: torch.device) -> Callable[[], torch.Tensor]:
    """One step to trace. ``--workload layer`` (default): forward + backward of one
    sequence-parallel MLP block, the overlapped layers as a model runs them::

        x_shard -> ColumnParallelLinear (ring all-gather ∥ GEMMs) -> gelu
                -> RowParallelLinear (GEMMs ∥ chunked reduce-scatter) -> y_shard
        backward: reduce-scatter of dgrad ∥ wgrad, all-gather of dy ∥ dgrad + wgrad

    ``--workload overlap``: the bare ``matmul_all_reduce`` schedule. ``--shape M N K`` is
    tokens (all ranks), intermediate and hidden size.
    """
    from fusedpar.layers import ColumnParallelLinear, RowParallelLinear
    from fusedpar.overlap import matmul_all_reduce

    m, n, k = args.shape
    dtype = getattr(torch, args.dtype)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    gen = torch.Generator().manual_seed(rank)
    if args.workload == "overlap":
        x = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)
        w = torch.randn(k, n, generator=gen).to(device=device, dtype=dtype)
        return lambda: matmul_all_reduce(x, w, group=group, chunks=args.chunks, kernel=args.kernel)

    knobs = dict(group=group, sequence_parallel=True, chunks=args.chunks, kernel=args.kernel,
                 dtype=dtype, device=device)
    up = ColumnParallelLinear(k, n, bias=False, **knobs)
    down = RowParallelLinear(n, k, bias=False, **knobs)
    x = torch.randn(1, m // world, k, generator=gen).to(device=device, dtype=dtype).requires_grad_()

    def step() -> torch.Tensor:
        with nvtx_range("forward"):
            y = down(torch.nn.functional.gelu(up(x)))
        with nvtx_range("backward"):
            y.sum().backward()
        return y

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rank_main(rank: int, world: int, init_file: str, args: argparse.Namespace) -> None:
    """One rank: init, warm up, run the traced steps, write this rank's files."""
    device = torch.device(f"cuda:{rank % torch.cuda.device_count()}") if args.gpu \
        else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if args.gpu else "gloo", init_method=f"file://{init_file}",
                            rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        group = dist.group.WORLD
        step = build_workload(args, group=group, device=device)
        for _ in range(args.warmup):
            step()
        _sync(device)
        dist.barrier(group)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        trace = not args.gpu or args.torch_trace
        prof = torch.profiler.profile(activities=activities) if trace else None
        if device.type == "cuda":
            emit_nvtx(True)  # nsys reads NVTX ranges; they are off unless asked for (streams.py)
            torch.cuda.profiler.start()  # cudaProfilerStart: nsys begins capturing here
        times = []
        if prof is not None:
            prof.start()
        for i in range(args.steps):
            t0 = time.perf_counter()
            with nvtx_range(f"step {i}"):
                step()
            _sync(device)
            times.append(time.perf_counter() - t0)
        if prof is not None:
            prof.stop()
        if device.type == "cuda":
            torch.cuda.profiler.stop()
        args.out.mkdir(parents=True, exist_ok=True)
        if prof is not None:
            path = args.out / f"trace-rank{rank}.json"
            prof.export_chrome_trace(str(path))
            print(f"rank {rank}: trace {path}", flush=True)
        ms = ", ".join(f"{t * 1e3:.2f}" for t in times)
        print(f"rank {rank}: step ms [{ms}]", flush=True)
    finally:
        dist.destroy_process_group()


def run(args: argparse.Namespace) -> int:
    """Fill in defaults, launch the ranks, write a small run description next to the traces."""
    if args.gpu and not torch.cuda.is_available():
        print("profile --gpu: no CUDA device here", flush=True)
        return 2
    device = torch.device("cuda" if args.gpu else "cpu")
    args.world = args.world or (1 if args.gpu else 2)
    args.shape = args.shape or ([8192, 4096, 4096] if args.gpu else [256, 128, 128])
    args.dtype = args.dtype or ("bfloat16" if args.gpu else "float32")
    if args.chunks is None and not args.gpu:
        args.chunks = 4  # the CPU model says chunking never pays here; show it anyway
    if args.chunks is None:
        m, n, k = args.shape
        args.chunks = costmodel.choose_chunks(
            "matmul_all_reduce", m=m, n=n, k=k, world_size=max(args.world, 2),
            dtype=getattr(torch, args.dtype), device=costmodel.device_spec_for(device))
    args.out = Path(args.out).resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"profile ({args.workload}): {args.shape} {args.dtype} chunks={args.chunks} "
          f"world={args.world} on {device.type}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        if args.world == 1:
            _rank_main(0, 1, init_file, args)
        else:
            torch.multiprocessing.spawn(_rank_main, args=(args.world, init_file, args),
                                        nprocs=args.world, join=True)
    meta = run_metadata(device, getattr(args, "argv", None))
    meta.update(workload=args.workload, shape=args.shape, dtype=args.dtype,
                chunks=args.chunks, world=args.world, steps=args.steps, warmup=args.warmup)
    (args.out / "profile-meta.json").write_text(json.dumps(meta, indent=1))
    return 0
