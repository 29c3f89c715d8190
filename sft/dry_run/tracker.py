"""Live tensor memory by part, and its peak: a dispatch mode that follows every storage an op creates.

Works on fake tensors (the dry run: nothing is allocated, the sizes are known) and on real ones (how
the dry run is checked against the allocator). Each storage is counted once, from the op that first
returns it until it is freed (a weak reference with a callback), under the part that was current when
it was created; `assign` moves known objects (weights, gradient buffers, optimizer state) to their part.

    tracker = MemoryTracker()
    with tracker:
        with tracker.part("activations"):
            y = model(x)
    tracker.peak_bytes, tracker.peak_parts
"""

from __future__ import annotations

import contextlib
import weakref
from collections import defaultdict
from collections.abc import Iterable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

PARTS = ("weights", "grads", "optimizer", "activations", "logits", "other")

_SCALAR = torch.ops.aten._local_scalar_dense.default


class _Storage:
    __slots__ = ("nbytes", "part", "ref")

    def __init__(self, nbytes: int, part: str):
        self.nbytes, self.part, self.ref = nbytes, part, None


class MemoryTracker(TorchDispatchMode):
    """`fake_scalar`: what `.item()` of a fake tensor returns (fake tensors have no values; the dry run
    only needs the code to go on)."""

    def __init__(self, fake_scalar: float | None = None):
        super().__init__()
        self.fake_scalar = fake_scalar
        self._current_part = "other"
        self._storages: dict[int, _Storage] = {}  # id of the live storage object -> its entry
        self.live = defaultdict(int)  # part -> bytes
        self.live_bytes = 0
        self.peak_bytes = 0
        self.peak_parts: dict[str, int] = dict.fromkeys(PARTS, 0)

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        """Storages created inside are counted under `name`."""
        previous, self._current_part = self._current_part, name
        try:
            yield
        finally:
            self._current_part = previous

    def __enter__(self):
        # megatron-core frees and restores some outputs by resizing their storage (the norms'
        # recomputation, CheckpointWithoutOutput): an op-level view would miss it
        resize, tracker = torch.UntypedStorage.resize_, self

        def counted_resize(storage, nbytes):
            entry = tracker._storages.get(id(storage))
            result = resize(storage, nbytes)
            if entry is not None and entry.ref() is storage:
                tracker._resize(entry, int(nbytes))
            return result

        self._resize_before = resize
        torch.UntypedStorage.resize_ = counted_resize
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._resize_before
        return super().__exit__(*exc)

    def _resize(self, entry: _Storage, nbytes: int) -> None:
        self.live[entry.part] += nbytes - entry.nbytes
        self.live_bytes += nbytes - entry.nbytes
        entry.nbytes = nbytes
        self._update_peak()

    def switch(self, name: str) -> None:
        """From now on, until the enclosing `part` ends, storages are counted under `name`."""
        self._current_part = name

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is _SCALAR and self.fake_scalar is not None and _is_fake(args[0]):
            return _typed_scalar(args[0].dtype, self.fake_scalar)
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self._track(tensor)
        return out

    def assign(self, tensors: Iterable[torch.Tensor], part: str) -> None:
        """Counts these tensors' storages under `part` (tracking them if they were made elsewhere)."""
        for tensor in tensors:
            entry = self._track(tensor)
            if entry.part != part:
                self._move(entry, part)

    def _track(self, tensor: torch.Tensor) -> _Storage:
        storage = tensor.untyped_storage()
        entry = self._storages.get(id(storage))
        if entry is not None and entry.ref() is storage:
            return entry
        entry = _Storage(storage.nbytes(), self._current_part)
        key = id(storage)
        entry.ref = weakref.ref(storage, lambda _ref, key=key, entry=entry: self._free(key, entry))
        self._storages[key] = entry
        self.live[entry.part] += entry.nbytes
        self.live_bytes += entry.nbytes
        self._update_peak()
        return entry

    def _free(self, key: int, entry: _Storage) -> None:
        if self._storages.get(key) is entry:
            del self._storages[key]
        self.live[entry.part] -= entry.nbytes
        self.live_bytes -= entry.nbytes

    def _move(self, entry: _Storage, part: str) -> None:
        self.live[entry.part] -= entry.nbytes
        self.live[part] += entry.nbytes
        entry.part = part
        if self.live_bytes == self.peak_bytes:
            self.peak_parts = {name: self.live[name] for name in PARTS}

    def _update_peak(self) -> None:
        if self.live_bytes > self.peak_bytes:
            self.peak_bytes = self.live_bytes
            self.peak_parts = {name: self.live[name] for name in PARTS}

    def reset_peak(self) -> None:
        """Starts a new peak from what is live now."""
        self.peak_bytes = self.live_bytes
        self.peak_parts = {name: self.live[name] for name in PARTS}


def _is_fake(tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(tensor, FakeTensor)


def _typed_scalar(dtype: torch.dtype, value: float):
    if dtype == torch.bool:
        return bool(value)
    if dtype.is_floating_point:
        return float(value)
    return int(value)
