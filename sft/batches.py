"""Each step's micro-batches for this rank, with the next step's prepared in a background thread.

    batches = StepBatches(data, config, layout, dp_rank, dp_size, cp_rank, device="cuda")
    micro_batches = batches.get(consumed_samples)     # this step's, on the device
    batches.close()

Reading the packs, building the THD rows (sft/data.py) and pinning them stays off the step's critical
path with data.prefetch; the copy to the GPU is the step's own.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch

from plan.layout import ParallelLayout

from .config import TrainConfig
from .data import MicroBatch, SFTData


class StepBatches:
    """The micro-batches of the data-parallel rank `dp_rank` (of `dp_size`; `cp_rank`: its share of
    each row) for the global batch at a data position; collective only in that every rank reads its own."""

    def __init__(
        self,
        data: SFTData,
        config: TrainConfig,
        layout: ParallelLayout,
        dp_rank: int,
        dp_size: int,
        cp_rank: int,
        device: str,
    ):
        self.data, self.layout, self.device = data, layout, device
        self.dp_rank, self.dp_size, self.cp_rank = dp_rank, dp_size, cp_rank
        self.global_batch_size = config.schedule.global_batch_size
        loss = config.loss
        self.loss_group_size = loss.group_size if loss.normalization == "per_group" else None
        self._prefetcher = ThreadPoolExecutor(1, "prefetch") if config.data.prefetch else None
        self._prefetched: tuple[int, Future] | None = None  # (consumed samples it is for, its future)

    def get(self, consumed: int) -> list[MicroBatch]:
        """The micro-batches of the global batch at `consumed`, on the device; with data.prefetch, those
        of the following global batch are prepared meanwhile."""
        prefetched, self._prefetched = self._prefetched, None
        batches = prefetched[1].result() if prefetched and prefetched[0] == consumed else None
        if batches is None:
            batches = self._prepare(consumed)
        if self._prefetcher is not None:
            following = consumed + self.global_batch_size
            self._prefetched = (following, self._prefetcher.submit(self._prepare, following))
        if self.device == "cuda":
            return [mb.to(torch.cuda.current_device()) for mb in batches]
        return batches

    def close(self) -> None:
        """Stops the prefetch thread (idempotent)."""
        if self._prefetcher is not None:
            self._prefetcher.shutdown(wait=True, cancel_futures=True)
            self._prefetcher = None

    def _prepare(self, consumed: int) -> list[MicroBatch]:
        batches = self.data.micro_batches(
            consumed,
            self.global_batch_size,
            self.layout,
            self.dp_rank,
            self.dp_size,
            self.cp_rank,
            self.loss_group_size,
        )
        return [mb.pin_memory() for mb in batches] if self.device == "cuda" else batches
