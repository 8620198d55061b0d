"""`python -m fusedpar demo`: a tensor-parallel model trained next to its single-process twin.

With fewer than 2 GPUs it starts its own ranks on this machine (gloo, 127.0.0.1 only);
under `torchrun` it uses the ranks it is given (NCCL when each rank has a GPU). Each rank
builds the same tiny random Hugging Face model (no download): `--model llama` (default),
or a mixture of experts, `mixtral` or `qwen3-moe` (experts split on their intermediate dim,
router replicated, grouped expert GEMMs). It keeps one copy whole as the reference and
converts the other with `parallelize(model, "auto", sequence_parallel=...)`.
It checks the logits, trains both on the same synthetic batches in lockstep, times one
MLP block overlapped (chunked) vs serial (chunks=1), and prints a table on rank 0. The exit
status is non-zero if the parallel model's logits or losses leave the reference's.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import os
import statistics
import sys
import tempfile
import time
import torch
import torch.distributed as dist

LOGITS_TOL = {"float32": 1e-4, "float64": 1e-10, "bfloat16": 3e-2, "float16": 1e-2}
LOSS_TOL = {"float32": 1e-3, "float64": 1e-8, "bfloat16": 5e-2, "float16": 2e-2}
# --fp8: the parallel model's GEMMs round to fp8 (~5% per GEMM output), the reference's do not:
# the logits stay within 10% and the losses within 3% (tests/layers/test_fp8_training.py)
FP8_LOGITS_TOL, FP8_LOSS_TOL = 0.1, 0.03


# the model's and the run's sizes: (option, default, what it counts)
SIZES = (
    ("--experts", 4, "experts per MoE layer"),
    ("--top-k", 2, "experts per token"),
    ("--steps", 30, "training steps"),
    ("--layers", 2, "decoder layers"),
    ("--hidden", 128, "hidden size"),
    ("--intermediate", 256, "MLP (for MoE models: each expert's) intermediate size"),
    ("--heads", 4, "attention heads"),
    ("--kv-heads", 2, "key/value heads"),
    ("--vocab", 256, "vocabulary size"),
    ("--seq", 64, "sequence length"),
    ("--batch", 4, "batch size"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--world-size", type=int, default=2, help="ranks to start when not under torchrun (default 2)")
    parser.add_argument("--model", default="llama", choices=sorted(MODELS),
                        help="llama (default), or a mixture of experts: mixtral, qwen3-moe")
    for flag, default, meaning in SIZES:
        parser.add_argument(flag, type=int, default=default, help=f"{meaning} (default {default})")
    parser.add_argument("--dtype", default="float32", choices=sorted(LOGITS_TOL), help="default float32")
    parser.add_argument("--sequence-parallel", action=argparse.BooleanOptionalAction, default=True,
                        help="split the residual stream on the sequence dim (default on)")
    parser.add_argument("--kernel", default="auto", choices=["auto", "triton", "torch"],
                        help="GEMM backend (auto: Triton on CUDA, torch on CPU unless TRITON_INTERPRET=1)")
    parser.add_argument("--comm", default="torch", choices=["torch", "cupy"], help="communicator (default torch)")
    parser.add_argument("--chunks", type=int, default=None, help="pieces per schedule (default: cost model)")
    parser.add_argument("--fp8", action="store_true",
                        help="the parallel model's linears in fp8 (forward and dgrad; compared to the "
                             "high-precision reference within fp8's error)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timing-reps", type=int, default=5, help="fwd+bwd repetitions per timed variant")


def run(args: argparse.Namespace) -> int:
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # under torchrun
        return _rank_main(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), "env://", args)
    if args.world_size < 1:
        raise SystemExit(f"--world-size: expected >= 1, got {args.world_size}")
    # The ranks meet through a file (no port picked in advance that another socket could
    # take) and gloo talks over loopback only.
    with tempfile.TemporaryDirectory(prefix="fusedpar-demo-") as folder:
        init_method = f"file://{folder}/rendezvous"
        ctx = torch.multiprocessing.get_context("spawn")
        procs = [ctx.Process(target=_spawned, args=(r, args.world_size, init_method, args))
                 for r in range(args.world_size)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
    codes = [p.exitcode for p in procs]
    if any(codes):
        print(f"fusedpar demo: ranks exited with codes {codes}", file=sys.stderr)
        return 1
    return 0


def _spawned(rank: int, world: int, init_method: str, args: argparse.Namespace) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    sys.exit(_rank_main(rank, world, init_method, args))


def _rank_main(rank: int, world: int, init_method: str, args: argparse.Namespace) -> int:
    from fusedpar.comm import init_distributed

    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() >= world
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    group = init_distributed("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=120),
                             init_method=init_method, rank=rank, world_size=world)
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    try:
        ok = _demo(group, rank, world, device, args)
    finally:
        dist.destroy_process_group()
    return 0 if ok else 1


MODELS = {"llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM", "qwen3-moe": "Qwen3MoeForCausalLM"}


def _tiny_model(args: argparse.Namespace, dtype: torch.dtype, device: torch.device):
    import transformers

    common = dict(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                  num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                  max_position_embeddings=max(256, args.seq), attn_implementation="sdpa")
    if args.model == "mixtral":
        config = transformers.MixtralConfig(intermediate_size=args.intermediate, num_local_experts=args.experts,
                                            num_experts_per_tok=args.top_k, **common)
    elif args.model == "qwen3-moe":
        config = transformers.Qwen3MoeConfig(moe_intermediate_size=args.intermediate, num_experts=args.experts,
                                             num_experts_per_tok=args.top_k, head_dim=args.hidden // args.heads,
                                             **common)
    else:
        config = transformers.LlamaConfig(intermediate_size=args.intermediate, **common)
    torch.manual_seed(args.seed)  # same weights on every rank
    return getattr(transformers, MODELS[args.model])(config).to(device=device, dtype=dtype)


def _batches(args: argparse.Namespace, device: torch.device):
    """Synthetic sequences with a learnable rule (t[i+1] = 5*t[i] + 3 mod vocab), same on all ranks."""
    g = torch.Generator().manual_seed(args.seed + 1)
    while True:
        start = torch.randint(0, args.vocab, (args.batch, 1), generator=g)
        tokens = start.clone().expand(-1, args.seq).clone()
        for i in range(1, args.seq):
            tokens[:, i] = (5 * tokens[:, i - 1] + 3) % args.vocab
        noise = torch.rand(tokens.shape, generator=g) < 0.05
        tokens = torch.where(noise, torch.randint(0, args.vocab, tokens.shape, generator=g), tokens)
        yield tokens.to(device)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _demo(group: dist.ProcessGroup, rank: int, world: int, device: torch.device, args: argparse.Namespace) -> bool:
    from fusedpar.kernels import resolve_kernel
    from fusedpar.plan import parallelize

    dtype = getattr(torch, args.dtype)
    reference = _tiny_model(args, dtype, device)
    model = parallelize(copy.deepcopy(reference), "auto", group=group, sequence_parallel=args.sequence_parallel,
                        kernel=args.kernel, comm=args.comm, chunks=args.chunks, fp8=args.fp8 or None)
    data = _batches(args, device)

    # 1. Logits of the converted model against the single-process one.
    tokens = next(data)
    with torch.no_grad():
        logits_err = _rel(model(tokens).logits, reference(tokens).logits)

    # 2. Train both on the same batches.
    opt_par = torch.optim.AdamW(model.parameters(), lr=args.lr)
    opt_ref = torch.optim.AdamW(reference.parameters(), lr=args.lr)
    losses_par, losses_ref, step_s = [], [], []
    bar = _progress(args.steps, enabled=rank == 0)
    for _ in range(args.steps):
        tokens = next(data)
        start = time.perf_counter()
        loss = model(tokens, labels=tokens).loss
        loss.backward()
        opt_par.step()
        opt_par.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        step_s.append(time.perf_counter() - start)
        loss_ref = reference(tokens, labels=tokens).loss
        loss_ref.backward()
        opt_ref.step()
        opt_ref.zero_grad(set_to_none=True)
        losses_par.append(loss.item())
        losses_ref.append(loss_ref.item())
        bar(f"loss {losses_par[-1]:.4f} (single-process {losses_ref[-1]:.4f})")
    max_loss_diff = max(abs(a - b) for a, b in zip(losses_par, losses_ref)) if losses_par else 0.0

    # 3. One MLP block, fwd+bwd, overlapped vs serial, interleaved so noise hits both alike.
    timing = _time_mlp_block(group, world, device, dtype, args)

    kernel = resolve_kernel(args.kernel, device, dtype)
    logits_tol = FP8_LOGITS_TOL if args.fp8 else LOGITS_TOL[args.dtype]
    loss_tol = FP8_LOSS_TOL if args.fp8 else LOSS_TOL[args.dtype]
    ok_logits = logits_err <= logits_tol
    ok_loss = max_loss_diff <= loss_tol * max(1.0, abs(losses_ref[-1]) if losses_ref else 1.0)
    if rank == 0:
        backend = dist.get_backend(group)
        experts = (f", {args.experts} experts (top-{args.top_k}) of width {args.intermediate}"
                   if args.model != "llama" else "")
        rows = [
            ("model", f"{MODELS[args.model]}, {args.layers} layers, hidden {args.hidden}, {args.heads} heads "
                      f"/ {args.kv_heads} kv heads{experts}, vocab {args.vocab}, {args.dtype}"),
            ("parallelism", f"tensor parallel over {world} ranks, plan='auto', "
                            f"sequence parallel {'on' if args.sequence_parallel else 'off'}"
                            f"{', fp8 linears (forward + dgrad)' if args.fp8 else ''}"),
            ("logits vs single-process", f"rel. err {logits_err:.2e} (tolerance {logits_tol:.0e}) "
                                         f"{'OK' if ok_logits else 'MISMATCH'}"),
            ("loss, first -> last step", f"parallel {losses_par[0]:.4f} -> {losses_par[-1]:.4f}, single-process "
                                         f"{losses_ref[0]:.4f} -> {losses_ref[-1]:.4f}" if losses_par else "no steps"),
            ("loss agreement", f"max |parallel - single| over {args.steps} steps {max_loss_diff:.2e} "
                               f"{'OK' if ok_loss else 'MISMATCH'}"),
            ("train step (parallel)", f"median {statistics.median(step_s) * 1e3:.1f} ms" if step_s else "-"),
            ("MLP block fwd+bwd", f"overlapped (chunks={timing['chunks']}) {timing['overlapped'] * 1e3:.2f} ms, "
                                  f"serial (chunks=1) {timing['serial'] * 1e3:.2f} ms, "
                                  f"ratio {timing['overlapped'] / timing['serial']:.2f}"),
            ("kernel / comm", f"{kernel} GEMMs{' (experts: grouped)' if args.model != 'llama' else ''}, "
                              f"{args.comm} communicator ({backend})"),
            ("world size / device", f"{world} / {device}"),
        ]
        if device.type == "cpu":
            rows.append(("note", "CPU ranks share 2 cores with gloo: overlap cannot gain wall time here; "
                                 "GPU timings come from bench/gpu/run_all.sh"))
        width = max(len(k) for k, _ in rows)
        print("\nfusedpar demo")
        for k, v in rows:
            print(f"  {k:<{width}}  {v}")
        sys.stdout.flush()
    return ok_logits and ok_loss


def _time_mlp_block(group, world: int, device: torch.device, dtype: torch.dtype, args: argparse.Namespace) -> dict:
    from fusedpar.layers import ParallelMLP

    chunks = args.chunks if args.chunks and args.chunks > 1 else 2 * world
    torch.manual_seed(args.seed + 2)
    blocks = {
        name: ParallelMLP(args.hidden, args.intermediate, group=group, gated=True, sequence_parallel=True,
                          chunks=c, kernel=args.kernel, comm=args.comm, dtype=dtype, device=device)
        for name, c in (("overlapped", chunks), ("serial", 1))
    }
    x = torch.randn(args.batch, args.seq // world, args.hidden, device=device, dtype=dtype, requires_grad=True)
    times: dict[str, list[float]] = {name: [] for name in blocks}
    for rep in range(args.timing_reps + 1):  # the first round warms up
        for name, block in blocks.items():
            dist.barrier(group=group)
            start = time.perf_counter()
            block(x).sum().backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64, device=device)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX, group=group)
            if rep:
                times[name].append(elapsed.item())
    return {"chunks": chunks, **{name: statistics.median(t) for name, t in times.items()}}


def _progress(total: int, *, enabled: bool):
    """A one-line progress bar on rank 0 (tqdm when installed, plain text otherwise)."""
    if not enabled or total <= 0:
        return lambda text: None
    try:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="training", leave=True, file=sys.stdout, dynamic_ncols=True, mininterval=0.5)

        def update(text: str) -> None:
            bar.set_postfix_str(text)
            bar.update(1)
            if bar.n >= total:
                bar.close()

        return update
    except ImportError:
        count = [0]

        def update(text: str) -> None:
            count[0] += 1
            filled = int(30 * count[0] / total)
            print(f"\rtraining [{'#' * filled}{'.' * (30 - filled)}] {count[0]}/{total} {text}", end="", flush=True)
            if count[0] >= total:
                print()

        return update
