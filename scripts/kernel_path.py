"""Name the CPU and the numerical kernel path this process runs on: one line for CI logs and
benchmark records.

Sums of float32 products depend on which kernels run: ATen's vectorised CPU code path
(``torch.backends.cpu.get_cpu_capability()``, forced with ``ATEN_CPU_CAPABILITY``), MKL's GEMM
code path and its conditional-numerical-reproducibility mode (``MKL_CBWR``,
``MKL_ENABLE_INSTRUCTIONS``), and the number of threads. Two machines that differ in any of these
can differ in the last bits, so every benchmark figure and CI leg names them.

    python scripts/kernel_path.py          # one line
    python scripts/kernel_path.py --json   # the same as JSON
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

OVERRIDES = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def cpu_model() -> str:
    """``lscpu``'s model name with family/model numbers, or /proc/cpuinfo's, or platform's."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, env={**os.environ, "LC_ALL": "C"}).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        name = fields.get("Model name", "?")
        return f"{name} (family {fields.get('CPU family', '?')}, model {fields.get('Model', '?')}, {fields.get('CPU(s)', '?')} CPUs)"
    except (OSError, subprocess.SubprocessError):
        info = Path("/proc/cpuinfo")
        if info.is_file():
            match = re.search(r"model name\s*:\s*(.+)", info.read_text())
            if match:
                return match.group(1)
        return platform.processor() or platform.machine()


def mkl_path() -> str:
    """MKL's own description of this process's GEMM (version, CNR mode, threads), read from
    ``MKL_VERBOSE`` in a child process with this environment; empty without MKL."""
    code = "import torch; a = torch.ones(64, 64); a @ a"
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "MKL_VERBOSE": "1"}).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    version = re.search(r"MKL_VERBOSE (oneMKL [^,]+?) Product", out)
    gemm = re.search(r"SGEMM\(.*\)\s+\S+\s+(CNR:\S+).*?(NThr:\d+)", out)
    return " ".join(x for x in (version and version.group(1), gemm and gemm.group(1), gemm and gemm.group(2)) if x)


def describe() -> dict:
    """The CPU, torch, ATen's code path, MKL's, and the environment overrides set."""
    import torch

    return {
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkl": mkl_path() if torch.backends.mkl.is_available() else "not built with MKL",
        "threads": torch.get_num_threads(),
        "overrides": {k: os.environ[k] for k in OVERRIDES if k in os.environ},
    }


def one_line(d: dict | None = None) -> str:
    d = d or describe()
    overrides = " ".join(f"{k}={v}" for k, v in d["overrides"].items()) or "none"
    return (f"CPU {d['cpu']}; torch {d['torch']}, ATen {d['aten_cpu_capability']}, MKL {d['mkl'] or '?'}, "
            f"{d['threads']} threads; overrides: {overrides}")


if __name__ == "__main__":
    print(json.dumps(describe(), indent=1) if "--json" in sys.argv[1:] else one_line())
