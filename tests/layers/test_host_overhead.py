"""What a forward of a parallelized model does on the host, checked by recording its aten ops.

* The fused column groups (q/k/v, gate/up run as one GEMM) keep their concatenated weight
  across forwards: no weight-shaped `cat` after the first forward, and the kept copy follows
  every change of the weights (an in-place edit through the DTensor parameter,
  `load_state_dict`, an optimizer step): logits and gradients against one process.
* At fixed shapes, after warm-up, a forward makes no host-device synchronisation beyond
  what the model itself makes in one process (`.item()`, `.tolist()`, `nonzero`,
  `torch.equal`, ...), with sequence parallelism off and on (the ranks' input-shape check
  included), so a decode step can be captured in a CUDA graph.
"""
from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from tests.layers.common import check, local_slice

pytest.importorskip("transformers")

TOL = 1e-5  # fp32 against one process
aten = torch.ops.aten
# ops whose result the host must read (on a GPU: the host waits for the device)
SYNC_OPS = {aten._local_scalar_dense, aten.item, aten.equal, aten.is_nonzero, aten.nonzero, aten.allclose,
            aten.masked_select, aten._unique2, aten.unique_consecutive, aten.unique_dim}


class _Record(TorchDispatchMode):
    """Every aten op run under it, with its output shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[object, list[tuple[int, ...]]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else [out]
        self.ops.append((func.overloadpacket, [tuple(o.shape) for o in outs if isinstance(o, torch.Tensor)]))
        return out

    def syncs(self) -> Counter:
        return Counter(str(op) for op, _ in self.ops if op in SYNC_OPS)

    def cats(self, shapes: set[tuple[int, ...]]) -> int:
        return sum(1 for op, outs in self.ops if op is aten.cat and any(s in shapes for s in outs))


def _llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        attn_implementation="sdpa")).eval()


def _fused_shapes(model) -> set[tuple[int, ...]]:
    """The shapes of the groups' concatenated local weights: [q+k+v rows, H], [gate+up rows, H]."""
    from fusedpar.layers.sharding import local_tensor

    shapes = set()
    for layer in model.model.layers:
        for parent, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj")), (layer.mlp, ("gate_proj", "up_proj"))):
            ws = [local_tensor(getattr(parent, n).weight) for n in names]
            shapes.add((sum(w.shape[0] for w in ws), ws[0].shape[1]))
    return shapes


def _fused_cache_case(group) -> None:
    from fusedpar import parallelize

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    name = f"rank {rank}/{world}"
    ref = _llama()
    model = parallelize(copy.deepcopy(ref), "auto", group=group, kernel="torch")
    shapes = _fused_shapes(model)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))

    # no weight copy per forward, with and without grad, once the first forward made them
    with torch.no_grad():
        model(ids)
        with _Record() as rec:
            model(ids)
    assert rec.cats(shapes) == 0, f"{name}: a no-grad forward concatenated the weights ({rec.cats(shapes)} times)"
    with _Record() as rec:
        model(ids, labels=ids).loss.backward()
    assert rec.cats(shapes) == 0, f"{name}: forward+backward concatenated the weights ({rec.cats(shapes)} times)"
    model.zero_grad()

    # the kept weights follow an in-place edit through the DTensor parameter ...
    with torch.no_grad():
        for m in (model, ref):
            m.model.layers[0].self_attn.k_proj.weight.mul_(2)
            m.model.layers[1].mlp.up_proj.weight.add_(0.01)
        check("logits after an in-place edit", model(ids).logits, ref(ids).logits, torch.float32, name, TOL)
    # ... load_state_dict (unsharded tensors, each rank keeps its piece) ...
    other = _llama(seed=7)
    model.load_state_dict(other.state_dict())
    ref.load_state_dict(other.state_dict())
    with torch.no_grad():
        check("logits after load_state_dict", model(ids).logits, ref(ids).logits, torch.float32, name, TOL)
    # ... and optimizer steps; every member's gradient is its own slice of the fused one
    opt, opt_ref = (torch.optim.SGD(m.parameters(), lr=0.5) for m in (model, ref))
    for step in range(2):
        for m, o in ((model, opt), (ref, opt_ref)):
            o.zero_grad()
            m(ids, labels=ids).loss.backward()
        ref_params = dict(ref.named_parameters())
        for pname, p in model.named_parameters():
            if any(k in pname for k in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")):
                check(f"grad {pname} (step {step})", p.grad,
                      local_slice(model, pname, ref_params[pname].grad, world, rank), torch.float32, name, TOL)
        opt.step()
        opt_ref.step()
        with torch.no_grad():
            check(f"logits after SGD step {step}", model(ids).logits, ref(ids).logits, torch.float32, name, TOL)


def test_fused_groups_keep_their_weights(dist2):
    dist2.run(_fused_cache_case)


def _refilled_case(group) -> None:
    """What FSDP2 does to the parameters of a fully_shard'ed block: its own Parameter objects
    (DTensors fusedpar did not make) stand in the modules, and after each optimizer step the
    all-gather refills them in place at the same address under
    `torch.autograd._unsafe_preserve_version_counter`. Kept fused weights keyed on version
    and address would serve the previous step's values (seen as a flaky FSDP2 test:
    embed_tokens' gradient off by 0.5 % at step 2)."""
    from torch import nn
    from torch.distributed.tensor import DTensor

    from fusedpar import parallelize

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    name = f"rank {rank}/{world}"
    ref = _llama()
    model = parallelize(copy.deepcopy(ref), "auto", group=group, kernel="torch")
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    attn = model.model.layers[0].self_attn
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):  # stand-ins, as FSDP2's unsharded parameters
        p = proj.weight
        local = p._local_tensor.detach().clone()
        proj._parameters["weight"] = nn.Parameter(
            DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()))
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            model(ids)  # the group's weights kept from these values
        k_local = attn.k_proj.weight._local_tensor
        with torch.no_grad(), torch.autograd._unsafe_preserve_version_counter(k_local):
            k_local.mul_(1.5)  # the refill: same address, same version
        with torch.no_grad():
            ref.model.layers[0].self_attn.k_proj.weight.mul_(1.5)
        with torch.set_grad_enabled(grad):
            check(f"logits after a refill (grad {grad})", model(ids).logits, ref(ids).logits, torch.float32, name, TOL)


def test_fused_groups_see_parameters_refilled_in_place(dist2):
    dist2.run(_refilled_case)


def _sync_case(group, sequence_parallel: bool) -> dict[str, dict[str, int]]:
    from transformers import DynamicCache

    from fusedpar import parallelize
    from fusedpar.plan import agreement

    assert agreement.agreement_enabled(), "expected the ranks' agreement checks on (the default)"
    ref = _llama()
    model = parallelize(copy.deepcopy(ref), "auto", group=group, kernel="torch", sequence_parallel=sequence_parallel)
    prompt = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(1))  # divides by the world: split

    def steps(m) -> dict[str, Counter]:
        """Sync ops of a full forward and of a decode step, each at shapes seen twice before."""
        found = {}
        with torch.no_grad():
            for _ in range(2):
                m(prompt)
            with _Record() as rec:
                m(prompt)
            found["forward"] = rec.syncs()
            cache = DynamicCache(config=m.config)
            token = m(prompt, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
            for _ in range(2):
                token = m(token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
            with _Record() as rec:
                m(token, past_key_values=cache, use_cache=True)
            found["decode step"] = rec.syncs()
        return found

    ours, theirs = steps(model), steps(ref)
    extra = {k: dict(ours[k] - theirs[k]) for k in ours}
    assert not any(extra.values()), (
        f"rank {dist.get_rank(group)}, sequence_parallel={sequence_parallel}: host-device syncs beyond the "
        f"single-process model's: {extra}")
    return {k: dict(v) for k, v in ours.items()}


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "tp+sp"])
def test_fixed_shape_forward_makes_no_host_sync(dist2, sequence_parallel):
    dist2.run(_sync_case, sequence_parallel)
