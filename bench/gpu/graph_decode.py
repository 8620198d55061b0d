"""A decode step of a parallelized tiny Llama captured in a CUDA graph and replayed.

    python bench/gpu/graph_decode.py [--out DIR] [--new-tokens 32] [--kernel auto]
    python bench/gpu/graph_decode.py --cpu-smoke     # no GPU: the eager half, and a check
                                                     # that the step makes no host sync

The model (hidden 256, 4 layers, 8 heads, 4 kv heads, fp32, a static KV cache) is
parallelized at world 2 on torch's fake process group (one process; collectives are
no-ops, so one GPU runs the host path of TP=2: the ranks' input-shape check, the fused
q/k/v and gate/up GEMMs, the row-parallel all-reduce), sequence parallelism off and on.
For each: a greedy decode in eager mode, then the same decode with one step captured by
`torch.cuda.graph` (argmax and the input update inside the graph) and replayed; the tokens
must be the same, and the time per token of both is printed and written to
`graph-decode.json` / `graph-decode.md` in --out. Without CUDA (and without --cpu-smoke)
it says so and exits 0.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

LLAMA = dict(vocab_size=256, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, max_position_embeddings=256, attn_implementation="sdpa")
PROMPT = 7


def _model(device: torch.device, sp: bool, kernel: str, group: dist.ProcessGroup) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    import fusedpar

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA)).to(device).eval()
    return fusedpar.parallelize(model, "auto", group=group, kernel=kernel, sequence_parallel=sp)


class Decoder:
    """Greedy decode with a static cache; `step()` reads `token` and `position` and
    writes the next token into `token` (so a captured step can be replayed as is)."""

    def __init__(self, model: torch.nn.Module, device: torch.device, new_tokens: int) -> None:
        from transformers import StaticCache

        self.model, self.device, self.new_tokens = model, device, new_tokens
        self.cache = StaticCache(config=model.config, max_cache_len=PROMPT + new_tokens + 8)
        self.prompt = torch.randint(0, LLAMA["vocab_size"], (1, PROMPT), generator=torch.Generator().manual_seed(1))
        self.token = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)

    def prefill(self) -> None:
        self.cache.reset()
        out = self.model(input_ids=self.prompt.to(self.device), past_key_values=self.cache,
                         cache_position=torch.arange(PROMPT, device=self.device), use_cache=True)
        self.token.copy_(out.logits[:, -1:].argmax(-1))
        self.position.fill_(PROMPT)

    def step(self) -> None:
        out = self.model(input_ids=self.token, past_key_values=self.cache, cache_position=self.position,
                         use_cache=True)
        self.token.copy_(out.logits[:, -1:].argmax(-1))
        self.position.add_(1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def eager(dec: Decoder) -> tuple[list[int], float]:
    """Tokens and seconds per token of an eager decode."""
    with torch.no_grad():
        dec.prefill()
        tokens = []
        _sync(dec.device)
        start = time.perf_counter()
        for _ in range(dec.new_tokens):
            dec.step()
            tokens.append(dec.token.clone())
        _sync(dec.device)
        per_token = (time.perf_counter() - start) / dec.new_tokens
    return torch.cat(tokens).view(-1).tolist(), per_token


def graphed(dec: Decoder) -> tuple[list[int], float]:
    """Tokens and seconds per token with one step captured in a CUDA graph and replayed."""
    with torch.no_grad():
        dec.prefill()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graphs asks
            for _ in range(3):
                dec.step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            dec.step()
        dec.prefill()  # the same start as the eager decode (the cache is reset in place)
        tokens = []
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(dec.new_tokens):
            graph.replay()
            tokens.append(dec.token.clone())
        torch.cuda.synchronize()
        per_token = (time.perf_counter() - start) / dec.new_tokens
    return torch.cat(tokens).view(-1).tolist(), per_token


def cpu_smoke(dec: Decoder) -> dict:
    """Without a GPU: the eager decode, and the aten ops of one step at seen shapes that
    would make the host wait for a device (none expected)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    sync_ops = {aten._local_scalar_dense, aten.item, aten.equal, aten.is_nonzero, aten.nonzero, aten.allclose}

    class Record(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.syncs: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in sync_ops:
                self.syncs.append(str(func))
            return func(*args, **(kwargs or {}))

    tokens, per_token = eager(dec)
    with torch.no_grad(), Record() as rec:
        dec.step()
    return {"tokens": tokens, "eager_ms_per_token": per_token * 1e3, "syncs_in_a_step": rec.syncs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--kernel", default="auto", help="fusedpar GEMM backend (auto: Triton on CUDA)")
    parser.add_argument("--cpu-smoke", action="store_true", help="no GPU: the eager half and the sync check")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu_smoke:
        print("graph-decode: no CUDA device: skipped (CUDA graphs need one; --cpu-smoke rehearses the rest)")
        return 0
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    group = dist.group.WORLD
    device = torch.device("cuda" if cuda else "cpu")
    kernel = args.kernel if cuda else "torch"
    results, failed = {}, False
    for sp in (False, True):
        name = "tp+sp" if sp else "tp"
        dec = Decoder(_model(device, sp, kernel, group), device, args.new_tokens)
        if not cuda:
            row = cpu_smoke(dec)
            failed |= bool(row["syncs_in_a_step"])
        else:
            tokens, t_eager = eager(dec)
            try:
                g_tokens, t_graph = graphed(dec)
                row = {"eager_ms_per_token": t_eager * 1e3, "graph_ms_per_token": t_graph * 1e3,
                       "same_tokens": g_tokens == tokens, "tokens": tokens}
                failed |= g_tokens != tokens
            except Exception as e:  # a capture that fails is the finding: report it, run the rest
                row = {"eager_ms_per_token": t_eager * 1e3, "error": f"{type(e).__name__}: {e}"}
                failed = True
        results[name] = row
        print(f"graph-decode {name}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                  for k, v in row.items() if k != "tokens"), flush=True)
    meta = {"device": torch.cuda.get_device_name() if cuda else "cpu (smoke: no graph)", "torch": torch.__version__,
            "kernel": kernel, "group": "fake (collectives are no-ops), world 2", "llama": LLAMA,
            "new_tokens": args.new_tokens, "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "graph-decode.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
        lines = [f"# Decode step in a CUDA graph ({meta['device']}, torch {meta['torch']}, kernel {kernel})", "",
                 "| variant | eager ms/token | graph ms/token | same tokens |", "|---|---|---|---|"]
        for name, row in results.items():
            graph = f"{row['graph_ms_per_token']:.3f}" if "graph_ms_per_token" in row else row.get("error", "-")
            lines.append(f"| {name} | {row['eager_ms_per_token']:.3f} | {graph} | {row.get('same_tokens', '-')} |")
        (args.out / "graph-decode.md").write_text("\n".join(lines) + "\n")
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
