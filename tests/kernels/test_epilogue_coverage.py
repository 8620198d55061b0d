"""`python -m fusedpar kernels --check` compiles every epilogue the layers and overlap ops can
ask the GEMM kernels for, on every candidate tile, for sm_90a and sm_80. What they can ask for
is read from the code: the kernels' epilogue switches, and every `matmul(...)` /
`gated_matmul(...)` call in fusedpar/ outside the kernels (its keywords; the activations its
caller validates). A new epilogue, or a new call that asks for one the check does not
compile, fails here. Then a slice of them is compiled (where Triton's ptxas and cuobjdump are
present) and must not spill."""
from __future__ import annotations

import ast
import inspect
import itertools
from pathlib import Path

import pytest
import torch

import importlib

from fusedpar.kernels import ACTIVATIONS
from fusedpar.kernels import compile_report as cr
from fusedpar.kernels.configs import candidate_configs
from fusedpar.layers import mlp

ROOT = Path(__file__).resolve().parents[2] / "fusedpar"
# the modules (the package exports functions of the same names)
_matmul_mod = importlib.import_module("fusedpar.kernels.matmul")
_gated_mod = importlib.import_module("fusedpar.kernels.gated")

# the kernels' constexpr parameters that are not epilogue switches: tile, pipeline, precision,
# operand orientation and address width
_NOT_EPILOGUE = {"BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "EPILOGUE_SPLIT", "UPCAST_TO_FP32", "INPUT_PRECISION",
                 "OFFSET_DTYPE", "MAX_IMPRECISE_ACC", "A_T", "B_T", "BATCHED"}
# each switch and the launcher argument that sets it (SCALED: fp8 operands, a dtype of the check)
_SWITCHES = {"matmul": {"HAS_BIAS": "bias", "ACTIVATION": "activation", "ACCUMULATE": "accumulate",
                        "SCALED": "a_scale"},
             "gated": {"ACTIVATION": "activation", "RETURN_PREACT": "return_preact", "SCALED": "a_scale"}}
_LAUNCHERS = {"matmul": "matmul", "gated_matmul": "gated"}
HOPPER_DTYPES = ("bfloat16", "float16", "float32-tf32", "float8_e4m3fn")
DTYPE_OF = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32-tf32": torch.float32,
            "float8_e4m3fn": torch.float8_e4m3fn}


def _constexprs(kernel) -> set[str]:
    fn = getattr(kernel, "fn", kernel)  # JITFunction or the interpreter's wrapper: the Python function
    return {n for n, p in inspect.signature(fn).parameters.items() if "constexpr" in str(p.annotation)}


def test_the_check_knows_every_epilogue_switch_of_the_kernels():
    """A new constexpr in a GEMM kernel is either named here as not an epilogue, or is an
    epilogue switch the check must learn (parse_epilogue, epilogues, _SWITCHES)."""
    kernels = {"matmul": [_matmul_mod._matmul_kernel, _matmul_mod._matmul_tma_kernel],
               "gated": [_gated_mod._gated_matmul_kernel, _gated_mod._gated_matmul_tma_kernel]}
    for op, fns in kernels.items():
        for fn in fns:
            assert _constexprs(fn) - _NOT_EPILOGUE == set(_SWITCHES[op]), (op, fn, _constexprs(fn) - _NOT_EPILOGUE)


def requested_epilogues() -> dict[str, set[tuple[str, bool]]]:
    """``{epilogue name: {(caller file, fp8 possible)}}`` over every call of the GEMM
    launchers in fusedpar/ outside kernels/: each epilogue keyword a call passes may be off
    or on (bias None or a tensor), its activation any the caller lets through (a literal;
    an overlap op's checked against kernels.ACTIVATIONS; a layer's, ParallelMLP's), and a
    call with ``a_scale`` or ``**kwargs`` may be fp8."""
    found: dict[str, set[tuple[str, bool]]] = {}
    for path in sorted(ROOT.rglob("*.py")):
        if "kernels" in path.relative_to(ROOT).parts:
            continue
        tree = ast.parse(path.read_text(), str(path))
        # the names this file binds to the launchers: `from ..kernels import matmul as mm`
        local = {a.asname or a.name: a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                 and (node.module or "").endswith("kernels") for a in node.names if a.name in _LAUNCHERS}
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in local):
                continue
            name = local[node.func.id]
            op = _LAUNCHERS[name]
            kws = {k.arg: k.value for k in node.keywords if k.arg is not None}
            fp8 = "a_scale" in kws or any(k.arg is None for k in node.keywords)
            if "activation" in kws and isinstance(kws["activation"], ast.Constant):
                acts = {kws["activation"].value}
            elif "activation" in kws:
                acts = set(ACTIVATIONS) if path.parent.name == "overlap" else set(mlp._ACTS)
            else:
                acts = {"silu" if op == "gated" else None}  # the launchers' defaults
            flags = [(False, True) if k in kws else (False,) for k in ("bias", "accumulate", "return_preact")]
            for act, bias, acc, pre in itertools.product(sorted(acts, key=str), *flags):
                epi = cr.Epilogue(op, bias=bias, activation=act, accumulate=acc, return_preact=pre)
                names = [n for n in (*cr.epilogues("matmul"), *cr.epilogues("gated"), "gated_preact")
                         if cr.parse_epilogue(n) == epi]
                where = f"{path.relative_to(ROOT.parent)}:{node.lineno}"
                assert names, f"{where} can ask {name} for {epi}, which compile_report has no name for"
                found.setdefault(names[0], set()).add((where, fp8))
    return found


def test_the_epilogues_the_layers_request_include_the_known_ones():
    """The derivation reads the calls: the epilogues known today are all among them."""
    requested = requested_epilogues()
    assert {"none", "bias", "gelu", "bias_gelu", "gelu_tanh", "silu", "gated_silu", "gated_gelu",
            "accumulate_fp32"} <= set(requested), sorted(requested)
    assert set(mlp._ACTS) <= set(ACTIVATIONS) - {None}  # ParallelMLP's activations are kernel epilogues


def missing_compiles(requested: dict[str, set[tuple[str, bool]]], cases: list[cr.Case]) -> list[str]:
    """Each (target, dtype, requested epilogue, candidate tile) that ``cases`` does not
    compile: bf16, fp16 and tf32 on sm_90a (TMA and pointer tiles) and sm_80 (pointer), and
    fp8 e4m3 on sm_90a where an fp8 call can ask for the epilogue."""
    have = {(c.target, c.dtype, c.epilogue, c.config) for c in cases}
    missing = []
    for name, callers in sorted(requested.items()):
        epi = cr.parse_epilogue(name)
        fp8 = any(f for _, f in callers)
        assert not (fp8 and epi.accumulate), f"{name}: an fp8 call can accumulate ({callers}): the check has no " \
                                             f"fp8 accumulate"
        for target, (capability, _, _) in cr.TARGETS.items():
            hopper = capability >= (9, 0)
            for dt in HOPPER_DTYPES:
                if dt.startswith("float8") and not (hopper and fp8):
                    continue
                for tma in ((True, False) if hopper else (False,)):
                    for cfg in candidate_configs(epi.op, DTYPE_OF[dt], tma, reads_out=epi.accumulate):
                        if (target, dt, name, cfg) not in have:
                            missing.append(f"{target} {dt} {name} {cfg.short()} (asked for by "
                                           f"{sorted(w for w, _ in callers)[0]})")
    return missing


def test_the_check_compiles_every_requested_epilogue_on_every_candidate_tile():
    missing = missing_compiles(requested_epilogues(), cr.check_cases())
    assert not missing, f"{len(missing)} epilogue x tile compiles missing from check_cases():\n" + \
        "\n".join(missing[:20])


def test_the_coverage_test_fails_when_an_epilogue_or_a_tile_is_left_out():
    requested, cases = requested_epilogues(), cr.check_cases()
    without_tanh = missing_compiles(requested, [c for c in cases if c.epilogue != "gelu_tanh"])
    assert without_tanh and all(" gelu_tanh " in m for m in without_tanh), without_tanh[:5]
    dropped = candidate_configs("matmul", torch.float16, False)[0]
    without_tile = missing_compiles(requested, [c for c in cases if c.config != dropped])
    assert any(f"sm_90a float16 bias_gelu {dropped.short()}" in m for m in without_tile), without_tile[:5]
    with pytest.raises(ValueError, match="unknown epilogue 'gelu_fast'"):
        cr.parse_epilogue("gelu_fast")


_missing = cr.toolchain_missing()


@pytest.mark.skipif(_missing is not None, reason=f"cannot compile for sm_90a/sm_80 here: {_missing}")
def test_a_slice_of_the_epilogues_compiles_without_spills():
    """The heaviest epilogues on the tiles nearest the register limit: GELU and gelu_tanh on
    the 8-warp 128x128 pointer tile in fp16 (where GELU once spilled 8 B on sm_90a),
    accumulate on the pointer tile sm_80 picks, GeGLU (tanh) on the gated TMA tile, fp8
    and tf32 with bias+GELU on the big TMA tiles, and GeGLU on the tf32 gated 32x64 pointer
    tile (8 B of stack on 4 warps, now 8)."""
    ptr = candidate_configs("matmul", torch.float16, False)
    big_ptr = max(ptr, key=lambda c: (c.block_m * c.block_n, c.num_warps))
    cases = [cr.Case("sm_90a", "float16", "out_slice", epi, config=big_ptr) for epi in ("gelu", "bias_gelu_tanh")]
    cases += [cr.Case("sm_80", "bfloat16", "dy.T@x", "accumulate_fp32",
                      config=candidate_configs("matmul", torch.bfloat16, False, reads_out=True)[0]),
              cr.Case("sm_90a", "bfloat16", "x@w.T", "gated_gelu_tanh",
                      config=candidate_configs("gated", torch.bfloat16, True)[0]),
              cr.Case("sm_90a", "float8_e4m3fn", "x@w.T", "bias_gelu",
                      config=candidate_configs("matmul", torch.float8_e4m3fn, True)[0]),
              cr.Case("sm_90a", "float32-tf32", "x@w.T", "bias_gelu_tanh",
                      config=candidate_configs("matmul", torch.float32, True)[0]),
              cr.Case("sm_90a", "float32-tf32", "out_slice", "gated_gelu",
                      config=next(c for c in candidate_configs("gated", torch.float32, False) if c.block_m == 32))]
    results = cr.run_cases(cases, jobs=2)
    assert all(r.ok for r in results) and not cr.problems(results), \
        "\n".join(cr.problems(results)) + "\n\n" + cr.format_table(results)
    summary = cr.format_summary(results)
    assert "0 spilling" in summary and "gelu_tanh" in summary, summary
