"""GPU generations: the one table of memory, bandwidth and compute capability that `plan` and the
build read, the GPU this host reports (nvidia-smi), and what TensorRT-LLM 1.2.1 cannot build on it.

Pure data and a subprocess call: no CUDA, no torch, so `plan` can use it on a CPU host.
Memory is in GB of 1e9 bytes as the vendor sells it (an "80 GB" H100 reports 81559 MiB);
bandwidth is the HBM's peak, in GB/s. Facts:
- TensorRT-LLM 1.2.1's builder raises "INT8/INT4 quantization is not supported on SM>=100" for
  weight-only int8/int4 (and an int8 KV cache) on SM 100-119, i.e. compute capability 10.x and
  11.x (B200, GB200, B300, GB300); 12.x (RTX Blackwell) is outside that check
  (NVIDIA/TensorRT-LLM tensorrt_llm/builder.py at 14e801da, a 1.x commit: `get_sm_version() >= 100
  and get_sm_version() < 120` around the weight-only and int8-KV-cache checks).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass

from grok_deploy.errors import UserError


@dataclass(frozen=True)
class Gpu:
    key: str                 # the hardware.gpu value
    name: str                # as nvidia-smi names it (the table's entries match names by `match`)
    memory_gb: float         # per GPU, GB = 1e9 bytes
    bandwidth_gbps: float    # HBM peak, GB/s
    compute_cap: tuple[int, int]
    match: str               # regular expression on nvidia-smi's name (case-insensitive)

    @property
    def sm(self) -> int:
        return self.compute_cap[0] * 10 + self.compute_cap[1]


# the SXM / data-centre parts; more specific patterns first (an "H100 NVL" is not an "H100 SXM")
GPUS: dict[str, Gpu] = {g.key: g for g in (
    Gpu("a100-40gb", "NVIDIA A100-SXM4-40GB", 40, 1555, (8, 0), r"A100.*40GB"),
    Gpu("a100", "NVIDIA A100-SXM4-80GB", 80, 2039, (8, 0), r"A100"),
    Gpu("l40s", "NVIDIA L40S", 48, 864, (8, 9), r"L40S"),
    Gpu("h100-nvl", "NVIDIA H100 NVL", 94, 3938, (9, 0), r"H100 NVL"),
    Gpu("h100", "NVIDIA H100 80GB HBM3", 80, 3350, (9, 0), r"H100"),
    Gpu("h200", "NVIDIA H200", 141, 4800, (9, 0), r"H200"),
    Gpu("b200", "NVIDIA B200", 192, 8000, (10, 0), r"(?<!G)B200"),
    Gpu("gb200", "NVIDIA GB200", 186, 8000, (10, 0), r"GB200"),
    Gpu("b300", "NVIDIA B300", 288, 8000, (10, 3), r"(?<!G)B300"),
    Gpu("gb300", "NVIDIA GB300", 279, 8000, (10, 3), r"GB300"),
    Gpu("rtx-pro-6000", "NVIDIA RTX PRO 6000 Blackwell Server Edition", 96, 1792, (12, 0), r"RTX PRO 6000"),
)}
DEFAULT = "h100"             # what hardware.gpu_memory_gb / hbm_bandwidth_gbps default to
NO_INT8_SM = (100, 120)      # [low, high): TensorRT-LLM 1.2.1 builds no INT8/INT4 weight-only here
NVIDIA_SMI_ENV = "GROK_DEPLOY_NVIDIA_SMI"  # another nvidia-smi, or "" to ignore this host's GPU


@dataclass(frozen=True)
class Detected:
    """What nvidia-smi reports for GPU 0 (the ranks of one node are alike), and its table entry."""
    name: str
    compute_cap: tuple[int, int]
    memory_bytes: int
    count: int
    entry: Gpu | None

    @property
    def sm(self) -> int:
        return self.compute_cap[0] * 10 + self.compute_cap[1]


def by_name(name: str) -> Gpu | None:
    """The table's entry for an nvidia-smi name (NVIDIA B200, NVIDIA H100 80GB HBM3, ...)."""
    return next((g for g in GPUS.values() if re.search(g.match, name, re.IGNORECASE)), None)


def lookup(key: str) -> Gpu:
    g = GPUS.get(str(key).lower())
    if g is None:
        raise UserError(f"unknown GPU {key!r}; known: {', '.join(GPUS)}")
    return g


def parse_query(text: str) -> Detected | None:
    """nvidia-smi --query-gpu=name,compute_cap,memory.total --format=csv,noheader: one line per
    GPU, e.g. `NVIDIA H100 80GB HBM3, 9.0, 81559 MiB`."""
    rows = [[c.strip() for c in line.rsplit(",", 2)] for line in text.splitlines() if line.strip()]
    if not rows or any(len(r) != 3 for r in rows):
        return None
    name, cap, mem = rows[0]
    m_cap, m_mem = re.fullmatch(r"(\d+)\.(\d+)", cap), re.fullmatch(r"(\d+(?:\.\d+)?)\s*(MiB|GiB)?", mem)
    if not m_cap or not m_mem:
        return None
    unit = {"GiB": 1 << 30}.get(m_mem.group(2), 1 << 20)
    return Detected(name, (int(m_cap.group(1)), int(m_cap.group(2))), int(float(m_mem.group(1)) * unit),
                    len(rows), by_name(name))


def detect(timeout: float = 10.0) -> Detected | None:
    """This host's GPU from nvidia-smi, or None where there is none (a CPU host), it fails, or
    $GROK_DEPLOY_NVIDIA_SMI is empty (the test suite sets it so that a GPU host's own GPU does not
    change what the tests expect)."""
    exe = os.environ.get(NVIDIA_SMI_ENV, "nvidia-smi")
    found = shutil.which(exe) if exe else None
    if not found:
        return None
    try:
        res = subprocess.run([found, "--query-gpu=name,compute_cap,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_query(res.stdout) if res.returncode == 0 else None


def int8_problem(quant: str, name: str, sm: int, dtype: str, fits_unquantised: str | None = None) -> str | None:
    """Why TensorRT-LLM 1.2.1 cannot build weight-only int8 on a GPU of SM `sm`, and what to use
    instead, or None. `fits_unquantised`: plan's sentence on the unquantised alternative's fit."""
    if quant != "w8a16" or not NO_INT8_SM[0] <= sm < NO_INT8_SM[1]:
        return None
    alt = f"quantization: none with dtype: {dtype if dtype != 'float32' else 'bfloat16'}"
    return (f"w8a16 on {name} (compute capability {sm // 10}.{sm % 10}): TensorRT-LLM 1.2.1's builder refuses "
            f"INT8/INT4 weight-only on SM 100-119 (\"INT8/INT4 quantization is not supported on SM>=100\"), after "
            f"convert and preprocess; use {alt}"
            + (f" ({fits_unquantised})" if fits_unquantised else ""))
