"""Sharded loading and saving: a Hugging Face checkpoint directory (sharded safetensors) read
slice by slice into a parallelized model built on the meta device, and a parallelized model
written back as a directory Hugging Face loads; against `from_pretrained` in one process."""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import torch.distributed as dist

import fusedpar
from fusedpar.layers import parallelize
from tests.layers.common import check, check_grads
from tests.layers.test_models import MODEL_TOL, build



@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny Llamas saved by Hugging Face in several safetensors files: untied, tied."""
    paths = {}
    for tied in (False, True):
        d = tmp_path_factory.mktemp(f"llama-tied{int(tied)}")
        build("llama", seed=11, tie_word_embeddings=tied).save_pretrained(d, max_shard_size="200KB")
        assert len([f for f in os.listdir(d) if f.endswith(".safetensors")]) > 2  # really sharded
        paths[tied] = str(d)
    return paths


def _run_load(group, path: str, sp: bool, stepwise: bool, split_embedding: bool = False):
    from transformers import LlamaForCausalLM

    from fusedpar.layers import resolve_plan

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    ref = LlamaForCausalLM.from_pretrained(path)
    plan = "auto"
    if split_embedding:  # as transformers 5.17's own Llama plan does; a tied head follows (layers/ties.py)
        plan = resolve_plan(ref, "auto") | {"model.embed_tokens": "embedding_rowwise"}
    if stepwise:
        with torch.device("meta"):
            model = LlamaForCausalLM(ref.config)
        parallelize(model, plan, group=group, sequence_parallel=sp, kernel="torch")
        fusedpar.load_checkpoint(model, path)
    else:
        model = fusedpar.from_pretrained(LlamaForCausalLM, path, group=group, plan=plan, sequence_parallel=sp,
                                         kernel="torch")
    assert not any(p.is_meta for p in model.parameters()) and not any(b.is_meta for b in model.buffers())
    if ref.config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight, "the tie was lost"
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(3))
    name = f"rank {rank}/{world} sp={sp} stepwise={stepwise} tied={ref.config.tie_word_embeddings}"
    out_ref, out = ref(ids, labels=ids), model(ids, labels=ids)
    check("logits", out.logits, out_ref.logits, torch.float32, name, MODEL_TOL)
    # the gradient hooks (SP norms, replicated kv heads) follow the parameters the loader made
    out_ref.loss.backward()
    out.loss.backward()
    check_grads(model, ref, world, rank, name, MODEL_TOL)
    return True


def test_load_slices_into_a_meta_model(dist2, dist4, checkpoints):
    assert dist2.run(_run_load, checkpoints[False], False, True) == [True] * 2
    assert dist2.run(_run_load, checkpoints[True], True, False) == [True] * 2
    # 2 kv heads on 4 ranks: the kv projections are replicated, each rank reading the whole tensor
    assert dist4.run(_run_load, checkpoints[False], True, False) == [True] * 4
    assert dist4.run(_run_load, checkpoints[True], False, True) == [True] * 4
    # a vocab-parallel embedding tied to the head: both read the same rows, one parameter
    assert dist2.run(_run_load, checkpoints[True], True, False, True) == [True] * 2
    assert dist4.run(_run_load, checkpoints[True], False, True, True) == [True] * 4


def _run_save(group, out: str, tied: bool):
    from transformers import LlamaForCausalLM

    ref = build("llama", seed=5, tie_word_embeddings=tied)
    model = parallelize(copy.deepcopy(ref), "auto", group=group, sequence_parallel=True, kernel="torch")
    fusedpar.save_pretrained(model, out, max_shard_size="300KB")
    if dist.get_rank(group) == 0:
        files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
        index = json.loads(open(os.path.join(out, "model.safetensors.index.json")).read())
        assert len(files) > 2 and set(index["weight_map"].values()) == set(files)
        assert ("lm_head.weight" in index["weight_map"]) == (not tied)
        loaded = LlamaForCausalLM.from_pretrained(out)
        ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(4))
        check("logits of the saved model", loaded(ids).logits, ref(ids).logits, torch.float32, f"tied={tied}", 1e-6)
        for k, v in ref.state_dict().items():
            assert torch.equal(loaded.state_dict()[k], v), f"{k} changed through save/load"
    return True


def test_save_pretrained_writes_what_hugging_face_loads(dist2, tmp_path):
    assert dist2.run(_run_save, str(tmp_path / "untied"), False) == [True] * 2
    assert dist2.run(_run_save, str(tmp_path / "tied"), True) == [True] * 2


def _run_bad_checkpoints(group, path: str, other: str):
    from transformers import LlamaForCausalLM

    # a checkpoint of another shape: named, with both shapes
    with torch.device("meta"):
        model = LlamaForCausalLM(build("llama", intermediate_size=512).config)
    parallelize(model, "auto", group=group, kernel="torch")
    try:
        fusedpar.load_checkpoint(model, path)
    except ValueError as e:
        assert "model.layers.0.mlp.gate_proj.weight" in str(e) and "[256, 128]" in str(e), str(e)
    else:
        raise AssertionError("a mismatched shape was loaded")
    # not a checkpoint directory
    try:
        fusedpar.load_checkpoint(model, other)
    except FileNotFoundError as e:
        assert "model.safetensors" in str(e), str(e)
    else:
        raise AssertionError("an empty directory was accepted")
    return True


def test_bad_checkpoints_are_named(dist2, checkpoints, tmp_path):
    assert dist2.run(_run_bad_checkpoints, checkpoints[False], str(tmp_path)) == [True] * 2


def test_per_expert_checkpoints_are_read_lazily_through_the_conversion_mapping(tmp_path):
    # Mixtral stores experts.E.w1/w3/w2 and the router under block_sparse_moe.; the model holds
    # mlp.experts.gate_up_proj [E, 2I, H] = stack(w1) next to stack(w3). A slice across the
    # gate/up boundary reads only the rows it covers, and equals the fused tensor's slice.
    from pathlib import Path

    from fusedpar.checkpoint import _entries, _Files
    from tests.models.families import build as build_family

    model = build_family("mixtral", seed=3)
    model.save_pretrained(tmp_path)
    files = _Files(Path(tmp_path), model, {k for k, *_ in _entries(model)})
    state = model.state_dict()
    key = "model.layers.0.mlp.experts.gate_up_proj"
    assert key not in files.where and files.has(key) and not files.refused
    assert len(files.sources[key]) == 2 * model.config.num_local_experts  # w1 and w3 of every expert
    view = files.slice(key)
    E, two_i, H = view.get_shape()
    assert [E, two_i, H] == list(state[key].shape)
    for index in [(slice(None), slice(two_i // 4, 3 * two_i // 4), slice(None)),
                  (slice(1, 3), slice(0, two_i // 2), slice(5, H)), (slice(None),)]:
        assert torch.equal(view[index], state[key][index]), index
    assert torch.equal(files.slice("model.layers.1.mlp.gate.weight")[:], state["model.layers.1.mlp.gate.weight"])
    files.close()


def test_a_conversion_the_slice_loader_cannot_apply_is_named(tmp_path):
    # Inkling 2 interleaves its stored w13 into gate_up: refused, naming the operation
    from tests.models.families import build as build_family

    model = build_family("inkling2_text", seed=3)
    model.save_pretrained(tmp_path)
    with torch.device("meta"):
        fresh = type(model)(model.config)
    with pytest.raises(KeyError, match=r"experts.gate_up_proj \(stored as .*Interleave, which the slice loader"):
        fusedpar.load_checkpoint(fresh, tmp_path)
