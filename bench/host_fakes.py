"""The device stand-ins of bench/host_overhead.py: a fake model, graphs that replay nothing, a simulated device
clock, and (at real vocabularies) a sampler whose device math is replaced by a cheap token pick.

Everything here replaces device work only, so that what host_overhead times is the engine's host code.
"""
from __future__ import annotations

import random
import time

import torch

from spool.engine.cuda_graphs import DecodeGraphs

# Above this many ids, [rows, vocab] logits on the CPU would cost more than the host work being measured:
# the sampler's device math is faked (FakeSampling) and the model's logits are an unread placeholder.
FAKE_SAMPLING_FROM_VOCAB = 4096


class FakeModel:
    """Stands in for the decoder on the device: zero hidden states, logits from a pool of one-hot rows
    (or, at a large vocabulary where FakeSampling picks the tokens, one unread placeholder)."""

    def __init__(self, hidden_size: int, vocab_size: int, token_stream: list[int], max_rows: int, pool: int = 16):
        self.hidden_size = hidden_size
        self._pool = []
        if vocab_size >= FAKE_SAMPLING_FROM_VOCAB:
            self._pool.append(torch.empty(max_rows, vocab_size))  # never touched: FakeSampling ignores it
        rng = random.Random(0)
        for _ in range(pool if not self._pool else 0):
            start = rng.randrange(len(token_stream))
            ids = [token_stream[(start + 7 * r) % len(token_stream)] for r in range(max_rows)]
            logits = torch.zeros(max_rows, vocab_size)
            logits[torch.arange(max_rows), torch.tensor(ids)] = 1.0
            self._pool.append(logits)
        self._calls = 0

    def __call__(self, meta, kv_caches, cos_sin) -> torch.Tensor:
        return torch.zeros(meta.num_tokens, self.hidden_size)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        self._calls += 1
        return self._pool[self._calls % len(self._pool)][: hidden.shape[0]]

    def argmax_seconds(self, rows: int, reps: int = 50) -> float:
        """Mean time of the sampler's greedy argmax over `rows` rows of logits, on its own."""
        logits = self._pool[0][:rows]
        t0 = time.perf_counter()
        for _ in range(reps):
            logits.argmax(dim=-1)
        return (time.perf_counter() - t0) / reps


class NoReplay:
    """A captured graph whose replay costs nothing (the forward pass is what this benchmark leaves out)."""

    def replay(self) -> None:
        pass


def fake_device(engine, token_stream: list[int]) -> FakeModel:
    """Swap the runner's model for FakeModel and give it CPU decode graphs that replay nothing."""
    runner, cfg = engine.runner, engine.model_cfg
    max_bs = min(engine.config.max_num_seqs, 512)
    model = FakeModel(cfg.hidden_size, cfg.vocab_size, token_stream, max_bs)
    runner.model = model
    graphs = DecodeGraphs(model, runner.kv_caches, runner.cos_sin, max_bs, engine.max_model_len, runner.block_size,
                          runner.device)
    graphs.graphs = {bs: NoReplay() for bs in graphs.sizes}
    graphs.outputs = {bs: torch.zeros(bs, cfg.hidden_size) for bs in graphs.sizes}
    runner.graphs = graphs
    return model


class SimulatedDevice:
    """A clock for the device work: each launched step occupies it device_s from max(launch, previous end)."""

    def __init__(self, device_s: float, clock=time.perf_counter):
        self.device_s = device_s
        self.clock = clock  # what the host's phases are measured with (wall, or a thread's CPU time)
        self.free_at = 0.0
        self.idle = 0.0  # seconds the device waited for a launch (after its first step)
        self.waited = 0.0  # seconds the host blocked in result(), or spent doing the device's work for it
        self._started = False

    def queue(self, device_s: float | None = None) -> float:
        """A step was queued now: returns when its results are ready."""
        now = time.perf_counter()
        if self._started and now > self.free_at:
            self.idle += now - self.free_at
        self._started = True
        self.free_at = max(now, self.free_at) + (self.device_s if device_s is None else device_s)
        return self.free_at

    def wait_until(self, ready_at: float) -> None:
        """Block like a host sync on the device until ready_at."""
        now = time.perf_counter()
        if ready_at > now:
            time.sleep(ready_at - now)
            self.waited += time.perf_counter() - now

    def pause(self, seconds: float) -> None:
        """The host just spent `seconds` on the device's behalf: the clock stops for them (no idle, no host time)."""
        self.free_at += seconds
        self.waited += seconds


def pick_allowed(bitmask: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """int64 [G]: an allowed token of each bitmask row (CPU int32 [G, W]): the lowest allowed id of a random
    non-empty word. Cheap (no [G, V] unpacking), and varied enough to walk a grammar like random logits do."""
    nonzero = bitmask != 0  # [G, W]
    scores = torch.rand(bitmask.shape, generator=gen).masked_fill_(~nonzero, -1.0)
    word_idx = scores.argmax(dim=1)  # [G]
    words = bitmask.gather(1, word_idx[:, None])[:, 0].long() & 0xFFFFFFFF  # [G] as unsigned
    lowest = words & -words  # the lowest set bit, a power of two (a word of a non-empty row is never 0)
    return word_idx * 32 + torch.log2(lowest.double()).round().long()


class FakeSampling:
    """Replaces Sampler._sample at a large vocabulary: the host part stays real (the grammar bitmask, filled as
    the sampler fills it), the device part (mask, argmax over [rows, vocab]) becomes a cheap pick whose own
    time is taken off the clock. Rows without a grammar take the next tokens of a text stream (so
    detokenization sees text); grammar rows take an allowed token (pick_allowed)."""

    def __init__(self, sampler, token_stream: list[int], device: SimulatedDevice, seed: int = 0):
        self.sampler = sampler
        self.stream = token_stream
        self.device = device
        self.gen = torch.Generator().manual_seed(seed)
        self._pos = 0
        sampler._sample = self
        sampler._argmax = lambda logits: self(logits, [None] * logits.shape[0])  # Sampler.launch_greedy

    def __call__(self, logits: torch.Tensor, rows: list, mask=None) -> torch.Tensor:
        grammar = [i for i, r in enumerate(rows) if r is not None and r.grammar is not None]
        min_tok = [i for i, r in enumerate(rows) if r is not None and len(r.output_token_ids) < r.params.min_tokens]
        bitmask = None
        if grammar:  # the host work, real (a started fill is passed on; older engines took no `mask`)
            args = (rows, grammar, min_tok) if mask is None else (rows, grammar, min_tok, mask)
            bitmask = self.sampler._grammar_bitmask(*args)
        t0 = self.device.clock()
        n = len(rows)
        tokens = torch.tensor([self.stream[(self._pos + 7 * r) % len(self.stream)] for r in range(n)])
        self._pos += 1
        if bitmask is not None:
            tokens[torch.tensor(grammar)] = pick_allowed(bitmask[: len(grammar)], self.gen)
        self.device.pause(self.device.clock() - t0)
        return tokens
