"""Data-sheet peaks of known accelerators: dense half-precision FLOP/s (for MFU) and memory
bandwidth (for the decode roofline), looked up by a fragment of the device's name.

Lookups compare names without spaces and case; the more specific fragments come first, so an
"H100 PCIe" never reads as the SXM part.
"""

from __future__ import annotations

import torch

# Dense bf16/fp16 tensor-core peak FLOP/s.
PEAK_FLOPS = {
    "GH200": 989e12,  # Grace Hopper: the H100's tensor cores
    "H200NVL": 835e12,
    "H200": 989e12,
    "H100PCIe": 756e12,
    "H100NVL": 835e12,
    "H100": 989e12,
    "H800PCIe": 756e12,
    "H800": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "4090": 165e12,
    "Ascend910B": 320e12,
    "910B": 320e12,
}

# Peak memory bandwidth, bytes/s.
PEAK_BANDWIDTH: dict[str, float | None] = {
    "GH200": None,  # 4.0 or 4.9 TB/s by memory version: pass --peak-bandwidth
    "H200": 4.8e12,  # SXM and NVL
    "H100PCIe": 2.0e12,
    "H100NVL": 3.9e12,
    "H100": 3.35e12,  # SXM (HBM3)
    "H800PCIe": 2.0e12,
    "H800": 3.35e12,
    "A10080GBPCIe": 1.935e12,
    "A100-SXM4-80GB": 2.039e12,
    "A100": 1.555e12,  # the 40 GB parts
    "L40S": 0.864e12,
    "4090": 1.008e12,
}


def _lookup(table: dict[str, float | None], device_name: str) -> float | None:
    compact = device_name.replace(" ", "").lower()
    return next((v for k, v in table.items() if k.lower() in compact), None)


def peak_flops(device_name: str, dtype: torch.dtype | None = None) -> float | None:
    """The half-precision tensor peak of a known device; None (no MFU) for fp32 compute,
    whose peak is another figure entirely, and for devices not in the table."""
    if dtype == torch.float32:
        return None
    return _lookup(PEAK_FLOPS, device_name)


def peak_bandwidth(device_name: str) -> float | None:
    """Peak memory bandwidth (bytes/s) of a known device; None when it is not in the table."""
    return _lookup(PEAK_BANDWIDTH, device_name)
