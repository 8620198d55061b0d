"""Train the torchtitan-shaped Llama the torchtitan way, on fusedpar's overlapped layers.

    torchrun --nproc-per-node 4 examples/torchtitan_llama/train.py --dp 2 --tp 2 --steps 10
    torchrun --nproc-per-node 4 examples/torchtitan_llama/train.py --dp 2 --tp 2 --steps 10 \\
        --checkpoint-dir /tmp/ckpt --checkpoint-every 5      # and again with --resume latest
    python examples/torchtitan_llama/train.py --dp 1 --tp 1  # one process, the reference

What a torchtitan user recognises, in torchtitan's order: a (dp, tp) DeviceMesh; the
tensor-parallel plan of `parallelize_llama` (torch ParallelStyles, sequence parallel, loss
parallel), applied by `fusedpar.parallelize_module` instead of torch's (`--torch-tp` switches
back); each decoder block compiled with `fullgraph=True` (`--compile`); FSDP2 `fully_shard`
over "dp" per block and at the root; AdamW; `torch.nn.utils.clip_grad_norm_`; cross-entropy
under torch's `loss_parallel()` on vocab-split DTensor logits; DCP checkpoints of model and
optimizer through `get_state_dict` / `set_state_dict`. Runs on CPU ranks (gloo) or GPUs (NCCL).

Every rank of a dp group reads the same batch; the dp groups read disjoint halves of one
global batch, so the loss equals the one-process loss over the whole batch. `--out` writes
the per-step losses and gradient norms as JSON.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: the repository root on the path
    sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from examples.torchtitan_llama.model import TitanArgs, Transformer, parallelize_llama  # noqa: E402


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dp", type=int, default=1, help="data-parallel (FSDP2) degree")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=4, help="global batch (sequences)")
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--max-norm", type=float, default=1.0)
    p.add_argument("--compile", default="none", choices=("none", "aot_eager", "inductor"),
                   help="torch.compile each decoder block with fullgraph=True on this backend")
    p.add_argument("--torch-tp", action="store_true", help="torch's parallelize_module instead of fusedpar's")
    p.add_argument("--checkpoint-dir", default=None)
    p.add_argument("--checkpoint-every", type=int, default=0)
    p.add_argument("--resume", default=None, metavar="STEP",
                   help="first load checkpoint-dir/step-STEP ('latest': the highest step there)")
    p.add_argument("--out", default=None, help="write {step: {loss, grad_norm}} as JSON (rank 0)")
    return p.parse_args(argv)


def _batch(step: int, args: argparse.Namespace, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of `step` (the same on every rank): tokens and next-token labels."""
    g = torch.Generator().manual_seed(1000 + step)
    seq = torch.randint(0, vocab, (args.batch, args.seq + 1), generator=g)
    return seq[:, :-1], seq[:, 1:]


def _checkpoint(directory: str | None, step: str) -> str:
    """checkpoint-dir/step-N for `step` N or "latest"."""
    if not directory:
        raise SystemExit("train.py: --resume: expected --checkpoint-dir too, got none")
    if step == "latest":
        steps = [int(n[5:]) for n in os.listdir(directory) if n.startswith("step-") and n[5:].isdigit()]
        if not steps:
            raise SystemExit(f"train.py: --resume latest: expected step-N checkpoints in {directory}, got none")
        step = str(max(steps))
    path = os.path.join(directory, f"step-{step}")
    if not os.path.isdir(path):
        raise SystemExit(f"train.py: --resume {step}: expected the checkpoint {path}, got no such directory")
    return path


def main(argv: list[str] | None = None) -> dict[int, dict[str, float]]:
    args = _args(argv)
    world = args.dp * args.tp
    device = "cuda" if torch.cuda.is_available() else "cpu"
    distributed = world > 1
    if distributed:
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=datetime.timedelta(seconds=120))
        if dist.get_world_size() != world:
            raise SystemExit(f"train.py: --dp {args.dp} x --tp {args.tp} = {world}: expected that many ranks, "
                             f"got {dist.get_world_size()} (torchrun --nproc-per-node {world})")
    rank = dist.get_rank() if distributed else 0
    # torch's clipping on a 2-D mesh reduces the norm over dp, then tp, and says so each step
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)

    torch.manual_seed(0)  # the same initial weights on every rank
    model_args = TitanArgs()
    model = Transformer(model_args).to(device)

    mesh = None
    if distributed:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device, (args.dp, args.tp), mesh_dim_names=("dp", "tp"))
    if args.tp > 1:
        if args.torch_tp:
            from torch.distributed.tensor.parallel import parallelize_module
        else:
            from fusedpar import parallelize_module  # the one import that changes
        parallelize_llama(model, mesh["tp"], loss_parallel=True, parallelize_module=parallelize_module)
    if args.compile != "none":  # torchtitan's apply_compile: per block, fullgraph
        for key, block in list(model.layers.items()):
            model.layers.register_module(key, torch.compile(block, backend=args.compile, fullgraph=True))
    if args.dp > 1:  # torchtitan's apply_fsdp: each block, then the root
        from torch.distributed.fsdp import fully_shard

        for block in model.layers.values():
            fully_shard(block, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)

    start = 0
    if args.resume:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd, "step": torch.zeros((), dtype=torch.int64)}
        dcp.load(state, checkpoint_id=_checkpoint(args.checkpoint_dir, args.resume))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        start = int(state["step"])

    dp_rank = mesh["dp"].get_local_rank() if mesh is not None else 0
    history: dict[int, dict[str, float]] = {}
    for step in range(start + 1, args.steps + 1):
        tokens, labels = _batch(step, args, model_args.vocab_size)
        tokens, labels = tokens.chunk(args.dp)[dp_rank].to(device), labels.chunk(args.dp)[dp_rank].to(device)
        logits = model(tokens)
        if args.tp > 1:  # vocab-split DTensor logits: the loss never gathers them
            from torch.distributed.tensor.parallel import loss_parallel

            with loss_parallel():
                loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
                loss.backward()
        else:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
            loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_norm)
        optimizer.step()
        optimizer.zero_grad()
        loss = loss.full_tensor() if hasattr(loss, "full_tensor") else loss
        if args.dp > 1:  # the global batch's mean loss, for the log
            loss = loss.detach().clone()
            dist.all_reduce(loss, group=mesh["dp"].get_group())
            loss /= args.dp
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        history[step] = {"loss": float(loss.detach()), "grad_norm": float(grad_norm)}
        if rank == 0:
            print(f"step {step:3d}  loss {float(loss):.6f}  grad_norm {float(grad_norm):.6f}", flush=True)
        if args.checkpoint_dir and args.checkpoint_every and step % args.checkpoint_every == 0:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict

            model_sd, optim_sd = get_state_dict(model, optimizer)
            dcp.save({"model": model_sd, "optim": optim_sd, "step": torch.tensor(step)},
                     checkpoint_id=os.path.join(args.checkpoint_dir, f"step-{step}"))

    if rank == 0 and args.out:
        with open(args.out, "w") as f:
            json.dump(history, f, indent=1)
    if distributed:
        dist.destroy_process_group()
    return history


if __name__ == "__main__":
    main()
