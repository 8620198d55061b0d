"""Peak resident memory per rank of sharded loading (fusedpar.from_pretrained) against one
process's Hugging Face `from_pretrained`, on a Llama of ~250 MB of fp32 weights.

    python bench/load_memory.py [--out bench/results/cpu] [--worlds 2 4]

Each measurement runs in a fresh spawned process (gloo ranks for fusedpar): the peak RSS
(VmHWM, reset just before loading with /proc/self/clear_refs) and the anonymous RSS after
loading and writing every parameter once (tensors backed by the checkpoint's memory map
become the process's own memory only once written, as an optimizer step does), minus the
same just before loading (imports and process group done): what loading added. Expected per rank: the replicated parameters
(embeddings, LM head, norms) plus 1/world of the rest.
"""
from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONFIG = dict(vocab_size=8192, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
              num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=256,
              tie_word_embeddings=False)


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> tuple[float, float]:
    """Reset the peak RSS (VmHWM) to the current RSS (Linux: clear_refs 5); return the RSS
    and its anonymous part. The imports' own peak would otherwise hide what loading adds."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mb("VmRSS"), _status_mb("RssAnon")


def _added(before: tuple[float, float]) -> tuple[float, float]:
    """(peak RSS, anonymous RSS now) added since `before`. The peak also counts page-cache
    pages of the checkpoint files read through their memory map (shared between ranks and
    reclaimable); the anonymous part is the memory the process itself holds."""
    return _status_mb("VmHWM") - before[0], _status_mb("RssAnon") - before[1]


def _touch(model) -> None:
    """Write every parameter once, as the first optimizer step would: tensors backed by the
    checkpoint's (private) memory map become memory of the process only once written."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.0)


def _single(path: str, q) -> None:
    from transformers import LlamaForCausalLM

    before = _reset_peak()
    model = LlamaForCausalLM.from_pretrained(path)
    _touch(model)
    q.put(("hf-1-process", 0, *_added(before), sum(p.numel() * 4 for p in model.parameters()) / 2**20))


def _rank(rank: int, world: int, init: str, path: str, q) -> None:
    import torch
    import torch.distributed as dist
    from transformers import LlamaForCausalLM

    import fusedpar

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    group = dist.group.WORLD
    dist.barrier()
    before = _reset_peak()
    model = fusedpar.from_pretrained(LlamaForCausalLM, path, group=group, kernel="torch")
    _touch(model)
    held = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    q.put((f"fusedpar-world{world}", rank, *_added(before), held))
    dist.barrier()
    dist.destroy_process_group()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "cpu")
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    args = ap.parse_args()
    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    ctx = mp.get_context("spawn")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**CONFIG))
        full_mb = sum(p.numel() * 4 for p in model.parameters()) / 2**20
        replicated_mb = sum(p.numel() * 4 for n, p in model.named_parameters()
                            if "embed" in n or "lm_head" in n or "norm" in n) / 2**20
        model.save_pretrained(tmp, max_shard_size="50MB")
        del model
        q = ctx.Queue()
        p = ctx.Process(target=_single, args=(tmp, q))
        p.start(); rows.append(q.get(timeout=300)); p.join()  # noqa: E702
        for world in args.worlds:
            init = f"file://{tmp}/rdzv-{world}"
            procs = [ctx.Process(target=_rank, args=(r, world, init, tmp, q)) for r in range(world)]
            for pr in procs:
                pr.start()
            rows += [q.get(timeout=600) for _ in range(world)]
            for pr in procs:
                pr.join()
    result = {
        "what": "memory added by loading and writing every parameter once (MiB), per process/rank: anonymous "
                "RSS (what the process holds) and peak RSS (also counts checkpoint pages read through mmap)",
        "model_fp32_mib": round(full_mb, 1), "replicated_mib": round(replicated_mb, 1),
        "rows": [{"run": r[0], "rank": r[1], "peak_rss_added_mib": round(r[2], 1), "anon_rss_added_mib": round(r[3], 1),
                  "parameters_held_mib": round(r[4], 1),
                  "expected_mib": round(replicated_mb + (full_mb - replicated_mb) / int(r[0][-1]), 1)
                  if r[0].startswith("fusedpar") else round(full_mb, 1)} for r in sorted(rows)],
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python bench/load_memory.py " + " ".join(sys.argv[1:]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    (args.out / f"load-memory-{stamp}.json").write_text(json.dumps(result, indent=1))
    print(f"model {full_mb:.0f} MiB fp32, replicated part {replicated_mb:.0f} MiB")
    for r in result["rows"]:
        print(f"{r['run']:>18} rank {r['rank']}: anonymous +{r['anon_rss_added_mib']:.0f} MiB, peak RSS "
              f"+{r['peak_rss_added_mib']:.0f} MiB (holds {r['parameters_held_mib']:.0f} MiB of parameters; "
              f"expected ~{r['expected_mib']:.0f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
