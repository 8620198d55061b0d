"""`python -m fusedpar` end to end in subprocesses (as users run it), plus the bench
runner's bookkeeping in-process. CPU only; the whole file takes ~40 s on 2 cores."""
from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fusedpar.cli import bench as bench_cli
from fusedpar.cli import main

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(*args: str, timeout: float = 60, env_extra: dict | None = None,
         cmd: list[str] | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), TRITON_INTERPRET="1", **(env_extra or {}))
    proc = subprocess.run(cmd or [sys.executable, "-m", "fusedpar", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


# ------------------------------------------------------------------- in-process, cheap


def _raw(name: str, median: float, **info) -> dict:
    return {"name": name, "group": None, "extra_info": info,
            "stats": {"median": median, "min": median, "rounds": 3}}


def test_rows_pick_baselines_and_tflops():
    raw = {"benchmarks": [
        _raw("ov-64", 0.5, op="ag", m=64, n=8, k=8, variant="overlapped", flops=2e12),
        _raw("se-64", 1.0, op="ag", m=64, n=8, k=8, variant="serial", flops=2e12),
        _raw("peer-64", 2.0, op="ag", m=64, n=8, k=8, variant="peer", baseline=True),
        _raw("ov-128", 1.0, op="ag", m=128, n=8, k=8, variant="overlapped"),
        _raw("lonely", 1.0),
        _raw("self-timed", 2.0, tflops=1.0, ratio_to_torch=1.5),
    ]}
    rows = {r["name"]: r for r in bench_cli.rows_from_pytest_benchmark(raw)}
    # An explicit baseline=True beats the "serial" variant name.
    assert rows["ov-64"]["baseline"] == "peer-64"
    assert rows["ov-64"]["speedup"] == pytest.approx(4.0)
    assert rows["se-64"]["tflops"] == pytest.approx(2.0)
    assert rows["ov-128"]["baseline"] is None and rows["lonely"]["speedup"] is None
    # A suite that timed torch inside the test reports a ratio: it becomes the speed-up.
    assert rows["self-timed"]["speedup"] == 1.5
    assert rows["self-timed"]["baseline_ms"] == pytest.approx(3000.0)
    table = bench_cli.format_table(list(rows.values()))
    assert table.splitlines()[0].split()[0] == "baseline"
    comparison = bench_cli.format_comparison(
        [dict(rows["se-64"], median_ms=3.0)], [rows["se-64"]])
    assert re.search(r"se-64\s+3\.000\s+1000\.000\s+0\.00", comparison)


def test_predict_in_process(capsys):
    assert main(["bench", "--predict", "--tokens", "4096"]) == 0
    out = capsys.readouterr().out
    assert "m=4096" in out


# ------------------------------------------------------------------------ subprocesses


def test_bench_quick_suite_writes_json_csv_png(tmp_path):
    proc = _run("bench", "--quick", "--suite", "bench/test_cli_smoke.py", "--out",
                str(tmp_path), timeout=120)
    (json_path,) = tmp_path.glob("bench-*.json")
    data = json.loads(json_path.read_text())
    assert data["meta"]["torch"] and data["meta"]["device_slug"] == "cpu"
    assert "--quick" in data["meta"]["command"]
    names = {r["name"] for r in data["rows"]}
    assert "test_smoke_matmul[chunked-64]" in names
    chunked = next(r for r in data["rows"] if r["name"] == "test_smoke_matmul[chunked-64]")
    assert chunked["baseline"] == "test_smoke_matmul[serial-64]"
    assert chunked["median_ms"] > 0 and chunked["tflops"] > 0 and chunked["speedup"] > 0
    (csv_path,) = tmp_path.glob("bench-*.csv")
    assert len(list(csv.DictReader(csv_path.open()))) == len(data["rows"])
    pngs = sorted(tmp_path.glob("*.png"))
    assert {p.name.rsplit("-", 1)[1] for p in pngs} == {"smoke_matmul.png", "medians.png"}
    for png in pngs:
        assert png.read_bytes()[:8] == PNG_MAGIC
    assert "x baseline" in proc.stdout


def test_bench_budget_skips_late_benchmarks_but_writes_json(tmp_path):
    proc = _run("bench", "--quick", "--suite", "bench/test_cli_smoke.py", "--budget-s", "0",
                "--out", str(tmp_path), timeout=120)
    (json_path,) = tmp_path.glob("bench-*.json")
    assert json.loads(json_path.read_text())["rows"] == []
    assert "5 skipped" in proc.stdout


def test_bench_predict_rows_for_tp_2_4_8():
    out = _run("bench", "--predict").stdout
    for model in ("llama-8b", "llama-70b"):
        for tp in (2, 4, 8):
            for layer in ("q", "k", "v", "o", "gate", "up", "down"):
                assert re.search(rf"^{model}\s+{tp}\s+{layer}\s+\w+", out, re.M), (model, tp, layer)
            line = re.search(rf"^{model}\s+tp={tp}: .*speedup ([\d.]+) \(bound ([\d.]+)\)",
                             out, re.M)
            assert line and 1.0 <= float(line[1]) <= float(line[2])


def test_profile_cpu_writes_chrome_traces(tmp_path):
    _run("profile", "--kernel", "torch", "--world", "2", "--warmup", "1", "--steps", "1",
         "--chunks", "3", "--out", str(tmp_path), timeout=120)
    for rank in (0, 1):
        trace = json.loads((tmp_path / f"trace-rank{rank}.json").read_text())
        names = {event.get("name") for event in trace["traceEvents"]}
        # one sequence-parallel MLP block: the layer's phases and every schedule's pieces
        expected = {"step 0", "forward", "backward", "all_gather_matmul c=3", "consume local",
                    "consume step 1 piece 1", "matmul_reduce_scatter c=3", "mm piece 2",
                    "all_gather_matmul_with_wgrad c=3", "wgrad"}
        assert expected <= names, (rank, sorted(expected - names))
    meta = json.loads((tmp_path / "profile-meta.json").read_text())
    assert meta["chunks"] == 3 and meta["world"] == 2


def test_demo_trains_a_parallel_llama_in_step_with_the_single_process_one():
    out = _run("demo", "--steps", "4", "--layers", "1", "--hidden", "64", "--intermediate", "128",
               "--seq", "16", "--batch", "2", "--timing-reps", "1", "--kernel", "torch").stdout
    assert re.search(r"logits vs single-process\s+rel\. err [\d.e+-]+ \(tolerance 1e-04\) OK", out), out
    assert re.search(r"loss agreement\s+max \|parallel - single\| over 4 steps [\d.e+-]+ OK", out), out
    first_last = re.search(r"parallel ([\d.]+) -> ([\d.]+), single-process ([\d.]+) -> ([\d.]+)", out)
    assert first_last and first_last[1] == first_last[3], out
    assert "torch GEMMs, torch communicator (gloo)" in out and "world size / device       2 / cpu" in out


def test_demo_trains_a_parallel_moe_in_step_with_the_single_process_one():
    out = _run("demo", "--model", "qwen3-moe", "--steps", "3", "--layers", "1", "--hidden", "64", "--intermediate",
               "32", "--seq", "16", "--batch", "2", "--timing-reps", "1", "--kernel", "torch").stdout
    assert "Qwen3MoeForCausalLM, 1 layers" in out and "4 experts (top-2) of width 32" in out, out
    assert re.search(r"logits vs single-process\s+rel\. err [\d.e+-]+ \(tolerance 1e-04\) OK", out), out
    assert re.search(r"loss agreement\s+max \|parallel - single\| over 3 steps [\d.e+-]+ OK", out), out
    assert "torch GEMMs (experts: grouped)" in out, out


def test_demo_trains_in_fp8_within_fp8s_error_of_the_single_process_one():
    out = _run("demo", "--fp8", "--steps", "3", "--layers", "1", "--hidden", "64", "--intermediate", "128",
               "--seq", "16", "--batch", "2", "--timing-reps", "1", "--kernel", "torch").stdout
    assert "fp8 linears (forward + dgrad)" in out, out
    err = re.search(r"logits vs single-process\s+rel\. err ([\d.e+-]+) \(tolerance 1e-01\) OK", out)
    assert err and float(err[1]) > 1e-4, out  # fp8 really ran: not bit-close to the fp32 reference
    assert re.search(r"loss agreement\s+max \|parallel - single\| over 3 steps [\d.e+-]+ OK", out), out


def test_demo_help_lists_its_options():
    out = _run("demo", "--help").stdout
    for option in ("--world-size", "--model", "--experts", "--steps", "--hidden", "--dtype", "--sequence-parallel",
                   "--kernel", "--comm", "--fp8"):
        assert option in out, option


def test_gpu_run_all_plumbing_on_cpu(tmp_path):
    script = ["bash", str(ROOT / "bench/gpu/run_all.sh")]
    env = {"OUT": str(tmp_path / "dry"), "PYTHON": sys.executable}
    _run(cmd=[*script, "--dry-run"], env_extra=env)
    summary = (tmp_path / "dry/summary.md").read_text()
    for step in ("env", "gpu-kernel-tests", "gpu-tests", "gemm", "fp8-overlap", "overlap-emulated", "timeline",
                 "calibrate",
                 "predict", "profile"):
        assert re.search(rf"^\| {step} \| dry-run \|", summary, re.M), step
    env["OUT"] = str(tmp_path / "quick")
    _run(cmd=[*script, "--quick", "--only", "env,calibrate,predict,overlap-emulated,fp8-overlap"],
         env_extra=env, timeout=120)
    summary = (tmp_path / "quick/summary.md").read_text()
    assert re.search(r"^\| calibrate \| ok \|", summary, re.M)
    assert "## GEMM calibration" in summary and "| torch | float32 |" in summary
    assert "llama-70b" in summary
    assert re.search(r"^\| overlap-emulated \| ok \|", summary, re.M)
    assert "## Overlap on an emulated link (one GPU)" in summary and "CPU smoke run" in summary
    assert re.search(r"^\| fp8-overlap \| ok \|", summary, re.M)
    assert "### fp8 vs bf16 all-gather + GEMM on an emulated link" in summary and "| tiny up tp2 m32 |" in summary
    versions = json.loads((tmp_path / "quick/env/versions.json").read_text())
    assert versions["torch"] and versions["date"]
