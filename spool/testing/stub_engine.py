"""A stub engine for the real worker: one token per running sequence per step, at a set step time, no model.

It answers what spool.worker.loop.Worker asks of an LLMEngine (add_request, launch/collect, abort, admission
capacity, the heartbeat's counters), so the worker's Redis traffic can be measured and tested at a GPU's
batch size and step rate on a CPU (bench/stream_cost.py, tests/test_stream_coalescing.py). `launch()`
records when the step began and `collect()` sleeps out the rest of `step_s`, as a device would compute
while the worker talks to Redis between the two.

Every token's id and text derive from its position (`token_text(i)`), so a test knows the exact output,
and `produced[request id]` keeps the wall-clock time (epoch seconds) each token came out of `collect()`.

With `max_num_batched_tokens`, prompts are prefilled too, as the real scheduler does it: each step has that
token budget, running decodes take one token each first, then prompt chunks in arrival order take the rest;
the step that finishes a prompt gives its first token, and a step lasts `step_s` plus `prefill_token_s` per
prompt token in it (a GPU's prefill cost), so a run's length depends on when its requests arrived
(bench/serve_load.py --sim).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from spool.engine.outputs import RequestDelta


def token_id(position: int) -> int:
    """The stub's token id at output position `position` (of any request)."""
    return 10 + position % 1000


def token_text(position: int) -> str:
    """The stub's text of the token at output position `position`: about 4 characters, as an English token."""
    return f" w{position % 100:02d}"


@dataclass(slots=True)
class _Sequence:
    request_id: str
    index: int
    max_tokens: int
    num_prompt_tokens: int
    generated: int = 0
    aborted: bool = False
    prefill_left: int = 0  # prompt tokens not computed yet (only with a token budget)


@dataclass(slots=True)
class _Step:
    began: float  # perf_counter at launch
    sequences: list[_Sequence] = field(default_factory=list)
    chunks: list[int] = field(default_factory=list)  # prompt tokens each sequence computes (token budget only)
    duration: float = 0.0  # how long the step lasts on the "device"


class StubEngine:
    """Generates `token_text(i)` for i = 0.. max_tokens-1 per choice; finish_reason 'length' (or 'abort')."""

    def __init__(self, max_num_seqs: int = 512, step_s: float = 0.0, record_times: bool = False,
                 max_num_batched_tokens: int | None = None, prefill_token_s: float = 0.0):
        self.step_s = step_s
        self.max_num_batched_tokens = max_num_batched_tokens  # None: no prefill, every sequence decodes
        self.prefill_token_s = prefill_token_s
        self.record_times = record_times
        self.config = SimpleNamespace(model="stub-model", max_num_seqs=max_num_seqs, block_size=16,
                                      enable_prefix_caching=False)
        self.runner = SimpleNamespace(device="cpu", dtype="none", num_blocks=max_num_seqs, graphs=None)
        self.stats = SimpleNamespace(num_steps=0, generation_tokens=0)
        self.max_model_len = 1 << 20
        self.tokenizer = None
        self.produced: dict[str, list[float]] = {}  # request id -> epoch seconds of each token (record_times)
        self.step_sizes: list[int] = []  # sequences computed per step
        self._sequences: dict[str, list[_Sequence]] = {}
        self._aborted: set[str] = set()

    # -- what the worker's admission calls ---------------------------------------------------------
    def encode_prompt(self, prompt: Any) -> tuple[str | None, list[int]]:
        """(text, ids): one id per word of a text prompt."""
        if isinstance(prompt, dict):
            return None, list(prompt["prompt_token_ids"])
        return prompt, [1] * max(1, len(str(prompt).split()))

    def apply_chat_template(self, messages: list[dict], **_: Any) -> dict:
        """Chat prompts: one id per word of the messages' contents."""
        words = sum(len(str(m.get("content") or "").split()) for m in messages)
        return {"prompt_token_ids": [1] * max(1, words)}

    def add_request(self, request_id: str, prompt: dict, params: Any, priority: int = 0,
                    isolated: bool = False) -> None:
        """Start `params.n` choices of `params.max_tokens` tokens each."""
        if request_id in self._sequences:
            raise ValueError(f"request {request_id!r} is already running")
        n_prompt = len(prompt.get("prompt_token_ids") or [])
        prefill = max(1, n_prompt) if self.max_num_batched_tokens else 0
        self._sequences[request_id] = [_Sequence(request_id, i, params.max_tokens, n_prompt, prefill_left=prefill)
                                       for i in range(params.n)]
        if self.record_times:
            self.produced[request_id] = []

    def abort(self, request_id: str) -> None:
        """End a request at the next step with finish_reason 'abort'."""
        for seq in self._sequences.get(request_id, []):
            seq.aborted = True

    # -- capacity and counters ---------------------------------------------------------------------
    def _running(self) -> int:
        return sum(len(seqs) for seqs in self._sequences.values())

    def has_unfinished_requests(self) -> bool:
        """True while any request runs."""
        return bool(self._sequences)

    def admission_capacity(self, priority: int = 0) -> int:
        """Free sequence slots."""
        return max(0, self.config.max_num_seqs - self._running())

    def isolated_request(self) -> None:
        """The stub never runs a job alone."""
        return None

    def kv_cache_usage(self) -> float:
        """Running sequences over max_num_seqs."""
        return self._running() / self.config.max_num_seqs

    @property
    def scheduler(self) -> SimpleNamespace:
        """running / waiting, as the heartbeat counts them."""
        return SimpleNamespace(running=[s for seqs in self._sequences.values() for s in seqs], waiting=[])

    # -- steps -------------------------------------------------------------------------------------
    def launch(self) -> _Step:
        """Begin a step over every running sequence (under the token budget, when there is one)."""
        began = time.perf_counter()
        running = [s for seqs in self._sequences.values() for s in seqs]
        if not self.max_num_batched_tokens:
            return _Step(began, running, [0] * len(running), self.step_s)
        budget, step = self.max_num_batched_tokens, _Step(began)
        # Decodes first, then prompt chunks in arrival order (dicts keep insertion order), as the scheduler does.
        for seq in sorted(running, key=lambda q: q.prefill_left > 0):
            if seq.aborted:
                step.sequences.append(seq)
                step.chunks.append(0)
                continue
            if budget <= 0:
                continue
            chunk = min(seq.prefill_left, budget)
            step.sequences.append(seq)
            step.chunks.append(chunk)
            budget -= max(1, chunk)
        step.duration = self.step_s + self.prefill_token_s * sum(step.chunks)
        return step

    def collect(self, step: _Step) -> list[RequestDelta]:
        """Wait out the step time, then one token (or the abort) per sequence of the step."""
        left = step.began + step.duration - time.perf_counter()
        if left > 0:
            time.sleep(left)
        now = time.time()
        deltas: list[RequestDelta] = []
        for seq, chunk in zip(step.sequences, step.chunks):
            if seq.aborted:
                deltas.append(RequestDelta(seq.request_id, seq.index, [], "", finished=True, finish_reason="abort",
                                           num_prompt_tokens=seq.num_prompt_tokens))
                self._drop(seq)
                continue
            if chunk:
                seq.prefill_left -= chunk
                if seq.prefill_left > 0:
                    continue  # a prompt chunk that does not finish its prompt samples nothing
            pos = seq.generated
            seq.generated += 1
            done = seq.generated >= seq.max_tokens
            deltas.append(RequestDelta(seq.request_id, seq.index, [token_id(pos)], token_text(pos), finished=done,
                                       finish_reason="length" if done else None,
                                       num_prompt_tokens=seq.num_prompt_tokens))
            if self.record_times and seq.index == 0:
                self.produced[seq.request_id].append(now)
            if done:
                self._drop(seq)
        self.stats.num_steps += 1
        self.stats.generation_tokens += sum(1 for d in deltas if d.new_token_ids)
        self.step_sizes.append(len(step.sequences))
        return deltas

    def step(self) -> list[RequestDelta]:
        """launch() and collect() in one call."""
        return self.collect(self.launch())

    def _drop(self, seq: _Sequence) -> None:
        seqs = self._sequences.get(seq.request_id)
        if seqs is None:
            return
        if seq in seqs:
            seqs.remove(seq)
        if not seqs:
            del self._sequences[seq.request_id]
