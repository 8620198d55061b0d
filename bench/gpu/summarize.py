"""Write OUT/summary.md for a bench/gpu/run_all.sh run: device, versions, each step's
outcome, the GEMM-vs-cuBLAS tables, the timeline picture, the benchmark tables, the
emulated-link overlap tables, the calibration table and links to every result file.

    python3 bench/gpu/summarize.py OUT
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def bench_tables(out: Path) -> list[str]:
    """A markdown table per bench results JSON under ``out``."""
    lines = []
    for path in sorted(out.rglob("bench-*.json")):
        data = json.loads(path.read_text())
        lines += [f"### {path.relative_to(out)}", "",
                  "| baseline | base ms | name | ms (median) | TFLOP/s | x baseline |",
                  "|---|---:|---|---:|---:|---:|"]
        for r in data.get("rows", []):
            lines.append(f"| {r['baseline'] or '-'} | {_fmt(r['baseline_ms'], '.3f')} | "
                         f"{r['name']} | {r['median_ms']:.3f} | {_fmt(r['tflops'], '.4g')} | "
                         f"{_fmt(r['speedup'], '.3g')} |")
        lines.append("")
    return lines


def calibration_tables(out: Path) -> list[str]:
    """A markdown table per calibration JSON under ``out``."""
    lines = []
    for path in sorted(out.rglob("calibrate-*.json")):
        data = json.loads(path.read_text())
        default = data["default_spec"]["gemm_tflops"]
        lines += [f"### {path.relative_to(out)}", "",
                  "| backend | dtype | m x n x k | ms | TFLOP/s | model's table |",
                  "|---|---|---|---:|---:|---:|"]
        for r in data["measurements"]:
            lines.append(f"| {r['backend']} | {r['dtype']} | {r['m']}x{r['n']}x{r['k']} | "
                         f"{r['median_s'] * 1e3:.3f} | {r['tflops']:.4g} | "
                         f"{_fmt(default.get(r['dtype']), '.4g')} |")
        lines.append("")
    return lines


def emulated_tables(out: Path) -> list[str]:
    """The markdown of each overlap_emulated.py run under ``out`` (it writes its own tables),
    its headings one level down."""
    lines = []
    for path in sorted(out.rglob("overlap-emulated.md")):
        text = "\n" + path.read_text()
        lines += [text.replace("\n### ", "\n#### ").replace("\n## ", "\n### ").strip(),
                  "", f"(from [{path.relative_to(out)}]({path.relative_to(out)}))", ""]
    return lines


def markdown_reports(out: Path, names: tuple[str, ...]) -> list[str]:
    """The markdown summaries named ``names`` that a step wrote itself (e.g. the fp8 overlap run)."""
    lines = []
    for name in names:
        for path in sorted(out.rglob(name)):
            text = ("\n" + path.read_text()).replace("\n### ", "\n#### ").replace("\n## ", "\n### ")
            lines += [text.replace("\n# ", "\n### ").strip(), "",
                      f"(from [{path.relative_to(out)}]({path.relative_to(out)}))", ""]
    return lines


def main(out: Path) -> int:
    """Write ``out/summary.md``; return 0."""
    versions = json.loads(_read(out / "env/versions.json") or "{}")
    gpu_csv = _read(out / "env/gpu.csv").strip()
    steps = list(csv.DictReader((out / "steps.tsv").open(), delimiter="\t")) \
        if (out / "steps.tsv").exists() else []
    lines = ["# fusedpar GPU run", ""]
    lines += [f"- date: {versions.get('date', '?')}",
              f"- device: {versions.get('gpu') or 'no CUDA device'}",
              f"- torch {versions.get('torch', '?')} (CUDA {versions.get('cuda')}, "
              f"NCCL {versions.get('nccl')}), triton {versions.get('triton', '?')}, "
              f"python {versions.get('python', '?')}"]
    if gpu_csv:
        lines += ["- nvidia-smi (name, driver, memory, max SM clock): "
                  + "; ".join(gpu_csv.splitlines()[1:])]
    lines += ["", "## Steps", "", "| step | status | seconds | log |", "|---|---|---:|---|"]
    for s in steps:
        lines.append(f"| {s['step']} | {s['status']} | {s['seconds']} | [{s['log']}]({s['log']}) |")
    gemm = _read(out / "gemm/gemm-summary.md").strip()
    lines += ["", "## GEMMs vs cuBLAS", ""]
    lines += [gemm.replace("\n## ", "\n### ").replace("# GEMM vs cuBLAS", "GEMM vs cuBLAS", 1), ""] if gemm \
        else ["(none)", ""]
    lines += ["## Decode step in a CUDA graph", ""] + (markdown_reports(out, ("graph-decode.md",)) or ["(none)", ""])
    lines += ["## fp8 all-gather + GEMM", ""] + (markdown_reports(out, ("fp8-overlap.md",)) or ["(none)", ""])
    timeline = out / "timeline/timeline.png"
    if timeline.exists():
        lines += ["## Timeline of one overlapped layer", "", f"![timeline]({timeline.relative_to(out)})", ""]
    lines += ["## Benchmarks", ""] + (bench_tables(out) or ["(none)", ""])
    lines += ["## Overlap on an emulated link (one GPU)", ""] + (emulated_tables(out) or ["(none)", ""])
    lines += ["## GEMM calibration", ""] + (calibration_tables(out) or ["(none)", ""])
    predict = _read(out / "logs/predict.log").strip()
    if predict:
        lines += ["## Cost-model predictions (h100-sxm defaults)", "", "```", predict, "```", ""]
    lines += ["## Files", ""]
    for path in sorted(out.rglob("*")):
        if path.is_file() and path.suffix in {".json", ".csv", ".png", ".xml", ".nsys-rep", ".txt"}:
            rel = path.relative_to(out)
            lines.append(f"- [{rel}]({rel})")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
