"""ModelRunner: owns the device: weights, KV cache, per-step metadata, the forward pass and sampling."""
from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from spool.engine.async_step import device_feed
from spool.engine.attention import AttentionMetadata, pack_block_tables
from spool.engine.config import ConfigError, EngineConfig, ModelConfig
from spool.engine.cuda_graphs import DecodeGraphs
from spool.engine.distributed import SINGLE, TPGroup
from spool.engine.grammar_mask import MaskFill
from spool.engine.logits_rows import compute_logits, load_logits_kernels
from spool.engine.models.kv_scales import read_kv_scales
from spool.engine.models.loader import build_model
from spool.engine.models.parallel_linear import kv_heads_per_rank
from spool.engine.models.rope import cos_sin_cache
from spool.engine.piecewise_graphs import PiecewiseGraphs
from spool.engine.sampler import Sampler, SamplingRow, is_plain_greedy
from spool.engine.step_types import ForwardInFlight, PendingStep, SchedulerOutput
from spool.kernels.kv_layout import allocate_kv_cache
from spool.kernels.ops import get_ops

log = logging.getLogger(__name__)


class ModelRunner:
    """Runs one flat varlen batch per step over the paged KV cache and samples the next tokens."""

    def __init__(self, config: EngineConfig, model_cfg: ModelConfig, max_model_len: int, tp: TPGroup = SINGLE):
        self.config = config
        self.model_cfg = model_cfg
        self.tp = tp  # this rank's place under tensor parallelism (spool/engine/tp_executor.py); SINGLE otherwise
        self.num_kv_heads = kv_heads_per_rank(model_cfg.num_kv_heads, tp.world_size)  # heads in this rank's cache
        self.device = config.resolve_device()
        if self.device.type == "cuda" and self.device.index is not None:
            # Triton kernels and CUDA graphs launch on the current device, not the tensors': make them agree.
            torch.cuda.set_device(self.device)
        self.dtype = config.resolve_dtype(model_cfg, self.device)
        self.kv_cache_dtype = config.resolve_kv_cache_dtype(self.dtype)
        self.block_size = config.block_size
        self.max_model_len = max_model_len
        self.ops = get_ops(config.kernel_backend, self.device)
        self._check_kv_cache_dtype()
        torch.manual_seed(config.seed)
        self.model = build_model(
            model_cfg, Path(config.model), self.ops, self.device, self.dtype, config.load_format, config.seed,
            quantization=config.quantization, tp=tp,
        )
        self._set_kv_scales()
        self.cos_sin = cos_sin_cache(model_cfg, max_model_len, self.device)
        self.sampler = Sampler(model_cfg.vocab_size, self.device)
        use_graphs = self.device.type == "cuda" and self.ops.name == "triton" and not config.enforce_eager
        self.graphs: DecodeGraphs | None = None
        self.piecewise: PiecewiseGraphs | None = None  # steps with prompt tokens (spool/engine/piecewise_graphs.py)
        graph_tokens, graph_bytes = 0, 0
        if use_graphs:  # measured and tried over a one-block cache, before the KV cache is sized
            scratch = self._allocate_kv(1)
            graph_tokens = self._piecewise_tokens(scratch)
            if config.num_kv_blocks is None:
                graph_tokens, graph_bytes = self._graph_bytes(scratch, graph_tokens)
            del scratch
        self.num_blocks = tp.all_reduce_min(self._decide_num_blocks(graph_bytes))  # rank 0's ids index every rank
        self.kv_caches = self._allocate_kv(self.num_blocks)
        # V's storage order: spool.kernels.kv_layout
        v_layout = "V row-major" if self.kv_caches[0][1].is_contiguous() else "V keys-fastest"
        log.info("KV cache: %d blocks of %d tokens, %s, %s (%.1f MiB)", self.num_blocks, self.block_size,
                 str(self.kv_cache_dtype).removeprefix("torch."), v_layout,
                 self.num_blocks * self.bytes_per_block / 2**20)
        # Device memory the graphs took at start-up, and what the KV cache's sizing set aside for them.
        self.graph_bytes, self.graph_bytes_set_aside = 0, graph_bytes
        if use_graphs:
            def make_and_capture() -> None:
                self.graphs, self.piecewise = self._make_graphs(self.kv_caches, graph_tokens)
                self.capture_graphs()

            _, self.graph_bytes = _device_bytes_taken(self.device, make_and_capture)  # measured as _graph_bytes
            log.info("CUDA graphs: %.0f MiB (%.0f MiB set aside for them)", self.graph_bytes / 2**20,
                     graph_bytes / 2**20)
        load_logits_kernels(self.model, model_cfg.hidden_size, self.dtype, self.device, config.max_running_seqs)

    def _allocate_kv(self, num_blocks: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every layer's K and V caches of num_blocks blocks (spool.kernels.kv_layout)."""
        c = self.model_cfg
        return [allocate_kv_cache(num_blocks, self.block_size, self.num_kv_heads, c.head_dim, self.kv_cache_dtype,
                                  self.device) for _ in range(c.num_layers)]

    def _make_graphs(self, kv_caches, piecewise_tokens: int) -> tuple[DecodeGraphs, PiecewiseGraphs | None]:
        """The decode graphs and, for piecewise_tokens > 0, the piecewise graphs over kv_caches (not captured)."""
        cfg = self.config
        # Up to max_running_seqs: the priority-0 rows beside a full bulk batch replay graphs too.
        rows = min(cfg.max_num_seqs, 512) + cfg.max_running_seqs - cfg.max_num_seqs
        decode = DecodeGraphs(self.model, kv_caches, self.cos_sin, rows, self.max_model_len, self.block_size,
                              self.device)
        pieces = None
        if piecewise_tokens:
            pieces = PiecewiseGraphs(self.model, kv_caches, self.cos_sin, piecewise_tokens, self.device)
        return decode, pieces

    def _graph_bytes(self, scratch, piecewise_tokens: int) -> tuple[int, int]:
        """Capture every CUDA graph once over the one-block scratch cache, then release them: the device memory
        that took (their pools, and anything capturing allocates) is set aside before the KV cache is sized, so
        gpu_memory_utilization holds with the graphs in (vLLM profiles its graphs' memory the same way). If the
        piecewise graphs do not fit even then, steps with prompt tokens run eagerly. Returns (piecewise tokens,
        bytes); every rank sets aside the same, the most any rank needed.
        """
        def make_and_capture():
            decode, pieces = self._make_graphs(scratch, piecewise_tokens)
            decode.capture()
            return decode, pieces if pieces is not None and _captured(pieces) else None

        (decode, pieces), used = _device_bytes_taken(self.device, make_and_capture)
        if pieces is None:
            piecewise_tokens = 0
        del decode, pieces
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        return self.tp.all_reduce_min(piecewise_tokens), -self.tp.all_reduce_min(-used)

    def capture_graphs(self) -> None:
        """(Re)capture the decode and piecewise CUDA graphs. Scalars the kernels take as arguments (the fp8 KV
        scales) are baked into a capture: after changing them, capture again."""
        if self.graphs is not None:
            self.graphs.capture()
        if self.piecewise is not None and not _captured(self.piecewise):
            self.piecewise = None

    @property
    def piecewise_graph_tokens(self) -> int:
        """The most tokens a step with prompt tokens may have to replay piecewise graphs (0: none captured)."""
        return 0 if self.piecewise is None else self.piecewise.max_tokens

    @property
    def bytes_per_block(self) -> int:
        """KV bytes one block takes across all layers (K and V): fp8 caches hold twice the tokens of bf16."""
        c = self.model_cfg
        elem = torch.tensor([], dtype=self.kv_cache_dtype).element_size()
        return 2 * c.num_layers * self.block_size * self.num_kv_heads * c.head_dim * elem

    def _check_kv_cache_dtype(self) -> None:
        """Triton's fp8 kernels need compute capability 8.9+ (Ada, Hopper); the torch backend runs anywhere."""
        fp8_triton = self.kv_cache_dtype == torch.float8_e4m3fn and self.ops.name == "triton"
        if fp8_triton and self.device.type == "cuda":
            if torch.cuda.get_device_capability(self.device) < (8, 9):
                name = torch.cuda.get_device_name(self.device)
                raise ConfigError(f"kv_cache_dtype fp8 needs a GPU with FP8 (compute capability 8.9+: Ada, Hopper); "
                                  f"{name} has none: use kv_cache_dtype auto (or kernel_backend torch)")

    def _set_kv_scales(self) -> None:
        """Give each attention layer its fp8 k/v scales: the checkpoint's, else 1.0 (spool.engine.models.kv_scales)."""
        if self.kv_cache_dtype != torch.float8_e4m3fn:
            return
        num_layers = self.model_cfg.num_layers
        if self.config.load_format == "dummy":
            scales = [(1.0, 1.0)] * num_layers
        else:
            scales = read_kv_scales(Path(self.config.model), num_layers)
        for layer, (k_scale, v_scale) in zip(self.model.layers, scales):
            layer.self_attn.k_scale, layer.self_attn.v_scale = k_scale, v_scale

    def _decide_num_blocks(self, graph_bytes: int = 0) -> int:
        """config.num_kv_blocks, or what the memory left under gpu_memory_utilization holds (on CUDA: after the
        weights, a full step's activations and graph_bytes for the CUDA graphs)."""
        cfg = self.config
        if cfg.num_kv_blocks is not None:
            return cfg.num_kv_blocks
        if self.device.type == "cuda":
            free = self._profile_free_bytes() - graph_bytes
        else:
            # On the CPU a fixed byte budget, but never more than max_num_seqs full-length sequences can use.
            free = cfg.cpu_kv_cache_bytes
        blocks = int(free // self.bytes_per_block)
        cap = cfg.max_num_seqs * -(-self.max_model_len // self.block_size)
        blocks = min(blocks, cap) if self.device.type == "cpu" else blocks
        if blocks < 1:
            raise ConfigError("no memory left for the KV cache: lower max_num_batched_tokens or raise the budget")
        return blocks

    def _max_step_tokens(self) -> int:
        """The most tokens one step can carry."""
        return min(self.config.max_num_batched_tokens, self.max_model_len * self.config.max_num_seqs)

    def _prompt_batch(self, n: int, distinct_blocks: bool) -> tuple[AttentionMetadata, int]:
        """A step of n prompt tokens in sequences of up to max_model_len, and the KV blocks it spans. Its blocks are
        distinct (0..) or all block 0, which any cache has (the attention reads are the same amount)."""
        seq_len = min(n, self.max_model_len)
        nblk = -(-seq_len // self.block_size)
        lens = [seq_len] * (n // seq_len) + ([n % seq_len] if n % seq_len else [])
        tables = [list(range(i * nblk, (i + 1) * nblk)) if distinct_blocks else [0] * nblk for i in range(len(lens))]
        meta = self._metadata([[0] * ln for ln in lens], [0] * len(lens), tables, list(range(len(lens))))
        return meta, len(lens) * nblk

    def _profile_free_bytes(self) -> int:
        """Run a forward pass at max_num_batched_tokens; the KV cache gets what remains under the utilization cap."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        meta, blocks = self._prompt_batch(self._max_step_tokens(), distinct_blocks=True)
        shape = (blocks, self.block_size, self.num_kv_heads, self.model_cfg.head_dim)
        kv = [(torch.empty(shape, dtype=self.kv_cache_dtype, device=self.device),) * 2
              for _ in range(self.model_cfg.num_layers)]
        with torch.inference_mode():
            hidden = self.model(meta, kv, self.cos_sin)
            logits = self.model.compute_logits(hidden[meta.logits_indices])
            if logits is not None:  # only rank 0 holds logits and samples
                rows = max(self.config.max_running_seqs, meta.seq_lens.shape[0])
                # the sampler's float32 working copy and its softmax, at the most rows a step samples
                torch.softmax(logits.new_empty(rows, logits.shape[1], dtype=torch.float32), dim=-1)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        del kv, hidden, logits
        torch.cuda.empty_cache()
        _, total = torch.cuda.mem_get_info(self.device)
        return int(total * self.config.gpu_memory_utilization - peak)

    def _piecewise_tokens(self, kv_caches) -> int:
        """Up to how many tokens steps with prompt tokens replay piecewise graphs (0: none); the same on every rank.

        config.piecewise_graph_tokens, or when None the token count below which an eager step is host-bound
        (_host_bound_tokens). Above it the GPU hides the eager launches and padding to a bucket would only cost.
        """
        n = self._max_step_tokens()
        tokens = self.config.piecewise_graph_tokens
        if tokens is None:
            tokens = self._host_bound_tokens(n, kv_caches)
            if tokens < n:
                tokens -= tokens % 64  # a measured size, on the buckets' grid
        tokens = min(tokens, n)
        return self.tp.all_reduce_min(tokens if tokens >= 64 else 0)

    @torch.inference_mode()
    def _host_bound_tokens(self, n: int, kv_caches) -> int:
        """Measure an eager forward of n prompt tokens: the host's time to launch it (the median of three) and the
        GPU's time to run it, taken with the launches queued behind a sleep kernel so the GPU never waits for the
        host. The step writes no KV (slots -1) and reads block 0. Returns host_bound_tokens() of them.
        """
        meta, _ = self._prompt_batch(n, distinct_blocks=False)
        meta.slot_mapping.fill_(-1)
        for _ in range(2):  # compile and warm up
            self.model(meta, kv_caches, self.cos_sin)
        host = []
        for _ in range(3):
            torch.cuda.synchronize(self.device)
            t0 = time.perf_counter()
            self.model(meta, kv_caches, self.cos_sin)
            host.append(time.perf_counter() - t0)
        torch.cuda.synchronize(self.device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(int(4e9 * max(host)) + 1_000_000)  # cycles: twice the host time at up to 2 GHz
        start.record()
        self.model(meta, kv_caches, self.cos_sin)
        end.record()
        torch.cuda.synchronize(self.device)
        gpu = start.elapsed_time(end) / 1000
        torch.cuda.empty_cache()
        tokens = host_bound_tokens(n, host, gpu)
        log.info("eager step of %d prompt tokens: host %.1f ms (median of %s), GPU %.1f ms: piecewise graphs up "
                 "to %d tokens", n, _median(host) * 1e3, ", ".join(f"{h * 1e3:.1f}" for h in host), gpu * 1e3,
                 min(tokens, n))
        return tokens

    def _metadata(
        self, chunks: list[list[int]], starts: list[int], tables: Sequence[Sequence[int]], sample_rows: list[int]
    ) -> AttentionMetadata:
        """Flatten chunks into one varlen batch: ids, positions, slots, block tables, lengths, sample rows."""
        lens = [len(c) for c in chunks]
        num_seqs = len(chunks)
        input_ids = torch.tensor([t for c in chunks for t in c], dtype=torch.int64)
        lens_t = torch.tensor(lens, dtype=torch.int64)
        starts_t = torch.tensor(starts, dtype=torch.int64)
        qsl = torch.zeros(num_seqs + 1, dtype=torch.int64)
        torch.cumsum(lens_t, 0, out=qsl[1:])
        num_tokens = len(input_ids)
        seq_idx = torch.arange(num_seqs).repeat_interleave(lens_t, output_size=num_tokens)  # [T]
        positions = torch.arange(num_tokens) - qsl[:-1][seq_idx] + starts_t[seq_idx]  # [T]
        block_tables = pack_block_tables(tables)  # [num_seqs, max_blocks] int32
        slots = block_tables[seq_idx, positions // self.block_size].long() * self.block_size + positions % self.block_size
        seq_lens = starts_t + lens_t
        logits_idx = qsl[1:][torch.tensor(sample_rows, dtype=torch.int64)] - 1
        return AttentionMetadata(
            input_ids=self._to_device(input_ids),
            positions=self._to_device(positions),
            slot_mapping=self._to_device(slots),
            query_start_loc=self._to_device(qsl.to(torch.int32)),
            seq_lens=self._to_device(seq_lens.to(torch.int32)),
            block_tables=self._to_device(block_tables),
            max_query_len=max(lens),
            max_seq_len=int(seq_lens.max()),
            logits_indices=self._to_device(logits_idx),
        )

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """Host-to-device through pinned memory (torch's caching host allocator), so the copy is async."""
        if self.device.type != "cuda":
            return t
        return t.pin_memory().to(self.device, non_blocking=True)

    def _feed_tensors(
        self, rows: list[int], src: list[int], previous: PendingStep
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """([2, K] int64 device: destination input rows, source rows) and the previous step's sampled ids."""
        idx = self._to_device(torch.tensor([rows, src], dtype=torch.int64))  # [2, K]
        return idx, previous.device_tokens

    def launch(self, sched: SchedulerOutput, previous: PendingStep | None = None) -> PendingStep:
        """Run the model on the scheduled chunks and sample one token for each chunk that ends its sequence.

        The forward pass and sampling are queued on the device; this returns without waiting for them.
        `previous` is the step launched before this one when its tokens have not reached the host yet (async
        scheduling): chunks in sched.device_input_rows take their last input token from its sampled ids.

        Until result() the caller may do host work (Redis I/O in the worker) while the GPU computes. At most
        one earlier step may still be unfinished when this is called (the decode graphs' host staging is
        double-buffered).
        """
        return self.launch_sampling(self.launch_forward(sched, previous))

    @torch.inference_mode()
    def launch_forward(self, sched: SchedulerOutput, previous: PendingStep | None = None) -> ForwardInFlight:
        """launch()'s first half: queue the forward pass and the logits; sampling waits for launch_sampling().

        Between the two the host may apply the previous step (async scheduling with grammar masks and other
        rows that sample from their output history: spool/engine/async_step.py), so the rows read its tokens.
        """
        for seq_id in sched.finished_seq_ids:
            self.sampler.release(seq_id)
        if not sched.chunks:
            return ForwardInFlight(sched, [], None)
        chunks = sched.chunks
        sample_rows = [i for i, c in enumerate(chunks) if c.sample]
        decode_only = len(sample_rows) == len(chunks) == sched.num_batched_tokens
        feed_rows, feed_src = device_feed(sched, previous)
        use_graphs = decode_only and self.graphs is not None
        max_blocks = max(len(c.block_table) for c in chunks) if use_graphs else 0
        if use_graphs and self.graphs.fits(len(chunks), max_blocks):
            feed = self._feed_tensors(feed_rows, feed_src, previous) if feed_rows else None  # one token per chunk
            hidden = self.graphs.run(chunks, max_blocks, self.block_size, feed)  # [S, hidden]
            logits = compute_logits(self.model, hidden)  # [S, vocab]
        else:
            meta = self._metadata(
                [c.token_ids for c in chunks], [c.start_pos for c in chunks], [c.block_table for c in chunks],
                sample_rows,
            )
            if feed_rows:
                # A pending token is its chunk's last: its flat row is the chunk's end - 1.
                ends = list(itertools.accumulate(len(c.token_ids) for c in chunks))
                idx, tokens = self._feed_tensors([ends[i] - 1 for i in feed_rows], feed_src, previous)
                meta.input_ids.index_copy_(0, idx[0], tokens.index_select(0, idx[1]))  # on the device, in order
            if self.piecewise is not None and self.piecewise.fits(meta.num_tokens):
                hidden = self.piecewise.run(meta)  # [T, hidden]
            else:
                hidden = self.model(meta, self.kv_caches, self.cos_sin)  # [T, hidden]
            if not sample_rows:
                return ForwardInFlight(sched, [], None)
            logits = compute_logits(self.model, hidden[meta.logits_indices])  # [S, vocab]
        # logits is None on a tensor-parallel rank other than 0: rank 0 samples
        return ForwardInFlight(sched, sample_rows, logits)

    def start_grammar_mask(self, forward: ForwardInFlight, unmasked: frozenset[str] = frozenset()) -> MaskFill | None:
        """Start filling, in the background, the grammar bitmask that launch_sampling(forward, unmasked) needs
        (None when no row has a grammar): the caller detokenizes meanwhile (spool/engine/grammar_mask.py)."""
        if forward.logits is None:
            return None
        chunks = forward.sched.chunks
        grammars = [c.grammar for c in (chunks[i] for i in forward.sample_rows)
                    if c.grammar is not None and c.seq_id not in unmasked]
        return self.sampler.start_mask(grammars) if grammars else None

    @torch.inference_mode()
    def launch_sampling(self, forward: ForwardInFlight, unmasked: frozenset[str] = frozenset(),
                        mask: MaskFill | None = None) -> PendingStep:
        """launch()'s second half: build the sampling rows from the sequences' state now and queue the sampling.

        `unmasked`: sequences that finished after this step was launched; their token is discarded, so their
        row skips the grammar mask (a terminated matcher has no next token to allow). `mask`: the rows'
        bitmask fill from start_grammar_mask(forward, unmasked), if started.
        """
        logits, sample_rows = forward.logits, forward.sample_rows
        if logits is None:
            return PendingStep([], None)
        chunks = forward.sched.chunks
        seq_ids = [chunks[i].seq_id for i in sample_rows]
        if _all_plain_greedy(chunks, sample_rows):  # the common decode batch: no per-row state to build
            return PendingStep(seq_ids, self.sampler.launch_greedy(logits))
        rows = []
        eos = self.model_cfg.eos_token_ids
        for i in sample_rows:
            c = chunks[i]
            p = c.params
            # The output history matters only to penalties and min_tokens; skip the copy otherwise.
            needs_history = (p.min_tokens > 0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
                             or p.repetition_penalty != 1.0)
            out_ids = c.all_token_ids[len(c.prompt_token_ids):] if needs_history else []
            grammar = c.grammar if not unmasked or c.seq_id not in unmasked else None
            rows.append(SamplingRow(p, c.prompt_token_ids, out_ids, c.seed, eos, c.seq_id, grammar))
        return PendingStep(seq_ids, self.sampler.launch(logits, rows, mask))


def host_bound_tokens(n: int, host_s: list[float], gpu_s: float) -> int:
    """The token count below which an eager step is host-bound, from a step of n tokens: host time (the median of
    host_s) hardly depends on the token count and GPU time grows with it, so n * host / gpu. An estimate on the
    safe side for padding: a small step's GPU time lies above the straight line."""
    host = _median(host_s)
    return int(n * host / gpu_s) if gpu_s > 0 else n


def _device_bytes_taken(device: torch.device, fn):
    """(fn(), the device memory it left taken): free memory before minus after, with the caching allocator's unused
    blocks (a warm-up's activations) released on both sides, so what counts is what fn's results hold."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    free = torch.cuda.mem_get_info(device)[0]
    out = fn()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    return out, max(0, free - torch.cuda.mem_get_info(device)[0])


def _captured(pieces: PiecewiseGraphs) -> bool:
    """Capture the piecewise graphs; False, logged, if the device runs out of memory doing so (their steps then run
    eagerly: nothing else depends on them)."""
    try:
        pieces.capture()
        return True
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        log.warning("no memory left for the piecewise CUDA graphs: steps with prompt tokens run eagerly "
                    "(lower gpu_memory_utilization to have them)")
        return False


def _median(xs: list[float]) -> float:
    """The middle sample (the upper middle of an even count)."""
    return sorted(xs)[len(xs) // 2]


def _all_plain_greedy(chunks: list, sample_rows: list[int]) -> bool:
    """Every sampled chunk is a bare argmax (spool.engine.sampler.is_plain_greedy, no grammar). Rows of one request
    share its params object, so a run of them is checked once."""
    last = None
    for i in sample_rows:
        c = chunks[i]
        if c.grammar is not None:
            return False
        p = c.params
        if p is not last:
            if not is_plain_greedy(p):
                return False
            last = p
    return True
