"""vLLM's async engine API for in-process use: many coroutines share one continuously batched engine.

    from spool.engine import AsyncEngineArgs, AsyncLLMEngine, SamplingParams, random_uuid

    engine = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(model=PATH, max_model_len=2048))
    async for out in engine.generate("Hello", SamplingParams(max_tokens=32), request_id=random_uuid()):
        print(out.outputs[0].text)          # cumulative: the whole text so far, as vLLM's RequestOutput

A background thread owns the LLMEngine and steps it (launch() / collect()); coroutines hand it requests and
aborts through a queue (applied between launch and collect, as the worker does) and get each step's
RequestOutput snapshots on their own event loop. A request id that is still live is refused with a
ValueError (vLLM's trap: a reused id would mix two requests' tokens). A generator that is closed early (the
caller stopped iterating, a client disconnected) aborts its request, which frees its KV cache at the next step.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, fields
from typing import Any

from spool.engine.config import EngineConfig
from spool.engine.llm_engine import LLMEngine, PromptInput, _Request
from spool.engine.outputs import CompletionOutput, RequestOutput
from spool.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)

# vLLM engine arguments that change nothing here when left at these values (one device, no remote code).
_VLLM_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "tensor_parallel_size": (1,), "pipeline_parallel_size": (1,), "trust_remote_code": (False, True),
    "disable_log_requests": (False, True), "disable_log_stats": (False, True), "enable_log_requests": (False, True),
}


def random_uuid() -> str:
    """A fresh request id (vLLM's vllm.utils.random_uuid)."""
    return uuid.uuid4().hex


class AsyncEngineDeadError(RuntimeError):
    """The engine's background loop died (its error is the __cause__); the engine serves no more requests."""


class AsyncEngineArgs:
    """vLLM's AsyncEngineArgs: the model and any EngineConfig option by name (device, max_model_len,
    gpu_memory_utilization, max_num_seqs, ...); unknown names raise TypeError listing the known ones."""

    def __init__(self, model: str, **kwargs: Any):
        for name, accepted in _VLLM_NEUTRAL.items():
            if name in kwargs and kwargs.pop(name) not in accepted:
                raise TypeError(f"{name} other than {accepted[0]!r} is not supported by spool's engine")
        self.model, self.kwargs = str(model), kwargs
        self.create_engine_config()  # fail here, at the line that named the option

    def __getattr__(self, name: str) -> Any:
        known = {f.name: f.default for f in fields(EngineConfig)}
        if name in known:
            return self.__dict__["kwargs"].get(name, known[name])
        raise AttributeError(name)

    def create_engine_config(self) -> EngineConfig:
        """The EngineConfig these arguments describe."""
        return EngineConfig.from_kwargs(self.model, **self.kwargs)


@dataclass(slots=True)
class _Stream:
    """One live request as its coroutine sees it."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    req: _Request | None = None  # the engine's bookkeeping (its outputs are updated by every step)
    finished: bool = False


class AsyncLLMEngine:
    """An LLMEngine stepped by a background thread, with vLLM's async generate / abort."""

    def __init__(self, engine: LLMEngine, start_engine_loop: bool = True):
        self.engine = engine
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._commands: deque[tuple] = deque()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._dead: BaseException | None = None
        self._auto_start = start_engine_loop

    @classmethod
    def from_engine_args(cls, engine_args: AsyncEngineArgs, start_engine_loop: bool = True) -> AsyncLLMEngine:
        """Load the model and build the engine (blocking: do it before serving)."""
        return cls(LLMEngine(engine_args.create_engine_config()), start_engine_loop=start_engine_loop)

    # -- state ------------------------------------------------------------------------------------
    @property
    def is_running(self) -> bool:
        """True while the background loop runs."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def errored(self) -> bool:
        """True once the background loop died."""
        return self._dead is not None

    @property
    def dead_error(self) -> BaseException | None:
        """Why the background loop died."""
        return self._dead

    def start_background_loop(self) -> None:
        """Start the thread that steps the engine (generate() starts it when start_engine_loop=True)."""
        if self._dead is not None:
            raise AsyncEngineDeadError("the engine's background loop died") from self._dead
        if self.is_running:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="spool-async-engine", daemon=True)
        self._thread.start()

    def shutdown_background_loop(self) -> None:
        """Stop the thread (live requests stop getting outputs); start_background_loop() resumes."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    async def get_tokenizer(self) -> Any:
        """The model's Hugging Face tokenizer."""
        return self.engine.tokenizer

    async def check_health(self) -> None:
        """Raise AsyncEngineDeadError if the background loop died."""
        if self._dead is not None:
            raise AsyncEngineDeadError("the engine's background loop died") from self._dead

    # -- requests ---------------------------------------------------------------------------------
    async def generate(self, prompt: PromptInput, sampling_params: SamplingParams | None, request_id: str,
                       lora_request: Any = None, trace_headers: Any = None,
                       priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Yield the request's cumulative RequestOutput after every step that changed it, the last one finished.

        ValueError if `request_id` is live (another generate() with it has not finished) or the request is
        invalid (an unknown token id in logit_bias, a prompt the engine cannot take). vLLM's `lora_request`
        must be None (no LoRA here); `trace_headers` are accepted and ignored.
        """
        if lora_request is not None:
            raise ValueError("LoRA adapters are not supported by spool's engine (lora_request must be None)")
        await self.check_health()
        if not self.is_running:
            if not self._auto_start:
                raise RuntimeError("the background loop is not running: call start_background_loop()")
            self.start_background_loop()
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request_id {request_id!r} is already live: request ids must be unique among "
                                 "running requests (a reused id would mix two requests' outputs); use random_uuid()")
            self._streams[request_id] = stream
        added: concurrent.futures.Future = concurrent.futures.Future()
        self._submit(("add", request_id, prompt, sampling_params or SamplingParams(), priority, added))
        try:
            await asyncio.wrap_future(added)
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            if not stream.finished and self._dead is None:
                self._submit(("abort", request_id))  # closed early: free its KV cache at the next step

    async def abort(self, request_id: str) -> None:
        """Stop a request; its generator yields a last output with finish_reason 'abort'."""
        self._submit(("abort", request_id))

    # -- the background loop ------------------------------------------------------------------------
    def _submit(self, command: tuple) -> None:
        self._commands.append(command)
        self._wake.set()

    def _run(self) -> None:
        eng = self.engine
        try:
            while not self._stopping:
                self._apply_commands()
                if not eng.has_unfinished_requests():
                    self._wake.wait()
                    self._wake.clear()
                    continue
                step = eng.launch()
                self._apply_commands()  # between launch and collect, as the worker adds and aborts
                self._publish({d.request_id for d in eng.collect(step)})
        except BaseException as e:  # every waiting coroutine must hear of it
            log.exception("the async engine's background loop died")
            self._dead = e
            with self._lock:
                streams, self._streams = list(self._streams.values()), {}
            for stream in streams:
                error = AsyncEngineDeadError("the engine's background loop died")
                error.__cause__ = e
                self._deliver(stream, error)

    def _apply_commands(self) -> None:
        while self._commands:
            command = self._commands.popleft()
            if command[0] == "abort":
                self.engine.abort(command[1])
                continue
            _, rid, prompt, params, priority, added = command
            try:
                self.engine.add_request(rid, prompt, params, priority)
            except Exception as e:  # noqa: BLE001 - the caller's request is wrong: it gets the error
                with self._lock:
                    self._streams.pop(rid, None)
                added.set_exception(e)
                continue
            with self._lock:
                stream = self._streams.get(rid)
            if stream is not None:
                stream.req = self.engine.requests[rid]
            added.set_result(None)

    def _publish(self, touched: set[str]) -> None:
        for rid in touched:
            with self._lock:
                stream = self._streams.get(rid)
            if stream is None or stream.req is None:
                continue
            out = _snapshot(stream.req)
            if out.finished:
                stream.finished = True
                with self._lock:
                    self._streams.pop(rid, None)
            self._deliver(stream, out)

    def _deliver(self, stream: _Stream, item: Any) -> None:
        try:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
        except RuntimeError:  # its event loop is closed: nobody is listening any more
            pass


def _snapshot(req: _Request) -> RequestOutput:
    """A RequestOutput the engine will not change afterwards (the engine keeps updating its own lists)."""
    outs = [CompletionOutput(o.index, o.text, list(o.token_ids), o.cumulative_logprob,
                             list(o.logprobs) if o.logprobs is not None else None, o.finish_reason, o.stop_reason)
            for o in req.outputs]
    done = req.num_finished == len(req.outputs)
    return RequestOutput(req.request_id, req.prompt, list(req.prompt_token_ids), outs, done, req.error)
