"""Sequence parallelism at any token count: lengths that do not divide by the world size
run the decoder layers unsplit (same logits and gradients as one process), and generate()
with a KV cache (one-token decode steps) gives the same tokens as one process."""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist

from fusedpar.plan import parallelize
from tests.layers.common import check, check_grads
from tests.layers.test_models import MODEL_TOL, build



def _run_lengths(group, lengths):
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    ref = build("llama")
    model = parallelize(copy.deepcopy(ref), "auto", group=group, sequence_parallel=True, kernel="torch")
    g = torch.Generator().manual_seed(2)
    state = model._fusedpar_parallel["region"]
    for seq in lengths:  # split and unsplit forwards, each followed by its backward
        ids = torch.randint(0, 256, (2, seq), generator=g)
        out_ref, out = ref(ids, labels=ids), model(ids, labels=ids)
        assert state.split == (seq % world == 0)
        name = f"rank {rank}/{world} seq {seq}"
        check("logits", out.logits, out_ref.logits, torch.float32, name, MODEL_TOL)
        out_ref.loss.backward()
        out.loss.backward()
        check_grads(model, ref, world, rank, name, MODEL_TOL)
        ref.zero_grad(); model.zero_grad()  # noqa: E702
    return True


def test_any_sequence_length_trains_like_one_process(dist2, dist4):
    assert dist2.run(_run_lengths, [7, 8, 1, 5]) == [True] * 2
    assert dist4.run(_run_lengths, [6, 8, 3]) == [True] * 4


def _run_generate(group, prompt_len: int):
    ref = build("llama").eval()
    model = parallelize(copy.deepcopy(ref), "auto", group=group, sequence_parallel=True, kernel="torch").eval()
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 256, (2, prompt_len), generator=g)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, use_cache=True)
    want = ref.generate(ids, **kw)
    got = model.generate(ids, **kw)
    assert torch.equal(got, want), f"prompt {prompt_len}: {got.tolist()} vs single-process {want.tolist()}"
    return got.shape[1]


def test_generate_with_kv_cache_under_sequence_parallelism(dist2):
    # a prompt that splits (prefill on shards, then 1-token decode steps unsplit) and one that does not
    assert dist2.run(_run_generate, 6) == [12, 12]
    assert dist2.run(_run_generate, 5) == [11, 11]


def _run_generate_fp8(group):
    # fp8 quantizes per token (row-wise scales), so a token's product does not depend on how
    # the sequence is split: decoding with the KV cache (prefill split, 1-token steps unsplit)
    # and without it (every length re-run, split or not) must pick the same tokens
    from fusedpar.layers.fp8 import fp8_stats

    torch.manual_seed(0)
    model = parallelize(build("llama"), "auto", group=group, sequence_parallel=True, kernel="triton", fp8=True).eval()
    before = fp8_stats()["weight_quantizations"]
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 256, (2, 6), generator=g)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    cached = model.generate(ids, use_cache=True, **kw)
    assert fp8_stats()["weight_quantizations"] > before, "the fp8 path did not run"
    uncached = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached, uncached), f"{cached.tolist()} vs {uncached.tolist()}"
    return cached.tolist()


def test_generate_in_fp8_under_sequence_parallelism(dist2):
    first, second = dist2.run(_run_generate_fp8)
    assert first == second  # both ranks decode the same tokens
