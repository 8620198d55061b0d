"""Run Hugging Face families parallelized with `plan="auto"` against their unparallelized twins.

`run_families(group, names, sp)` runs on every rank of a gloo group (tests.dist.DistPool) and
returns one `{family, sp, status, reason, seconds}` per family:

    passed    logits and every parameter's gradient (sliced to what this rank stores) within
              `TOL` (relative, fp32) of the single-process model's
    refused   `parallelize` raised before converting anything, so before any collective
              (every check runs first); `reason` is its message
    failed    anything else: a wrong number, or an error after conversion

Every family ends with an all-reduce(MAX) of the failure flag, so the ranks never drift
apart: a family that fails on one rank is reported failed on every rank.
"""
from __future__ import annotations

import copy
import time
import traceback
from typing import Any

import torch
import torch.distributed as dist

from fusedpar.layers import local_shard

from fusedpar.plan import parallelize
from fusedpar.layers.sharding import param_shards
from fusedpar.plan.ties import tied_groups
from tests.layers.common import rel_err
from tests.models.families import VOCAB, build

TOL = 1e-4  # fp32, relative, a whole model deep (the bound)
ZERO = 1e-6  # gradient norms below this count as zero (compared absolutely)


class Refused(Exception):
    """parallelize refused the family before converting anything."""


def _compare(name: str, got: torch.Tensor | None, ref: torch.Tensor | None) -> str | None:
    from tests.layers.common import as_local

    got = as_local(got, ref)  # a DTensor gradient: this rank's piece
    if got is None and ref is None:
        return None
    if got is None or ref is None:
        # a parameter the loss does not reach on one side only
        other = ref if got is None else got
        if other.detach().double().norm() <= ZERO:
            return None
        return f"{name}: got {'None' if got is None else 'a gradient'}, reference {'None' if ref is None else 'a gradient'}"
    if tuple(got.shape) != tuple(ref.shape):
        return f"{name}: shape {list(got.shape)} != reference {list(ref.shape)}"
    if ref.detach().double().norm() <= ZERO:
        diff = (got.detach().double() - ref.detach().double()).norm().item()
        return None if diff <= ZERO else f"{name}: expected ~0, |got - ref| = {diff:.3g}"
    err = rel_err(got, ref)
    return None if err <= TOL else f"{name}: relative error {err:.3g} > {TOL:.0e}"


def _with_overrides(model: torch.nn.Module, overrides: dict[str, str]) -> dict[str, str]:
    """The model's own plan (keys that match something in it) with `overrides` on top (None drops a key)."""
    import re

    from fusedpar.plan import resolve_plan

    names = [n for n, _ in model.named_modules()] + [n for n, _ in model.named_parameters()]
    regex = lambda key: re.compile(key.replace(".", r"\.").replace("*", "[^.]+") + "$")  # noqa: E731
    plan = {k: v for k, v in resolve_plan(model, "auto").items() if any(regex(k).match(n) for n in names)}
    return {k: v for k, v in (plan | overrides).items() if v is not None}


def run_family(group: Any, family: str, sp: bool, *, plan: Any = "auto", kernel: str = "torch",
               loss_parallel: bool = False, steps: int = 0, state_dict: bool = False, config: dict | None = None,
               batch: int = 2, seq: int = 8) -> dict[str, Any]:
    """One family, one layout: compare with the twin; raise Refused or AssertionError.

    Always: the loss, the logits (this rank's vocabulary slice with `loss_parallel`),
    every gradient, and that tied parameters stay tied. `steps`: that many AdamW steps in
    lockstep, equal losses. `state_dict`: the gathered weights load into a fresh
    single-process model with the same logits.
    """
    ref = build(family, **(config or {}))
    model = copy.deepcopy(ref)
    if isinstance(plan, tuple):  # ("auto", overrides)
        plan = _with_overrides(model, plan[1])
    try:
        parallelize(model, plan, group=group, sequence_parallel=sp, kernel=kernel, loss_parallel=loss_parallel)
    except (ValueError, TypeError, NotImplementedError) as e:
        raise Refused(f"{type(e).__name__}: {e}") from None
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    # MoE blocks that may reduce their partial sums once decide on the first forward with
    # gradients (fusedpar/plan/block_reduction.py): compare a second pass, merged, too
    merges = [m._fusedpar_block_reduction for m in model.modules() if hasattr(m, "_fusedpar_block_reduction")]
    errors: list[str] = []
    ties = lambda m: sorted(sorted(f"{p}.{n}" for p, n in g) for g in tied_groups(m))  # noqa: E731
    if ties(model) != ties(ref):
        errors.append(f"tied parameters {ties(ref)} after parallelize: {ties(model)}")
    for attempt in range(2 if merges else 1):
        tag = "" if attempt == 0 else f" (pass 2, merged reductions: {sum(bool(s.merged) for s in merges)})"
        ref.zero_grad()
        model.zero_grad()
        out_ref = ref(ids, labels=ids)
        out = model(ids, labels=ids)
        logits_ref = out_ref.logits.chunk(world, -1)[rank] if loss_parallel else out_ref.logits
        errors += [e + tag for e in [_compare("logits", out.logits, logits_ref),
                                     _compare("loss", out.loss, out_ref.loss)] if e]
        out_ref.loss.backward()
        out.loss.backward()
        ref_params = dict(ref.named_parameters())
        for name, p in model.named_parameters():
            ref_grad = ref_params[name].grad
            errors += [e + tag for e in [_compare(f"grad {name}", p.grad, local_shard(model, name, ref_grad))] if e]
    if steps:
        opts = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (ref, model)]
        for step in range(steps):
            batch_ids = torch.randint(3, VOCAB, ids.shape, generator=g)
            losses = []
            for m, opt in zip((ref, model), opts):
                opt.zero_grad()
                loss = m(batch_ids, labels=batch_ids).loss
                loss.backward()
                opt.step()
                losses.append(loss.detach())
            errors += [e for e in [_compare(f"loss at step {step}", losses[1], losses[0])] if e]
    if state_dict:
        from fusedpar.plan import full_state_dict

        gathered = full_state_dict(model)
        fresh = build(family, seed=123, **(config or {}))
        fresh.load_state_dict(gathered)
        with torch.no_grad():
            got, want = fresh(ids).logits, model(ids).logits
        errors += [e for e in [_compare("fresh-model logits", got.chunk(world, -1)[rank] if loss_parallel else got,
                                        want)] if e]
    if errors:
        raise AssertionError("; ".join(errors[:4]) + (f" (+{len(errors) - 4} more)" if len(errors) > 4 else ""))
    styles = sorted({style for style, _ in model._fusedpar_parallel["plan"].values()})
    experts = sorted({m._fusedpar_experts for m in model.modules() if hasattr(m, "_fusedpar_experts")})
    shards = sorted({f"{n}{list(s.dim for s, _ in [v])}" for m in model.modules() for n, v in param_shards(m).items()})
    return {"styles": styles, "experts": experts, "shards": shards,
            "merged_blocks": sum(bool(s.merged) for s in merges), "merge_candidates": len(merges)}


def run_cases(group: Any, cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`run_family` for each case dict (`family`, `sp`, options); raises on a refusal too."""
    return [run_family(group, **case) for case in cases]


def run_families(group: Any, names: list[str], sp: bool) -> list[dict[str, Any]]:
    results = []
    for family in names:
        t0 = time.perf_counter()
        status, reason, info = "passed", "", {}
        try:
            info = run_family(group, family, sp)
        except Refused as e:
            status, reason = "refused", str(e)
        except Exception as e:  # reported, not raised: the sweep counts
            status = "failed"
            reason = f"{type(e).__name__}: {e}"
            if not isinstance(e, AssertionError):
                reason += " | " + traceback.format_exc(limit=-3).replace("\n", " ")[-600:]
        flag = torch.tensor([0.0 if status != "failed" else 1.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        if flag.item() and status != "failed":
            status, reason = "failed", "failed on another rank"
        results.append(dict(family=family, sp=sp, status=status, reason=reason[:1500],
                            seconds=round(time.perf_counter() - t0, 2), **info))
    return results
