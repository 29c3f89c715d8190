"""The accelerators the project knows by name: their datasheet dense bf16 peak and memory, in one table.

    accelerator = find_accelerator(torch.cuda.get_device_name())   # None for an unlisted device
    peak = peak_tflops(torch.cuda.get_device_name())               # the recipe GPU's for an unlisted one

The trainer's MFU, the layout planner and the GPU benchmark (bench/gpu/) read their peak from here. A
name is matched by the markers torch.cuda.get_device_name() reports for that part (e.g. "NVIDIA H100 80GB
HBM3" for the H100 SXM, "NVIDIA H200"); the table is ordered so that a more specific marker ("GH200",
"H100 PCIe") is tried before one it contains ("H200", "H100").
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Accelerator:
    name: str
    markers: tuple[str, ...]  # substrings of the device name that identify the part
    bf16_dense_tflops: float  # the vendor datasheet's dense (no sparsity) bf16 tensor-core peak
    memory_gb: float  # the datasheet's device memory, 1e9 bytes


ACCELERATORS = (
    Accelerator("GH200", ("GH200",), 989.0, 96.0),
    Accelerator("H200", ("H200",), 989.0, 141.0),
    Accelerator("H100 PCIe", ("H100 PCIe",), 756.0, 80.0),
    Accelerator("H100 NVL", ("H100 NVL",), 835.0, 94.0),
    Accelerator("H100 SXM", ("H100 80GB HBM3", "H100 SXM", "H100"), 989.0, 80.0),
    Accelerator("A100", ("A100",), 312.0, 80.0),
)
RECIPE_ACCELERATOR = next(a for a in ACCELERATORS if a.name == "H100 SXM")  # K2-Think's 32 x 8 H100


def find_accelerator(device_name: str) -> Accelerator | None:
    """The table's entry for a device name as torch reports it, or None."""
    lowered = device_name.lower()
    for accelerator in ACCELERATORS:
        if any(marker.lower() in lowered for marker in accelerator.markers):
            return accelerator
    return None


def peak_tflops(device_name: str | None) -> float:
    """The datasheet dense bf16 peak of the named device; the recipe GPU's (H100 SXM) when the device is
    unlisted or None (a CPU), so that MFU stays comparable with the recipe's figures."""
    found = find_accelerator(device_name) if device_name else None
    return (found or RECIPE_ACCELERATOR).bf16_dense_tflops
