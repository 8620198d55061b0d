"""fusedpar.grad_norm / clip_grad_norm_ on a parallelized Llama against torch's
clip_grad_norm_ on the unparallelized twin (one process), on 2 and 4 gloo ranks."""
from __future__ import annotations

import copy
import math

import torch
import torch.distributed as dist

import fusedpar
from fusedpar.plan import parallelize
from tests.layers.test_models import build

TOL = 1e-5  # fp32, relative: a sum of squares over ~100 tensors, split differently across ranks


def _twins(group, sp: bool, frozen: bool, seed: int = 0):
    ref = build("llama", seed=seed)
    if frozen:  # a frozen block: its parameters have no gradient and must not count
        ref.model.layers[0].mlp.requires_grad_(False)
    model = parallelize(copy.deepcopy(ref), "auto", group=group, sequence_parallel=sp, kernel="torch")
    return ref, model


def _backward(ref, model, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (2, 8), generator=g)
    ref(ids, labels=ids).loss.backward()
    model(ids, labels=ids).loss.backward()


def _run_norm_cases(group, cases):
    world = dist.get_world_size(group)
    for case in cases:
        ref, model = _twins(group, case["sp"], case["frozen"])
        _backward(ref, model, seed=1)
        for p in (2.0, 1.0, 3.0, math.inf):
            want = torch.nn.utils.get_total_norm([q.grad for q in ref.parameters() if q.grad is not None], p)
            got = fusedpar.grad_norm(model, group=group, norm_type=p)
            err = abs(got.item() - want.item()) / want.item()
            assert err <= TOL, f"world {world} {case} p={p}: {got.item()} vs single-process {want.item()} ({err:.2e})"
        # torch's own function: right too, since the gradients are DTensors (before, with plain
        # shards, it saw only this rank's and came out too small)
        plain = torch.nn.utils.get_total_norm([q.grad for q in model.parameters() if q.grad is not None], 2.0)
        plain = plain.full_tensor() if hasattr(plain, "full_tensor") else plain
        want = torch.nn.utils.get_total_norm([q.grad for q in ref.parameters() if q.grad is not None], 2.0)
        assert abs(plain.item() - want.item()) <= TOL * want.item(), (
            f"world {world} {case}: torch's get_total_norm {plain.item()} vs single-process {want.item()}")
    return True


def test_grad_norm_equals_single_process_world2(dist2):
    cases = [dict(sp=False, frozen=False), dict(sp=True, frozen=False), dict(sp=True, frozen=True)]
    assert dist2.run(_run_norm_cases, cases) == [True] * 2


def test_grad_norm_equals_single_process_world4(dist4):
    # 2 kv heads on 4 ranks: the kv weights are replicated (each rank's block), counted once
    cases = [dict(sp=False, frozen=True), dict(sp=True, frozen=False)]
    assert dist4.run(_run_norm_cases, cases) == [True] * 4


def _run_clipped_training(group, sp: bool):
    """10 AdamW steps with clipping that clips: losses and returned norms in lockstep."""
    ref, model = _twins(group, sp, frozen=False, seed=3)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=3e-3)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(4)
    clipped = 0
    for step in range(10):
        ids = torch.randint(0, 256, (2, 8), generator=g)
        loss_ref = ref(ids, labels=ids).loss
        loss = model(ids, labels=ids).loss
        loss_ref.backward()
        loss.backward()
        max_norm = 0.5  # below the norms of this model's first steps: clipping happens
        n_ref = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
        n = fusedpar.clip_grad_norm_(model, max_norm, group=group)
        clipped += int(n_ref.item() > max_norm)
        assert abs(n.item() - n_ref.item()) <= TOL * n_ref.item(), f"step {step}: norm {n.item()} vs {n_ref.item()}"
        assert abs(loss.item() - loss_ref.item()) <= 1e-4 * abs(loss_ref.item()), (
            f"step {step}: loss {loss.item()} vs single-process {loss_ref.item()}")
        opt_ref.step(); opt.step()  # noqa: E702
        opt_ref.zero_grad(); opt.zero_grad()  # noqa: E702
    assert clipped >= 5, f"max_norm clipped only {clipped} of 10 steps: the test would not see clipping"
    return True


def test_clipped_training_stays_in_lockstep(dist2):
    assert dist2.run(_run_clipped_training, False) == [True] * 2
    assert dist2.run(_run_clipped_training, True) == [True] * 2


def _run_bad_arguments(group):
    model = parallelize(build("llama"), "auto", group=group, kernel="torch")
    for bad in (0, -1.0, "two"):
        try:
            fusedpar.grad_norm(model, group=group, norm_type=bad)
        except (ValueError, TypeError) as e:
            assert "norm_type" in str(e) and repr(bad) in str(e), str(e)
        else:
            raise AssertionError(f"norm_type={bad!r} was accepted")
    try:
        fusedpar.clip_grad_norm_(model, 1.0, group=None)
    except TypeError as e:
        assert "group" in str(e) and "None" in str(e)
    else:
        raise AssertionError("group=None was accepted")
    # no gradients yet: the norm is 0 and clipping is a no-op
    assert fusedpar.clip_grad_norm_(model, 1.0, group=group).item() == 0.0
    return True


def test_bad_arguments_and_no_gradients(dist2):
    assert dist2.run(_run_bad_arguments) == [True] * 2
