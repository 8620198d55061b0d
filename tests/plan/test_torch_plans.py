"""torch's tensor-parallel API as its users write it, with `fusedpar.parallelize_module` in
place of torch's (the one import a torchtitan user switches):

- torch's own example `Transformer` parallelized by its own `Transformer.parallelize`, which
  calls `parallelize_module` root first, then block by block, then the output layer (a
  single style for a module itself, a tied output weight), SP off and on, world 2 and 4;
- the same model with fusedpar's strings: its attention's `n_heads` gets the local count;
- a torchtitan-shaped Llama (layers in a ModuleDict, `layer(x, freqs_cis)`) with
  torchtitan's plan, with loss parallel (DTensor logits, torch's `loss_parallel()`), and
  with a whole-model string plan and fusedpar's sequence-parallel region;
- DTensor outputs (`use_local_output=False`) flowing into DTensor ops and back;
- a PrepareModuleInput gathering a sequence shard, against torch's own parallelize_module.

Each against one process: logits / loss and every gradient (gathered whole) at fp32."""
from __future__ import annotations

import copy
import importlib.util
from unittest import mock

import pytest
import torch
import torch.distributed as dist

from tests.layers.common import check
from examples.torchtitan_llama.model import TitanArgs, Transformer as TitanTransformer, parallelize_llama

# torch's example Transformer lives in torch.testing._internal, which imports expecttest (a
# test extra here; a machine without it skips those tests, saying so)
needs_torch_example = pytest.mark.skipif(importlib.util.find_spec("expecttest") is None,
                                         reason="torch's example Transformer needs expecttest (pip install expecttest)")
TOL = 5e-5  # fp32; after an AdamW step (lr 1e-2) rounding differences grow to ~2.5e-5


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _check_all_grads(model, ref, case: str) -> None:
    """Every parameter's gradient, gathered whole (a collective over DTensor gradients),
    against the single-process one; every parameter must be a DTensor."""
    ref_params = dict(ref.named_parameters())
    names = [n for n, _ in model.named_parameters()]
    assert names == [n for n, _ in ref.named_parameters() if n in names] and names, case
    for name, p in model.named_parameters():
        assert hasattr(p, "placements"), f"{case}: {name} is not a DTensor"
        check(f"grad {name}", _full(p.grad), ref_params[name].grad, torch.float32, case, TOL)


def _mesh(group):
    from torch.distributed.device_mesh import DeviceMesh

    return DeviceMesh.from_group(group, "cpu")


def _run_torch_example(group, sp: bool):
    """torch's `Transformer.parallelize`, its `parallelize_module` switched to fusedpar's."""
    import torch.testing._internal.distributed._tensor.common_dtensor as torch_example

    import fusedpar

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    torch.manual_seed(0)
    ref = torch_example.Transformer(torch_example.ModelArgs(dropout_p=0.0, vocab_size=20, n_layers=2, dim=16, n_heads=4))
    model = copy.deepcopy(ref)
    switch = lambda module, mesh, plan: fusedpar.parallelize_module(module, mesh, plan, kernel="torch")  # noqa: E731
    with mock.patch.object(torch_example, "parallelize_module", switch):
        # local_output_for_attn=True: with DTensor q/k/v the example's attention runs
        # scaled_dot_product_attention on DTensors, which torch 2.13 has no CPU rule for
        # (the same failure under torch's own parallelize_module on CPU)
        torch_example.Transformer.parallelize(model, _mesh(group), use_seq_parallel=sp, local_output_for_attn=True)
    assert isinstance(model.layers[0].attention.wq, fusedpar.ColumnParallelLinear)
    assert isinstance(model.output, fusedpar.ColumnParallelLinear) and model.output.weight is model.tok_embeddings.weight
    assert model.layers[0].attention.wo.spec.sequence_parallel is sp
    case = f"torch example sp={sp} world {world} rank {rank}"
    for step in range(2):
        ids = torch.randint(0, 20, (2, 8), generator=torch.Generator().manual_seed(step))
        out, out_ref = model(ids), ref(ids)
        check("logits", out, out_ref, torch.float32, f"{case} step {step}", TOL)
        (out * out.detach()).sum().backward()
        (out_ref * out_ref.detach()).sum().backward()
        _check_all_grads(model, ref, f"{case} step {step}")
        model.zero_grad(), ref.zero_grad()
    return True


@needs_torch_example
@pytest.mark.parametrize("sp", [False, True])
def test_torch_example_transformer_with_its_own_parallelize(dist2, sp):
    assert dist2.run(_run_torch_example, sp) == [True] * 2


@needs_torch_example
def test_torch_example_transformer_at_world_4(dist4):
    assert dist4.run(_run_torch_example, True) == [True] * 4


def _run_example_strings(group):
    """fusedpar's strings on torch's example: its attention views q/k/v with `self.n_heads`,
    which must become the local count."""
    import torch.testing._internal.distributed._tensor.common_dtensor as torch_example

    import fusedpar

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    torch.manual_seed(1)
    ref = torch_example.Transformer(torch_example.ModelArgs(dropout_p=0.0, vocab_size=20, n_layers=2, dim=16, n_heads=4,
                                                             weight_tying=False))
    model = copy.deepcopy(ref)
    plan = {"layers.*.attention.wq": "colwise", "layers.*.attention.wk": "colwise", "layers.*.attention.wv": "colwise",
            "layers.*.attention.wo": "rowwise", "layers.*.feed_forward.w1": "colwise",
            "layers.*.feed_forward.w2": "rowwise"}
    fusedpar.parallelize(model, plan, group=group, kernel="torch")
    assert model.layers[0].attention.n_heads == 4 // world
    ids = torch.randint(0, 20, (2, 8), generator=torch.Generator().manual_seed(3))
    out, out_ref = model(ids), ref(ids)
    check("logits", out, out_ref, torch.float32, f"torch example strings rank {rank}", TOL)
    out.square().sum().backward(), out_ref.square().sum().backward()
    _check_all_grads(model, ref, f"torch example strings rank {rank}")
    return True


@needs_torch_example
def test_torch_example_transformer_with_fusedpar_strings(dist2):
    assert dist2.run(_run_example_strings) == [True] * 2


def _titan_pair(seed: int):
    torch.manual_seed(seed)
    ref = TitanTransformer(TitanArgs())
    return ref, copy.deepcopy(ref)


def _run_titan(group, loss_parallel: bool):
    """torchtitan's `parallelize_llama`, module by module, with fusedpar's parallelize_module."""
    import torch.nn.functional as F
    from torch.distributed.tensor.parallel import loss_parallel as torch_loss_parallel

    import fusedpar

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    ref, model = _titan_pair(2)
    parallelize_llama(model, _mesh(group), loss_parallel=loss_parallel,
                      parallelize_module=lambda m, mesh, plan: fusedpar.parallelize_module(m, mesh, plan, kernel="torch"))
    assert model.layers["0"].feed_forward.w2.spec.sequence_parallel
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    case = f"titan loss_parallel={loss_parallel} world {world} rank {rank}"
    for step in range(2):
        g = torch.Generator().manual_seed(10 + step)
        ids, labels = torch.randint(0, 96, (2, 16), generator=g), torch.randint(0, 96, (2, 16), generator=g)
        logits, logits_ref = model(ids), ref(ids)
        loss_ref = F.cross_entropy(logits_ref.flatten(0, 1), labels.flatten())
        if loss_parallel:  # vocab-split DTensor logits; the loss never gathers them
            assert tuple(logits.placements) == (torch.distributed.tensor.Shard(2),), logits.placements
            assert logits.to_local().shape[-1] == 96 // world
            with torch_loss_parallel():
                loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
                loss.backward()
            loss = loss.full_tensor()
        else:
            check("logits", logits, logits_ref, torch.float32, f"{case} step {step}", TOL)
            loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
            loss.backward()
        loss_ref.backward()
        check("loss", loss.reshape(1), loss_ref.reshape(1), torch.float32, f"{case} step {step}", TOL)
        _check_all_grads(model, ref, f"{case} step {step}")
        opt.step(), opt_ref.step()
        opt.zero_grad(), opt_ref.zero_grad()
    return True


@pytest.mark.parametrize("loss_parallel", [False, True])
def test_torchtitan_llama_with_its_plan(dist2, loss_parallel):
    assert dist2.run(_run_titan, loss_parallel) == [True] * 2


def test_torchtitan_llama_with_its_plan_at_world_4(dist4):
    assert dist4.run(_run_titan, True) == [True] * 4


def _run_titan_strings(group, sp: bool):
    """fusedpar's strings on the whole torchtitan-shaped model: with sequence parallelism the
    region is its ModuleDict of layers, the residual `x` passed by position."""
    import fusedpar

    rank = dist.get_rank(group)
    ref, model = _titan_pair(3)
    plan = {"layers.*.attention.wq": "colwise", "layers.*.attention.wk": "colwise", "layers.*.attention.wv": "colwise",
            "layers.*.attention.wo": "rowwise", "layers.*.feed_forward.w1": "colwise",
            "layers.*.feed_forward.w3": "colwise", "layers.*.feed_forward.w2": "rowwise",
            "layers.*.attention_norm": "sequence_parallel", "layers.*.ffn_norm": "sequence_parallel"}
    fusedpar.parallelize(model, plan, group=group, kernel="torch", sequence_parallel=sp)
    case = f"titan strings sp={sp} rank {rank}"
    for length in (16, 7):  # 7: not a multiple of the world size, the region runs unsplit
        ids = torch.randint(0, 96, (2, length), generator=torch.Generator().manual_seed(length))
        out, out_ref = model(ids), ref(ids)
        check("logits", out, out_ref, torch.float32, f"{case} length {length}", TOL)
        out.square().sum().backward(), out_ref.square().sum().backward()
        _check_all_grads(model, ref, f"{case} length {length}")
        model.zero_grad(), ref.zero_grad()
    return True


@pytest.mark.parametrize("sp", [False, True])
def test_torchtitan_llama_with_fusedpar_strings(dist2, sp):
    assert dist2.run(_run_titan_strings, sp) == [True] * 2


class _MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = torch.nn.Linear(12, 20), torch.nn.Linear(20, 12)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


def _run_dtensor_outputs(group, sequence_out: bool):
    """use_local_output=False: the column layer returns a Shard(-1) DTensor, the GELU runs as
    a DTensor op, the row layer takes it apart and returns a Replicate DTensor, or (with
    `sequence_out`, output_layouts=Shard(1)) reduce-scatters to a Shard(1) DTensor. The
    layouts are the fields of the style objects the plan reads as."""
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    import fusedpar
    from fusedpar.plan.torch_styles import read_plan

    rank = dist.get_rank(group)
    torch.manual_seed(4)
    ref = _MLP()
    down = RowwiseParallel(output_layouts=Shard(1), use_local_output=False) if sequence_out else \
        RowwiseParallel(use_local_output=False)
    plan = {"up": ColwiseParallel(use_local_output=False), "down": down}
    read = read_plan(ref, plan).styles
    assert read["up"].layouts.dtensor_placement == "shard(-1)"
    assert read["down"].layouts.dtensor_placement == ("shard(1)" if sequence_out else "replicate")
    model = fusedpar.parallelize_module(copy.deepcopy(ref), _mesh(group), plan, kernel="torch")
    assert model.down.spec.sequence_parallel is sequence_out and not model.up.spec.sequence_parallel
    seq = 4 if sequence_out else 5  # Shard(1) splits the sequence evenly
    x = torch.randn(3, seq, 12, generator=torch.Generator().manual_seed(5))
    hidden = model.up(x)
    assert isinstance(hidden, DTensor) and tuple(hidden.placements) == (Shard(2),) and hidden.shape == (3, seq, 20)
    out, out_ref = model(x), ref(x)
    case = f"dtensor outputs sequence_out={sequence_out} rank {rank}"
    assert isinstance(out, DTensor) and tuple(out.placements) == ((Shard(1),) if sequence_out else (Replicate(),))
    check("out", out.full_tensor(), out_ref, torch.float32, case, TOL)
    out.full_tensor().square().sum().backward(), out_ref.square().sum().backward()
    _check_all_grads(model, ref, case)
    return True


@pytest.mark.parametrize("sequence_out", [False, True])
def test_use_local_output_false_returns_dtensors(dist2, sequence_out):
    assert dist2.run(_run_dtensor_outputs, sequence_out) == [True] * 2


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = _MLP()

    def forward(self, x):
        return self.mlp(x)


def _gather_plan(column_child: bool = True):
    """PrepareModuleInput gathering `mlp`'s sequence shard for a column-parallel `up` and a
    row-parallel `down` back to a sequence shard; or (not `column_child`) for an `up` whose
    output is gathered (Replicate()), which cannot gather its input."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel

    gather = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
    if not column_child:
        return {"mlp": gather, "mlp.up": ColwiseParallel(output_layouts=Replicate())}
    return {"mlp": gather, "mlp.up": ColwiseParallel(), "mlp.down": RowwiseParallel(output_layouts=Shard(1))}


def _run_prepare_module_input(group):
    """A module-by-module plan whose PrepareModuleInput gathers a sequence shard: fusedpar's
    column layer gathers it in its fused GEMM; the output (a sequence shard) and every gradient
    match torch's own parallelize_module on the same model and one process. Without a
    column-parallel layer to gather for, the style's check refuses it, naming the plan key."""
    from torch.distributed.tensor.parallel import parallelize_module as torch_parallelize_module

    import fusedpar

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    torch.manual_seed(6)
    try:
        fusedpar.parallelize_module(_Block(), _mesh(group), _gather_plan(column_child=False), kernel="torch")
    except ValueError as e:
        assert "plan['mlp']" in str(e) and "expected column-parallel linears directly under it" in str(e), str(e)
    else:
        raise AssertionError("a PrepareModuleInput with no column-parallel layer to gather for was accepted")
    torch.manual_seed(6)
    ref = _Block()
    ours = fusedpar.parallelize_module(copy.deepcopy(ref), _mesh(group), _gather_plan(), kernel="torch")
    theirs = torch_parallelize_module(copy.deepcopy(ref), _mesh(group), _gather_plan())
    assert isinstance(ours.mlp.up, fusedpar.ColumnParallelLinear) and ours.mlp.up.spec.sequence_parallel
    case = f"PrepareModuleInput rank {rank}"
    for step in range(2):  # twice: buffers reused
        x = torch.randn(3, 4 * world, 12, generator=torch.Generator().manual_seed(20 + step))
        x_shard = x.chunk(world, 1)[rank]
        out, out_torch, out_ref = ours(x_shard), theirs(x_shard), ref(x)
        check("out vs torch", out, out_torch, torch.float32, case, TOL)
        check("out vs one process", out, out_ref.chunk(world, 1)[rank], torch.float32, case, TOL)
        out.square().sum().backward(), out_torch.square().sum().backward(), out_ref.square().sum().backward()
        _check_all_grads(ours, ref, f"{case} step {step}")
        _check_all_grads(theirs, ref, f"{case} step {step}, torch's")
        for m in (ours, theirs, ref):
            m.zero_grad()
    return True


def test_prepare_module_input_gathers_in_the_column_layer_as_torch_does(dist2):
    assert dist2.run(_run_prepare_module_input) == [True] * 2


def _run_torch_example_state(group, ckpt: str):
    """torch's tools on torch's example model parallelized by fusedpar (SP on): torch's
    clip_grad_norm_ returns the one-process norm; a DCP checkpoint loads into the model torch's
    own parallelize_module builds and back, with the one-process logits after each load."""
    import torch.distributed.checkpoint as dcp
    import torch.testing._internal.distributed._tensor.common_dtensor as torch_example

    import fusedpar

    rank = dist.get_rank(group)
    make_args = lambda: torch_example.ModelArgs(dropout_p=0.0, vocab_size=20, n_layers=2, dim=16, n_heads=4)  # noqa: E731

    def build(seed: int, ours: bool):
        torch.manual_seed(seed)
        model = torch_example.Transformer(make_args())
        switch = (lambda module, mesh, plan: fusedpar.parallelize_module(module, mesh, plan, kernel="torch")) if ours \
            else torch_example.parallelize_module
        with mock.patch.object(torch_example, "parallelize_module", switch):
            torch_example.Transformer.parallelize(model, _mesh(group), use_seq_parallel=True, local_output_for_attn=True)
        return model

    torch.manual_seed(0)
    ref = torch_example.Transformer(make_args())
    ours = build(0, True)
    ids = torch.randint(0, 20, (2, 8), generator=torch.Generator().manual_seed(7))
    ours(ids).square().mean().backward(), ref(ids).square().mean().backward()
    norm, norm_ref = torch.nn.utils.clip_grad_norm_(ours.parameters(), 0.5), torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
    check("torch's clip_grad_norm_", _full(norm).reshape(1), norm_ref.reshape(1), torch.float32, f"rank {rank}", TOL)
    _check_all_grads(ours, ref, f"clipped gradients rank {rank}")

    dcp.save(ours.state_dict(), checkpoint_id=ckpt + "/fusedpar")
    theirs = build(5, False)  # torch's own parallelize_module, other weights
    sd = theirs.state_dict()
    dcp.load(sd, checkpoint_id=ckpt + "/fusedpar")
    theirs.load_state_dict(sd)
    check("logits, torch's model from fusedpar's checkpoint", theirs(ids), ref(ids), torch.float32, f"rank {rank}", TOL)
    dcp.save(theirs.state_dict(), checkpoint_id=ckpt + "/torch")
    again = build(6, True)
    sd = again.state_dict()
    dcp.load(sd, checkpoint_id=ckpt + "/torch")
    again.load_state_dict(sd)
    check("logits, fusedpar's model from torch's checkpoint", again(ids), ref(ids), torch.float32, f"rank {rank}", TOL)
    return True


@needs_torch_example
def test_torch_example_transformer_clip_and_dcp_exchange_with_torch(dist2):
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        assert dist2.run(_run_torch_example_state, tmp) == [True, True]
