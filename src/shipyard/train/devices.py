"""Where and in what precision a run trains, and seeding."""

from __future__ import annotations

import random

import numpy as np
import torch

from shipyard.errors import TrainError

# Peak dense bf16 throughput (FLOP/s) of common accelerators, for the MFU estimate.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def pick_device(name: str) -> torch.device:
    """The device `train.device` names (auto: CUDA when present, else CPU)."""
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainError("train.device is cuda but no CUDA device is available; use auto or cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_precision(name: str, device: torch.device) -> torch.dtype | None:
    """None means plain fp32; otherwise the autocast dtype."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if name == "fp32":
        return None
    if name == "fp16" and device.type != "cuda":
        raise TrainError("train.precision fp16 needs CUDA; use fp32 (or bf16) on CPU")
    return torch.bfloat16 if name == "bf16" else torch.float16


def device_peak_flops(device: torch.device) -> float | None:
    """Peak bf16 FLOP/s of a known accelerator (for MFU), None on CPU or unknown devices."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_FLOPS.items():
        if key in name:
            return flops
    return None


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) from one integer."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
