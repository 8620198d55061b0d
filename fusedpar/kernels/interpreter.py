"""The one place for Triton-interpreter (``TRITON_INTERPRET=1``) workarounds.

Under the interpreter every ``@triton.jit`` kernel runs on the CPU through numpy. That lets
the kernels be tested on GPU-less machines, with two differences from compiled Triton
(measured with triton 3.8/3.9, see ../shared/FACTS.md):

1. bfloat16 *arithmetic* is silently wrong (bf16 is held as uint16 and the raw bits are
   computed with; triton-lang/triton#11584). Loads, stores and ``.to()`` are right, so the
   kernels up-cast bf16 tiles to fp32 right after ``tl.load`` when :func:`upcast_to_fp32`
   says so, and only then.
2. Each program costs ~2.5 ms per K-step, whatever its block size: interpreted runs use
   one large-block config (:data:`INTERPRETER_BLOCKS`) rather than the GPU configs, and
   never autotune (timings would say nothing about a GPU).
3. Casting fp32 to fp8 (``.to(tl.float8e4nv)`` / ``tl.float8e5``) rounds wrongly when the
   rounding carries into the exponent (124.9 becomes 64, not 128, in e4m3; measured with
   triton 3.9: 90 of 4096 random values) and rounds ties up rather than to even. Loads, the
   fp8 -> fp32 conversion and ``tl.dot`` on fp8 tiles are right. So the quantization kernels
   first round each value onto the fp8 grid in fp32 arithmetic (:func:`round_to_fp8_grid`,
   exact round-to-nearest-even) when :func:`fp8_cast_rounds_wrongly` says so; the cast then
   has nothing left to round.
   Its cast also writes NaN wrongly (measured with triton 3.9): as 0x7C in e4m3, the
   finite 384, and as 0x7E in e5m2; :func:`cast_to_fp8` writes 0x7F there instead. The
   reverse conversion (and so ``tl.dot`` on fp8 tiles) reads e4m3's NaN 0x7F as 480 and
   e5m2's NaN and inf as finite values: interpreted fp8 GEMMs turn a NaN operand value into
   a finite one (not worked around; a NaN or inf row's scale still makes its output row
   non-finite).
4. Triton 3.6's interpreter turns a scalar tensor into a Python index (``range(tl.program_id(0),
   ...)`` in the persistent loops) with ``int()`` of a one-element 1-D numpy array, which
   numpy 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars");
   triton 3.9 squeezes the array first. :func:`_index_scalar_tensors_like_triton_39` does
   the same for every Triton version we support (3.6-3.9).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["INTERPRETER_BLOCKS", "cast_to_fp8", "fp8_cast_rounds_wrongly", "is_interpreting", "round_to_fp8_grid",
           "upcast_to_fp32"]

# Triton reads TRITON_INTERPRET once, when `@triton.jit` decorates a function. This module is
# imported just before the kernels are decorated, so reading it here at import time gives
# the mode the kernels actually run in; setting the variable later has no effect on them.
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")

# Block sizes for interpreted runs. Small blocks pay the per-program cost many times, big
# ones make numpy slow (measured on the 2-core CI machine, matmul + gated_matmul per call:
# 200x130x70 86 ms with 128x128x64, 186 ms 128x128x128, 252 ms 256x256x64, 314 ms 64^3;
# 512^3 0.56 s, 5.0 s, 3.3 s, 1.4 s). 128x128x64 was fastest on every shape tried.
INTERPRETER_BLOCKS: dict[str, int] = {"block_m": 128, "block_n": 128, "block_k": 64, "group_m": 8}


def _index_scalar_tensors_like_triton_39() -> None:
    """Make the interpreter's ``tensor.__index__`` read one-element arrays of any rank (4.)."""
    from triton.runtime import interpreter as interp

    patch_tensor = getattr(interp, "_patch_lang_tensor", None)
    if patch_tensor is None or getattr(patch_tensor, "indexes_any_rank", False):
        return

    def patch_lang_tensor(tensor, scope):
        patch_tensor(tensor, scope)
        # the scope restores in reverse order, so this is undone before Triton's own patch
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    patch_lang_tensor.indexes_any_rank = True
    interp._patch_lang_tensor = patch_lang_tensor


if _INTERPRETING:
    _index_scalar_tensors_like_triton_39()


def is_interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1`` was set
    before the kernels were imported)."""
    return _INTERPRETING


def upcast_to_fp32(dtype: torch.dtype) -> bool:
    """Whether kernels must convert loaded tiles of ``dtype`` to fp32 before computing.

    True only for bfloat16 under the interpreter, whose bf16 arithmetic is wrong; compiled
    kernels keep bf16 tiles so ``tl.dot`` uses the tensor cores.
    """
    return _INTERPRETING and dtype == torch.bfloat16


def fp8_cast_rounds_wrongly() -> bool:
    """Whether fp32 -> fp8 casts in kernels must be preceded by :func:`round_to_fp8_grid`
    (the interpreter's cast is wrong when rounding carries into the exponent); compiled
    kernels cast with the hardware's round-to-nearest-even instruction."""
    return _INTERPRETING


@triton.jit
def round_to_fp8_grid(v, MANTISSA_BITS: tl.constexpr, MIN_NORMAL_EXP: tl.constexpr):
    """``v`` (fp32, already within the fp8 format's range) rounded to the nearest value the
    fp8 format holds, ties to even, computed in fp32: the spacing of fp8 values around
    ``v`` is ``q = 2**(e - MANTISSA_BITS)`` with ``e`` the exponent of ``|v|`` (at least the
    format's smallest normal exponent, below which the spacing stays that of subnormals), and
    adding then subtracting ``c = 1.5 * 2**23 * q`` leaves ``|v|`` rounded to a multiple of
    ``q`` by the fp32 addition's own round-to-nearest-even (``|v| < 16 q`` keeps ``|v| + c``
    in the binade where the fp32 spacing is exactly ``q``)."""
    bits = v.to(tl.int32, bitcast=True)
    a = tl.abs(v)
    e = ((bits >> 23) & 0xFF) - 127
    e = tl.maximum(e, MIN_NORMAL_EXP)
    c = (((e - MANTISSA_BITS + 23 + 127) << 23) | 0x400000).to(tl.float32, bitcast=True)
    r = (a + c) - c
    # the sign back by a product, so -0.0 stays -0.0 (triton 3.6 interprets `-r` as `0 - r`)
    return tl.where(bits < 0, r * -1.0, r)


@triton.jit
def cast_to_fp8(v, out_dtype: tl.constexpr):
    """``v`` (fp32, on the fp8 grid: :func:`round_to_fp8_grid`) cast to ``out_dtype``, NaN
    written as 0x7F (NaN in e4m3fn and e5m2, what torch and the GPU's cast write for a
    positive NaN) where the interpreter's cast writes a finite value (3.)."""
    nan = tl.full(v.shape, 0x7F, tl.uint8).to(out_dtype, bitcast=True)
    return tl.where(v != v, nan, v.to(out_dtype))
