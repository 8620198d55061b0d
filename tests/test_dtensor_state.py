"""Sharded state torch's own tools understand: every parameter of a parallelized model is a
DTensor, so `torch.distributed.checkpoint`, `get_state_dict` / `set_state_dict`,
`torch.nn.utils.clip_grad_norm_` and the optimizers see shards as shards.

Against one process training the same model on the same batches: torch's clipping (norm and
clipped gradients), full model and optimizer state dicts, a DCP checkpoint of model and
optimizer saved at world 2 and loaded at world 2, at world 4 and into a plain model, the next
AdamW step after resuming, and checkpoints exchanged with torch's own `parallelize_module`.
Families: Llama (colwise / rowwise, SP off and on), Phi-3 with packed [gate; up] linears,
Mixtral (stacked experts, packed gate_up).
"""
from __future__ import annotations

import copy
import os
import tempfile

import pytest
import torch
import torch.distributed as dist

from tests.layers.common import as_local, check, check_grads, local_slice

TOL = 1e-4  # fp32 after AdamW steps, a whole tiny model deep (sums split across ranks round differently)

PHI3_PACKED = {"model.layers.*.self_attn.qkv_proj": "colwise_gather_output",
               "model.layers.*.self_attn.o_proj": "rowwise_split_input",
               "model.layers.*.mlp.gate_up_proj": "packed_colwise", "model.layers.*.mlp.down_proj": "rowwise"}
CASES = {
    "llama": dict(family="llama", sp=False, plan="auto"),
    "llama-sp": dict(family="llama", sp=True, plan="auto"),
    "phi3-packed": dict(family="phi3", sp=False, plan=PHI3_PACKED),
    "mixtral": dict(family="mixtral", sp=True, plan="auto"),
}


def _build(family: str, seed: int = 0) -> torch.nn.Module:
    from tests.models.families import build

    return build(family, seed=seed)


def _parallel(family: str, sp: bool, plan, group, seed: int = 0) -> torch.nn.Module:
    from fusedpar import parallelize

    return parallelize(_build(family, seed), plan, group=group, sequence_parallel=sp, kernel="torch")


def _batch(step: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(100 + step))


def _step(model, opt, step: int, vocab: int, clip: float | None = None):
    ids = _batch(step, vocab)
    loss = model(ids, labels=ids).loss
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip) if clip is not None else None
    opt.step()
    opt.zero_grad()
    return loss.detach(), norm


def _full(model, opt=None):
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True)
    msd = {k: v.detach().clone() for k, v in get_model_state_dict(model, options=options).items()}
    osd = get_optimizer_state_dict(model, opt, options=options) if opt is not None else None
    return msd, osd


def _compare_state(got: dict, want: dict, what: str, tol: float = TOL) -> None:
    assert set(got) == set(want), f"{what}: keys differ: {sorted(set(got) ^ set(want))[:5]}"
    for k in want:
        from torch.distributed.tensor import DTensor

        assert not isinstance(got[k], DTensor), f"{what}: {k} is a DTensor in a full state dict"
        assert tuple(got[k].shape) == tuple(want[k].shape), f"{what}: {k}: shape {list(got[k].shape)} vs {list(want[k].shape)}"
        check(f"{what} {k}", got[k].float(), want[k].float(), torch.float32, what, tol)


def _compare_optim(got: dict, want: dict, what: str) -> None:
    assert set(got["state"]) == set(want["state"]), f"{what}: optimizer keys differ"
    for k, st in want["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            check(f"{what} {k}.{name}", got["state"][k][name], st[name], torch.float32, what, 1e-4)


def _run_train_save(group, case: dict, ckpt: str, clip: float):
    """Step 1 with torch's clipping (against one process), full state dicts, a DCP save of
    model + optimizer, then step 2 (what a resumed run must reproduce)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.tensor import DTensor

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    family, sp, plan = case["family"], case["sp"], case["plan"]
    ref = _build(family)
    model = _parallel(family, sp, plan, group)
    vocab = ref.config.vocab_size
    plain = [n for n, p in model.named_parameters() if not isinstance(p, DTensor)]
    assert not plain, f"{family}: parameters that are not DTensors: {plain}"
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)

    ids = _batch(0, vocab)
    loss, loss_ref = model(ids, labels=ids).loss, ref(ids, labels=ids).loss
    loss.backward(), loss_ref.backward()
    grads_before = {n: as_local(p.grad).clone() for n, p in model.named_parameters()}
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    norm_ref = torch.nn.utils.clip_grad_norm_(ref.parameters(), clip)
    norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
    assert abs(norm.item() - norm_ref.item()) <= 1e-5 * norm_ref.item(), (
        f"{family}: torch's clip_grad_norm_ {norm.item()} vs one process {norm_ref.item()}")
    assert norm_ref.item() > clip, "the case must clip"
    check_grads(model, ref, world, rank, f"{family} clipped", 1e-4)
    scale = min(1.0, clip / (norm_ref.item() + 1e-6))
    for n, p in model.named_parameters():  # clipped in place, by the same factor on every rank
        check(f"clipped {n}", p.grad, grads_before[n] * scale, torch.float32, family, 1e-5)
    opt.step(), opt_ref.step()
    opt.zero_grad(), opt_ref.zero_grad()

    msd_full, osd_full = _full(model, opt)
    _compare_state(msd_full, ref.state_dict(), f"{family} get_model_state_dict(full)")
    _, osd_ref = _full(ref, opt_ref)
    _compare_optim(osd_full, osd_ref, f"{family} get_optimizer_state_dict(full)")

    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt)
    dist.barrier(group)
    _step(model, opt, 1, vocab)
    after, _ = _full(model)
    saved = {k: v for k, v in msd_full.items()}
    return (saved, after) if rank == 0 else None


def _run_resume(group, case: dict, ckpt: str, after: dict):
    """A model built from another seed loads the DCP checkpoint and takes step 2."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    family, sp, plan = case["family"], case["sp"], case["plan"]
    model = _parallel(family, sp, plan, group, seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    msd, osd = get_state_dict(model, opt)
    dcp.load({"model": msd, "optim": osd}, checkpoint_id=ckpt)
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)
    _step(model, opt, 1, model.config.vocab_size)
    got, _ = _full(model)
    _compare_state(got, after, f"{family} resumed at world {dist.get_world_size(group)}", 1e-4)
    return True


@pytest.mark.parametrize("name", list(CASES))
def test_dcp_and_clipping_against_one_process(dist2, dist4, name):
    import torch.distributed.checkpoint as dcp

    case = CASES[name]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "ckpt")
        saved, after = dist2.run(_run_train_save, case, ckpt, 0.05)[0]
        assert dist2.run(_run_resume, case, ckpt, after) == [True, True]
        assert dist4.run(_run_resume, case, ckpt, after) == [True] * 4
        plain = _build(case["family"], seed=2)  # one process, no process group: resharded to whole tensors
        state = {"model": plain.state_dict()}
        dcp.load(state, checkpoint_id=ckpt, no_dist=True)
        plain.load_state_dict(state["model"])
        _compare_state(plain.state_dict(), saved, f"{name} DCP into one process", 0)


# --------------------------------------------------------------------------------------------
# Checkpoints exchanged with torch's own parallelize_module
# --------------------------------------------------------------------------------------------


def _torch_parallel_llama(group):
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    model = _build("llama", seed=3)
    mesh = DeviceMesh.from_group(group, "cpu")
    plan = {}
    for i in range(len(model.model.layers)):
        for leaf in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            plan[f"model.layers.{i}.{leaf}"] = ColwiseParallel()
        for leaf in ("self_attn.o_proj", "mlp.down_proj"):
            plan[f"model.layers.{i}.{leaf}"] = RowwiseParallel()
    return parallelize_module(model, mesh, plan)


def _run_exchange_with_torch(group, ckpt: str):
    import torch.distributed.checkpoint as dcp

    ref = _build("llama")
    torch_model = _torch_parallel_llama(group)
    torch_sd = torch_model.state_dict()
    # torch -> fusedpar
    mine = _parallel("llama", True, "auto", group, seed=3)
    sd = _build("llama").state_dict()  # the values torch's model will load and save
    ours = _parallel("llama", False, "auto", group)
    dcp.save(ours.state_dict(), checkpoint_id=ckpt + "/fusedpar")
    dcp.load(torch_sd, checkpoint_id=ckpt + "/fusedpar")
    torch_model.load_state_dict(torch_sd)
    got, _ = _full(torch_model)
    _compare_state(got, sd, "fusedpar checkpoint into torch's parallelize_module", 0)
    dcp.save(torch_model.state_dict(), checkpoint_id=ckpt + "/torch")
    mine_sd = mine.state_dict()
    dcp.load(mine_sd, checkpoint_id=ckpt + "/torch")
    mine.load_state_dict(mine_sd)
    got, _ = _full(mine)
    _compare_state(got, sd, "torch's parallelize_module checkpoint into fusedpar", 0)
    ids = _batch(0, ref.config.vocab_size)
    check("logits after loading torch's checkpoint", mine(ids).logits, ref(ids).logits, torch.float32, "exchange", 1e-4)
    return True


def test_checkpoints_exchanged_with_torch_parallelize_module(dist2):
    with tempfile.TemporaryDirectory() as tmp:
        assert dist2.run(_run_exchange_with_torch, tmp) == [True, True]


# --------------------------------------------------------------------------------------------
# Bad checkpoints; clipping a mix
# --------------------------------------------------------------------------------------------


def _run_wrong_shapes(group, ckpt: str):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    small = _parallel("llama", False, "auto", group)
    dcp.save(small.state_dict(), checkpoint_id=ckpt)
    from tests.models.families import build

    from fusedpar import parallelize

    big = parallelize(build("llama", seed=0, intermediate_size=2 * small.config.intermediate_size), "auto",
                      group=group, kernel="torch")
    sd = big.state_dict()
    try:
        dcp.load(sd, checkpoint_id=ckpt)
    except CheckpointException as e:  # wraps each rank's error (a BaseException, not an Exception)
        text = str(e)
        # DCP names the key and both global shapes, on every rank
        assert "Size mismatch" in text and "mlp." in text and "torch.Size([64, 128])" in text, text[:2000]
        return True
    raise AssertionError("a checkpoint of other shapes loaded without an error")


def test_dcp_checkpoint_of_other_shapes_is_refused_on_every_rank(dist2):
    with tempfile.TemporaryDirectory() as tmp:
        assert dist2.run(_run_wrong_shapes, os.path.join(tmp, "ckpt")) == [True, True]


def test_root_norm_planned_sequence_parallel(dist2):
    # torch's SequenceParallel() on the final norm, written as fusedpar's string: the norm sits
    # outside the split decoder layers and sees every token; its gradient was all-reduced
    # anyway (2.000x the single-process one). Every gradient against one process.
    from tests.models.sweep import run_cases

    dist2.run(run_cases, [dict(family="llama", sp=True, plan=("auto", {"model.norm": "sequence_parallel"}), steps=2)])
