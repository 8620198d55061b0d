"""Host overhead per call: fusedpar's linears and a decode step against hand-written eager TP.

Host time only: torch's fake process group (world 2, one process) makes every collective a
no-op (FACTS.md), so what is timed is the work of issuing kernels and collectives, which
bounds a small-token step (a decode step) on a GPU. One thread; the variants of a case run
interleaved round by round (the order rotates each round) so drifting load on a shared box
hits them alike; each figure is the median over the rounds.

Linears (hidden 256, no bias, fp32, `kernel="torch"`), 1 and 16 tokens, forward (under
no_grad, as in decode) and forward+backward (input and weights require grad):

    fusedpar    fusedpar.ColumnParallelLinear / RowParallelLinear
    hand        F.linear on the local weight plus one collective in a Megatron-style
                autograd.Function (column: identity forward, all_reduce of dx; row:
                all_reduce of the output)
    dtensor     nn.Linear through torch's parallelize_module (ColwiseParallel / RowwiseParallel)

Decode: greedy decode of a tiny Hugging Face Llama (hidden 256, 4 layers, 8 heads, 4 kv
heads), a 7-token prompt then 32 new tokens with a KV cache, ms per new token:

    single         the model in one process (no TP)
    hand           q/k/v, gate/up column-parallel and o/down row-parallel, hand-written as above
    fusedpar       fusedpar.parallelize(model, "auto", kernel="torch")
    fusedpar_sp    the same with sequence_parallel=True

(transformers' own `tp_plan="auto"` needs `accelerate`; it runs only where that is installed.)

Targets (issue 27): every linear at most 1.5x hand-written; decode at most 1.3x hand-written.

    PYTHONPATH=. python bench/test_host_overhead.py [--rounds 40] [--out bench/results/cpu] [--tag after]
    python -m fusedpar bench --suite bench/test_host_overhead.py     # pytest-benchmark rows
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# hidden 256 (the tiny Llama's): at 1024 a one-token fp32 GEMM on this CPU takes ~120 us, on a
# GPU a few, so the CPU GEMM would hide the host work this benchmark is about
HIDDEN, WORLD = 256, 2
LINEAR_TOKENS = (1, 16)
LLAMA = dict(vocab_size=256, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=256, attn_implementation="sdpa")
PROMPT, NEW_TOKENS = 7, 32  # an odd prompt: the SP variant runs its prefill unsplit, like its decode steps
LINEAR_TARGET, DECODE_TARGET = 1.5, 1.3


# --------------------------------------------------------------------------------------------
# The fake world
# --------------------------------------------------------------------------------------------


def init_fake_world() -> dist.ProcessGroup:
    """World 2 on torch's fake process group in this one process (collectives are no-ops)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if not dist.is_initialized():
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=WORLD)
    if dist.get_backend() != "fake":
        raise RuntimeError(f"host-overhead benchmark: expected torch's fake process group, got {dist.get_backend()}")
    return dist.group.WORLD


def interleaved(variants: dict[str, Callable[[], object]], *, rounds: int, calls: int,
                warmup: int = 3) -> dict[str, list[float]]:
    """Seconds per call of each variant, one figure per round: each round runs every variant
    `calls` times, in an order rotated by one each round."""
    names = list(variants)
    for name in names:
        for _ in range(warmup):
            variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn = variants[name]
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append((time.perf_counter() - start) / calls)
    return times


# --------------------------------------------------------------------------------------------
# Hand-written eager TP (Megatron's mappings)
# --------------------------------------------------------------------------------------------


class _CopyToTP(torch.autograd.Function):
    """Megatron's copy_to_tensor_model_parallel_region: identity forward, all_reduce of dx."""

    @staticmethod
    def forward(ctx, x, group):  # type: ignore[override]
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, dx):  # type: ignore[override]
        dx = dx.contiguous()
        dist.all_reduce(dx, group=ctx.group)
        return dx, None


class _ReduceFromTP(torch.autograd.Function):
    """Megatron's reduce_from_tensor_model_parallel_region: all_reduce forward, identity dgrad."""

    @staticmethod
    def forward(ctx, y, group):  # type: ignore[override]
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        return dy, None


class HandColumn(nn.Module):
    """Column-parallel linear: `F.linear(x_full, w_shard_n)`; dx all-reduced in backward."""

    def __init__(self, linear: nn.Linear, group: dist.ProcessGroup) -> None:
        super().__init__()
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        self.group = group
        self.weight = nn.Parameter(linear.weight.detach().chunk(world, 0)[rank].clone())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().chunk(world, 0)[rank].clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(_CopyToTP.apply(x, self.group), self.weight, self.bias)


class HandRow(nn.Module):
    """Row-parallel linear: `all_reduce(F.linear(x_part, w_shard_k)) + b`."""

    def __init__(self, linear: nn.Linear, group: dist.ProcessGroup) -> None:
        super().__init__()
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        self.group = group
        self.weight = nn.Parameter(linear.weight.detach().chunk(world, 1)[rank].clone())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _ReduceFromTP.apply(F.linear(x, self.weight), self.group)
        return y if self.bias is None else y + self.bias


def hand_parallelize(model: nn.Module, group: dist.ProcessGroup) -> nn.Module:
    """A HF Llama with its projections replaced by HandColumn / HandRow (attention infers
    the local head count from the projection width)."""
    column = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
    row = ("o_proj", "down_proj")
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in column:
                setattr(module, child_name, HandColumn(child, group))
            elif child_name in row:
                setattr(module, child_name, HandRow(child, group))
    return model


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------


def linear_variants(kind: str, tokens: int, backward: bool, group: dist.ProcessGroup) -> dict[str, Callable]:
    """`{variant: one call}` for one column (kind "column") or row linear case."""
    import fusedpar
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    torch.manual_seed(0)
    base = nn.Linear(HIDDEN, HIDDEN, bias=False)
    if kind == "column":
        ours = fusedpar.ColumnParallelLinear.from_linear(base, group=group, kernel="torch")
        hand = HandColumn(base, group)
        style = ColwiseParallel()
        x = torch.randn(tokens, HIDDEN)
    else:
        ours = fusedpar.RowParallelLinear.from_linear(base, group=group, kernel="torch")
        hand = HandRow(base, group)
        style = RowwiseParallel()
        x = torch.randn(tokens, HIDDEN // WORLD)
    mesh = init_device_mesh("cpu", (WORLD,))
    peer = parallelize_module(nn.Linear(HIDDEN, HIDDEN, bias=False), mesh, style)
    x.requires_grad_(backward)
    out: dict[str, Callable] = {}
    for name, layer in (("fusedpar", ours), ("hand", hand), ("dtensor", peer)):
        params = list(layer.parameters())
        if backward:
            dy = torch.randn(tokens, layer(x).shape[-1])

            def call(layer=layer, params=params, dy=dy) -> None:
                for p in params:
                    p.grad = None
                layer(x).backward(dy)
        else:
            def call(layer=layer) -> None:
                with torch.no_grad():
                    layer(x)
        out[name] = call
    return out


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**LLAMA)).eval()


def decode_variants(group: dist.ProcessGroup) -> dict[str, Callable[[], float]]:
    """`{variant: one greedy decode, returning seconds per new token}` (prefill untimed)."""
    import fusedpar
    from transformers import DynamicCache

    models: dict[str, nn.Module] = {"single": _llama(), "hand": hand_parallelize(_llama(), group)}
    models["fusedpar"] = fusedpar.parallelize(_llama(), "auto", group=group, kernel="torch")
    models["fusedpar_sp"] = fusedpar.parallelize(_llama(), "auto", group=group, kernel="torch",
                                                 sequence_parallel=True)
    if importlib.util.find_spec("accelerate") is not None:  # transformers' own TP needs it
        model, why = _transformers_tp()
        TRANSFORMERS_TP["status"] = why
        if model is not None:
            models["transformers_tp"] = model
    prompt = torch.randint(0, LLAMA["vocab_size"], (1, PROMPT), generator=torch.Generator().manual_seed(1))

    def run(model: nn.Module) -> float:
        with torch.no_grad():
            cache = DynamicCache(config=model.config)
            out = model(input_ids=prompt, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            start = time.perf_counter()
            for _ in range(NEW_TOKENS):
                out = model(input_ids=token, past_key_values=cache, use_cache=True)
                token = out.logits[:, -1:].argmax(-1)
            return (time.perf_counter() - start) / NEW_TOKENS

    return {name: (lambda model=model: run(model)) for name, model in models.items()}


# what became of transformers' own TP in this run (meta["transformers_tp"])
TRANSFORMERS_TP = {"status": "not run: accelerate is not installed (transformers' tp_plan needs it)"}


def _transformers_tp() -> tuple[nn.Module | None, str]:  # pragma: no cover - needs accelerate
    """transformers' `from_pretrained(tp_plan="auto")`, and whether it really sharded: a model
    it left whole (as transformers 5.23 does on this fake CPU group) is not TP, and timing it
    as such would flatter the peer, so it is left out, saying why."""
    import tempfile

    from transformers import LlamaForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        _llama().save_pretrained(tmp)
        model = LlamaForCausalLM.from_pretrained(tmp, tp_plan="auto").eval()
    rows = model.model.layers[0].self_attn.q_proj.weight.shape[0]
    if rows == LLAMA["hidden_size"]:
        return None, (f"not run: tp_plan='auto' left q_proj whole ({rows} rows, world {WORLD}) on this "
                      f"backend, so it would time one process, not TP")
    return model, "run"


def measure_decode(group: dist.ProcessGroup, rounds: int) -> dict[str, list[float]]:
    """Seconds per new token of each decode variant, one figure per round (interleaved)."""
    variants = decode_variants(group)
    names = list(variants)
    for name in names:
        variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(variants[name]())
    return times


def bytes_per_block_forward(group: dist.ProcessGroup, *, tokens: int, grad: bool,
                            sequence_parallel: bool = False) -> int:
    """Bytes of new tensor storage allocated by one forward of the first decoder layer of the
    parallelized tiny Llama (fusedpar, kernel="torch"), after a warm-up forward: every aten op's
    outputs whose storage is none of its inputs' (views and out= writes allocate nothing)."""
    import fusedpar
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.on, self.bytes = False, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if self.on:
                flat = torch.utils._pytree.tree_leaves((args, kwargs))
                seen = {t.untyped_storage().data_ptr() for t in flat if isinstance(t, torch.Tensor)}
                for t in torch.utils._pytree.tree_leaves(out):
                    if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                        seen.add(t.untyped_storage().data_ptr())
                        self.bytes += t.untyped_storage().nbytes()
            return out

    model = fusedpar.parallelize(_llama(), "auto", group=group, kernel="torch", sequence_parallel=sequence_parallel)
    block = model.model.layers[0]
    counter = Count()
    block.register_forward_pre_hook(lambda *a: setattr(counter, "on", True), prepend=True)
    block.register_forward_hook(lambda *a: setattr(counter, "on", False), always_call=True)
    ids = torch.randint(0, LLAMA["vocab_size"], (1, tokens), generator=torch.Generator().manual_seed(1))
    with torch.set_grad_enabled(grad):
        model(ids)  # warm-up: what is made once (kept weights, plans) is not per forward
        with counter:
            model(ids)
    return counter.bytes


LINEAR_CASES = [(kind, tokens, backward) for backward in (False, True) for kind in ("column", "row")
                for tokens in LINEAR_TOKENS]


def _case_name(kind: str, tokens: int, backward: bool) -> str:
    return f"{kind} {'fwd+bwd' if backward else 'forward'}, {tokens} token{'s' if tokens > 1 else ''}"


def _summary(times: dict[str, list[float]], scale: float) -> dict[str, float]:
    return {name: statistics.median(ts) * scale for name, ts in times.items()}


# --------------------------------------------------------------------------------------------
# pytest-benchmark entry points (python -m fusedpar bench --suite bench/test_host_overhead.py)
# --------------------------------------------------------------------------------------------

try:
    import pytest
except ImportError:  # pragma: no cover - the standalone runner needs no pytest
    pytest = None

if pytest is not None:

    @pytest.fixture(scope="module")
    def fake_group():
        if dist.is_initialized() and dist.get_backend() != "fake":
            pytest.skip("another process group is initialized in this process")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        group = init_fake_world()
        yield group
        torch.set_num_threads(threads)
        dist.destroy_process_group()

    def _rounds(quick: bool, bench_rounds: int) -> int:
        return bench_rounds if quick else max(bench_rounds, 40)

    @pytest.mark.parametrize("kind,tokens,backward", LINEAR_CASES,
                             ids=[f"{k}-{t}tok-{'fwdbwd' if b else 'fwd'}" for k, t, b in LINEAR_CASES])
    def test_linear_host_overhead(benchmark, fake_group, quick, bench_rounds, kind, tokens, backward):
        variants = linear_variants(kind, tokens, backward, fake_group)
        times: dict[str, list[float]] = {name: [] for name in variants}

        def one_round() -> None:
            for name, ts in interleaved(variants, rounds=1, calls=10 if quick else 20, warmup=0).items():
                times[name].extend(ts)

        benchmark.pedantic(one_round, rounds=_rounds(quick, bench_rounds), iterations=1, warmup_rounds=1)
        med = _summary(times, 1e6)
        benchmark.extra_info.update({
            "op": f"host {kind} {'fwd+bwd' if backward else 'fwd'}", "m": tokens, "k": HIDDEN, "n": HIDDEN,
            "world_size": WORLD, "variant": "interleaved", **{f"{k}_us": v for k, v in med.items()},
            "ratio_to_hand": med["fusedpar"] / med["hand"], "target": LINEAR_TARGET,
        })

    def test_decode_host_overhead(benchmark, fake_group, quick, bench_rounds):
        pytest.importorskip("transformers")
        rounds = _rounds(quick, bench_rounds)
        holder: dict[str, dict[str, list[float]]] = {}
        benchmark.pedantic(lambda: holder.update(t=measure_decode(fake_group, rounds)), rounds=1, iterations=1)
        med = _summary(holder["t"], 1e3)
        benchmark.extra_info.update({
            "op": "host decode", "m": 1, "world_size": WORLD, "variant": "interleaved",
            **{f"{k}_ms_per_token": v for k, v in med.items()},
            "ratio_to_hand": med["fusedpar"] / med["hand"], "target": DECODE_TARGET,
        })


# --------------------------------------------------------------------------------------------
# Standalone runner: JSON + a markdown table in bench/results/cpu/
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--calls", type=int, default=20, help="calls per variant per round (linears)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "cpu")
    parser.add_argument("--tag", default="", help="a word for the file name (e.g. before / after)")
    parser.add_argument("--skip-decode", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    group = init_fake_world()
    linears = []
    for kind, tokens, backward in LINEAR_CASES:
        times = interleaved(linear_variants(kind, tokens, backward, group), rounds=args.rounds, calls=args.calls)
        med = _summary(times, 1e6)
        row = {"case": _case_name(kind, tokens, backward), "us": med, "ratio_to_hand": med["fusedpar"] / med["hand"]}
        linears.append(row)
        print(f"{row['case']:<28} " + "  ".join(f"{k} {v:7.1f} us" for k, v in med.items())
              + f"  fusedpar/hand {row['ratio_to_hand']:.2f}x", flush=True)
    alloc = {}
    for tokens in (1, 16):
        for grad in (False, True):
            key = f"{tokens} token{'s' if tokens > 1 else ''}, {'grad' if grad else 'no_grad'}"
            alloc[key] = bytes_per_block_forward(group, tokens=tokens, grad=grad)
            print(f"bytes allocated per decoder-layer forward, {key}: {alloc[key]}", flush=True)
    decode = None
    if not args.skip_decode:
        med = _summary(measure_decode(group, args.rounds), 1e3)
        decode = {"ms_per_token": med, "ratio_to_hand": {k: v / med["hand"] for k, v in med.items()}}
        print("decode ms/token: " + "  ".join(f"{k} {v:.3f}" for k, v in med.items()), flush=True)
    import triton

    stamp = datetime.datetime.now(datetime.timezone.utc)
    meta = {
        "date_utc": stamp.isoformat(timespec="seconds"), "torch": torch.__version__, "triton": triton.__version__,
        "python": platform.python_version(), "machine": platform.machine(), "cpu_threads": 1,
        "group": f"fake (collectives are no-ops), world {WORLD}", "rounds": args.rounds, "calls": args.calls,
        "hidden": HIDDEN, "llama": LLAMA, "prompt": PROMPT, "new_tokens": NEW_TOKENS, "tag": args.tag,
        "transformers_tp": TRANSFORMERS_TP["status"],
        "targets": {"linear_max_ratio_to_hand": LINEAR_TARGET, "decode_max_ratio_to_hand": DECODE_TARGET},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"host-overhead-{stamp:%Y%m%d-%H%M%S}{'-' + args.tag if args.tag else ''}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "linears": linears, "decode": decode,
                                                          "bytes_per_block_forward": alloc}, indent=1))
    stem.with_suffix(".md").write_text(markdown(meta, linears, decode, alloc))
    print(f"results: {stem}.json (+ .md)")
    return 0


def markdown(meta: dict, linears: list[dict], decode: dict | None, alloc: dict[str, int]) -> str:
    lines = [f"# Host overhead ({meta['tag'] or 'run'}), {meta['date_utc']}", "",
             f"torch {meta['torch']}, triton {meta['triton']}, Python {meta['python']}, {meta['group']}, one "
             f"thread, variants interleaved, medians of {meta['rounds']} rounds ({meta['calls']} calls each for "
             f"the linears). Targets: every linear <= {LINEAR_TARGET}x hand-written, decode <= {DECODE_TARGET}x.", "",
             f"| call (hidden {HIDDEN}) | fusedpar µs | hand-written µs | DTensor µs | fusedpar / hand |",
             "|---|---|---|---|---|"]
    for row in linears:
        us = row["us"]
        lines.append(f"| {row['case']} | {us['fusedpar']:.1f} | {us['hand']:.1f} | {us['dtensor']:.1f} | "
                     f"{row['ratio_to_hand']:.2f}x |")
    if decode is not None:
        lines += ["", f"Greedy decode, tiny Llama (hidden 256, 4 layers), {NEW_TOKENS} new tokens:", "",
                  "| variant | ms / token | / hand-written |", "|---|---|---|"]
        for name, ms in decode["ms_per_token"].items():
            lines.append(f"| {name} | {ms:.3f} | {decode['ratio_to_hand'][name]:.2f}x |")
        lines += ["", f"transformers' tp_plan: {meta['transformers_tp']}."]
    lines += ["", "Bytes of new storage per forward of the first decoder layer (fusedpar, SP off, after a warm-up "
              "forward; aten outputs not aliasing an input):", "", "| input | bytes |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in alloc.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
