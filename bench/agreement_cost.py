"""What the ranks' agreement checks cost (fusedpar/plan/agreement.py), on 2 gloo ranks.

    PYTHONPATH=. python bench/agreement_cost.py [--out bench/results/cpu] [--rounds 15]

Per forward of a sequence-parallel model, the input-shape check is one all-reduce of two
int64, started in the model's pre-hook and awaited at the first decoder layer. Measured on
one Llama decoder block (hidden 256, 8 heads, 4 kv heads, FFN 768, batch 2 x 256 tokens, as
bench/test_layers.py; vocab 256, so the block is most of the model), parallelized over 2
gloo ranks with sequence parallelism, torch GEMMs, three ways:

* in forward: how long each forward waits in the check (``_check_shapes``, timed where the
  model calls it: the wait after the overlap; it includes the ranks' skew, which the first
  collective would absorb without the check);
* back to back: the synchronous check called ``CALLS`` times in a row after a barrier, per
  call (no overlap: an upper bound of the latency it adds);
* end to end: forward + backward steps of the same model built with the checks on and off
  (``FUSEDPAR_CHECK_AGREEMENT``), alternated round by round (noisy on a shared 2-core box).

Each figure is the slower rank's median over the rounds, divided by the block's forward +
backward time with the checks off.
Also the one-time check in `parallelize` (a checksum of every parameter plus one all-gather).
Writes ``agreement-<timestamp>.json`` with the medians and the ratio.
"""
from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONFIG = dict(vocab_size=256, hidden_size=256, intermediate_size=768, num_hidden_layers=1, num_attention_heads=8,
              num_key_value_heads=4, max_position_embeddings=512, attn_implementation="sdpa")
BATCH, SEQ, STEPS, CALLS = 2, 256, 4, 200


def _rank(rank: int, world: int, init: str, rounds: int, results: mp.Queue) -> None:
    import torch
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    from fusedpar.plan import agreement, parallelize

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    group = dist.group.WORLD

    def build(check: bool) -> tuple[torch.nn.Module, float]:
        os.environ["FUSEDPAR_CHECK_AGREEMENT"] = "1" if check else "0"
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**CONFIG))
        dist.barrier(group)
        start = time.perf_counter()
        parallelize(model, "auto", group=group, sequence_parallel=True, kernel="torch")
        return model, time.perf_counter() - start

    (on, t_par_on), (off, t_par_off) = build(True), build(False)
    # time the checks the forwards of `on` make, where they run (timing only: the real
    # function runs, its collective included)
    in_forward: list[float] = []
    real_check = agreement._check_shapes

    def timed_check(*args: object, **kwargs: object) -> None:
        start = time.perf_counter()
        real_check(*args, **kwargs)
        in_forward.append(time.perf_counter() - start)

    agreement._check_shapes = timed_check
    os.environ["FUSEDPAR_CHECK_AGREEMENT"] = "1"
    ids = torch.randint(0, CONFIG["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    shapes = {"input_ids": [BATCH, SEQ], "labels": [BATCH, SEQ]}

    def steps(model: torch.nn.Module) -> float:
        dist.barrier(group)
        start = time.perf_counter()
        for _ in range(STEPS):
            model(ids, labels=ids).loss.backward()
        return (time.perf_counter() - start) / STEPS

    def checks() -> float:
        dist.barrier(group)
        start = time.perf_counter()
        for _ in range(CALLS):
            real_check("bench", shapes, group)
        return (time.perf_counter() - start) / CALLS

    steps(on), steps(off), checks()  # warm-up
    in_forward.clear()
    t_on, t_off, t_check = [], [], []
    for _ in range(rounds):
        t_on.append(steps(on))
        t_off.append(steps(off))
        t_check.append(checks())
    assert len(in_forward) == rounds * STEPS, f"{len(in_forward)} checks in {rounds * STEPS} forwards"
    results.put((rank, dict(step_on=t_on, step_off=t_off, check=t_check, check_in_forward=in_forward,
                            parallelize_on=t_par_on, parallelize_off=t_par_off)))
    dist.barrier(group)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench/results/cpu")
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    from tests.dist import remove_rendezvous, rendezvous_file

    ctx = mp.get_context("spawn")
    init, results, world = rendezvous_file(), ctx.Queue(), 2
    procs = [ctx.Process(target=_rank, args=(r, world, init, args.rounds, results)) for r in range(world)]
    for p in procs:
        p.start()
    per_rank = dict(results.get(timeout=1800) for _ in procs)
    for p in procs:
        p.join()
    remove_rendezvous(init)
    med = {key: max(statistics.median(per_rank[r][key]) for r in per_rank)  # the slower rank
           for key in ("step_on", "step_off", "check", "check_in_forward")}
    summary = {
        "what": "agreement checks, 2 gloo ranks, 1 Llama decoder block with SP (bench/agreement_cost.py)",
        "config": {**CONFIG, "batch": BATCH, "seq": SEQ, "steps_per_round": STEPS, "calls_per_round": CALLS,
                   "rounds": args.rounds},
        "check_in_forward_us": med["check_in_forward"] * 1e6,
        "check_in_forward_share_pct": 100 * med["check_in_forward"] / med["step_off"],
        "check_back_to_back_us": med["check"] * 1e6,
        "block_fwd_bwd_ms_checks_on": med["step_on"] * 1e3,
        "block_fwd_bwd_ms_checks_off": med["step_off"] * 1e3,
        "check_back_to_back_share_pct": 100 * med["check"] / med["step_off"],
        "end_to_end_difference_pct": 100 * (med["step_on"] - med["step_off"]) / med["step_off"],
        "parallelize_s_checks_on": max(per_rank[r]["parallelize_on"] for r in per_rank),
        "parallelize_s_checks_off": max(per_rank[r]["parallelize_off"] for r in per_rank),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "per_rank": per_rank,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"agreement-{datetime.datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "per_rank"}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
