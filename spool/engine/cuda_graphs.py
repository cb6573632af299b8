"""CUDA graphs for decode-only steps: one captured forward per bucketed batch size.

Decode steps are launch-bound for small models (hundreds of small kernels per token). Each bucket's graph
reads static input buffers; a step copies its metadata into them (padding rows write no KV: slot -1) and
replays the smallest graph that fits. Attention kernels are launched with max_seq_len = max_model_len at
capture, so the launch grid covers any context the graph will later see.
"""
from __future__ import annotations

import logging
import time
from array import array
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from spool.engine.attention import AttentionMetadata, pack_block_tables

if TYPE_CHECKING:  # an annotation only
    from spool.engine.step_types import ScheduledChunk

log = logging.getLogger(__name__)


_capture_streams: dict[torch.device, torch.cuda.Stream] = {}


def capture_stream() -> torch.cuda.Stream:
    """The side stream every capture on the current device runs on: one per device, because each stream a cuBLAS
    call meets gets a workspace of its own that is never freed (on an H200, a dry capture on two new streams left
    64 MiB reserved: a new stream per capture leaked that much per (re)capture)."""
    device = torch.device("cuda", torch.cuda.current_device())
    if device not in _capture_streams:
        _capture_streams[device] = torch.cuda.Stream(device)
    return _capture_streams[device]


def capture_graph(fn, pool, stream: torch.cuda.Stream):
    """Capture fn() into a new CUDA graph allocating from pool, on stream (capture_stream()); returns (graph, fn's
    output).

    CUDAGraph.capture_begin/capture_end on a side stream rather than `torch.cuda.graph`, whose every entry runs
    gc.collect() and empty_cache(): over the dozens (decode) to hundreds (piecewise) of captures a runner makes,
    that was seconds of start-up. The caller orders the stream after its inputs are ready and before the outputs
    are read (Stream.wait_stream).
    """
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        graph.capture_begin(pool=pool)
        try:
            out = fn()
        finally:
            graph.capture_end()
    return graph, out


def bucket_sizes(max_bs: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to max_bs (max_bs itself included)."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_bs] + list(range(16, max_bs, 16))
    return sorted(set(sizes + [max_bs]))


class DecodeGraphs:
    """Captured decode forwards, replayed with fresh inputs."""

    def __init__(self, model, kv_caches, cos_sin, max_bs: int, max_model_len: int, block_size: int, device):
        self.model, self.kv_caches, self.cos_sin = model, kv_caches, cos_sin
        self.sizes = bucket_sizes(max_bs)
        self.max_bs = self.sizes[-1]
        self.width = -(-max_model_len // block_size)
        self.max_model_len = max_model_len
        g = self.max_bs
        i64, i32 = torch.int64, torch.int32
        self.input_ids = torch.zeros(g, dtype=i64, device=device)
        self.positions = torch.zeros(g, dtype=i64, device=device)
        self.slot_mapping = torch.full((g,), -1, dtype=i64, device=device)
        self.seq_lens = torch.ones(g, dtype=i32, device=device)
        self.block_tables = torch.zeros(g, self.width, dtype=i32, device=device)
        self.query_start_loc = torch.arange(g + 1, dtype=i32, device=device)
        self.logits_indices = torch.arange(g, dtype=i64, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        # Host staging in pinned memory: one [3, G] int64 block and one block table, filled then copied async.
        # (Pageable off CUDA, where nothing can be pinned: only bench/host_overhead.py builds them there.)
        # Two sets, alternated: with async scheduling a step's inputs are staged while the previous step's copies
        # may still wait in the stream; each set's last copies are fenced by an event before it is refilled.
        self._on_cuda = torch.device(device).type == "cuda"
        pin = self._on_cuda
        self._staging = [
            (torch.zeros(3, g, dtype=i64, pin_memory=pin), torch.zeros(g, self.width, dtype=i32, pin_memory=pin),
             torch.ones(g, dtype=i32, pin_memory=pin))
            for _ in range(2)
        ]
        self._staged: list[torch.cuda.Event | None] = [None, None]
        self._next = 0

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            input_ids=self.input_ids[:bs], positions=self.positions[:bs], slot_mapping=self.slot_mapping[:bs],
            query_start_loc=self.query_start_loc[: bs + 1], seq_lens=self.seq_lens[:bs],
            block_tables=self.block_tables[:bs], max_query_len=1, max_seq_len=self.max_model_len,
            logits_indices=self.logits_indices[:bs],
        )

    @torch.inference_mode()
    def capture(self) -> None:
        """Warm up and capture every bucket, largest first, sharing one memory pool."""
        t0 = time.perf_counter()
        self.slot_mapping.fill_(-1)  # the warm-up runs write no KV (after steps ran, the buffer holds real slots)
        pool = torch.cuda.graph_pool_handle()
        stream = capture_stream()
        for bs in reversed(self.sizes):
            meta = self._meta(bs)
            self.model(meta, self.kv_caches, self.cos_sin)  # compile/autotune outside the capture
            torch.cuda.synchronize()
            stream.wait_stream(torch.cuda.current_stream())
            self.graphs[bs], self.outputs[bs] = capture_graph(
                lambda: self.model(meta, self.kv_caches, self.cos_sin), pool, stream)
            torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        log.info("captured %d decode CUDA graphs (batch %d..%d) in %.1fs", len(self.sizes), self.sizes[0],
                 self.max_bs, time.perf_counter() - t0)

    def fits(self, num_seqs: int, max_blocks: int) -> bool:
        """True when a decode step of this size can replay a graph."""
        return bool(self.graphs) and num_seqs <= self.max_bs and max_blocks <= self.width

    def run(
        self, chunks: Sequence[ScheduledChunk], max_blocks: int, block_size: int,
        feed: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Replay the smallest fitting graph for decode chunks (one token each); returns hidden states [B, hidden].

        max_blocks: the longest block table among the chunks. feed = (rows [2, K] int64: input rows, source rows;
        sampled ids [R] int64), both on the device: input ids that only the device knows yet (async
        scheduling), copied in after the staged ones.
        """
        b = len(chunks)
        bs = next(s for s in self.sizes if s >= b)
        k = self._next
        self._next ^= 1
        if self._staged[k] is not None:
            self._staged[k].synchronize()  # that set's copies (two steps ago) have left: in practice no wait
        vec, tab, lens = self._staging[k]
        # The block tables packed to max_blocks columns (zero-padded). Only the columns in use are staged: the
        # kernel never reads a row past its own sequence's last block, so stale entries beyond them are
        # harmless, and padding every row to max_model_len would cost milliseconds.
        maxb = max_blocks
        ids = array("q", [c.token_ids[0] for c in chunks])
        ids.extend([c.start_pos for c in chunks])
        vec[:2, :b] = torch.frombuffer(ids, dtype=torch.int64).view(2, b)
        tab[:b, :maxb] = pack_block_tables([c.block_table for c in chunks], maxb)
        pos = vec[1, :b]
        rows = tab[:b].gather(1, (pos // block_size).view(b, 1).to(torch.int64)).view(b).to(torch.int64)
        vec[2, :b] = rows * block_size + pos % block_size
        lens[:b] = pos + 1  # seq_lens
        if bs > b:  # padding rows: write no KV, attend to one (ignored) slot
            vec[:, b:bs] = 0
            vec[2, b:bs] = -1
            lens[b:bs] = 1
            tab[b:bs, :maxb] = 0
        self.input_ids[:bs].copy_(vec[0, :bs], non_blocking=True)
        self.positions[:bs].copy_(vec[1, :bs], non_blocking=True)
        self.slot_mapping[:bs].copy_(vec[2, :bs], non_blocking=True)
        self.seq_lens[:bs].copy_(lens[:bs], non_blocking=True)
        self.block_tables[:bs, :maxb].copy_(tab[:bs, :maxb], non_blocking=True)
        if self._on_cuda:
            self._staged[k] = torch.cuda.Event()
            self._staged[k].record()
        if feed is not None:
            rows, sampled = feed
            self.input_ids.index_copy_(0, rows[0], sampled.index_select(0, rows[1]))
        self.graphs[bs].replay()
        return self.outputs[bs][:b]
