"""`torch.compile` of a parallelized model (backends "eager", "aot_eager" and, on CPU too,
"inductor": dynamo traces through the hooks and autograd Functions, graph-breaking at the
collectives) gives the same loss and gradients as the uncompiled single-process model."""
from __future__ import annotations

import copy

import torch
import torch.distributed as dist

from fusedpar.plan import parallelize
from tests.layers.common import check, check_grads
from tests.layers.test_models import MODEL_TOL, build



def _run_compiled(group, backend: str, sp: bool):
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    torch._dynamo.reset()
    ref = build("llama")
    model = parallelize(copy.deepcopy(ref), "auto", group=group, sequence_parallel=sp, kernel="torch")
    compiled = torch.compile(model, backend=backend)
    g = torch.Generator().manual_seed(9)
    for step in range(2):  # the second call runs the cached graphs
        ids = torch.randint(0, 256, (2, 8), generator=g)
        out_ref, out = ref(ids, labels=ids), compiled(ids, labels=ids)
        name = f"{backend} sp={sp} rank {rank} step {step}"
        check("loss", out.loss.reshape(1), out_ref.loss.reshape(1), torch.float32, name, MODEL_TOL)
        out_ref.loss.backward()
        out.loss.backward()
        check_grads(model, ref, world, rank, name, MODEL_TOL)
        ref.zero_grad(); model.zero_grad()  # noqa: E702
    return True


def test_torch_compile_eager_and_aot_eager(dist2):
    assert dist2.run(_run_compiled, "eager", True) == [True] * 2
    assert dist2.run(_run_compiled, "aot_eager", False) == [True] * 2


def test_torch_compile_inductor(dist2):
    # ~1 min on 2 cores (C++ codegen for the CPU): the backend users train with
    assert dist2.run(_run_compiled, "inductor", True, timeout=600) == [True] * 2
