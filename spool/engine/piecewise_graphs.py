"""Piecewise CUDA graphs for steps with prompt tokens: everything but attention captured per token bucket.

An eager step with a prompt chunk launches ~300 kernels through Python; for a small model the host takes longer
to launch them than the GPU to run them (qwen3-0.6b on an H200: 20-30 ms of host time for ~19 ms of GPU time,
bench/RESULTS.md, seventh session). Attention cannot be captured for such steps (its grid follows the step's
sequences and query lengths), everything else can: its shapes follow the token count alone. So, as vLLM v1 does,
each layer is cut at attention: segment 0 is the embedding and layer 0 up to attention (norm, qkv projection,
rotary, KV write); segment i is layer i-1 after attention (o_proj, norm, MLP) and layer i up to attention; the
last segment is the last layer after attention and the final norm. A step copies its ids, positions and KV slots
into static buffers (padding rows write no KV: slot -1), then replays segment 0, runs attention eagerly on the
real rows into the segment's output buffer, replays segment 1, and so on.

All segments of all buckets share one memory pool, captured in order. The tensors passed between segments are
held as non-owning views (weak_view), as vLLM holds them, so a later capture may reuse their memory: safe because
the segments always replay in the order they were captured, each consuming its predecessor's outputs before
anything later runs.
"""
from __future__ import annotations

import logging
import time

import torch

from spool.engine.attention import AttentionMetadata
from spool.engine.cuda_graphs import capture_graph, capture_stream

log = logging.getLogger(__name__)

_TYPESTR = {1: "|u1", 2: "<i2", 4: "<i4", 8: "<i8"}


def token_buckets(max_tokens: int) -> list[int]:
    """Token counts graphs are captured for: 64, 128, every 256 to 4096, then every 512; max_tokens included.

    A step pads its tokens up to the next bucket: at most 256 rows below 4096 and 512 above, a few percent of
    the step's GEMM work, against the milliseconds of host time a replay saves.
    """
    sizes = [s for s in (64, 128) if s < max_tokens]
    sizes += [s for s in range(256, min(max_tokens, 4096) + 1, 256) if s < max_tokens]
    sizes += [s for s in range(4608, max_tokens, 512)]
    return sorted(set(sizes + [max_tokens]))


class _CudaArray:
    """A __cuda_array_interface__ over a tensor's memory that does not keep its storage alive."""

    def __init__(self, t: torch.Tensor):
        size = t.element_size()
        self.__cuda_array_interface__ = {
            "shape": tuple(t.shape), "typestr": _TYPESTR[size], "data": (t.data_ptr(), False), "version": 3,
            "strides": tuple(s * size for s in t.stride()),
        }


def weak_view(t: torch.Tensor) -> torch.Tensor:
    """A tensor over t's memory that does not own it: when t is freed its memory goes back to the allocator (here,
    the graphs' pool) while the view still reads and writes the same addresses."""
    raw = torch.as_tensor(_CudaArray(t), device=t.device)
    return raw.view(t.dtype)


class PiecewiseGraphs:
    """Captured per-layer segments of the forward pass, replayed with eager attention between them.

    Off CUDA (tests) nothing is captured: run() calls the segments directly, through the same static buffers
    and padding, so the segmentation is checked against the model's own forward on the CPU.
    """

    def __init__(self, model, kv_caches, cos_sin, max_tokens: int, device):
        self.model, self.kv_caches, self.cos_sin = model, kv_caches, cos_sin
        self.sizes = token_buckets(max_tokens)
        self.max_tokens = self.sizes[-1]
        n = self.max_tokens
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}
        # per bucket, per segment: (q, k, v, residual, attention output) between layers; the hidden states last
        self.outputs: dict[int, list] = {}

    def fits(self, num_tokens: int) -> bool:
        """True when a step of this many tokens can run here."""
        return num_tokens <= self.max_tokens

    def _segment(self, i: int, t: int, prev):
        """Segment i at t tokens: layer i-1 after attention (from prev, segment i-1's outputs, its attention output
        filled), then layer i up to attention. Returns (q, k, v, residual, an empty attention output), or the hidden
        states for i == num_layers."""
        m = self.model
        if i == 0:
            x, residual = m.embed_tokens(self.input_ids[:t]), None
        else:
            *_, residual, o = prev
            x, residual = m.layers[i - 1].attn_out(o, residual)
        if i == len(m.layers):
            return m.final_norm(x, residual)
        q, k, v, residual = m.layers[i].attn_in(
            x, residual, self.positions[:t], self.slot_mapping[:t], self.kv_caches[i], self.cos_sin)
        return q, k, v, residual, torch.empty(q.shape, dtype=q.dtype, device=q.device)

    @torch.inference_mode()
    def capture(self) -> None:
        """Warm up and capture every bucket's segments, largest bucket first, all in one memory pool, on one side
        stream (spool.engine.cuda_graphs.capture_graph)."""
        t0 = time.perf_counter()
        self.slot_mapping.fill_(-1)  # the warm-up runs write no KV (after steps ran, the buffer holds real slots)
        reserved = torch.cuda.memory_reserved()
        pool = torch.cuda.graph_pool_handle()
        stream = capture_stream()
        n = len(self.model.layers) + 1
        for t in reversed(self.sizes):
            prev = None
            for i in range(n):  # eager warm-up: Triton compiles and cuBLAS picks its kernels outside the capture
                prev = self._segment(i, t, prev)
            del prev
            torch.cuda.synchronize()
            torch.cuda.empty_cache()  # the warm-up's activations: the capture allocates its own in the pool
            graphs, outs, prev = [], [], None
            stream.wait_stream(torch.cuda.current_stream())
            for i in range(n):
                graph, out = capture_graph(lambda: self._segment(i, t, prev), pool, stream)
                graphs.append(graph)
                outs.append(out)
                prev = out
                if i:  # the previous segment's outputs are captured as consumed: let later captures reuse them
                    outs[i - 1] = tuple(map(weak_view, outs[i - 1]))
            torch.cuda.current_stream().wait_stream(stream)
            outs[-1] = weak_view(outs[-1])
            self.graphs[t], self.outputs[t] = graphs, outs
        torch.cuda.synchronize()
        log.info("captured piecewise CUDA graphs for %d token buckets (%d..%d tokens, %d segments each) in %.1fs, "
                 "%.0f MiB", len(self.sizes), self.sizes[0], self.max_tokens, n, time.perf_counter() - t0,
                 (torch.cuda.memory_reserved() - reserved) / 2**20)

    def run(self, meta: AttentionMetadata) -> torch.Tensor:
        """The forward pass of the step meta describes: returns its hidden states [T, hidden]."""
        t = meta.num_tokens
        bs = next(s for s in self.sizes if s >= t)
        self.input_ids[:t].copy_(meta.input_ids)
        self.positions[:t].copy_(meta.positions)
        self.slot_mapping[:t].copy_(meta.slot_mapping)
        self.slot_mapping[t:bs].fill_(-1)  # padding rows write no KV (their ids and positions are stale, harmless)
        graphs, outs = self.graphs.get(bs), self.outputs.get(bs)
        layers = self.model.layers
        prev = None
        for i, layer in enumerate(layers):
            if graphs is None:
                out = self._segment(i, bs, prev)
            else:
                graphs[i].replay()
                out = outs[i]
            q, k, v, _, o = out
            layer.self_attn.attend(q[:t], k[:t], v[:t], meta, self.kv_caches[i], out=o[:t])
            prev = out
        if graphs is None:
            return self._segment(len(layers), bs, prev)[:t]
        graphs[-1].replay()
        return outs[-1][:t]
