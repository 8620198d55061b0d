"""torch's ParallelStyle plans given to fusedpar: `fusedpar.parallelize_module(model, mesh,
plan)` with torch's signature, against one process (logits, every gradient, 2 AdamW steps),
and the styles fusedpar cannot map refused on every rank naming the style and why."""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist

from tests.layers.common import check, check_grads
from tests.layers.test_models import MODEL_TOL, build


def _torch_plan(model, sp: bool):
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel

    plan = {}
    for i in range(len(model.model.layers)):
        for leaf in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            plan[f"model.layers.{i}.{leaf}"] = ColwiseParallel()
        for leaf in ("self_attn.o_proj", "mlp.down_proj"):
            plan[f"model.layers.{i}.{leaf}"] = RowwiseParallel(output_layouts=Shard(1)) if sp else RowwiseParallel()
        if sp:
            plan[f"model.layers.{i}.input_layernorm"] = SequenceParallel()
            plan[f"model.layers.{i}.post_attention_layernorm"] = SequenceParallel()
    plan["lm_head"] = ColwiseParallel(output_layouts=Replicate())
    return plan


def _run_torch_plan(group, sp: bool):
    from torch.distributed.device_mesh import DeviceMesh

    import fusedpar

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    ref = build("llama")
    model = copy.deepcopy(ref)
    mesh = DeviceMesh.from_group(group, "cpu")
    fusedpar.parallelize_module(model, mesh, _torch_plan(model, sp), kernel="torch")
    assert isinstance(model.model.layers[0].self_attn.q_proj, fusedpar.ColumnParallelLinear)
    assert model._fusedpar_parallel["sequence_parallel"] is sp
    opt, opt_ref = torch.optim.AdamW(model.parameters(), lr=1e-3), torch.optim.AdamW(ref.parameters(), lr=1e-3)
    for step in range(2):
        ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(step))
        out, out_ref = model(ids, labels=ids), ref(ids, labels=ids)
        check("logits", out.logits, out_ref.logits, torch.float32, f"torch plan sp={sp} step {step}", MODEL_TOL)
        out.loss.backward(), out_ref.loss.backward()
        check_grads(model, ref, world, rank, f"torch plan sp={sp} step {step}", MODEL_TOL)
        opt.step(), opt_ref.step()
        opt.zero_grad(), opt_ref.zero_grad()
    return True


def test_torch_parallel_style_plans_match_one_process(dist2):
    assert dist2.run(_run_torch_plan, False) == [True, True]
    assert dist2.run(_run_torch_plan, True) == [True, True]


def _run_refusals(group):
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel, PrepareModuleInput, PrepareModuleOutput, RowwiseParallel,
    )

    import fusedpar

    cases = [
        ({"model.layers.0.self_attn": PrepareModuleOutput(output_layouts=(Replicate(),),
                                                          desired_output_layouts=(Shard(1),))}, "PrepareModuleOutput"),
        ({"model.layers.0.self_attn": PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),))},
         "replicate -> shard(1)"),
        ({"model.layers.0.mlp.down_proj": RowwiseParallel(input_layouts=Shard(0))}, "input_layouts=shard(0)"),
        ({"model.layers.0.mlp.up_proj": ColwiseParallel(output_layouts=Shard(0))}, "output_layouts=shard(0)"),
    ]
    for plan, needle in cases:
        try:
            fusedpar.parallelize(build("llama"), plan, group=group, kernel="torch")
        except ValueError as e:
            assert needle in str(e) and "plan[" in str(e), str(e)
        else:
            raise AssertionError(f"{needle}: accepted")
    try:  # a plan that splits the sequence, given to parallelize without sequence_parallel
        fusedpar.parallelize(build("llama"), {"model.layers.0.mlp.down_proj": RowwiseParallel(output_layouts=Shard(1))},
                             group=group, kernel="torch")
    except ValueError as e:
        assert "sequence_parallel=True" in str(e), str(e)
    else:
        raise AssertionError("a sequence-splitting torch plan ran without sequence parallelism")
    return True


def test_torch_styles_fusedpar_cannot_map_are_refused(dist2):
    assert dist2.run(_run_refusals) == [True, True]
