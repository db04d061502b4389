"""Accelerator detection against output recorded on a real GPU host.

`tests/fixtures/gpu/` was written by `tests/fixtures/gpu/record.sh` on an NVIDIA H200 machine
(driver 580.159.04, CUDA 13.0, torch 2.11.0+cu130; see host.txt there): the raw `nvidia-smi` query
the fallback path runs, and what `node.accelerators` itself reported through torch on that host
(detect.json), and a generation by hf_local on that GPU (hf_local_cuda.txt).
"""

from __future__ import annotations

import json
from pathlib import Path

from node.accelerators import MIB, Accelerator, parse_nvidia_smi

GPU = Path(__file__).resolve().parents[1] / "fixtures" / "gpu"


def test_recorded_nvidia_smi_output_is_parsed():
    text = (GPU / "nvidia_smi_query.txt").read_text()
    assert parse_nvidia_smi(text) == [Accelerator("cuda", "NVIDIA H200", 143771 * MIB, 143156 * MIB, 0)]


def test_nvidia_smi_and_torch_name_the_same_device_on_the_recorded_host():
    recorded = json.loads((GPU / "detect.json").read_text())
    (smi,) = parse_nvidia_smi((GPU / "nvidia_smi_query.txt").read_text())
    (torch_view,) = recorded["torch"]
    assert recorded["pick_torch_device"] == "cuda"
    assert (torch_view["kind"], torch_view["name"], torch_view["index"]) == (smi.kind, smi.name, smi.index)
    # torch's total is what the driver lets a process allocate, a little below nvidia-smi's total
    assert 0.9 * smi.memory_total < torch_view["memory_total"] <= smi.memory_total
    # detection lists the GPU first and the CPU last
    assert [d["kind"] for d in recorded["detect"]] == ["cuda", "cpu"]
    assert recorded["detect"][0] == torch_view


def test_hf_local_chose_the_gpu_on_the_recorded_host():
    text = (GPU / "hf_local_cuda.txt").read_text()
    assert "accelerator: cuda" in text
    allocated = int(text.rsplit("cuda memory allocated:", 1)[1])
    assert allocated > 0, "the tiny model's weights were on the GPU"
