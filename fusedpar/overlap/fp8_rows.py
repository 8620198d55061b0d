"""fp8 rows on the wire: gathered fp8 rows travel packed with their float32 row scales.

A packed row is `[row bytes]` uint8: the K fp8 bytes, the scale at the next 4-byte
boundary, zero padding to 16 bytes (TMA alignment). `_pack_fp8_rows` takes `[m, K]` fp8
and `[m, 1]` float32 and returns `[m, row bytes]`; `_unpack_fp8_rows` returns views of the
two back. Layouts are unchanged by packing: a shard packs to a shard, gathered packed rows
unpack to the gathered (full) rows.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..kernels.fp8 import is_fp8


def _as_bytes(t: Tensor) -> Tensor:
    """fp8 moves as bytes: gloo has no fp8 dtype, and a gather or send never does arithmetic."""
    return t.view(torch.uint8) if is_fp8(t.dtype) else t


def _fp8_row_layout(k: int) -> tuple[int, int]:
    """(scale offset, row bytes) of a packed fp8 row: its K fp8 bytes, its float32 scale at
    the next 4-byte boundary, padded to 16 bytes so that the gathered rows stay aligned for
    TMA. One message per piece carries rows and scales together (a second send per hop would
    add a collective's latency to every step of the ring)."""
    offset = -(-k // 4) * 4
    return offset, -(-(offset + 4) // 16) * 16


def _pack_fp8_rows(x_rows: Tensor, s_rows: Tensor) -> Tensor:
    """`x_rows` [m, K] fp8 and `s_rows` [m, 1] float32 as packed rows [m, row bytes] uint8."""
    m, k = x_rows.shape
    offset, row_bytes = _fp8_row_layout(k)
    packed = torch.empty(m, row_bytes, dtype=torch.uint8, device=x_rows.device)
    packed[:, :k].copy_(x_rows.view(torch.uint8))
    packed[:, offset:offset + 4].view(torch.float32).copy_(s_rows)
    packed[:, k:offset].zero_()  # padding: defined bytes on the wire
    packed[:, offset + 4:].zero_()
    return packed


def _unpack_fp8_rows(packed: Tensor, k: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Views of packed rows [r, row bytes]: the fp8 rows [r, K] and their scales [r, 1]."""
    offset, _ = _fp8_row_layout(k)
    return packed[:, :k].view(dtype), packed[:, offset:offset + 4].view(torch.float32)
