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

from fusedpar.layers import local_shard, parallelize
from fusedpar.layers.sharding import sharded_parameters
from tests.layers.common import rel_err
from tests.models.families import VOCAB, build

TOL = 1e-4  # fp32, relative, a whole model deep (the bound)
ZERO = 1e-6  # gradient norms below this count as zero (compared absolutely)


class Refused(Exception):
    """parallelize refused the family before converting anything."""


def _compare(name: str, got: torch.Tensor | None, ref: torch.Tensor | None) -> str | None:
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


def run_family(group: Any, family: str, sp: bool, *, batch: int = 2, seq: int = 8) -> dict[str, Any]:
    """One family, one layout: compare with the twin; raise Refused or AssertionError."""
    ref = build(family)
    model = copy.deepcopy(ref)
    try:
        parallelize(model, "auto", group=group, sequence_parallel=sp, kernel="torch")
    except (ValueError, TypeError, NotImplementedError) as e:
        raise Refused(f"{type(e).__name__}: {e}") from None
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    out_ref = ref(ids, labels=ids)
    out = model(ids, labels=ids)
    errors = [e for e in [_compare("logits", out.logits, out_ref.logits)] if e]
    out_ref.loss.backward()
    out.loss.backward()
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        ref_grad = ref_params[name].grad
        errors += [e for e in [_compare(f"grad {name}", p.grad, local_shard(model, name, ref_grad))] if e]
    if errors:
        raise AssertionError("; ".join(errors[:4]) + (f" (+{len(errors) - 4} more)" if len(errors) > 4 else ""))
    styles = sorted({style for style, _ in model._fusedpar_parallel["plan"].values()})
    experts = sorted({m._fusedpar_experts for m in model.modules() if hasattr(m, "_fusedpar_experts")})
    shards = sorted({f"{n}{list(s.dim for s, _ in [v])}" for m in model.modules() for n, v in sharded_parameters(m).items()})
    return {"styles": styles, "experts": experts, "shards": shards}


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
