"""Every validation raises before any collective, on every rank alike, naming what is wrong.

The messages must name the module path (or argument), the expected and the actual value.
All cases run on one 4-rank pool in one task; a rank that hung in a collective would time
the task out instead of passing.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from fusedpar.layers import (
    ColumnParallelLinear,
    ParallelAttention,
    ParallelMLP,
    ReplicatedColumnLinear,
    RowParallelLinear,
)
from fusedpar.plan import parallelize, resolve_plan
from tests.layers.test_models import build


def _expect(exc: type[BaseException], fn, *needles: str) -> None:
    try:
        fn()
    except exc as e:
        msg = str(e)
        missing = [n for n in needles if n not in msg]
        assert not missing, f"error message lacks {missing}: {msg!r}"
        return
    raise AssertionError(f"expected {exc.__name__} mentioning {needles}, nothing was raised")


def _run_error_cases(group):
    world = dist.get_world_size(group)
    assert world == 4
    llama = lambda **kw: build("llama", **kw)  # noqa: E731

    # a missing group
    _expect(TypeError, lambda: parallelize(llama(), "auto", group=None), "group", "ProcessGroup", "None")
    _expect(TypeError, lambda: ColumnParallelLinear(8, 8, group=None), "group", "None")
    _expect(TypeError, lambda: RowParallelLinear.from_linear(nn.Linear(8, 8), group=None), "group", "None")

    # heads not divisible: 6 query heads on 4 ranks
    _expect(ValueError, lambda: parallelize(llama(hidden_size=96, num_attention_heads=6, num_key_value_heads=6),
                                            "auto", group=group),
            "model.layers.0.self_attn.q_proj", "heads", "world size 4", "got 6")
    # kv heads that neither split nor replicate: 3 kv heads on 4 ranks
    _expect(ValueError, lambda: parallelize(llama(hidden_size=96, num_attention_heads=12, num_key_value_heads=3),
                                            "auto", group=group),
            "model.layers.0.self_attn.k_proj", "heads", "world size 4", "got 3")
    # intermediate size not divisible
    _expect(ValueError, lambda: parallelize(llama(intermediate_size=130), "auto", group=group),
            "model.layers.0.mlp.gate_proj", "out_features", "world size 4", "got 130")
    # vocab not divisible, for a plan that splits the head
    _expect(ValueError, lambda: parallelize(llama(vocab_size=254), {"lm_head": "colwise_gather_output"}, group=group),
            "lm_head", "out_features", "world size 4", "got 254")
    # a plan key that matches nothing
    _expect(ValueError, lambda: parallelize(llama(), {"model.layers.*.mlp.fc1": "colwise"}, group=group),
            "model.layers.*.mlp.fc1", "match", "got no match")
    # a module that is not an nn.Linear
    _expect(TypeError, lambda: parallelize(llama(), {"model.layers.*.input_layernorm": "colwise"}, group=group),
            "model.layers.0.input_layernorm", "nn.Linear", "LlamaRMSNorm")
    # an unknown style: named with the module it would apply to and the styles known
    _expect(ValueError, lambda: parallelize(llama(), {"model.layers.*.mlp.up_proj": "bogus_wise"}, group=group),
            "model.layers.0.mlp.up_proj", "model.layers.*.mlp.up_proj", "'bogus_wise'", "packed_colwise",
            "moe_tp_experts")
    # plan="auto" on a model without a tp plan; a plan that is neither
    _expect(ValueError, lambda: parallelize(nn.Sequential(nn.Linear(4, 4)), "auto", group=group),
            "base_model_tp_plan", "got None")
    _expect(ValueError, lambda: parallelize(llama(), "colwise", group=group), "plan", "'auto'", "got 'colwise'")

    # a row-parallel layer with nothing in its block to split its input (an unplanned gate/up
    # would hand it whole features), with or without sequence parallelism
    for sp in (False, True):
        _expect(ValueError, lambda: parallelize(llama(), {"model.layers.*.mlp.down_proj": "rowwise"}, group=group,
                                                sequence_parallel=sp),
                "model.layers.0.mlp.down_proj", "column-parallel layer under model.layers.0.mlp", "got none")

    # the styles beyond colwise/rowwise (tests/models/families.py builds every family)
    from tests.models.families import build as build_family

    mixtral_plan = lambda **styles: {f"model.layers.*.mlp.experts{'.' + k if k else ''}": v  # noqa: E731
                                     for k, v in ({"": "moe_tp_experts"} | styles).items()}
    # an expert weight left out of the plan would be summed over the ranks
    _expect(ValueError, lambda: parallelize(build_family("mixtral"), mixtral_plan(down_proj="rowwise"), group=group),
            "model.layers.0.mlp.experts", "gate_up_proj", "expected a plan entry", "got none")
    # experts split on the wrong dim; [gate; up] split as one block
    _expect(ValueError, lambda: parallelize(build_family("mixtral"), mixtral_plan(gate_up_proj="packed_colwise",
                                                                                  down_proj="colwise"), group=group),
            "down_proj", "intermediate dim", "got dim 1")
    _expect(ValueError, lambda: parallelize(build_family("mixtral"), mixtral_plan(gate_up_proj="colwise",
                                                                                  down_proj="rowwise"), group=group),
            "gate_up_proj", "concatenated [gate; up]", "'packed_colwise'", "got 'colwise'")
    # packed halves that do not split in 4: 2 x 130 rows
    _expect(ValueError, lambda: parallelize(build_family("phi3", intermediate_size=130),
                                            {"model.layers.*.mlp.gate_up_proj": "packed_colwise"}, group=group),
            "model.layers.0.mlp.gate_up_proj", "2 packed parts x the world size 4 = 8", "got 260")
    # a vocabulary that does not split in 4
    _expect(ValueError, lambda: parallelize(llama(vocab_size=254), {"model.embed_tokens": "embedding_rowwise"},
                                            group=group),
            "model.embed_tokens", "weight", "world size 4", "got 254")
    # a module style given to a parameter; mla_kv_a_proj on a model without latent attention
    _expect(ValueError, lambda: parallelize(llama(), {"model.embed_tokens.weight": "all_reduce"}, group=group),
            "model.embed_tokens.weight", "expected a module for this style", "got a parameter")
    _expect(ValueError, lambda: parallelize(llama(), {"model.layers.*.self_attn.k_proj": "mla_kv_a_proj"},
                                            group=group),
            "model.layers.0.self_attn.k_proj", "qk_rope_head_dim", "got", "None")
    # loss_parallel on something that is not a Hugging Face causal LM
    _expect(ValueError, lambda: parallelize(nn.Sequential(nn.Linear(8, 8)), {"0": "colwise"}, group=group,
                                            loss_parallel=True),
            "loss_parallel=True", "get_output_embeddings", "Sequential")
    # sequence parallelism over decoder layers that take another per-token input, or a 4-D stream
    _expect(ValueError, lambda: parallelize(build_family("glm_moe_dsa"), "auto", group=group, sequence_parallel=True),
            "model.layers.0", "per-token input is its first, the residual stream", "prev_topk_indices")
    _expect(ValueError, lambda: parallelize(build_family("gemma3n_text"), "auto", group=group, sequence_parallel=True),
            "model.layers.0", "residual stream is [(batch,) seq, hidden]", "AltUp")

    # sequence parallelism runs any length (unsplit when it does not divide), but not one
    # backward over forwards of both kinds: raised in forward, before the split
    model = parallelize(llama(), "auto", group=group, sequence_parallel=True)
    model(torch.zeros(1, 8, dtype=torch.long))  # split; its backward never runs
    _expect(ValueError, lambda: model(torch.zeros(1, 6, dtype=torch.long)),
            "model.layers.0", "sequence length 6", "does not divide", "world size 4", "expected backward")
    with torch.no_grad():
        model(torch.zeros(1, 6, dtype=torch.long))  # no graph: nothing to mix

    # an unplanned module with parameters whose input carries no autograd history (everything
    # upstream frozen): whether it reads split heads cannot be told, so the first forward raises,
    # before the block's first collective
    qwen3 = build("qwen3")
    no_norms = {k: v for k, v in resolve_plan(qwen3, "auto").items() if not k.endswith("_norm")}
    model = parallelize(qwen3, no_norms, group=group)
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith("q_norm.weight"))
    _expect(RuntimeError, lambda: model(torch.zeros(1, 8, dtype=torch.long)),
            "model.layers.0.self_attn.q_norm", "cannot tell", "'replicated_with_grad_allreduce'")

    # the layers' own constructors
    _expect(ValueError, lambda: ColumnParallelLinear(8, 10, group=group), "out_features", "world size 4", "got 10")
    _expect(ValueError, lambda: RowParallelLinear(10, 8, group=group), "in_features", "world size 4", "got 10")
    _expect(TypeError, lambda: ColumnParallelLinear.from_linear(nn.Conv1d(4, 4, 1), group=group, name="enc.fc"),
            "enc.fc", "nn.Linear", "Conv1d")
    _expect(ValueError, lambda: ColumnParallelLinear(8, 8, group=group, chunks=0), "chunks", "got 0")
    _expect(ValueError, lambda: ColumnParallelLinear(8, 8, group=group, comm="mpi"), "comm", "got 'mpi'")
    _expect(ValueError, lambda: ParallelAttention(64, 6, group=group), "num_heads", "world size 4", "got 6")
    _expect(ValueError, lambda: ParallelAttention(96, 12, num_kv_heads=3, group=group),
            "num_kv_heads", "world size 4", "got 3")
    _expect(ValueError, lambda: ParallelMLP(16, 30, group=group), "out_features", "world size 4", "got 30")
    _expect(ValueError, lambda: ParallelMLP(16, 32, group=group, activation="tanh"), "activation", "got 'tanh'")
    # the knobs the blocks hand on (LinearKnobs): checked by name, then by each linear
    _expect(TypeError, lambda: ParallelMLP(16, 32, group=group, chunk=2), "ParallelMLP", "'chunk'")
    _expect(TypeError, lambda: ParallelAttention(64, 4, group=group, sequence_dim=-3), "ParallelAttention",
            "'sequence_dim'")
    _expect(TypeError, lambda: ReplicatedColumnLinear(8, 8, group=group, parts=2, gather_output=True),
            "ReplicatedColumnLinear", "'gather_output'")
    _expect(ValueError, lambda: ParallelMLP(16, 32, group=group, kernel="cuda"), "ParallelMLP.gate_proj", "kernel",
            "got 'cuda'")
    _expect(ValueError, lambda: ParallelAttention(64, 4, group=group, chunks=0), "ParallelAttention.q_proj",
            "chunks", "got 0")
    row_sp = RowParallelLinear(8, 8, group=group, sequence_parallel=True)
    _expect(ValueError, lambda: row_sp(torch.randn(6, 2)), "sequence_parallel", "world size 4", "got 6")
    return True


def test_errors_before_any_collective(dist4):
    assert dist4.run(_run_error_cases) == [True] * 4
