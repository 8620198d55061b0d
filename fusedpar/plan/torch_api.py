"""torch's `parallelize_module` signature over `parallelize`: a plan keyed by module path,
or one ParallelStyle for the module itself."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from .parallelize import parallelize
from .torch_styles import is_torch_style, string_plan

__all__ = ["parallelize_module"]


def parallelize_module(module: nn.Module, device_mesh: Any, parallelize_plan: Any, **kwargs: Any) -> nn.Module:
    """torch's `parallelize_module(module, device_mesh, parallelize_plan)` on fusedpar's
    overlapped layers: a plan of torch ParallelStyles (or fusedpar strings) keyed by module
    path, or one style for `module` itself (converted in place, as torch does), over a 1-D
    mesh (or `mesh["tp"]`). Sequence parallelism is on when the plan's styles say so
    (Shard(1) layouts, SequenceParallel); `kwargs` go to `parallelize`. Called module by
    module (torchtitan's `parallelize_llama`), the layouts mean what torch means: the
    sequence is split where an output is Shard(1) and gathered where an input is. Styles
    fusedpar cannot map are refused naming them (plan/torch_styles.py)."""
    if not isinstance(parallelize_plan, Mapping):
        if not is_torch_style(parallelize_plan) and not isinstance(parallelize_plan, str):
            raise TypeError(f"parallelize_module: parallelize_plan: expected a ParallelStyle or a dict of "
                            f"{{module path: style}}, got {type(parallelize_plan).__name__}")
        return _parallelize_self(module, device_mesh, parallelize_plan, **kwargs)
    kwargs.setdefault("sequence_parallel", string_plan(module, parallelize_plan)[1])
    return parallelize(module, parallelize_plan, group=device_mesh, **kwargs)


class _Holder(nn.Module):
    """A parent for a module given one style for itself: fusedpar converts a planned child."""

    def __init__(self, target: nn.Module) -> None:
        super().__init__()
        self.target = target

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover - never called
        return self.target(*args, **kwargs)


def _parallelize_self(module: nn.Module, device_mesh: Any, style: Any, **kwargs: Any) -> nn.Module:
    """`parallelize_module(linear, mesh, ColwiseParallel())`: convert `module` itself. The
    caller holds `module` (its parent's attribute, torch's weight-tying code after it), so
    the converted layer takes its place in the same object: its class and state move into
    `module`, and hooks registered on the new layer see the same state."""
    holder = _Holder(module)
    kwargs.setdefault("sequence_parallel", string_plan(holder, {"target": style})[1])
    parallelize(holder, {"target": style}, group=device_mesh, **kwargs)
    new = holder.target
    if new is not module:
        module.__class__ = new.__class__
        module.__dict__ = new.__dict__  # one dict for both objects: closures over `new` stay right
    module._fusedpar_parallel = holder.__dict__.get("_fusedpar_parallel")
    return module

