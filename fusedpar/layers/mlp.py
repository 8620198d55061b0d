"""The tensor-parallel MLP: column-parallel up (and gate), activation, row-parallel down.

    plain:  y = down(act(up(x)))
    gated:  y = down(act(gate(x)) * up(x))          (SwiGLU with act="silu")

The intermediate features are split across ranks, so the activation and the gating run on
local columns with no communication; the only collectives are the column layer's (forward
all-gather with sequence parallelism; backward reduction of dx) and the row layer's.
gate and up read the same input and run as one fused column GEMM (one gather, one
reduction). Without autograd (inference, `torch.no_grad()`) and without sequence
parallelism the gated product runs in one kernel, `kernels.gated_matmul`, which never
writes the gate and up activations to memory; training needs them for backward, so it
keeps the two-GEMM path.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import Unpack  # typing.Unpack needs Python 3.11; torch requires typing_extensions

from ..kernels import gated_matmul
from .linear import ColumnParallelLinear, RowParallelLinear, column_parallel_group
from .linear_spec import LinearKnobs, _check_knobs, _row_knobs
from .sharding import local_tensor

__all__ = ["ParallelMLP"]

_ACTS = {
    "silu": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
}


class ParallelMLP(nn.Module):
    """`hidden → intermediate → hidden` MLP with the intermediate features split across `group`.

    Input `x_full [.., hidden]`, or `x_shard` split on `sequence_dim` with
    `sequence_parallel=True` (the output is then split the same way). The other keyword
    arguments (`LinearKnobs`: `chunks`, `kernel`, `comm`, `save_gathered_input`, `dtype`,
    `device`, ...) go to every linear, with the linears' defaults.
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        *,
        group: dist.ProcessGroup,
        gated: bool = True,
        activation: str = "silu",
        bias: bool = False,
        **knobs: Unpack[LinearKnobs],
    ) -> None:
        super().__init__()
        if activation not in _ACTS:
            raise ValueError(f"ParallelMLP: activation: expected one of {sorted(_ACTS)}, got {activation!r}")
        _check_knobs(knobs, "ParallelMLP")
        self.gated, self.activation = gated, activation
        col: dict[str, Any] = dict(knobs, group=group, bias=bias)
        if gated:
            self.gate_proj = ColumnParallelLinear(hidden_size, intermediate_size, _name="ParallelMLP.gate_proj", **col)
        self.up_proj = ColumnParallelLinear(hidden_size, intermediate_size, _name="ParallelMLP.up_proj", **col)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, _name="ParallelMLP.down_proj",
                                           **_row_knobs(col))

    @classmethod
    def from_linears(
        cls, *, up: nn.Linear, down: nn.Linear, gate: nn.Linear | None = None, group: dist.ProcessGroup,
        activation: str = "silu", **kwargs: Any,
    ) -> ParallelMLP:
        """Shard an existing MLP's linears (pretrained weights survive)."""
        for name, lin in (("up", up), ("down", down), ("gate", gate)):
            if lin is not None and not isinstance(lin, nn.Linear):
                raise TypeError(f"ParallelMLP.from_linears: {name}: expected an nn.Linear, got {type(lin).__name__}")
        mlp = cls.__new__(cls)
        nn.Module.__init__(mlp)
        if activation not in _ACTS:
            raise ValueError(f"ParallelMLP: activation: expected one of {sorted(_ACTS)}, got {activation!r}")
        mlp.gated, mlp.activation = gate is not None, activation
        if gate is not None:
            mlp.gate_proj = ColumnParallelLinear.from_linear(gate, group=group, name="gate", **kwargs)
        mlp.up_proj = ColumnParallelLinear.from_linear(up, group=group, name="up", **kwargs)
        mlp.down_proj = RowParallelLinear.from_linear(down, group=group, name="down", **_row_knobs(kwargs))
        return mlp

    def _fused_gated_ok(self) -> bool:
        # The gated kernel records no autograd history, so only under no_grad: with frozen
        # weights, gradients must still flow back to the input. Biases are not in the kernel.
        spec = self.up_proj.spec
        return (self.gated and not torch.is_grad_enabled() and not spec.sequence_parallel
                and self.up_proj.bias is None and self.gate_proj.bias is None)

    def forward(self, x: Tensor) -> Tensor:
        act = _ACTS[self.activation]
        if self._fused_gated_ok():
            spec = self.up_proj.spec
            gate, up = local_tensor(self.gate_proj.weight), local_tensor(self.up_proj.weight)  # no_grad: no link
            h = None
            if spec.fp8 is not None:  # the fp8 gated kernel; None when fp8 cannot serve it
                from .fp8 import gated_fp8

                h = gated_fp8(x, gate, up, self.activation, spec)
            if h is None:
                h = gated_matmul(x, gate.t(), up.t(), activation=self.activation, kernel=spec.kernel)
        elif self.gated:
            (g, u), _ = column_parallel_group([self.gate_proj, self.up_proj], x)
            h = act(g) * u
        else:
            h = act(self.up_proj(x))
        return self.down_proj(h)

    def full_state_dict(self) -> dict[str, Tensor]:
        """Unsharded weights keyed like the module's own state dict (a collective)."""
        out = {}
        for name in ("gate_proj", "up_proj", "down_proj"):
            if hasattr(self, name):
                out.update({f"{name}.{k}": v for k, v in getattr(self, name).full_state_dict().items()})
        return out

    def extra_repr(self) -> str:
        return f"gated={self.gated}, activation={self.activation}"
