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

`detect()` does the whole detection every call. `AcceleratorDetector` (what the daemon uses for
every advert it signs, up to once a second under changing load) detects once, keeps the static
parts (kinds, names, totals, indexes, the CPU model and cores) and re-reads only free memory, at
most every `refresh_interval` seconds (10 s), from the same source that found each device:
`torch.cuda.mem_get_info`, one `nvidia-smi`/`rocm-smi` query, or /proc/meminfo.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import platform
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

from protocols.vocabulary import ACCELERATOR_KINDS

__all__ = [
    "Accelerator",
    "AcceleratorDetector",
    "detect",
    "detect_cpu",
    "parse_nvidia_smi",
    "parse_nvidia_smi_free",
    "parse_rocm_smi",
    "pick_torch_device",
    "refresh_free_memory",
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


def parse_nvidia_smi_free(text: str) -> dict[int, int]:
    """Lines of ``index, memory.free [MiB]`` (csv, noheader, nounits): free bytes per device index."""
    free = {}
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 2:
            continue
        try:
            free[int(parts[0])] = int(float(parts[1])) * MIB
        except ValueError:
            log.warning("nvidia-smi: unreadable line %r", line)
    return free


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


NVIDIA_QUERY = ("--query-gpu=index,name,memory.total,memory.free", "--format=csv,noheader,nounits")
NVIDIA_FREE_QUERY = ("--query-gpu=index,memory.free", "--format=csv,noheader,nounits")
ROCM_QUERY = ("--showproductname", "--showmeminfo", "vram", "--json")


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


def _detect_with_sources() -> list[tuple[Accelerator, str]]:
    """Every accelerator with where it was found: "torch", "mps", "nvidia-smi", "rocm-smi" or "cpu"."""
    found: list[tuple[Accelerator, str]] = []
    try:
        found = [(d, "mps" if d.kind == "mps" else "torch") for d in _torch_gpus()]
    except Exception as exc:  # a broken CUDA install must not stop the daemon from advertising its CPU
        log.warning("torch could not list GPUs: %s", exc)
    kinds = {d.kind for d, _ in found}
    if "cuda" not in kinds:
        text = _run("nvidia-smi", *NVIDIA_QUERY)
        found += [(d, "nvidia-smi") for d in (parse_nvidia_smi(text) if text else [])]
    if "rocm" not in kinds:
        text = _run("rocm-smi", *ROCM_QUERY)
        found += [(d, "rocm-smi") for d in (parse_rocm_smi(text) if text else [])]
    return [*found, (detect_cpu(), "cpu")]


def detect() -> list[Accelerator]:
    """Every accelerator of this host, the CPU last (always present). Blocking: call in a thread."""
    return [device for device, _ in _detect_with_sources()]


def refresh_free_memory(
    found: list[tuple[Accelerator, str]],
    *,
    cuda: Any = None,
    run: Callable[..., str | None] | None = None,
    meminfo: Callable[[], tuple[int, int]] | None = None,
) -> list[tuple[Accelerator, str]]:
    """`found` with only `memory_free` re-read, each device from the source that found it.

    One query per source (one `nvidia-smi` run for all its devices); a device whose source
    fails keeps its last value. `cuda` (torch.cuda), `run` and `meminfo` are the sources,
    defaulting to the real ones.
    """
    run = run or _run
    meminfo = meminfo or _meminfo
    sources = {source for _, source in found}
    free: dict[tuple[str, int], int] = {}
    if "torch" in sources:
        try:
            if cuda is None:
                import torch

                cuda = torch.cuda
            for device, source in found:
                if source == "torch":
                    free[(source, device.index)] = int(cuda.mem_get_info(device.index)[0])
        except Exception as exc:  # the driver went away: keep the last values
            log.warning("torch could not read free GPU memory: %s", exc)
    if "nvidia-smi" in sources:
        text = run("nvidia-smi", *NVIDIA_FREE_QUERY)
        free.update({("nvidia-smi", i): f for i, f in (parse_nvidia_smi_free(text) if text else {}).items()})
    if "rocm-smi" in sources:
        text = run("rocm-smi", *ROCM_QUERY)
        free.update({("rocm-smi", d.index): d.memory_free for d in (parse_rocm_smi(text) if text else [])})
    if sources & {"cpu", "mps"}:
        available = meminfo()[1]
        free.update({(s, d.index): available for d, s in found if s in ("cpu", "mps")})
    return [(replace(d, memory_free=free.get((s, d.index), d.memory_free)), s) for d, s in found]


FREE_MEMORY_REFRESH_S = 10.0


class AcceleratorDetector:
    """`detect()` once, then only free memory again, at most every `refresh_interval` seconds.

    Callable like `detect` and, like it, blocking (call it in a thread); thread-safe.
    `detections` and `refreshes` count the full detections and the free-memory re-reads.
    """

    def __init__(self, refresh_interval: float = FREE_MEMORY_REFRESH_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.refresh_interval = refresh_interval
        self._clock = clock
        self._lock = threading.Lock()
        self._found: list[tuple[Accelerator, str]] | None = None
        self._stamp = 0.0
        self.detections = 0
        self.refreshes = 0

    def __call__(self) -> list[Accelerator]:
        with self._lock:
            now = self._clock()
            if self._found is None:
                self._found = _detect_with_sources()
                self.detections += 1
                self._stamp = now
            elif now - self._stamp >= self.refresh_interval:
                self._found = refresh_free_memory(self._found)
                self.refreshes += 1
                self._stamp = now
            return [device for device, _ in self._found]
