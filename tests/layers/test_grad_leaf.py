"""A DTensor parameter's gradient reaches `p.grad` through its gradient leaf
(local_views._grad_leaf): what autograd's AccumulateGrad does for a parameter must still happen,
on real gloo ranks against one process in float64 (an MLP: column, tanh, row layers).

- `p.register_hook` hooks see the DTensor gradient and may replace it; post-accumulate
  hooks run once per backward, after `p.grad` is set.
- Gradients accumulate over backwards without zero_grad (in place, as torch does), and start
  fresh after `zero_grad(set_to_none=True)`; a packed parameter's gradient keeps its layout
  (two backwards give twice one).
- A DTensor computed in forward (torch.func.functional_call with `1.5 * w`) keeps its
  autograd history: the gradient reaches the tensor it was computed from.
- An optimizer step is seen by the next forward (the leaf aliases the parameter's storage);
  a parameter still pickles and deep-copies after a backward.
"""
from __future__ import annotations

import copy
import io

import torch
import torch.distributed as dist
from torch import nn

from fusedpar.layers import local_shard
from tests.layers.common import check

DT = torch.float64


def _models(group, seed: int = 0):
    import fusedpar

    torch.manual_seed(seed)
    # sizes not multiples of a tile
    ref = nn.Sequential(nn.Linear(13, 20, dtype=DT), nn.Tanh(), nn.Linear(20, 11, dtype=DT))
    par = nn.Sequential(
        fusedpar.ColumnParallelLinear.from_linear(copy.deepcopy(ref[0]), group=group, kernel="torch"),
        nn.Tanh(),
        fusedpar.RowParallelLinear.from_linear(copy.deepcopy(ref[2]), group=group, kernel="torch"),
    )
    return ref, par


def _x(step: int) -> torch.Tensor:
    return torch.randn(5, 13, dtype=DT, generator=torch.Generator().manual_seed(100 + step))


def _grads(model: nn.Module, ref: nn.Module, case: str) -> None:
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        check(name, p.grad, local_shard(model, name, q.grad), DT, case)


def _run_hooks_and_accumulation(group):
    from torch.distributed.tensor import DTensor

    ref, par = _models(group)
    w = par[0].weight
    seen: list = []
    w.register_hook(lambda g: seen.append(("pre", type(g), g.placements, g.shape)) or g * 3)
    w.register_post_accumulate_grad_hook(lambda p: seen.append(("post", p is w, type(p.grad))))
    ref[0].weight.register_hook(lambda g: g * 3)

    for step in range(2):  # two backwards, no zero_grad: gradients add up
        ref(_x(step)).square().sum().backward()
        par(_x(step)).square().sum().backward()
    _grads(par, ref, "accumulated over 2 backwards")
    assert [s[0] for s in seen] == ["pre", "post"] * 2, seen
    assert seen[0][1] is DTensor and seen[0][2] == w.placements and seen[0][3] == w.shape, seen[0]
    assert seen[1][1:] == (True, DTensor), seen[1]
    assert all(type(p.grad) is DTensor and p.grad.placements == p.placements for p in par.parameters())

    held = w.grad
    ref(_x(2)).square().sum().backward()
    par(_x(2)).square().sum().backward()
    assert w.grad is held, "accumulation replaced the gradient tensor (torch adds in place)"
    _grads(par, ref, "accumulated over 3 backwards")

    ref.zero_grad(set_to_none=True)
    par.zero_grad(set_to_none=True)
    ref(_x(3)).square().sum().backward()
    par(_x(3)).square().sum().backward()
    _grads(par, ref, "after zero_grad(set_to_none=True)")
    assert w.grad is not held
    # nothing unpicklable is left on a parameter by its gradient leaf
    buf = io.BytesIO()
    torch.save(w, buf)
    copy.deepcopy(w)
    return True


def _run_packed_accumulation(group):
    import fusedpar

    torch.manual_seed(1)
    # [gate; up] of 2 x 10 rows, gathered: a rank's gradient is two boxes of the packed weight
    layer = fusedpar.PackedColumnParallelLinear.from_linear(nn.Linear(13, 20, dtype=DT), group=group, parts=2,
                                                            kernel="torch")
    layer(_x(0)).square().sum().backward()
    once = {n: p.grad._local_tensor.clone() for n, p in layer.named_parameters()}
    layer.zero_grad(set_to_none=True)
    for _ in range(2):
        layer(_x(0)).square().sum().backward()
    for n, p in layer.named_parameters():
        assert p.grad._local_tensor.shape == p._local_tensor.shape, (n, p.grad._local_tensor.shape)
        check(n, p.grad._local_tensor, 2 * once[n], DT, "packed, 2 backwards vs twice one")
    return True


def test_packed_gradient_accumulates_in_its_layout(dist2):
    assert dist2.run(_run_packed_accumulation) == [True, True]


def test_hooks_and_accumulation_as_torch_does(dist2):
    assert dist2.run(_run_hooks_and_accumulation) == [True, True]


def _run_computed_weight_and_step(group):
    from torch.distributed.tensor import DTensor
    from torch.func import functional_call

    ref, par = _models(group)
    # a DTensor computed in forward: its gradient goes to what it was computed from
    src = par[2].weight.detach().clone().requires_grad_(True)
    ref_src = ref[2].weight.detach().clone().requires_grad_(True)
    y = functional_call(par, {"2.weight": src * 1.5}, (_x(0),))
    y_ref = functional_call(ref, {"2.weight": ref_src * 1.5}, (_x(0),))
    check("output", y, y_ref, DT, "functional_call")
    y.square().sum().backward()
    y_ref.square().sum().backward()
    assert isinstance(src.grad, DTensor), type(src.grad)
    check("src.grad", src.grad, local_shard(par, "2.weight", ref_src.grad), DT, "functional_call 1.5 * w")
    assert par[2].weight.grad is None, "the parameter itself was not used"

    # an optimizer step changes what the next forward reads
    opt, opt_ref = torch.optim.SGD(par.parameters(), lr=0.1), torch.optim.SGD(ref.parameters(), lr=0.1)
    for step in range(2):
        for model, o in ((par, opt), (ref, opt_ref)):
            o.zero_grad()
            model(_x(step)).square().sum().backward()
            o.step()
    check("output", par(_x(5)), ref(_x(5)), DT, "after 2 SGD steps")
    _grads(par, ref, "second SGD step")
    return True


def test_computed_weight_keeps_history_and_steps_are_seen(dist2):
    assert dist2.run(_run_computed_weight_and_step) == [True, True]


def _run_frozen_and_no_grad(group):
    ref, par = _models(group)
    par[0].weight.requires_grad_(False)
    ref[0].weight.requires_grad_(False)
    par(_x(0)).square().sum().backward()
    ref(_x(0)).square().sum().backward()
    assert par[0].weight.grad is None
    check("bias", par[0].bias.grad, local_shard(par, "0.bias", ref[0].bias.grad), DT, "frozen first weight")
    with torch.no_grad():
        check("output", par(_x(1)), ref(_x(1)), DT, "no_grad")
    return dist.get_rank(group)


def test_frozen_parameter_gets_no_gradient(dist2):
    assert sorted(dist2.run(_run_frozen_and_no_grad)) == [0, 1]


def _run_input_grads_only_and_reuse(group):
    ref, par = _models(group)
    x, x_ref = _x(0).requires_grad_(True), _x(0).requires_grad_(True)
    # gradients of the input only (a pipeline stage's input backward, a gradient penalty): the
    # parameters' gradients stay untouched, as autograd leaves them
    dx, = torch.autograd.grad(par(x).square().sum(), [x])
    dx_ref, = torch.autograd.grad(ref(x_ref).square().sum(), [x_ref])
    check("dx", dx, dx_ref, DT, "autograd.grad(out, [x])")
    par(x).square().sum().backward(inputs=[x])
    ref(x_ref).square().sum().backward(inputs=[x_ref])
    check("x.grad", x.grad, x_ref.grad, DT, "backward(inputs=[x])")
    assert all(p.grad is None for p in par.parameters()), [n for n, p in par.named_parameters() if p.grad is not None]
    # a layer used twice in one forward (a shared block): its gradients add up
    for model in (par, ref):
        (model(_x(1)) * model(_x(2))).sum().backward()
    _grads(par, ref, "each layer used twice in one forward")
    return True


def test_input_gradients_leave_parameters_alone_and_reuse_adds(dist2):
    assert dist2.run(_run_input_grads_only_and_reuse) == [True, True]
