"""Accelerator detection. For now: which torch device hf_local uses (cuda > mps > cpu)."""

from __future__ import annotations

__all__ = ["pick_torch_device"]


def pick_torch_device() -> str:
    """The best torch device here: ``cuda`` if a CUDA (or ROCm) GPU is usable, else ``mps``, else ``cpu``."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"
