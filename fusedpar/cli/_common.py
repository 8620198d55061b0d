"""Helpers shared by the subcommands: device naming and run metadata."""
from __future__ import annotations

import datetime as _dt
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]


def default_device() -> torch.device:
    """CUDA if present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_slug(device: torch.device | str | None = None) -> str:
    """Short folder name for results: ``cpu``, ``h100``, ``h200``, ``a100``, else the
    GPU name in lower case with non-alphanumerics as dashes."""
    device = torch.device(device) if device is not None else default_device()
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device)
    for known in ("h200", "h100", "a100", "l40s", "l4"):
        if known in name.lower():
            return known
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def device_name(device: torch.device | str | None = None) -> str:
    """Human-readable device: the GPU's name, or the CPU's with its core count."""
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import os

    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def run_metadata(device: torch.device | str | None = None,
                 argv: list[str] | None = None) -> dict:
    """Where and when a result was taken: device, versions, date, command line, commit."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device_name(device),
        "device_slug": device_slug(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", "fusedpar",
                               *(sys.argv[1:] if argv is None else argv)]),
        "git_commit": _git_commit(),
    }


def timestamp() -> str:
    """UTC time stamp for file names."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")

