"""LLMEngine: the incremental API (add_request / step / abort) that the offline LLM and the Redis worker drive."""
from __future__ import annotations

import atexit
import gc
import itertools
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from spool.engine.block_manager import BlockManager
from spool.engine.config import ConfigError, EngineConfig, ModelConfig
from spool.engine.detokenizer import IncrementalDetokenizer, decode_logprob_tokens, token_bytes_table
from spool.engine.distributed import TensorParallelError
from spool.engine.grammar_gate import Compiled, GrammarGate
from spool.engine.outputs import CompletionOutput, Logprob, RequestDelta, RequestOutput
from spool.engine.sampling_params import SamplingParams, generator_seed
from spool.engine.scheduler import Scheduler
from spool.engine.sequence import Sequence, SeqStatus
from spool.engine.step_types import PendingStep, RunnerOutput, SchedulerOutput, StepInFlight
from spool.engine.swap import SwapSpace
from spool.engine.tokenizer import load_tokenizer
from spool.engine.tp_executor import make_runner

log = logging.getLogger(__name__)

PromptInput = str | list[int] | dict
# How long launch() may block for a compiling grammar when nothing else can run (keeps LLM.generate and an
# idle worker loop from spinning; a busy engine never waits).
_IDLE_GRAMMAR_WAIT_S = 0.01


@dataclass(slots=True)
class _Request:
    """Engine-side bookkeeping for one request and its n completions."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    detoks: list[IncrementalDetokenizer | None]
    outputs: list[CompletionOutput]
    num_finished: int = 0
    error: str | None = None

    def to_output(self) -> RequestOutput:
        done = self.num_finished == len(self.outputs)
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, self.outputs, done, self.error)


@dataclass(slots=True)
class EngineStats:
    """Counters for logs and the worker's heartbeat."""

    num_steps: int = 0
    generation_tokens: int = 0


def _freeze_startup_heap() -> None:
    """Move every object alive now (weights' Python objects, tokenizer, modules) out of the cyclic GC's reach.

    Full collections during serving then scan only per-step garbage (vLLM does the same after start-up).
    Measured on the CPU at 512 sequences (bench/host_overhead.py): ~1.2 ms -> ~0.14 ms of GC per step. At exit
    the heap is unfrozen, so the interpreter's last collection still finalizes those objects.
    """
    global _unfreeze_at_exit
    gc.collect()
    gc.freeze()
    if not _unfreeze_at_exit:
        atexit.register(gc.unfreeze)
        _unfreeze_at_exit = True


_unfreeze_at_exit = False


class LLMEngine:
    """Continuous-batching generation over a paged KV cache; one step() is one forward pass."""

    def __init__(self, config: EngineConfig):
        config.validate()
        self.config = config
        path = Path(config.model)
        self.model_cfg = ModelConfig.from_dir(path)
        self.tokenizer = load_tokenizer(config.tokenizer or config.model, required=config.load_format != "dummy")
        limit = self.model_cfg.max_position_embeddings
        if self.model_cfg.sliding_window:
            limit = min(limit, self.model_cfg.sliding_window)  # no sliding-window attention: stay inside the window
        self.max_model_len = config.max_model_len or limit
        if self.max_model_len > limit:
            raise ConfigError(f"max_model_len {self.max_model_len} exceeds the model's limit {limit}")
        self.runner = make_runner(config, self.model_cfg, self.max_model_len)  # a TPExecutor when tensor parallel
        self.block_manager = BlockManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching)
        eos = list(self.model_cfg.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in eos:
            eos.append(self.tokenizer.eos_token_id)
        self.scheduler = Scheduler(
            self.block_manager, config.max_num_seqs, config.max_num_batched_tokens, self.max_model_len, eos,
            config.priority_reserve, config.interactive_prefill_tokens, config.interactive_window_s,
            config.interactive_split_steps,
        )
        swap_bytes = config.resolve_swap_space_bytes(self.runner.device)
        self.swap_space = SwapSpace(self.runner.kv_caches) if swap_bytes >= self.runner.bytes_per_block else None
        if self.swap_space is not None:
            self.scheduler.enable_swap(swap_bytes // self.runner.bytes_per_block, config.swap_min_tokens)
        self.requests: dict[str, _Request] = {}
        self._pending: list[RequestDelta] = []  # deltas produced outside step() (errors, aborts)
        self._grammars = GrammarGate(self.tokenizer, self.model_cfg.vocab_size, eos,  # structured outputs
                                     config.grammar_compile_timeout_s)
        self._arrival = itertools.count()
        self._in_flight = False
        self.async_scheduling = config.resolve_async_scheduling(self.runner.device)
        # Async scheduling: the last launched step, collected but not applied yet (its tokens may still be on
        # the device); the next launch() schedules around it and collect() applies it (spool/engine/async_step.py).
        self._unapplied: StepInFlight | None = None
        # Whether the runner can queue a step's forward pass and its sampling separately (ModelRunner can; a
        # runner without launch_forward, such as TPExecutor today, gets synchronous steps for history rows).
        # Looked up on the class: TPExecutor forwards unknown attributes to rank 0's runner.
        self._split_launch = hasattr(type(self.runner), "launch_forward")
        self.stats = EngineStats()
        self._vocab_bytes: list[bytes] | None = None  # token id -> exact bytes, built when logprobs need it
        _freeze_startup_heap()

    def _raise_if_runner_failed(self) -> None:
        failure = getattr(self.runner, "failure", None)  # TPExecutor: why the ranks stopped
        if failure is not None:
            raise TensorParallelError(failure)

    def shutdown(self) -> None:
        """Stop the tensor-parallel rank processes, if any (they also stop when the engine is collected or at exit)."""
        stop = getattr(self.runner, "shutdown", None)
        if stop is not None:
            stop()

    @classmethod
    def from_kwargs(cls, model: str, **kwargs) -> "LLMEngine":
        """LLMEngine(EngineConfig(model=..., **kwargs))."""
        return cls(EngineConfig.from_kwargs(model, **kwargs))

    # -- inputs -----------------------------------------------------------------------------------
    def encode_prompt(self, prompt: PromptInput) -> tuple[str | None, list[int]]:
        """Normalize a string, a list of ids or {"prompt_token_ids": [...]} / {"prompt": str} to (text, ids)."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), [int(t) for t in prompt["prompt_token_ids"]]
            if "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass prompt_token_ids")
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise ValueError("prompt must be a string, a list of token ids, or a dict with 'prompt_token_ids'")

    def apply_chat_template(
        self, messages: list[dict], *, tools: list[dict] | None = None, add_generation_prompt: bool = True,
        continue_final_message: bool = False, chat_template_kwargs: dict | None = None,
    ) -> dict:
        """Render chat messages with the model's chat template: {"prompt": text, "prompt_token_ids": ids}.

        The rendered template owns the special tokens (most render `{{ bos_token }}` themselves), so the text
        is tokenized without adding any: the ids equal transformers' apply_chat_template(tokenize=True).
        """
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template")
        text = self.tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message, **(chat_template_kwargs or {}))
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return {"prompt": text, "prompt_token_ids": ids}

    def _reject_reason(self, ids: list[int], params: SamplingParams) -> str | None:
        if not ids:
            return "the prompt is empty"
        vocab = self.model_cfg.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            return f"prompt token ids must be in [0, {vocab})"
        if params.max_tokens is None:
            return (f"the prompt ({len(ids)} tokens) leaves no room to generate within max_model_len "
                    f"({self.max_model_len})")
        if params.max_tokens < params.min_tokens:
            return f"min_tokens ({params.min_tokens}) exceeds the {params.max_tokens} tokens left after the prompt"
        total = len(ids) + params.max_tokens
        if total > self.max_model_len:
            return (f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) = {total} exceeds "
                    f"max_model_len ({self.max_model_len})")
        need = math.ceil(total / self.config.block_size)
        if need > self.block_manager.num_blocks:
            return (f"the request needs {need} KV blocks but the whole cache has {self.block_manager.num_blocks}; "
                    "lower max_tokens or give the cache more memory")
        return None

    def add_request(
        self, request_id: str, prompt: PromptInput, params: SamplingParams | None = None, priority: int = 0,
        isolated: bool = False,
    ) -> None:
        """Queue a request; one that can never run finishes at the next step with finish_reason 'error'.

        isolated=True runs it in steps of its own: while it is unfinished, no other request is computed
        (they keep their KV cache and resume after it), so a crash during its steps is its own doing.
        """
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in the engine")
        params = params or SamplingParams()
        text, ids = self.encode_prompt(prompt)
        vocab = self.model_cfg.vocab_size
        bad_bias = [t for t in params.logit_bias if t >= vocab]
        if bad_bias:
            raise ValueError(f"logit_bias token id {bad_bias[0]} is outside the vocabulary [0, {vocab})")
        if params.max_tokens is None:
            params = self._resolve_max_tokens(ids, params)
        outputs = [CompletionOutput(index=i, text="", token_ids=[], logprobs=[] if params.logprobs is not None else None)
                   for i in range(params.n)]
        req = _Request(request_id, text, ids, params, [], [], outputs)
        self.requests[request_id] = req
        reason = self._reject_reason(ids, params)
        if reason is not None:
            self._fail_request(req, reason)
            return
        arrival = next(self._arrival)
        for i in range(params.n):
            seed = generator_seed(params.seed, i)
            seq = Sequence(f"{request_id}#{i}", request_id, i, ids, params, seed, priority, arrival, isolated)
            req.seqs.append(seq)
            req.detoks.append(
                IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens, params.stop,
                                       params.include_stop_str_in_output) if self.tokenizer is not None else None
            )
        if params.structured_outputs is None:
            for seq in req.seqs:
                self.scheduler.add(seq)
            return
        # Compiling is off the step path: until the grammar is ready the sequences wait in the gate, unseen by
        # the scheduler, so a new schema never stalls running requests (a cache hit is ready right here).
        compiled = self._grammars.submit(request_id, params.structured_outputs, req.seqs)
        if compiled is not None:
            self._start_compiled(compiled)

    def _resolve_max_tokens(self, ids: list[int], params: SamplingParams) -> SamplingParams:
        """max_tokens=None: the rest of max_model_len after the prompt, within what the whole KV cache holds
        (a request must always be able to finish alone). None is kept when no room is left (then rejected)."""
        cache_tokens = self.block_manager.num_blocks * self.config.block_size
        room = min(self.max_model_len, cache_tokens) - len(ids)
        return params.model_copy(update={"max_tokens": room}) if room >= 1 else params

    def _fail_request(self, req: _Request, reason: str) -> None:
        """Finish every completion of a request that cannot run; the error deltas leave with the next step."""
        req.error = reason
        for seq in req.seqs:
            seq.status, seq.finish_reason = SeqStatus.FINISHED, "error"  # never reached the scheduler
        for out in req.outputs:
            out.finish_reason = "error"
            self._pending.append(RequestDelta(req.request_id, out.index, [], "", True, "error", None, None, reason,
                                              len(req.prompt_token_ids)))
        req.num_finished = len(req.outputs)

    def _start_compiled(self, compiled: Compiled) -> None:
        """A request's grammar is settled: schedule its sequences, or fail it (invalid_structured_output)."""
        req = self.requests.get(compiled.request_id)
        if req is None:
            return
        if compiled.error is not None:
            self._fail_request(req, compiled.error)
            return
        for seq in compiled.seqs:
            self.scheduler.add(seq)

    def abort(self, request_id: str) -> bool:
        """Stop a request now; its blocks are freed and a final 'abort' delta comes out of the next step."""
        req = self.requests.get(request_id)
        if req is None:
            return False
        compiling = self._grammars.discard(request_id)  # sequences the scheduler has not seen yet
        for seq in req.seqs:
            if not seq.finished:
                if compiling:
                    seq.status, seq.finish_reason = SeqStatus.FINISHED, "abort"
                else:
                    self.scheduler.finish(seq, "abort")
                self._pending.append(self._finish_delta(req, seq, []))
        return True

    # -- the loop ---------------------------------------------------------------------------------
    def has_unfinished_requests(self) -> bool:
        """True while a request is compiling its grammar, queued, running, or has deltas still to deliver."""
        return (bool(self._pending) or self.scheduler.has_unfinished() or bool(self._grammars)
                or self._unapplied is not None)

    def kv_cache_usage(self) -> float:
        """Fraction of KV blocks held by sequences (0..1)."""
        return self.block_manager.usage()

    def isolated_request(self) -> str | None:
        """The isolated request (add_request(isolated=True)) that the next step computes alone, if any."""
        isolated = self.scheduler.isolated
        return isolated[0].request_id if isolated else None

    def admission_capacity(self, priority: int = 0) -> int:
        """How many new requests of `priority` a queue consumer should hand over now (the scheduler decides)."""
        self._raise_if_runner_failed()  # a tensor-parallel rank died while the engine was idle
        capacity = self.scheduler.admission_capacity(priority)
        if self._grammars:  # sequences waiting for their grammar will queue soon: count them as queued
            capacity = max(0, capacity - self._grammars.num_waiting(priority))
        return capacity

    def step(self) -> list[RequestDelta]:
        """Schedule, run one forward pass, sample, detokenize; returns what each touched completion gained."""
        return self.collect(self.launch())

    def launch(self) -> StepInFlight:
        """First half of step(): schedule and queue the forward pass on the device, without waiting for it.

        Between launch() and collect() the caller may add_request(), abort() and read engine state (the
        worker talks to Redis there while the GPU computes), but must not launch another step.

        With async scheduling this runs while the step before it may still compute: its sampled tokens feed
        this step on the device, and collect() returns that earlier step's deltas (spool/engine/async_step.py).
        """
        self._raise_if_runner_failed()  # a dead tensor-parallel engine says why, on every call after the failure
        if self._in_flight:
            raise RuntimeError("a step is already in flight: collect() it first")
        if self._grammars:
            if not (self._pending or self.scheduler.has_unfinished()):
                self._grammars.wait(_IDLE_GRAMMAR_WAIT_S)  # nothing else to run: do not spin on the compile
            for compiled in self._grammars.poll():
                self._start_compiled(compiled)
        previous = self._unapplied
        # Rows sampling from host-side history (grammar masks, penalties, min_tokens) need the previous step
        # applied before this step samples, but not before its forward pass: the launch is split around it.
        split = previous is not None and self.scheduler.needs_history()
        if previous is not None and (self.scheduler.needs_sync() or (split and not self._split_launch)):
            # An isolated request runs next (or the runner launches whole steps only): apply the previous
            # step before scheduling.
            self._unapplied = None
            self._pending.extend(self._apply(previous))
            previous, split = None, False
        sched = self.scheduler.schedule()
        if self.swap_space is not None:
            self.swap_space.apply(sched)  # queued before the step's forward pass, which reuses or reads the blocks
        if not (sched.chunks or sched.finished_seq_ids):
            self._in_flight = True  # until collect(), even when nothing runs: the pairing is the contract
            return StepInFlight(sched, None)
        # Marked only once the launch went through: a launch that raised leaves no step to collect.
        if split:
            pending = self._launch_split(sched, previous)
        else:
            pending = self.runner.launch(sched, previous.pending if previous is not None else None)
        self._in_flight = True
        return StepInFlight(sched, pending)

    def _launch_split(self, sched: SchedulerOutput, previous: StepInFlight) -> PendingStep:
        """Queue this step's forward pass, apply the previous step while it computes, then queue the sampling.

        The forward pass takes its decode inputs from the previous step's tokens on the device; the sampling
        rows are built after the matchers (and output histories) have taken those tokens on the host, so a
        row's grammar mask is the one synchronous stepping would use (spool/engine/async_step.py).
        """
        forward = self.runner.launch_forward(sched, previous.pending)
        self._unapplied = None
        seqs, result = self._take_tokens(previous)  # waits for the previous step; the matchers accept its tokens
        # Sequences that finished at the previous step (EOS, length, grammar end or error) still have a row here:
        # their token is dropped when this step is applied, so their row goes unmasked. (One stopped by a stop
        # string, found while detokenizing below, keeps its mask: its matcher is fine, its token dropped too.)
        unmasked = frozenset()
        if any(seq.finished for seq in seqs):
            unmasked = frozenset(c.seq_id for c, seq in zip(sched.chunks, sched.seqs) if c.sample and seq.finished)
        # The grammar rows' bitmask fills on xgrammar's threads while this thread detokenizes: both run while
        # the device computes the forward pass, and the sampling waits for both.
        mask = self.runner.start_grammar_mask(forward, unmasked)
        self._pending.extend(self._deltas(seqs, result))
        return self.runner.launch_sampling(forward, unmasked, mask)

    def collect(self, step: StepInFlight) -> list[RequestDelta]:
        """Second half of step(): wait for the device, append the sampled tokens, detokenize, report.

        With async scheduling the step just launched stays on the device: this applies the one before it
        (and the launched one too when it ran nothing, so the last results always come out).
        """
        self._in_flight = False
        applied: list[RequestDelta] = []
        if not self.async_scheduling:
            if step.pending is not None:
                applied = self._apply(step)
        else:
            older, self._unapplied = self._unapplied, (step if step.pending is not None else None)
            if older is not None:
                applied = self._apply(older)
        # Taken only after the step applied: if it raised, deltas queued outside the step (aborts, failed
        # requests) wait for the next collect() instead of being lost with the exception.
        deltas, self._pending = self._pending, []  # includes aborts made while the step was in flight
        deltas.extend(applied)
        return self._collect(deltas)

    def _apply(self, step: StepInFlight) -> list[RequestDelta]:
        """Wait for a launched step's tokens, append them, apply stop rules, detokenize; its deltas."""
        return self._deltas(*self._take_tokens(step))

    def _take_tokens(self, step: StepInFlight) -> tuple[list[Sequence], RunnerOutput]:
        """Wait for a launched step's tokens and append them (stop rules, grammar accept); the sequences that
        got one, and the step's output."""
        result = step.pending.result()
        self.stats.num_steps += 1
        return self.scheduler.update_from_output(step.sched, result), result

    def _deltas(self, seqs: list[Sequence], result: RunnerOutput) -> list[RequestDelta]:
        """Detokenize the tokens just appended (stop strings); one delta per sequence.

        The common token (no logprobs, the sequence still running after it) is handled inline: at hundreds
        of sequences per step every attribute chain and call here costs tens of microseconds per step.
        """
        self.stats.generation_tokens += len(seqs)
        logprobs, ranks = result.logprobs, result.ranks
        requests, finished = self.requests, SeqStatus.FINISHED
        deltas: list[RequestDelta] = []
        append = deltas.append
        for seq in seqs:
            if logprobs and seq.seq_id in logprobs:
                append(self._on_token(seq, logprobs[seq.seq_id], ranks.get(seq.seq_id)))
                continue
            req = requests[seq.request_id]
            index = seq.index
            token = seq.token_ids[-1]
            out = req.outputs[index]
            out.token_ids.append(token)
            detok = req.detoks[index]
            if detok is None or seq.status is finished:
                append(self._on_token(seq, None, None, appended=True))
                continue
            p = seq.params
            # Stop strings count only once min_tokens are out (vLLM semantics).
            min_tokens = p.min_tokens
            check = not min_tokens or len(seq.token_ids) - len(seq.prompt_token_ids) >= min_tokens
            text = detok.add_token_delta(token, check)
            if detok.stopped is not None:  # a stop string ended the text (a running sequence's detokenizer had none)
                self.scheduler.finish(seq, "stop", detok.stopped)
                append(self._finish_delta(req, seq, [token], text_before=text))
                continue
            out.text = detok.output_text
            append(RequestDelta(req.request_id, index, [token], text, False, None, None, None, None,
                                len(seq.prompt_token_ids)))
        return deltas

    def _collect(self, deltas: list[RequestDelta]) -> list[RequestDelta]:
        for d in deltas:
            if d.finished:
                req = self.requests.get(d.request_id)
                if req is not None and req.num_finished == len(req.outputs):
                    del self.requests[d.request_id]
        return deltas

    def _token_bytes(self, ids: list[int]) -> list[bytes | None]:
        """Exact bytes of tokens (for logprobs); the vocabulary's table is built on first use."""
        if self._vocab_bytes is None:
            self._vocab_bytes = token_bytes_table(self.tokenizer) if self.tokenizer is not None else []
        table = self._vocab_bytes
        return [table[i] if 0 <= i < len(table) else None for i in ids]

    def _on_token(self, seq: Sequence, logprobs: dict[int, float] | None, ranks: dict[int, int] | None,
                  appended: bool = False) -> RequestDelta:
        """The general path of _deltas for one sequence's new token (appended: already in out.token_ids)."""
        req = self.requests[seq.request_id]
        out = req.outputs[seq.index]
        token = seq.token_ids[-1]
        if not appended:
            out.token_ids.append(token)
        new_lp = None
        if logprobs is not None and out.logprobs is not None:
            ids = list(logprobs)
            toks = decode_logprob_tokens(self.tokenizer, ids) if self.tokenizer else [None] * len(ids)
            raw = self._token_bytes(ids)
            new_lp = [{t: Logprob(lp, ranks.get(t) if ranks else None, s, b)
                       for (t, lp), s, b in zip(logprobs.items(), toks, raw)}]
            out.logprobs.extend(new_lp)
            out.cumulative_logprob = (out.cumulative_logprob or 0.0) + logprobs[token]
        num_output = seq.num_output_tokens
        detok = req.detoks[seq.index]
        if detok is not None:
            # A stop token ends the text before itself (vLLM semantics); its id stays in token_ids.
            stopped_by_token = seq.finished and seq.finish_reason == "stop"
            if not stopped_by_token or seq.params.include_stop_str_in_output:
                # Stop strings count only once min_tokens are out (vLLM semantics).
                stop_str = detok.add_token(token, check_stop=num_output >= seq.params.min_tokens)
                if stop_str is not None:
                    if seq.finished:
                        seq.finish_reason, seq.stop_reason = "stop", stop_str
                    else:
                        self.scheduler.finish(seq, "stop", stop_str)
        if seq.finished:
            return self._finish_delta(req, seq, [token], new_lp)
        text = ""
        if detok is not None:
            text = detok.get_delta(False)
            out.text = detok.output_text
        return RequestDelta(req.request_id, seq.index, [token], text, False, None, None, new_lp, None,
                            seq.num_prompt_tokens)

    def _finish_delta(self, req: _Request, seq: Sequence, tokens: list[int], new_lp=None,
                      text_before: str = "") -> RequestDelta:
        """A completion's last delta (text_before: its text already taken from the detokenizer this step)."""
        out = req.outputs[seq.index]
        detok = req.detoks[seq.index]
        text = text_before + detok.get_delta(True) if detok is not None else text_before
        out.text = detok.output_text if detok is not None else ""
        out.finish_reason = seq.finish_reason
        out.stop_reason = seq.stop_reason
        req.num_finished += 1
        error = None
        if seq.finish_reason == "error" and seq.grammar is not None:  # a sampled token the grammar rejected
            error = req.error = f"structured output: {seq.grammar.error}"
        return RequestDelta(req.request_id, seq.index, tokens, text, True, seq.finish_reason, seq.stop_reason, new_lp,
                            error, seq.num_prompt_tokens, max(seq.num_cached_tokens, 0))

    def get_request_output(self, request_id: str) -> RequestOutput | None:
        """Snapshot of a request still in the engine (None once finished and collected)."""
        req = self.requests.get(request_id)
        return None if req is None else req.to_output()
