"""The command line: one module per subcommand, each with ``add_arguments`` and ``run``.

Heavy imports (matplotlib) happen inside the functions that need them, so building the
parser stays cheap. Replace a subcommand by replacing its module (e.g. ``demo``).
"""
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "demo": "run fusedpar on a real problem and check it against torch",
    "bench": "run the benchmark suites, tabulate, plot; or print cost-model predictions",
    "profile": "trace one workload (Chrome trace on CPU, nsys capture range on GPU)",
    "kernels": "compile the GEMM kernels for sm_90a/sm_80 and report registers, spills, smem, wgmma, TMA",
}


def build_parser() -> argparse.ArgumentParser:
    """The full parser; each subcommand module adds its own options."""
    parser = argparse.ArgumentParser(
        prog="python -m fusedpar",
        description="fusedpar: tensor-parallel layers whose matmuls overlap their collectives")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in SUBCOMMANDS.items():
        module = importlib.import_module(f"fusedpar.cli.{name}")
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: sys.argv[1:]), run the subcommand, return its exit code."""
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for results' metadata
    module = importlib.import_module(f"fusedpar.cli.{args.command}")
    return int(module.run(args) or 0)
