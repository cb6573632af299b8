"""Swap: a preempted sequence's KV blocks go to host memory and come back, instead of being recomputed.

vLLM v0's swap, with the block copies batched: the scheduler decides (Scheduler._preempt: sequences with at
least swap_min_tokens computed tokens, while the host budget lasts; shorter ones are recomputed, which is
cheaper than the copies) and lists (sequence, device blocks) to copy out and in; SwapSpace runs those copies
on the device's stream right before the step that reuses the freed blocks (swap-out) or reads the restored
ones (swap-in), so no host sync is needed. Per swap-out, each layer's K and V blocks are gathered into one
staging tensor on the device and copied to pinned host memory at once (non-blocking); a swap-in copies it back
and scatters it into the sequence's new blocks. Copies are raw bytes, so any KV dtype (bf16, fp8) round-trips
exactly.
"""
from __future__ import annotations

import torch

from spool.engine.step_types import SchedulerOutput


def _raw(cache: torch.Tensor) -> torch.Tensor:
    """A KV cache tensor [num_blocks, block_size, kv_heads, head_dim] viewed as bytes (same first dimension)."""
    return cache.view(torch.uint8)


class SwapSpace:
    """Host copies of swapped-out sequences' KV, keyed by sequence id; the scheduler keeps their budget."""

    def __init__(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]):
        self.kv_caches = kv_caches
        self.device = kv_caches[0][0].device
        self.host: dict[str, torch.Tensor] = {}  # seq id -> [2 * layers, blocks, block bytes...] uint8

    @torch.inference_mode()
    def apply(self, sched: SchedulerOutput) -> None:
        """Queue this step's swap copies: drop finished sequences' copies, then swap out, then swap in."""
        for seq_id in sched.finished_seq_ids:
            self.host.pop(seq_id, None)
        # Out before in: a block freed by a swap-out this step may be a swap-in's destination.
        for seq_id, blocks in sched.swap_out:
            self.host[seq_id] = self._gather(blocks)
        for seq_id, blocks in sched.swap_in:
            self._scatter(self.host.pop(seq_id), blocks)

    def _index(self, blocks: list[int]) -> torch.Tensor:
        idx = torch.tensor(blocks, dtype=torch.int64)
        return idx.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else idx

    def _gather(self, blocks: list[int]) -> torch.Tensor:
        """Copy blocks of every layer to host memory: [2 * layers, len(blocks), block bytes...] uint8."""
        idx = self._index(blocks)
        first = _raw(self.kv_caches[0][0])
        stage = torch.empty((2 * len(self.kv_caches), len(blocks), *first.shape[1:]), dtype=torch.uint8,
                            device=self.device)
        for layer, (k, v) in enumerate(self.kv_caches):
            torch.index_select(_raw(k), 0, idx, out=stage[2 * layer])
            torch.index_select(_raw(v), 0, idx, out=stage[2 * layer + 1])
        if self.device.type != "cuda":
            return stage
        host = torch.empty(stage.shape, dtype=torch.uint8, pin_memory=True)
        host.copy_(stage, non_blocking=True)
        return host

    def _scatter(self, host: torch.Tensor, blocks: list[int]) -> None:
        """Copy a swapped-out sequence's blocks back into `blocks` of every layer."""
        idx = self._index(blocks)
        stage = host.to(self.device, non_blocking=True) if self.device.type == "cuda" else host
        for layer, (k, v) in enumerate(self.kv_caches):
            _raw(k).index_copy_(0, idx, stage[2 * layer])
            _raw(v).index_copy_(0, idx, stage[2 * layer + 1])
