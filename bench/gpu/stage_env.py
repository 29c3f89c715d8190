"""The env stage: what the machine is (GPU, driver, torch, CUDA, Python, megatron-core, the kernels
chosen, the memory the sizes are planned for, the datasheet peak) and the measured rate of a bf16
matrix product, the ceiling MFU is also reported against."""

from __future__ import annotations

import platform
import subprocess
import time
from pathlib import Path

import torch
from harness import device_name, synchronize
from sizing import Sizes, usable_memory

from common.devices import RECIPE_ACCELERATOR, find_accelerator, peak_tflops


def stage_env(args, sizes: Sizes, work: Path) -> tuple[bool, dict]:
    from importlib import metadata

    from models.backends import choose_backend
    from models.packed_attention import packed_attention_kernel

    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    name = device_name(args.device)
    accelerator = find_accelerator(name) if args.device == "cuda" else None
    figures = {
        "device": name,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "megatron_core": version("megatron-core"),
        "transformers": version("transformers"),
        "layers": choose_backend(args.device).describe(),
        "packed_attention": packed_attention_kernel(args.device),
        "usable_memory": usable_memory(args.device),
        "datasheet_peak_tflops": peak_tflops(name if args.device == "cuda" else None),
        "datasheet_peak_of": accelerator.name if accelerator else f"{RECIPE_ACCELERATOR.name} (unlisted)",
        "matmul_bf16_tflops": matmul_tflops(args.device, sizes.matmul),
    }
    if args.device == "cuda":
        figures["driver"] = nvidia_smi("--query-gpu=driver_version,memory.total", "--format=csv,noheader")
        figures["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return figures["megatron_core"] is not None, figures


def nvidia_smi(*arguments: str) -> str | None:
    """nvidia-smi's answer, or None where it is missing or fails (a sandboxed driver may lack it)."""
    try:
        done = subprocess.run(["nvidia-smi", *arguments], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def matmul_tflops(device: str, n: int, warmup: int = 3, timed: int = 10) -> float:
    """The measured rate of an n x n x n bf16 matrix product on random data: the ceiling a GEMM-bound
    step can reach here (the datasheet peak is not reached by any real kernel)."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(warmup):
        a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(timed):
        a @ b
    synchronize(device)
    tflops = 2 * n**3 * timed / (time.perf_counter() - start) / 1e12
    return float(f"{tflops:.4g}")  # significant digits: a loaded CPU's rate would round to 0.00
