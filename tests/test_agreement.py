"""Ranks that disagree, on fresh gloo groups with a short timeout (issue 24, items 5-6).

Faults: a NaN or inf gradient on one rank only (each rank in turn), ranks given different
plans, settings or seeds, and sequence-parallel forwards of different lengths on the two
ranks. Every case must end in its documented error on every rank, naming the difference,
within the group timeout + 5 s, and no process may hang or die. Before the fix: the inf-norm
of a NaN on rank 1 came back finite on both ranks; different plans raised on one rank only;
different seeds and lengths 8 vs 7 passed or waited out the timeout; 8 vs 6 aborted a rank
inside gloo. Healthy twins run alongside, so a check that refuses everything fails too.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

import fusedpar
from fusedpar.plan import parallelize, resolve_plan
from tests.faults import MATRIX_CASES, run_scenarios
from tests.layers.test_models import build

TIMEOUT_S = 3.0
BOUND_S = TIMEOUT_S + 5.0
NORM_TYPES = (1.0, 2.0, math.inf, 3.0)


def _backward(model: torch.nn.Module, seq: int = 8) -> None:
    ids = torch.randint(0, 256, (2, seq), generator=torch.Generator().manual_seed(1))
    model(ids, labels=ids).loss.backward()


# Scenarios: (group, rank, world, **kwargs) -> extra info; raising is the expected outcome.
def s_nonfinite_grad(group, rank, world, *, victim: int, value: str, where: str):
    """NaN / inf in one gradient on `victim` only: every norm type must see it on every rank,
    and clipping with error_if_nonfinite must raise on every rank."""
    from fusedpar.layers.sharding import local_tensor

    model = parallelize(build("llama"), "auto", group=group, kernel="torch")
    _backward(model)
    # a sharded weight (each rank's shard differs) or a replicated one (counted once)
    target = model.model.layers[0].self_attn.q_proj.weight if where == "sharded" else model.model.norm.weight
    if rank == victim:  # this rank's piece of the DTensor gradient (an index into the DTensor would gather)
        local_tensor(target.grad).view(-1)[3] = float(value)
    norms, raised = {}, []
    for p in NORM_TYPES:
        norm = fusedpar.grad_norm(model, group=group, norm_type=p)
        norms[p] = norm.item()
        want = math.isnan if value == "nan" else (lambda v: v == math.inf)
        assert want(norm.item()), f"rank {rank}: grad_norm(norm_type={p}) = {norm.item()}, expected {value}"
        before = [local_tensor(q.grad).clone() for q in model.parameters() if q.grad is not None]
        try:
            fusedpar.clip_grad_norm_(model, 1.0, group=group, norm_type=p, error_if_nonfinite=True)
        except RuntimeError as e:
            raised.append(str(e))
        after = [local_tensor(q.grad) for q in model.parameters() if q.grad is not None]
        assert all(torch.allclose(a, b, rtol=0, atol=0, equal_nan=True) for a, b in zip(before, after)), (
            f"rank {rank}: clip_grad_norm_ changed gradients before raising")
    assert len(raised) == len(NORM_TYPES), f"rank {rank}: error_if_nonfinite raised for {len(raised)} of {NORM_TYPES}"
    raise RuntimeError(f"{raised[0]} | norms {norms}")


def s_plans_differ(group, rank, world, *, kind: str):
    model = build("llama")
    plan = resolve_plan(model, "auto")
    if rank == 1 and kind == "missing_key":
        del plan["model.layers.*.mlp.up_proj"]
    elif rank == 0 and kind == "bad_style_on_rank_0":  # rank 0's own checks would refuse it alone
        plan["model.layers.*.mlp.up_proj"] = "colwize"
    model = parallelize(model, plan, group=group, kernel="torch")
    _backward(model)


def s_settings_differ(group, rank, world):
    parallelize(build("llama"), "auto", group=group, kernel="torch", sequence_parallel=rank == 0)


def s_seeds_differ(group, rank, world):
    model = parallelize(build("llama", seed=rank), "auto", group=group, kernel="torch")
    _backward(model)


def s_lengths_differ(group, rank, world, *, lengths: tuple[int, int], entry: str):
    model = parallelize(build("llama"), "auto", group=group, kernel="torch", sequence_parallel=True)
    ids = torch.randint(0, 256, (1, lengths[rank]), generator=torch.Generator().manual_seed(1))
    if entry == "model":
        model(ids, labels=ids).loss.backward()
    else:  # the base model only: the check at the first decoder layer
        model.model(ids).last_hidden_state.sum().backward()


def s_agree(group, rank, world):
    """Identical ranks: parallelize, SP forwards of two lengths, finite clipping all pass,
    and the logits are the single process's."""
    ref = build("llama")
    model = parallelize(copy.deepcopy(ref), "auto", group=group, kernel="torch", sequence_parallel=True)
    for seq in (8, 7):
        ids = torch.randint(0, 256, (2, seq), generator=torch.Generator().manual_seed(seq))
        out, want = model(ids, labels=ids), ref(ids, labels=ids)
        err = ((out.logits - want.logits).norm() / want.logits.norm()).item()
        assert err < 1e-5, f"rank {rank}: seq {seq}: logits rel err {err:.2e}"
        out.loss.backward()
        want.loss.backward()
    for p in NORM_TYPES:
        n = fusedpar.grad_norm(model, group=group, norm_type=p)
        n_ref = torch.nn.utils.get_total_norm([q.grad for q in ref.parameters()], p)
        assert abs(n.item() - n_ref.item()) <= 1e-5 * n_ref.item(), f"rank {rank}: p={p}: {n.item()} vs {n_ref.item()}"
    return {"ok": True}


def _expect_all(outcomes: dict, label: str, error_type: str | None, patterns: list[str]) -> None:
    for rank in (0, 1):
        assert rank in outcomes, f"{label}: rank {rank} reported nothing (hung or died)"
        o = outcomes[rank]
        if error_type is None:
            assert o.ok, f"{label}: rank {rank} expected success, got {o.error_type}: {o.message}"
        else:
            assert not o.ok and o.error_type == error_type, (
                f"{label}: rank {rank} expected {error_type}, "
                f"got {'success' if o.ok else o.error_type + ': ' + o.message}")
            for pattern in patterns:
                assert pattern in o.message, f"{label}: rank {rank}: {pattern!r} not in {o.message!r}"
        bound = BOUND_S if error_type else 60.0  # a healthy case's first run also imports and builds
        assert o.elapsed <= bound, f"{label}: rank {rank} took {o.elapsed:.1f} s > {bound:.1f} s"


NONFINITE_MSG = "clip_grad_norm_: the total norm of order"
# (label, scenario, kwargs, expected error type, patterns every rank's message must hold)
CASES = [("agree", s_agree, {}, None, [])]
CASES += [(f"nonfinite_grad[{x} on rank {v}, {w}]", s_nonfinite_grad, dict(victim=v, value=x, where=w), "RuntimeError",
           [NONFINITE_MSG, f"is {x} (non-finite)"])
          for v, x, w in [(1, "nan", "sharded"), (1, "inf", "replicated"), (0, "nan", "replicated"),
                          (0, "inf", "sharded")]]
CASES += [
    ("plans_differ[key missing on rank 1]", s_plans_differ, dict(kind="missing_key"), "RanksDisagreeError",
     ["ranks disagree on plan", "'model.layers.*.mlp.up_proj': 'colwise' vs '<absent>'"]),
    ("plans_differ[bad style on rank 0]", s_plans_differ, dict(kind="bad_style_on_rank_0"), "RanksDisagreeError",
     ["ranks disagree on plan", "'colwize' vs 'colwise'"]),
    ("settings_differ[sequence_parallel]", s_settings_differ, {}, "RanksDisagreeError",
     ["ranks disagree on settings", "'sequence_parallel': True vs False"]),
    ("seeds_differ", s_seeds_differ, {}, "RanksDisagreeError",
     ["ranks disagree on parameter checksums", "'model.embed_tokens.weight'"]),
    ("sp_lengths_differ[8 vs 7]", s_lengths_differ, dict(lengths=(8, 7), entry="model"), "RanksDisagreeError",
     ["[1, 8] on rank 0, [1, 7] on rank 1"]),
    ("sp_lengths_differ[8 vs 6]", s_lengths_differ, dict(lengths=(8, 6), entry="model"), "RanksDisagreeError",
     ["[1, 8] on rank 0, [1, 6] on rank 1"]),
    ("sp_lengths_differ[8 vs 6, base model]", s_lengths_differ, dict(lengths=(8, 6), entry="layers"),
     "RanksDisagreeError", ["model.layers.0 forward: hidden_states", "[1, 8, 128] on rank 0, [1, 6, 128] on rank 1"]),
    ("agree_after_faults", s_agree, {}, None, []),  # works again after every fault, on a rebuilt group
]
SCENARIOS = {label: fn for label, fn, *_ in CASES}


def test_disagreeing_ranks_raise_on_every_rank_naming_the_difference():
    plan = [(label, kwargs) for label, _, kwargs, *_ in CASES]
    outcomes, codes = run_scenarios(2, __name__, plan, timeout_s=TIMEOUT_S, limit_s=300)
    for label, _, _, error_type, patterns in CASES:
        _expect_all(outcomes[label], label, error_type, patterns)
    nan_norms = {r: o.message.split(" | ")[1] for r, o in outcomes[CASES[1][0]].items()}
    assert nan_norms[0] == nan_norms[1], f"ranks reported different norms: {nan_norms}"
    assert codes == [0, 0], f"every rank must exit cleanly, exit codes {codes}"
    MATRIX_CASES.extend(f"agreement[world=2] x {label}" for label, *_ in CASES)
