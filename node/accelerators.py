"""What this host computes on: CUDA and ROCm GPUs, Apple MPS, and the CPU (always listed).

Detection order, each step only if the one before found nothing of its kind:

- CUDA / ROCm through torch when torch is installed and a GPU driver's device node exists
  (/dev/nvidiactl, /dev/nvidia0, /dev/kfd, /dev/dxg; without one torch finds nothing, and
  importing it costs a second of start-up) (names, total and free memory per device; a ROCm
  build of torch reports HIP devices through the same API);
- else `nvidia-smi --query-gpu=index,name,memory.total,memory.free --format=csv,noheader,nounits`
  (MiB), and `rocm-smi --showproductname --showmeminfo vram --json` (bytes), when on PATH;
- Apple MPS through torch (unified memory: the host's RAM);
- the CPU: model name, logical cores, total and available RAM (/proc on Linux).

The parsers of the tools' output are pure functions (`parse_nvidia_smi`, `parse_rocm_smi`),
tested with recorded output. `pick_torch_device` is hf_local's device choice: cuda > mps > cpu.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import platform
import shutil
import subprocess
from dataclasses import asdict, dataclass
from typing import Any

from node.providers.base import ACCELERATOR_KINDS

__all__ = [
    "Accelerator",
    "detect",
    "detect_cpu",
    "parse_nvidia_smi",
    "parse_rocm_smi",
    "pick_torch_device",
    "torch_could_find_gpus",
    "KINDS",
]

log = logging.getLogger(__name__)

KINDS = ACCELERATOR_KINDS  # cuda, rocm, mps, cpu
TOOL_TIMEOUT = 10.0  # seconds for nvidia-smi / rocm-smi
MIB = 1024 * 1024


@dataclass(frozen=True)
class Accelerator:
    kind: str  # cuda, rocm, mps or cpu
    name: str
    memory_total: int  # bytes
    memory_free: int  # bytes
    index: int = 0
    cores: int | None = None  # cpu only

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def pick_torch_device() -> str:
    """The best torch device here: ``cuda`` if a CUDA (or ROCm) GPU is usable, else ``mps``, else ``cpu``."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


# ---------------------------------------------------------------------------------------
# Parsers of the vendor tools' output (pure)


def parse_nvidia_smi(text: str) -> list[Accelerator]:
    """Lines of ``index, name, memory.total [MiB], memory.free [MiB]`` (csv, noheader, nounits)."""
    devices = []
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 4:
            continue
        index, name, total, free = parts
        try:
            devices.append(Accelerator("cuda", name, int(float(total)) * MIB, int(float(free)) * MIB, int(index)))
        except ValueError:
            log.warning("nvidia-smi: unreadable line %r", line)
    return devices


def parse_rocm_smi(text: str) -> list[Accelerator]:
    """`rocm-smi --showproductname --showmeminfo vram --json`: {"card0": {"Card series": ..., "VRAM Total Memory (B)": ...}}."""
    try:
        data = json.loads(text)
    except ValueError:
        return []
    devices = []
    for card, info in sorted(data.items()):
        if not card.startswith("card") or not isinstance(info, dict):
            continue
        name = info.get("Card series") or info.get("Card model") or info.get("Device Name") or card
        try:
            total = int(info.get("VRAM Total Memory (B)", 0))
            used = int(info.get("VRAM Total Used Memory (B)", 0))
            index = int(card[4:])
        except ValueError:
            continue
        devices.append(Accelerator("rocm", str(name), total, max(total - used, 0), index))
    return devices


def _run(tool: str, *args: str) -> str | None:
    path = shutil.which(tool)
    if path is None:
        return None
    try:
        out = subprocess.run([path, *args], capture_output=True, text=True, timeout=TOOL_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("%s failed: %s", tool, exc)
        return None
    return out.stdout if out.returncode == 0 else None


# ---------------------------------------------------------------------------------------
# Detection


def _meminfo() -> tuple[int, int]:
    try:
        fields = {}
        with open("/proc/meminfo") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                fields[key] = int(rest.split()[0]) * 1024
        return fields.get("MemTotal", 0), fields.get("MemAvailable", fields.get("MemFree", 0))
    except (OSError, ValueError, IndexError):
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        return pages * size, 0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def detect_cpu() -> Accelerator:
    total, free = _meminfo()
    return Accelerator("cpu", _cpu_name(), total, free, 0, cores=os.cpu_count() or 1)


GPU_DEVICE_NODES = ("nvidiactl", "nvidia0", "kfd", "dxg")  # NVIDIA driver, AMD ROCm, WSL2's GPU bridge


def torch_could_find_gpus(dev: str = "/dev", system: str | None = None) -> bool:
    """Whether asking torch is worth its import (over a second): macOS (MPS), or a GPU driver's device node."""
    if (system or platform.system()) == "Darwin":
        return True
    return any(os.path.exists(os.path.join(dev, name)) for name in GPU_DEVICE_NODES)


def _torch_gpus() -> list[Accelerator]:
    if importlib.util.find_spec("torch") is None or not torch_could_find_gpus():
        return []
    import torch

    devices: list[Accelerator] = []
    if torch.cuda.is_available():
        kind = "rocm" if getattr(torch.version, "hip", None) else "cuda"
        for index in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(index)
            devices.append(Accelerator(kind, torch.cuda.get_device_name(index), int(total), int(free), index))
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        total, free = _meminfo()
        devices.append(Accelerator("mps", "Apple MPS", total, free, 0))
    return devices


def detect() -> list[Accelerator]:
    """Every accelerator of this host, the CPU last (always present). Blocking: call in a thread."""
    devices = []
    try:
        devices = _torch_gpus()
    except Exception as exc:  # a broken CUDA install must not stop the daemon from advertising its CPU
        log.warning("torch could not list GPUs: %s", exc)
    kinds = {d.kind for d in devices}
    if "cuda" not in kinds:
        text = _run("nvidia-smi", "--query-gpu=index,name,memory.total,memory.free",
                    "--format=csv,noheader,nounits")
        devices += parse_nvidia_smi(text) if text else []
    if "rocm" not in kinds:
        text = _run("rocm-smi", "--showproductname", "--showmeminfo", "vram", "--json")
        devices += parse_rocm_smi(text) if text else []
    return [*devices, detect_cpu()]
