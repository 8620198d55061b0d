"""Shared helpers for the layer tests: tolerances, comparisons, seeded full tensors."""
from __future__ import annotations

import torch

# Relative error ||got - ref|| / ||ref|| between a parallel result and the single-process one
# computed in the same dtype: both round differently (sums split across ranks, chunked GEMMs),
# so fp32 allows a few ulps times the depth of the computation; fp64 is exact to ~1e-15.
TOL = {torch.float64: 1e-11, torch.float32: 2e-5}
# Norms below which a reference counts as zero (e.g. the key bias's gradient: softmax ignores
# a per-query constant) and is compared absolutely: rounding noise has no relative scale.
ZERO = {torch.float64: 1e-10, torch.float32: 1e-4}
DTYPES = {"float64": torch.float64, "float32": torch.float32}


def as_local(got, ref=None):
    """A parameter or gradient as this rank's plain piece: DTensors (every parameter of a
    parallelized model) give their local tensor, in the reference's shape where the element
    counts match (packed parameters are DTensors over a [parts, size/parts] view)."""
    from torch.distributed.tensor import DTensor

    from fusedpar.layers.sharding import local_tensor

    if isinstance(got, DTensor):
        got = local_tensor(got)
    if ref is not None and got is not None and got.shape != ref.shape and got.numel() == ref.numel():
        got = got.reshape(ref.shape)
    return got


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    ref = as_local(ref)
    got = as_local(got, ref)
    got, ref = got.detach().double(), ref.detach().double()
    if torch.isnan(got).any():
        return float("inf")
    return ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check(name: str, got: torch.Tensor | None, ref: torch.Tensor | None, dtype: torch.dtype, case: str,
          tol: float | None = None) -> None:
    assert got is not None, f"{name} {case}: got None (no gradient?)"
    assert ref is not None, f"{name} {case}: reference is None"
    ref = as_local(ref)
    got = as_local(got, ref)
    assert tuple(got.shape) == tuple(ref.shape), f"{name} {case}: shape {list(got.shape)} != {list(ref.shape)}"
    if ref.detach().double().norm() < ZERO[dtype]:  # a gradient that is zero in exact arithmetic (key bias)
        diff = (got.detach().double() - ref.detach().double()).norm().item()
        assert diff <= ZERO[dtype], f"{name} {case}: expected ~0 (|ref| < {ZERO[dtype]:.0e}), |got - ref| = {diff:.3g}"
        return
    err = rel_err(got, ref)
    limit = TOL[dtype] if tol is None else tol
    assert err <= limit, f"{name} {case}: relative error {err:.3g} > {limit:.0e}"


def randn(seed: int, *shape: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def local_slice(model, name: str, full: torch.Tensor, world: int, rank: int) -> torch.Tensor:
    """What this rank of a parallelized `model` stores of the full tensor of parameter `name`
    (`world` and `rank` must be the model's group's)."""
    from fusedpar.layers import local_shard

    return local_shard(model, name, full)


def check_grads(model, ref, world: int, rank: int, case: str, tol: float) -> None:
    """Every parameter's gradient of the parallel `model` against the slice of the
    single-process `ref`'s (the key bias's gradient is ~0 in exact arithmetic: 10x looser)."""
    ref_params = dict(ref.named_parameters())
    for pname, p in model.named_parameters():
        ref_grad = ref_params[pname].grad
        if hasattr(p.grad, "device_mesh") and p.grad.device_mesh.ndim > 1:  # FSDP2 over TP: a 2-D DTensor
            grad = p.grad.full_tensor()
        elif hasattr(p.grad, "device_mesh") and p.grad.device_mesh.mesh_dim_names == ("dp",):  # FSDP2 only
            grad, ref_grad = p.grad.full_tensor(), local_slice(model, pname, ref_grad, world, rank)
        else:
            grad, ref_grad = p.grad, local_slice(model, pname, ref_grad, world, rank)
        check(f"grad {pname}", grad, ref_grad,
              torch.float32, case, tol * 10 if pname.endswith("k_proj.bias") else tol)
