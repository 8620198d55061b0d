"""Tile configurations of the GEMM family and the rules that pick one per problem.

A launch picks its tile from the problem's shape (:func:`pick_config`), as cuBLAS's
heuristics do, instead of autotuning on first use: an autotuner compiles and times every
candidate with a device sync on each new shape class, which stalls an overlap schedule
mid-pipeline and turns a model's first step into minutes of compiles. ``FUSEDPAR_AUTOTUNE=1``
(or :func:`set_autotune`) times the candidates once per shape class (M rounded up to a
power of two, N, K, dtype, epilogue) instead.

Every candidate is compile-checked for sm_90a and sm_80 with every epilogue the layers can
request (``python -m fusedpar kernels --check``, :mod:`fusedpar.kernels.compile_report`;
the test suite compiles each with bias+SiLU and a slice of the rest): no spills, shared
memory within the target's, wgmma and TMA on Hopper; tiles that failed were retuned or
dropped, and the comments say which and why. The rules
are tile arithmetic (biggest tile that still gives every SM a tile, short wide-K tiles for
decode) that no GPU has checked yet: bench/gpu/gemm_sweep.py times every candidate against
cuBLAS on a GPU machine, and its results are what the rules are to be fitted to.
"""
from __future__ import annotations

import dataclasses
import os

import torch

from fusedpar.kernels import interpreter

__all__ = ["GemmConfig", "candidate_configs", "pick_config", "set_autotune", "autotune_enabled"]


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    """One tile configuration: block sizes, warps, pipeline depth and epilogue sub-tiles.

    ``tma`` chooses the kernel: True the Hopper kernel (TMA tensor descriptors, persistent
    grid), False the pointer kernel (any strides, Ampere and later), None whichever the
    operands and device allow (TMA where it can run). ``epilogue_split`` stores the tile in
    that many column slices (TMA kernel only), so the epilogue holds fewer live registers.
    """

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    epilogue_split: int = 1
    tma: bool | None = None

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"GemmConfig: {name} must be a power of two >= 16, got {v}")
        if self.epilogue_split not in (1, 2, 4) or self.block_n // self.epilogue_split < 16:
            raise ValueError(f"GemmConfig: epilogue_split must be 1, 2 or 4 and leave slices of >= 16 "
                             f"columns, got {self.epilogue_split} for block_n={self.block_n}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"GemmConfig: num_warps must be a power of two <= 16, got {self.num_warps}")

    @property
    def meta(self) -> dict:
        """The kernel's constexpr block arguments."""
        return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_K": self.block_k,
                "GROUP_M": self.group_m}

    def short(self) -> str:
        kind = {True: "tma", False: "ptr", None: "any"}[self.tma]
        return (f"{kind}:{self.block_m}x{self.block_n}x{self.block_k}/w{self.num_warps}/s{self.num_stages}"
                f"/g{self.group_m}/e{self.epilogue_split}")


def _c(bm, bn, bk, warps, stages, split=1, group=8, tma=None) -> GemmConfig:
    return GemmConfig(bm, bn, bk, group, warps, stages, split, tma)


# Interpreted runs: one large-block config; per-program cost dominates there (interpreter.py).
_INTERPRETER = GemmConfig(**interpreter.INTERPRETER_BLOCKS, num_warps=4, num_stages=1)


def candidate_configs(op: str, dtype: torch.dtype, tma: bool, *, tensor_cores: bool = True,
                      reads_out: bool = False) -> list[GemmConfig]:
    """The configurations the rules choose from and the autotuner sweeps, per kernel
    (``op`` "matmul" or "gated") and path. Every one of them is compile-checked.
    ``tensor_cores=False`` (fp32 with TF32 disabled): FMA tiles, whose fp32 operands live
    in registers, so only small tiles fit without spilling. ``reads_out`` (accumulate into
    ``out``): the pointer kernel's epilogue holds the loaded tile too."""
    wide = dtype == torch.float32  # fp32 tiles take twice the shared memory per element
    if not tensor_cores:  # sizes and warps as compile_report found them spill-free per path
        if tma:
            return [_c(64, 64, 16, 8, 3, tma=True), _c(32, 64, 16, 4, 3, group=1, tma=True)]
        small = _c(16, 64, 32, 4, 3, group=1) if op == "gated" else _c(32, 32, 16, 4, 3, group=1)
        return [_c(64, 64, 16, 4, 3, tma=False), dataclasses.replace(small, tma=False)]
    if op == "gated":  # two accumulators: the tile's N is half a plain GEMM's
        if tma:
            # large M, mid M, decode (BLOCK_M 64: one wgmma warpgroup's rows)
            # (128x64 on 8 warps: on 4 the two accumulators spill under triton 3.6)
            configs = [_c(128, 128, 64, 8, 3, split=2), _c(128, 64, 64, 8, 4), _c(64, 128, 64, 4, 4),
                       _c(64, 64, 128, 4, 4), _c(64, 32, 128, 4, 5)]
        else:
            # 16x64x64/3 stages rather than x128 or 4 stages: there ptxas puts a few values on
            # the stack at ~96 registers (fp32 and bf16, sm_90a)
            configs = [_c(64, 128, 64, 8, 3), _c(64, 64, 64, 4, 4), _c(32, 64, 128, 4, 4, group=1),
                       _c(16, 64, 64, 4, 3, group=1)]
    elif tma:
        # large M (128x256 / 256x128, 8 warps, sliced epilogue), then narrower tiles for when
        # the big ones leave SMs idle, then BLOCK_M 64 with long K steps for decode.
        # 128x128 on 4 warps stores its epilogue in two slices: whole, GELU's erf on a
        # thread's 128 accumulator registers spilled 152 B (bf16/fp16, sm_90a, triton 3.9)
        configs = [
            _c(128, 256, 64, 8, 3, split=2), _c(128, 256, 64, 8, 4, split=2), _c(256, 128, 64, 8, 3, split=2),
            _c(128, 128, 64, 8, 4, split=2), _c(128, 128, 64, 4, 4, split=2), _c(128, 64, 64, 4, 4),
            _c(64, 128, 64, 4, 5), _c(64, 64, 128, 4, 5), _c(64, 32, 128, 4, 6), _c(64, 128, 128, 4, 4),
        ]
    else:
        # no 128x256 pointer tile: per-element offsets take the registers TMA saves (255
        # registers and spills on sm_90 and sm_80); the pointer kernel is the fallback there.
        # No 16x128 tile either: with GELU (no bias) ptxas held it to 96 registers and put
        # 8-16 B on the stack (bf16, fp16, tf32; sm_90a, triton 3.9), and fp8 spilled 16 B
        # when a is M-major; 16x64 serves decode-sized M (the only one the rules pick)
        configs = [
            _c(128, 128, 64, 8, 3), _c(128, 64, 64, 8, 4), _c(64, 64, 64, 4, 4),
            _c(32, 64, 128, 4, 4, group=1), _c(16, 64, 128, 4, 4, group=1),
        ]
    if wide:  # fp32: halve BLOCK_K so the pipeline fits in shared memory
        configs = [dataclasses.replace(c, block_k=max(16, c.block_k // 2)) for c in configs]
    if wide or dtype.itemsize == 1:
        # tf32 and fp8 hold more beside the accumulator (tf32: wider operand fragments; fp8:
        # each K step's partial sum, matmul._max_imprecise): 128x128 tiles spill on 4 warps
        # (TMA) and on the pointer kernel (8-40 B with bias+SiLU, sm_90a); the 8-warp TMA
        # tile with the sliced epilogue fits
        configs = [c for c in configs if c.block_m * c.block_n < 128 * 128 or (tma and c.num_warps == 8)]
    if wide and not tma:
        # tf32 pointer tiles where ptxas capped the registers and put 8 B on the stack (sm_90a,
        # triton 3.9): gated 32x64 on 4 warps with GeGLU's erf (128 registers; on 8 warps 96,
        # no stack), and the 16x64x64 GEMM tile with most epilogues, none included (80
        # registers, on 3 stages as on 4; 16x64x32 takes 64-94, no stack, every epilogue)
        configs = [dataclasses.replace(c, num_warps=8) if op == "gated" and (c.block_m, c.block_n) == (32, 64)
                   else dataclasses.replace(c, block_k=32) if op == "matmul" and (c.block_m, c.block_n) == (16, 64)
                   else c for c in configs]
    if dtype.itemsize == 1:  # fp8: the same bytes per K step hold twice the K (wgmma's fp8 K is 32)
        configs = [dataclasses.replace(c, block_k=_fp8_block_k(c.block_k)) for c in configs]
        # fp8 also holds each K step's partial sum beside the accumulator (its promotion to
        # fp32, matmul._max_imprecise): a thread's share of a 128x256 tile (128 + 128
        # registers) spills, while 256x128 gives each warpgroup its own rows and fits; the
        # gated kernel's 64x128 tile (two of each) needs 8 warps
        configs = [c for c in configs if (c.block_m, c.block_n) != (128, 256)]
        configs = [dataclasses.replace(c, num_warps=8) if op == "gated" and (c.block_m, c.block_n) == (64, 128)
                   else c for c in configs]
    if reads_out and not tma:  # the loaded output tile on top of a 128x128 accumulator spills on sm_80
        configs = [c for c in configs if c.block_m * c.block_n < 128 * 128]
    return [dataclasses.replace(c, tma=tma) for c in configs]


def _fp8_block_k(bk: int) -> int:
    """BLOCK_K of an fp8 tile made from a 16-bit one: doubled up to 128 (a 128-byte row of
    the tile, the widest TMA swizzle), so the shared memory per stage stays at most the
    16-bit tile's."""
    return max(bk, min(128, 2 * bk))


def pick_config(op: str, M: int, N: int, K: int, dtype: torch.dtype, *, tma: bool, num_sms: int,
                tensor_cores: bool = True, reads_out: bool = False) -> GemmConfig:
    """The tile for an ``[M, K] @ [K, N]`` problem (M counts every batch's rows).

    Large problems take the biggest tile that still gives every SM work; decode-sized M
    takes short, wide-K tiles; N is cut finer when the tiles would not cover the SMs (a
    memory-bound GEMM needs many SMs pulling weight bytes, not big tiles).
    """
    if interpreter.is_interpreting():
        return dataclasses.replace(_INTERPRETER, tma=tma)
    if not tensor_cores:
        return candidate_configs(op, dtype, tma, tensor_cores=False)[0 if M > 32 else 1]
    cands = {c.short(): c for c in candidate_configs(op, dtype, tma, reads_out=reads_out)}
    wide = dtype == torch.float32

    def get(bm, bn, bk, warps, stages, split=1, group=8):
        bk = max(16, bk // 2) if wide else bk
        bk = _fp8_block_k(bk) if dtype.itemsize == 1 else bk
        cfg = GemmConfig(bm, bn, bk, group, warps, stages, split, tma)
        # a tile outside the candidates would escape the compile check (tests/kernels/test_paths.py)
        return cands[cfg.short()]

    def tiles(bm, bn):
        return -(-M // bm) * -(-N // bn)

    if op == "gated":
        if tma:
            if M > 128 and tiles(128, 128) >= num_sms:
                return get(128, 128, 64, 8, 3, split=2)
            if M > 64:
                return get(128, 64, 64, 8, 4) if tiles(128, 64) >= num_sms // 2 else get(64, 64, 128, 4, 4)
            return get(64, 64, 128, 4, 4) if tiles(64, 64) >= num_sms else get(64, 32, 128, 4, 5)
        if M > 32:
            return get(64, 128, 64, 8, 3) if tiles(64, 128) >= num_sms else get(64, 64, 64, 4, 4)
        return get(32, 64, 128, 8 if wide else 4, 4, group=1) if M > 16 else get(16, 64, 64, 4, 3, group=1)

    if tma:
        if M > 128:
            if tiles(128, 256) >= num_sms:  # fp8: the same tile area as 256x128 (candidate_configs)
                if dtype.itemsize == 1:
                    return get(256, 128, 64, 8, 3, split=2)
                return get(128, 256, 64, 8, 3, split=2)
            if tiles(128, 128) >= num_sms:
                return get(128, 128, 64, 8, 4, split=2)
            return get(64, 128, 64, 4, 5)
        if M > 64:
            if tiles(128, 128) < num_sms:
                return get(64, 64, 128, 4, 5)
            return get(128, 128, 64, 8, 4, split=2) if wide or dtype.itemsize == 1 else get(128, 128, 64, 4, 4, split=2)
        return get(64, 64, 128, 4, 5) if tiles(64, 64) >= num_sms else get(64, 32, 128, 4, 6)
    if M > 128:
        if tiles(128, 128) >= num_sms and not wide and dtype.itemsize != 1 and not reads_out:
            return get(128, 128, 64, 8, 3)
        return get(128, 64, 64, 8, 4) if tiles(128, 64) >= num_sms else get(64, 64, 64, 4, 4)
    if M > 32:
        return get(64, 64, 64, 4, 4)
    return get(32, 64, 128, 4, 4, group=1) if M > 16 else get(16, 64, 64 if wide else 128, 4, 4, group=1)


_AUTOTUNE = os.environ.get("FUSEDPAR_AUTOTUNE", "0").strip().lower() in ("1", "true", "yes", "on")


def set_autotune(enabled: bool) -> None:
    """Time every candidate per shape class (once per process) instead of the rules."""
    global _AUTOTUNE
    _AUTOTUNE = bool(enabled)


def autotune_enabled() -> bool:
    return _AUTOTUNE and not interpreter.is_interpreting()


def m_class(rows: int) -> int:
    """The autotuner's key for M: rows rounded up to a power of two, so ragged chunks of an
    overlap schedule and new prefill lengths reuse a tuned tile instead of re-timing."""
    return 1 << max(0, rows - 1).bit_length()


# Shared memory a block may use on Hopper (227 KiB); the TMA kernel's budget.
SMEM_BYTES = 227 * 1024


def tma_smem_bytes(cfg: GemmConfig, in_dtype: torch.dtype, out_dtype: torch.dtype, *, n_b: int = 1,
                   n_out: int = 1, reads_out: bool = False) -> int:
    """Shared memory of the TMA kernel: ``num_stages`` buffers of the A tile and ``n_b`` B
    tiles, plus one staging slice per output descriptor (two when the epilogue also loads
    the output to accumulate)."""
    ib, ob = in_dtype.itemsize, out_dtype.itemsize
    ring = cfg.num_stages * (cfg.block_m + n_b * cfg.block_n) * cfg.block_k * ib
    staging = cfg.block_m * (cfg.block_n // cfg.epilogue_split) * ob * (n_out + reads_out)
    return ring + staging


def fit_epilogue(cfg: GemmConfig, in_dtype: torch.dtype, out_dtype: torch.dtype, *, n_b: int = 1,
                 n_out: int = 1, reads_out: bool = False) -> GemmConfig:
    """``cfg`` with the epilogue cut into more slices, then fewer stages, until the TMA
    kernel fits in shared memory (an fp32 main_grad tile is twice a bf16 one, and
    accumulating reads it back through a second staging buffer)."""
    max_split = 2 if n_b == 2 else 4
    while tma_smem_bytes(cfg, in_dtype, out_dtype, n_b=n_b, n_out=n_out, reads_out=reads_out) > SMEM_BYTES:
        if cfg.epilogue_split < max_split and cfg.block_n // (cfg.epilogue_split * 2) >= 16:
            cfg = dataclasses.replace(cfg, epilogue_split=cfg.epilogue_split * 2)
        elif cfg.num_stages > 2:
            cfg = dataclasses.replace(cfg, num_stages=cfg.num_stages - 1)
        else:
            break
    return cfg
