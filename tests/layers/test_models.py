"""Hugging Face decoders parallelized with `plan="auto"` against the unparallelized model.

Tiny random configs (no download). Every rank builds the same model from one seed, keeps an
unparallelized copy, and converts the other in place. Checked: logits, every parameter's
gradient (sliced to what this rank stores), the losses of 5 AdamW steps, and that the
gathered state dict loads into a fresh single-process model that reproduces the logits.
"""
from __future__ import annotations

import copy
import importlib

import torch
import torch.distributed as dist

from fusedpar.layers import ColumnParallelLinear, RowParallelLinear

from fusedpar.plan import full_state_dict, parallelize
from tests.layers.common import DTYPES, check

MODEL_TOL = 1e-4  # fp32 relative error, a whole model deep (the bound)


def _family(name: str):
    import transformers

    if name == "llama":
        return transformers.LlamaConfig, transformers.LlamaForCausalLM
    if name == "qwen2":
        return transformers.Qwen2Config, transformers.Qwen2ForCausalLM
    if name == "qwen3":
        return transformers.Qwen3Config, transformers.Qwen3ForCausalLM
    if name == "mistral":
        return transformers.MistralConfig, transformers.MistralForCausalLM
    raise ValueError(name)


def tiny_config(family: str, **overrides):
    config_cls, _ = _family(family)
    kw = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              attn_implementation="sdpa", tie_word_embeddings=False)
    kw.update(overrides)
    return config_cls(**kw)


def build(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    _, model_cls = _family(family)
    torch.manual_seed(seed)
    return model_cls(tiny_config(family, **overrides)).to(dtype)


def _local_slice(model, name: str, full: torch.Tensor, world: int, rank: int) -> torch.Tensor:
    module = model.get_submodule(name.rsplit(".", 1)[0])
    if isinstance(module, ColumnParallelLinear):
        return full.chunk(world, 0)[rank]
    if isinstance(module, RowParallelLinear) and name.endswith("weight"):
        return full.chunk(world, 1)[rank]
    return full


def _run_model_case(group, case):
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    dtype = DTYPES[case.get("dtype", "float32")]
    tol = MODEL_TOL if dtype == torch.float32 else 1e-10
    name = f"rank {rank}/{world} {case}"
    ref = build(case["family"], dtype=dtype, **case.get("config", {}))
    model = parallelize(copy.deepcopy(ref), case.get("plan", "auto"), group=group, sequence_parallel=case["sp"],
                        kernel=case.get("kernel", "torch"), chunks=case.get("chunks"))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (case.get("batch", 2), case.get("seq", 8)), generator=g)

    # logits and every gradient
    out_ref = ref(ids, labels=ids)
    out = model(ids, labels=ids)
    check("logits", out.logits, out_ref.logits, dtype, name, tol)
    out_ref.loss.backward()
    out.loss.backward()
    ref_params = dict(ref.named_parameters())
    for pname, p in model.named_parameters():
        check(f"grad {pname}", p.grad, _local_slice(model, pname, ref_params[pname].grad, world, rank), dtype, name,
              tol * 10 if pname.endswith("k_proj.bias") else tol)
    ref.zero_grad(); model.zero_grad()  # noqa: E702

    # training: 5 AdamW steps, equal losses
    steps = case.get("steps", 5)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses, losses_ref = [], []
    for step in range(steps):
        batch = torch.randint(0, 256, ids.shape, generator=g)
        for m, o, log in ((ref, opt_ref, losses_ref), (model, opt, losses)):
            loss = m(batch, labels=batch).loss
            loss.backward()
            o.step()
            o.zero_grad()
            log.append(loss.item())
    for step, (a, b) in enumerate(zip(losses, losses_ref)):
        assert abs(a - b) <= tol * abs(b), f"{name}: loss at step {step}: {a} vs single-process {b}"

    # the gathered state dict reproduces the parallel model's logits in a fresh single process
    sd = full_state_dict(model)
    fresh = build(case["family"], seed=123, dtype=dtype, **case.get("config", {}))
    fresh.load_state_dict(sd)
    with torch.no_grad():
        check("fresh-model logits", fresh(ids).logits, model(ids).logits, dtype, name, tol)
    return losses


def _run_model_cases(group, cases):
    return [_run_model_case(group, c) for c in cases]


def _run_triton_model_case(group, case):
    """The case with the GEMM backend that actually ran checked: the (interpreted) Triton kernel."""
    kernels = importlib.import_module("fusedpar.kernels.common")  # where the backend choice is logged

    kernels._logged_backends.discard(("cpu", "triton"))
    losses = _run_model_case(group, case)
    assert ("cpu", "triton") in kernels._logged_backends, "kernel='triton' did not launch the Triton kernel"
    return losses


def test_llama_world2(dist2):
    cases = [dict(family="llama", sp=False), dict(family="llama", sp=True),
             dict(family="llama", sp=True, dtype="float64", steps=2, chunks=2)]
    dist2.run(_run_model_cases, cases)


def test_llama_world4_replicated_kv_heads(dist4):
    # 2 kv heads on 4 ranks: each kv head replicated on 2 ranks
    # eager attention repeats kv heads by the module's num_key_value_groups, which must be local
    dist4.run(_run_model_cases, [dict(family="llama", sp=False), dict(family="llama", sp=True, steps=3),
                                 dict(family="llama", sp=True, steps=2, config=dict(attn_implementation="eager"))])


def test_qwen2_world2(dist2):
    # Qwen2: q/k/v carry biases (the column group concatenates them)
    dist2.run(_run_model_cases, [dict(family="qwen2", sp=False), dict(family="qwen2", sp=True)])


def test_qwen3_and_explicit_plans(dist2):
    # Qwen3: per-head q/k norms planned "replicated_with_grad_allreduce" (each rank sees its heads only)
    qwen3 = dict(family="qwen3", config=dict(head_dim=32), steps=3)
    # explicit plan strings: wildcards, a gathered head output, a row-parallel layer on a
    # replicated input next to replicated (unplanned) gate/up; with SP, the styles that take shards
    attn = {f"model.layers.*.self_attn.{c}_proj": "colwise" for c in "qkv"} | {"model.layers.*.self_attn.o_proj": "rowwise"}
    plan = attn | {"model.layers.*.mlp.down_proj": "rowwise_rep", "lm_head": "colwise_rep", "model.norm": "replicate"}
    plan_sp = attn | {"model.layers.*.mlp.gate_proj": "colwise", "model.layers.*.mlp.up_proj": "colwise",
                      "model.layers.*.mlp.down_proj": "rowwise", "lm_head": "colwise_gather_output",
                      "model.layers.*.input_layernorm": "sequence_parallel"}
    dist2.run(_run_model_cases, [dict(qwen3, sp=False), dict(qwen3, sp=True),
                                 dict(family="llama", sp=False, plan=plan, steps=2),
                                 dict(family="llama", sp=True, plan=plan_sp, steps=2)])


def test_llama_triton_kernel(dist2):
    # The interpreted Triton GEMM end to end; a model small enough for the interpreter.
    small = dict(hidden_size=64, intermediate_size=128, vocab_size=256, num_hidden_layers=1)
    dist2.run(_run_triton_model_case, dict(family="llama", sp=True, kernel="triton", config=small, steps=2,
                                           seq=16, batch=1, chunks=2))
