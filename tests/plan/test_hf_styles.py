"""The Hugging Face styles beyond colwise/rowwise, each against the single-process twin.

The sweep (tests/models) runs every family once with its own plan; here, what it does not:
the vocab-parallel LM head and loss (tied and untied), packed linears from an explicit plan,
a corrected plan for a family whose own plan is refused (covers "all_reduce"), the gathered
state dict of every kind of sharded parameter, training steps in lockstep, the interpreted
Triton grouped GEMM inside a model, and 4 ranks.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from fusedpar.layers import vocab_parallel_cross_entropy
from tests.models.sweep import run_cases


def _run_cross_entropy(group):
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 8 * world, generator=g, dtype=torch.float64) * 4
    labels = torch.randint(0, 8 * world, (3, 5), generator=g)
    labels[0, :2] = -100
    for reduction in ("mean", "sum", "none"):
        full = logits.clone().requires_grad_()
        shard = logits.chunk(world, -1)[rank].clone().requires_grad_()
        want = F.cross_entropy(full.flatten(0, 1), labels.flatten(), reduction=reduction).view(-1)
        got = vocab_parallel_cross_entropy(shard, labels, group=group, reduction=reduction).reshape(-1)
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-12), (reduction, got, want)
        weights = torch.arange(want.numel(), dtype=torch.float64) + 1
        (want * weights).sum().backward()
        (got * weights).sum().backward()
        assert torch.allclose(shard.grad, full.grad.chunk(world, -1)[rank], rtol=1e-12, atol=1e-12), reduction
    return True


def test_vocab_parallel_cross_entropy(dist2):
    dist2.run(_run_cross_entropy)


def test_loss_parallel(dist2):
    # the head keeps its vocabulary slice: logits [.., V/2] and the loss from vocab_parallel_cross_entropy;
    # tied, the input embedding is vocab-parallel over the same local rows (one parameter)
    dist2.run(run_cases, [
        dict(family="llama", sp=False, loss_parallel=True, steps=3, state_dict=True),
        dict(family="llama", sp=True, loss_parallel=True, steps=3, state_dict=True,
             config=dict(tie_word_embeddings=True)),
        dict(family="qwen3_moe", sp=False, loss_parallel=True, config=dict(tie_word_embeddings=True)),
    ])


def test_packed_linears_and_corrected_plan(dist2):
    # Phi-3's fused gate_up_proj split per half (the model's own chunk(2) sees [gate_r, up_r]),
    # with sequence parallelism the MLP joins the native region, the attention runs as an island
    phi3 = {"model.layers.*.self_attn.qkv_proj": "colwise_gather_output",
            "model.layers.*.self_attn.o_proj": "rowwise_split_input",
            "model.layers.*.mlp.gate_up_proj": "packed_colwise", "model.layers.*.mlp.down_proj": "rowwise"}
    # Inkling's own plan splits its concatenated [gate; up] experts 'colwise' and is refused;
    # split per part it runs, shared experts reduced by "all_reduce"
    inkling = ("auto", {"model.layers.*.mlp.experts.gate_up_proj": "packed_colwise"})
    dist2.run(run_cases, [
        dict(family="phi3", sp=False, plan=phi3, steps=2, state_dict=True),
        dict(family="phi3", sp=True, plan=phi3, steps=2),
        dict(family="inkling_text", sp=False, plan=inkling, steps=2, state_dict=True),
    ])


def test_unplanned_modules_reading_split_heads(dist2):
    # Qwen3 without its q/k norm entries: the norms read this rank's heads only; found on the
    # first forward, their gradients are all-reduced (upstream modules, e.g. DeepSeek's
    # kv_a_layernorm, are left alone: the sweep checks those)
    no_norms = ("auto", {"model.layers.*.self_attn.q_norm": None, "model.layers.*.self_attn.k_norm": None})
    dist2.run(run_cases, [dict(family="qwen3", sp=False, plan=no_norms, steps=2)])


def test_sharded_parameters_state_dict_and_training(dist2):
    # experts (3-D, packed), attention sinks (1-D colwise), vocab- and hidden-parallel embeddings,
    # MLA, the identity expert: gathered weights load into one process; 3 AdamW steps in lockstep
    dist2.run(run_cases, [
        dict(family="mixtral", sp=False, steps=3, state_dict=True),
        dict(family="qwen3_moe", sp=True, steps=3, state_dict=True),
        dict(family="granite_swa", sp=False, steps=2, state_dict=True),
        dict(family="nemotron_h", sp=False, steps=2, state_dict=True),
        dict(family="qwen4_exp_text", sp=False, steps=1, state_dict=True),
        dict(family="longcat_flash", sp=True, steps=2, state_dict=True),
        dict(family="deepseek_v3", sp=True, steps=2, state_dict=True),
    ])


def test_moe_triton_grouped_gemm(dist2):
    # the interpreted Triton grouped GEMM (forward, dgrad, wgrad) inside a model
    dist2.run(run_cases, [dict(family="mixtral", sp=False, kernel="triton", steps=1, seq=4,
                               config=dict(num_hidden_layers=1))])


def test_world4(dist4):
    # packed halves in quarters, 4 heads over 4 ranks (2 kv heads replicated), MLA, sinks
    dist4.run(run_cases, [dict(family=f, sp=sp, steps=1) for f in ("mixtral", "deepseek_v2", "granitemoe_swa")
                          for sp in (False, True)])


# ---------------------------------------------------------------------------------------------
# With the training tools: the global gradient norm, sharded checkpoints, any sequence length
# ---------------------------------------------------------------------------------------------

PHI3_PACKED = {"model.layers.*.self_attn.qkv_proj": "colwise_gather_output",
               "model.layers.*.self_attn.o_proj": "rowwise_split_input",
               "model.layers.*.mlp.gate_up_proj": "packed_colwise", "model.layers.*.mlp.down_proj": "rowwise"}


def _run_grad_norms(group, cases):
    # experts (3-D, packed), sinks, a vocab-parallel embedding, packed linears: counted once each
    import copy
    import math

    import fusedpar
    from fusedpar.plan import parallelize
    from tests.models.families import VOCAB, build

    for case in cases:
        ref = build(case["family"])
        model = parallelize(copy.deepcopy(ref), case.get("plan", "auto"), group=group, sequence_parallel=case["sp"],
                            kernel="torch")
        ids = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
        ref(ids, labels=ids).loss.backward()
        model(ids, labels=ids).loss.backward()
        for p in (2.0, math.inf):
            want = torch.nn.utils.get_total_norm([q.grad for q in ref.parameters() if q.grad is not None], p)
            got = fusedpar.grad_norm(model, group=group, norm_type=p)
            assert abs(got.item() - want.item()) <= 1e-5 * want.item(), (case, p, got.item(), want.item())
    return True


def test_grad_norm_counts_every_sharded_parameter_once(dist2):
    dist2.run(_run_grad_norms, [dict(family="mixtral", sp=False), dict(family="qwen3_moe", sp=True),
                                dict(family="granite_swa", sp=False), dict(family="nemotron_h", sp=False),
                                dict(family="phi3", sp=False, plan=PHI3_PACKED)])


def _run_checkpoint(group, family: str, plan, hf_dir: str, ours_dir: str):
    # a Hugging Face checkpoint read slice by slice into a meta-built parallel model (packed
    # expert halves read block by block); written back; read again into another; Hugging Face
    # loads what was written
    from transformers import AutoModelForCausalLM

    import fusedpar
    from tests.models.families import VOCAB

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    ref = AutoModelForCausalLM.from_pretrained(hf_dir)
    ids = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(2))
    want = ref(ids).logits
    for step, path in (("load", hf_dir), ("reload", ours_dir)):
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(ref.config)
        fusedpar.parallelize(model, plan, group=group, kernel="torch")
        fusedpar.load_checkpoint(model, path)
        err = ((model(ids).logits - want).norm() / want.norm()).item()
        assert err <= 1e-5, f"{family} {step} rank {rank}/{world}: logits off by {err:.3g}"
        if step == "load":
            fusedpar.save_pretrained(model, ours_dir, max_shard_size="100KB")
    if rank == 0:
        saved = AutoModelForCausalLM.from_pretrained(ours_dir).state_dict()
        for k, v in ref.state_dict().items():
            assert torch.equal(saved[k], v), f"{family}: {k} changed through load and save"
        # written under the names Hugging Face writes (per-expert tensors where it stores them so)
        assert _stored_keys(ours_dir) == _stored_keys(hf_dir), family
    return True


def _stored_keys(path: str) -> set[str]:
    import json
    from pathlib import Path

    from safetensors import safe_open

    index = Path(path) / "model.safetensors.index.json"
    if index.exists():
        return set(json.loads(index.read_text())["weight_map"])
    with safe_open(str(Path(path) / "model.safetensors"), framework="pt") as f:
        return set(f.keys())


# Llama 4 stores its experts fused, as the model holds them; Mixtral, Qwen3-MoE and DeepSeek-V3
# store them one by one (experts.0.w1, ...) and are read through transformers' conversion
# mapping, slice by slice (fusedpar/key_conversion.py)
@pytest.mark.parametrize("family, plan", [("llama4_text", "auto"), ("phi3", PHI3_PACKED), ("granite_swa", "auto"),
                                          ("mixtral", "auto"), ("qwen3_moe", "auto"), ("deepseek_v3", "auto")],
                         ids=["llama4-experts-packed", "phi3-packed-linear", "granite_swa-sinks",
                              "mixtral-experts-one-by-one", "qwen3_moe-experts-one-by-one",
                              "deepseek_v3-mla-experts"])
def test_sharded_checkpoint_round_trip(dist2, tmp_path, family, plan):
    from tests.models.families import build

    build(family, seed=7).save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    dist2.run(_run_checkpoint, family, plan, str(tmp_path / "hf"), str(tmp_path / "ours"))


def test_moe_islands_at_any_sequence_length(dist2):
    # lengths that do not divide by the world size run the region unsplit, islands included
    dist2.run(run_cases, [dict(family=f, sp=True, seq=seq) for f in ("mixtral", "deepseek_v3") for seq in (7, 8, 3)])


def test_per_layer_inputs_split_with_the_residual_stream(dist2, dist4):
    # Gemma 4 feeds each decoder layer a per-token input computed from the whole sequence
    # (per_layer_input, passed by position): split with the residual stream under SP; a length
    # that does not divide by the world runs unsplit, per-layer inputs too
    cases = [dict(family="gemma4_text", sp=True, steps=2, state_dict=True),
             dict(family="gemma4_text", sp=True, seq=7)]
    dist2.run(run_cases, cases)
    dist4.run(run_cases, [dict(family="gemma4_text", sp=True, steps=1)])
