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
from fusedpar.plan import parallelize
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

    from fusedpar.plan import resolve_plan

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    ref = LlamaForCausalLM.from_pretrained(path)
    plan = "auto"
    if split_embedding:  # as transformers 5.17's own Llama plan does; a tied head follows (plan/ties.py)
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


# ---------------------------------------------------------------------------------------------
# Loading in place: optimizers keep their tensors, the model keeps its dtype
# ---------------------------------------------------------------------------------------------

MIXED = ("model.layers.0.mlp.gate_proj.weight", "model.norm.weight")  # a sharded and a replicated one


def _save_single(state: dict, config, out) -> None:
    """A one-file checkpoint holding exactly `state` (dtypes as given) and `config`."""
    from safetensors.torch import save_file

    os.makedirs(out, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(out, "model.safetensors"),
              metadata={"format": "pt"})
    config.save_pretrained(out)


@pytest.fixture(scope="module")
def mixed_checkpoints(tmp_path_factory):
    """fp32 weights with two tensors stored bf16 (config says float32); the reverse (config
    bfloat16, two tensors fp32); and an all-fp32 one."""
    d = tmp_path_factory.mktemp("mixed")
    ref = build("llama", seed=41)
    state = {k: v.to(torch.bfloat16) if k in MIXED else v for k, v in ref.state_dict().items()}
    _save_single(state, ref.config, d / "fp32-with-bf16")
    ref16 = build("llama", seed=43, dtype=torch.bfloat16)
    ref16.config.dtype = torch.bfloat16
    _save_single({k: v.float() if k in MIXED else v for k, v in ref16.state_dict().items()}, ref16.config,
                 d / "bf16-with-fp32")
    build("llama", seed=42).save_pretrained(d / "fp32")
    return {k: str(d / k) for k in ("fp32-with-bf16", "bf16-with-fp32", "fp32")}


def _run_in_place(group, paths):
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    where = f"rank {rank}/{world}"
    # an fp32 model loading a checkpoint with two bf16 tensors: same Parameters, still fp32
    model = parallelize(build("llama", seed=40), "auto", group=group, kernel="torch")
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    before = dict(model.named_parameters())
    fusedpar.load_checkpoint(model, paths["fp32-with-bf16"])
    ref = build("llama", seed=41)
    with torch.no_grad():
        for k in MIXED:  # what the checkpoint holds, cast back to fp32 (exact: bf16 -> fp32)
            ref.get_parameter(k).copy_(ref.get_parameter(k).to(torch.bfloat16).float())
    ref = parallelize(ref, "auto", group=group, kernel="torch")
    for name, p in model.named_parameters():
        assert p is before[name], f"{where}: {name} was replaced by a new tensor"
        assert p.dtype == torch.float32, f"{where}: {name} became {p.dtype}"
        assert torch.equal(p, ref.get_parameter(name)), f"{where}: {name} differs from the stored values"
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}
    # the optimizer moves the loaded weights (it held stale tensors before: they moved 0.0)
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(5))
    loaded = {k: model.get_parameter(k).detach().clone() for k in MIXED}
    model(ids, labels=ids).loss.backward()
    opt.step()
    for k in MIXED:
        assert not torch.equal(model.get_parameter(k), loaded[k]), f"{where}: {k} did not move in the step"
    # a bf16 model loading an fp32 checkpoint stays bf16, with the values rounded to bf16
    model16 = parallelize(build("llama", seed=40, dtype=torch.bfloat16), "auto", group=group, kernel="torch")
    before = dict(model16.named_parameters())
    fusedpar.load_checkpoint(model16, paths["fp32"])
    ref = parallelize(build("llama", seed=42), "auto", group=group, kernel="torch")
    for name, p in model16.named_parameters():
        assert p is before[name], f"{where}: {name} was replaced by a new tensor"
        assert p.dtype == torch.bfloat16, f"{where}: {name} became {p.dtype}"
        assert torch.equal(p, ref.get_parameter(name).to(torch.bfloat16)), f"{where}: {name} differs"
    return True


def _run_dtensor_copy(group):
    # the one in-place write goes into a DTensor's local shard (parameters are becoming DTensors)
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Shard

    from fusedpar.checkpoint import _copy_into, _local_shape

    rank = dist.get_rank(group)
    mesh = DeviceMesh.from_group(group, "cpu")
    p = torch.nn.Parameter(DTensor.from_local(torch.zeros(2, 3), mesh, [Shard(0)], run_check=False))
    local_before = p._local_tensor
    _copy_into(p, torch.full((2, 3), rank + 1.5, dtype=torch.bfloat16), key="w")
    assert tuple(p.shape) == (4, 3) and tuple(_local_shape(p)) == (2, 3)
    assert p._local_tensor is local_before and p._local_tensor.dtype == torch.float32
    assert torch.equal(p._local_tensor, torch.full((2, 3), rank + 1.5)), p._local_tensor
    return True


def test_loading_copies_into_the_model_in_place(dist2, mixed_checkpoints):
    assert dist2.run(_run_in_place, mixed_checkpoints) == [True] * 2
    assert dist2.run(_run_dtensor_copy) == [True] * 2


def _run_from_pretrained_dtype(group, paths):
    from transformers import LlamaForCausalLM

    cases = [(paths["bf16-with-fp32"], {}, torch.bfloat16),           # config.dtype
             (paths["fp32-with-bf16"], {}, torch.float32),
             (paths["bf16-with-fp32"], {"dtype": "float32"}, torch.float32),
             (paths["fp32-with-bf16"], {"torch_dtype": torch.float16}, torch.float16)]
    for path, kwargs, want in cases:
        model = fusedpar.from_pretrained(LlamaForCausalLM, path, group=group, kernel="torch", **kwargs)
        hf = LlamaForCausalLM.from_pretrained(path, **kwargs)
        got = {n: p.dtype for n, p in model.named_parameters()}
        assert set(got.values()) == {want}, f"{path} {kwargs}: dtypes {set(got.values())}, expected {want}"
        hf_dtypes = {n: p.dtype for n, p in hf.named_parameters()}
        assert all(hf_dtypes[n] == d for n, d in got.items()), f"{path} {kwargs}: transformers gives {hf_dtypes}"
    return True


def test_from_pretrained_gives_one_dtype_as_transformers_does(dist2, mixed_checkpoints):
    assert dist2.run(_run_from_pretrained_dtype, mixed_checkpoints) == [True] * 2


def test_a_cast_that_changes_the_meaning_is_refused_naming_the_tensor(tmp_path):
    from transformers import LlamaForCausalLM

    ref = build("llama", seed=44)
    state = ref.state_dict()
    key = "model.layers.1.self_attn.k_proj.weight"
    _save_single({k: v.to(torch.float8_e4m3fn) if k == key else v for k, v in state.items()}, ref.config,
                 tmp_path / "fp8")
    with pytest.raises(TypeError, match=rf"{key}: the checkpoint stores torch.float8_e4m3fn, the model's tensor is "
                                        r"torch.float32: refusing the cast because fp8 values need their scales"):
        fusedpar.load_checkpoint(build("llama"), tmp_path / "fp8")
    # an fp16 model and a value beyond fp16's range
    big = dict(state)
    big["model.norm.weight"] = state["model.norm.weight"].clone()
    big["model.norm.weight"][3] = 1e6
    _save_single(big, ref.config, tmp_path / "big")
    with pytest.raises(TypeError, match=r"model.norm.weight: .* overflow torch.float16 \(largest magnitude 1e\+06\)"):
        fusedpar.load_checkpoint(build("llama", dtype=torch.float16), tmp_path / "big")
    # an fp8 model parameter (not scaled by us) refuses an fp32 value
    model = build("llama")
    model.model.norm.weight = torch.nn.Parameter(model.model.norm.weight.detach().to(torch.float8_e4m3fn),
                                                 requires_grad=False)
    with pytest.raises(TypeError, match=r"model.norm.weight: the checkpoint stores torch.float32, the model's tensor "
                                        r"is torch.float8_e4m3fn"):
        fusedpar.load_checkpoint(model, tmp_path / "big")
    # dtype= cannot change a tensor that exists (it would have to be replaced)
    with pytest.raises(ValueError, match=r"dtype: expected None or the model's dtype torch.float32 .* got "
                                         r"torch.bfloat16 for model.embed_tokens.weight"):
        fusedpar.load_checkpoint(LlamaForCausalLM(ref.config), tmp_path / "big", dtype=torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# Damaged files and mismatched shapes are named
# ---------------------------------------------------------------------------------------------


def _meta_llama():
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        return LlamaForCausalLM(build("llama").config)


def test_damaged_files_are_named_with_the_tensor(tmp_path):
    import shutil

    src = tmp_path / "src"
    build("llama", seed=45).save_pretrained(src, max_shard_size="200KB")
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    shard = sorted(set(index.values()))[1]  # the second shard
    keys = sorted(k for k, f in index.items() if f == shard)
    assert keys, sorted(set(index.values()))
    key_pattern = "(" + "|".join(keys) + ")"

    def damaged(name, edit):
        d = tmp_path / name
        shutil.copytree(src, d)
        edit(d)
        return d

    def truncate(d):
        data = (d / shard).read_bytes()
        (d / shard).write_bytes(data[: len(data) // 2])

    cases = [("truncated", truncate, rf"{shard}: not a complete safetensors file \(reading tensor '{key_pattern}': "
                                     r".*incomplete metadata, file not fully covered"),
             ("empty", lambda d: (d / shard).write_bytes(b""),
              rf"{shard}: not a complete safetensors file \(reading tensor '{key_pattern}': .*header too small"),
             ("bad-index", lambda d: (d / "model.safetensors.index.json").write_text('{"weight_map": {"a": '),
              r"model.safetensors.index.json: not a valid safetensors index: .*JSONDecodeError"),
             ("no-weight-map", lambda d: (d / "model.safetensors.index.json").write_text('{"metadata": {}}'),
              r"model.safetensors.index.json: not a valid safetensors index: .*KeyError: 'weight_map'")]
    for name, edit, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            fusedpar.load_checkpoint(_meta_llama(), damaged(name, edit))
    with pytest.raises(FileNotFoundError, match=rf"maps tensor '{key_pattern}' to {shard}, which does not exist"):
        fusedpar.load_checkpoint(_meta_llama(), damaged("missing", lambda d: (d / shard).unlink()))
    single = tmp_path / "single"
    build("llama", seed=45).save_pretrained(single)
    (single / "model.safetensors").write_bytes((single / "model.safetensors").read_bytes()[:5000])
    with pytest.raises(ValueError, match=r"single/model.safetensors: not a complete safetensors file \(opening it"):
        fusedpar.load_checkpoint(_meta_llama(), single)


def _run_shape_mismatch(group, path: str):
    from transformers import LlamaForCausalLM

    # stored intermediate size 256, model's 512 (sharded: a piece each) and 64
    for inter, model_full, piece, would_be in ((512, [512, 128], [256, 128], [128, 128]),
                                               (64, [64, 128], [32, 128], [128, 128])):
        with torch.device("meta"):
            model = LlamaForCausalLM(build("llama", intermediate_size=inter).config)
        parallelize(model, "auto", group=group, kernel="torch")
        with pytest.raises(ValueError) as e:
            fusedpar.load_checkpoint(model, path)
        msg = str(e.value)
        for part in ("model.layers.0.mlp.gate_proj.weight", "model-0000", "the checkpoint stores shape [256, 128]",
                     f"the model's is {model_full}", f"this rank holds {piece}", "differ in dim(s) [0]",
                     f"this rank's piece of the stored tensor would be {would_be}"):
            assert part in msg, f"{part!r} not in {msg!r}"
    return True


def test_shape_mismatches_show_what_differs(dist2, checkpoints):
    assert dist2.run(_run_shape_mismatch, checkpoints[False]) == [True] * 2


def test_max_shard_size_takes_what_transformers_takes():
    from transformers.utils.hub import convert_file_size_to_int

    from fusedpar.checkpoint_io import parse_size

    for size in ("5GB", "500MB", "5GiB", "5KB", "3MiB", "7KiB", "5Gb", "5gb", " 5 GB", 12345):
        assert parse_size(size) == convert_file_size_to_int(size), size
    assert [parse_size(s) for s in ("5G", "500M", "5K", "1.5GB", "100")] == [5 * 10**9, 5 * 10**8, 5000, 15 * 10**8,
                                                                              100]
    for bad in ("5XB", "", "GB", "-1GB", "0"):
        with pytest.raises(ValueError, match=rf"max_shard_size: expected .*got {bad!r}"):
            parse_size(bad)
    with pytest.raises(TypeError, match="max_shard_size: expected an int"):
        parse_size(5.0)
