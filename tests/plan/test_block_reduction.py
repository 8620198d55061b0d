"""One reduction per MoE block (fusedpar/plan/block_reduction.py): the routed experts' and
the shared expert's partial sums reduced once at the block's exit, where the block's graph
shows that is exact; on real gloo ranks, against the single-process model, with the
collectives counted on the real communicator."""
from __future__ import annotations

import collections
import copy

import pytest
import torch

from fusedpar.comm import TorchCommunicator
from fusedpar.plan import parallelize
from fusedpar.plan.block_reduction import _MarkFn, block_is_merged, is_linear_in_marks
from tests.layers.common import rel_err
from tests.models.sweep import run_cases


def test_the_graph_check_accepts_sums_and_constant_factors_only():
    a = _MarkFn.apply(torch.randn(4, 3, requires_grad=True))
    b = _MarkFn.apply(torch.randn(4, 3, requires_grad=True))
    x = torch.randn(4, 3, requires_grad=True) * 1.0  # a replicated value with a history (not a leaf)
    gate = torch.randn(4, 1, requires_grad=True)
    const = torch.rand(4, 1)
    exact = {"a + b": a + b, "(a + b).view": (a + b.double().float()).view(12), "2a - b": a * 2 - b,
             "a * const + b": a * const + b, "a / 3": a / 3}
    inexact = {"a + x": a + x, "sigmoid(gate) * a + b": torch.sigmoid(gate) * a + b, "a * b": a * b,
               "a + const": a + const, "relu(a)": torch.relu(a), "x": x}
    for name, y in exact.items():
        assert is_linear_in_marks(y, stop=set()), name
    for name, y in inexact.items():
        assert not is_linear_in_marks(y, stop=set()), name
    assert not is_linear_in_marks(a + x, stop={x.grad_fn})


def _count_collectives(monkeypatch_target: list) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    original = TorchCommunicator._run

    def counting(self, op, issue, *tensors):
        counts[op] += 1
        return original(self, op, issue, *tensors)

    TorchCommunicator._run = counting
    monkeypatch_target.append(original)
    return counts


def _run_counts(group, family: str, sp: bool):
    from tests.models.families import VOCAB, build

    ref = build(family)
    merged = parallelize(copy.deepcopy(ref), "auto", group=group, sequence_parallel=sp, kernel="torch")
    unmerged = parallelize(copy.deepcopy(ref), "auto", group=group, sequence_parallel=sp, kernel="torch")
    blocks = [m for m in merged.modules() if hasattr(m, "_fusedpar_block_reduction")]
    assert blocks, "expected MoE blocks with a shared expert"
    ids = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(4))
    merged(ids, labels=ids).loss.backward()  # the first forward with gradients decides
    assert all(block_is_merged(b) for b in blocks)
    restore: list = []
    counts = {}
    try:
        with torch.no_grad():
            for name, model in (("merged", merged), ("unmerged", unmerged)):
                c = _count_collectives(restore)
                logits = model(ids).logits
                counts[name] = dict(c)
                TorchCommunicator._run = restore.pop()
                err = rel_err(logits, ref(ids).logits)
                assert err <= 1e-5, (name, err)
    finally:
        if restore:
            TorchCommunicator._run = restore[0]
    return {"blocks": len(blocks), **counts}


@pytest.mark.parametrize("sp", [False, True], ids=["sp_off", "sp_on"])
def test_moe_blocks_with_a_shared_expert_reduce_once(dist2, sp):
    for family in ("deepseek_v3", "glm4_moe"):
        r = dist2.run(_run_counts, family, sp)[0]
        n, m, u = r["blocks"], r["merged"], r["unmerged"]
        if sp:  # an island: all-reduce x2 + slice -> one reduce-scatter
            assert m.get("all_reduce", 0) == u.get("all_reduce", 0) - 2 * n, (family, r)
            assert m.get("reduce_scatter", 0) == u.get("reduce_scatter", 0) + n, (family, r)
        else:
            assert m.get("all_reduce", 0) == u.get("all_reduce", 0) - n, (family, r)


def test_merged_blocks_train_like_one_process_and_a_learned_gate_keeps_two_reductions(dist2):
    # run_family compares logits and every gradient on a second, merged pass, then 2 AdamW steps.
    # Qwen2-MoE's own plan leaves its shared expert whole; sharded here, its sigmoid gate times
    # the shared output is not a sum of partial sums: the check keeps its reductions apart
    qwen2_shared = ("auto", {"model.layers.*.mlp.shared_expert.gate_proj": "colwise",
                             "model.layers.*.mlp.shared_expert.up_proj": "colwise",
                             "model.layers.*.mlp.shared_expert.down_proj": "rowwise"})
    results = dist2.run(run_cases, [dict(family="deepseek_v2", sp=True, steps=2),
                                    dict(family="glm4_moe", sp=False, steps=2),
                                    dict(family="qwen2_moe", sp=False, steps=2, plan=qwen2_shared),
                                    dict(family="qwen2_moe", sp=True, steps=2, plan=qwen2_shared)])[0]
    (ds, glm, qwen, qwen_sp) = results
    assert ds["merged_blocks"] == ds["merge_candidates"] > 0, ds
    assert glm["merged_blocks"] == glm["merge_candidates"] > 0, glm
    for q in (qwen, qwen_sp):
        assert q["merge_candidates"] > 0 and q["merged_blocks"] == 0, q


def _run_fp8_merged(group):
    # the shared expert's row-parallel down projection in fp8 leaves its partial sum too
    from tests.models.families import VOCAB, build

    ref = build("deepseek_v3")
    model = parallelize(copy.deepcopy(ref), "auto", group=group, kernel="torch", fp8=True)
    blocks = [m for m in model.modules() if hasattr(m, "_fusedpar_block_reduction")]
    ids = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(5))
    errs = []
    for _ in range(2):  # decides on the first, merged on the second
        out = model(ids, labels=ids)
        out.loss.backward()
        errs.append(rel_err(out.logits, ref(ids).logits))
    assert blocks and all(block_is_merged(b) for b in blocks)
    assert all(e <= 0.1 for e in errs), errs  # fp8's rounding, as for the dense fp8 layers
    assert abs(errs[1] - errs[0]) <= 0.02, errs  # merging changes the sums' order, not the result
    return errs


def test_merged_reduction_with_fp8_linears(dist2):
    dist2.run(_run_fp8_merged)
