"""Runs megatron-core on CPU (gloo) by redirecting its CUDA assumptions; used by tests and CPU runs.

megatron-core assumes CUDA in a handful of places: `torch.cuda.current_device()` as a device,
`device="cuda"` tensors, `.cuda()` calls, the CUDA RNG tracker, and asserts on `tensor.type()` being
`torch.cuda.FloatTensor`. `enable()` installs, once per process, a `TorchFunctionMode` that maps every
CUDA device argument to the CPU, makes `.cuda()` a no-op and reports CUDA type names, plus CPU stand-ins
for the `torch.cuda` functions megatron-core calls. It is never enabled when CUDA is in use.

Its mixture-of-experts layer (megatron-core 0.16.1) needs three more: CUDA streams and events for the
all-to-all dispatcher's host copies, split sizes that gloo accepts, and a name megatron-core imports only
with Transformer Engine (`fill_missing_te_names`, which GPU runs without TE need as well).
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)
_mode: TorchFunctionMode | None = None


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)  # a bare index means a CUDA device


class _CudaOnCpu(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and "dtype" not in kwargs:
            return func(*args, **kwargs).replace(
                "torch.", "torch.cuda.", 1
            )  # for `.type() == 'torch.cuda.*'` asserts
        if func is torch.Tensor.type and len(args) > 1 and isinstance(args[1], str):
            args = (args[0], args[1].replace("torch.cuda.", "torch."), *args[2:])
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def enable() -> None:
    """Redirects megatron-core's CUDA calls to the CPU for the rest of the process (idempotent)."""
    global _mode
    if _mode is not None:
        return
    if torch.cuda.is_available():
        raise RuntimeError("megatron_cpu.enable() is for CPU-only runs; CUDA is available here")
    from megatron.core.tensor_parallel import random as tp_random

    # the CPU itself, not an index for the mode to map: autograd's backward runs without the mode, and
    # megatron-core's backward functions allocate on it (sequence parallelism's all-gather buffers)
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.manual_seed = lambda seed: None  # the CPU generator is seeded by torch.manual_seed
    torch.cuda.manual_seed_all = lambda seed: None
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.empty_cache = lambda: None
    tp_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    tp_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    # transformer/moe/token_dispatcher.py:445 creates a torch.cuda.Stream for the all-to-all dispatcher's
    # device-to-host copies; 871-895 compare it with the current stream, enter it, record an event on it
    # and synchronize that. On the CPU every copy is already done: one stream that is always current.
    torch.cuda.Stream = _CpuStream  # a class: annotations such as `torch.cuda.Stream | None` still work
    torch.cuda.current_stream = lambda device=None: _CpuStream()
    torch.cuda.stream = lambda stream: contextlib.nullcontext()
    _split_sizes_as_lists()
    fill_missing_te_names()
    _mode = _CudaOnCpu()
    _mode.__enter__()
    log.info("megatron-core on CPU: CUDA device arguments, RNG and type checks are redirected to the CPU")


class _CpuEvent:
    def synchronize(self) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass


class _CpuStream:
    """The one CPU stream: every construction returns it."""

    _the_stream = None

    def __new__(cls, *args, **kwargs):
        if cls._the_stream is None:
            cls._the_stream = super().__new__(cls)
        return cls._the_stream

    def wait_stream(self, other) -> None:
        pass

    def record_event(self, event=None) -> _CpuEvent:
        return _CpuEvent()

    def synchronize(self) -> None:
        pass


def _split_sizes_as_lists() -> None:
    """tensor_parallel/mappings.py:444 (the expert all-to-all) passes its split sizes as the tensors the
    dispatcher computed (as numpy arrays after a device-to-host copy, which a CPU tensor never makes);
    gloo's binding takes lists of ints."""
    import torch.distributed as dist

    all_to_all_single = dist.all_to_all_single

    def with_list_splits(output, input, output_split_sizes=None, input_split_sizes=None, **kwargs):
        as_list = lambda sizes: sizes.tolist() if hasattr(sizes, "tolist") else sizes  # noqa: E731
        return all_to_all_single(
            output, input, as_list(output_split_sizes), as_list(input_split_sizes), **kwargs
        )

    dist.all_to_all_single = with_list_splits


def fill_missing_te_names() -> None:
    """transformer/moe/moe_utils.py:1192 and 1225 (the router's gating GEMM) test `te_general_gemm is
    not None`, a name that module imports only when Transformer Engine is installed: without TE the test
    itself raises NameError. Defines it as None (torch's matmul then runs). Idempotent."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
