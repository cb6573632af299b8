"""Tensor parallelism's processes: rank 0 (the engine's own process) starts and supervises ranks 1..N-1.

Rank 0 owns the scheduler, the sampler and (in a worker) all Redis I/O. Each step it rings every other rank
over its pipe (one small JSON message: how long the step's inputs are), broadcasts the inputs as one int32
tensor over the gloo control group (spool/engine/step_wire.py), then runs the forward pass like every rank; the
row-parallel all-reduces and the logits gather inside it are the only other traffic.

Why a pipe besides the process group: an idle engine (a worker waiting for jobs) sends nothing for hours,
and a rank blocked in a collective would time out; blocked on its pipe it waits as long as needed and still
learns at once that rank 0 is gone (end of file). Everything that waits on another rank is bounded:

- collectives: the process group's timeout (spool/engine/distributed.py);
- rank 0's watchdog thread notices a rank process that exits, records why, and aborts the NCCL group so
  that a collective waiting on the dead rank returns (gloo notices the closed socket by itself);
- each rank's watchdog thread exits the rank when rank 0's process is gone.

A failure raises TensorParallelError from the engine call in progress (or the next one) and stops the
remaining ranks: the engine is down, a worker exits non-zero and its jobs stay pending for another.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
import weakref
from multiprocessing.connection import Connection, wait

import torch
import torch.multiprocessing as mp

from spool.engine import distributed
from spool.engine.config import ConfigError, EngineConfig, ModelConfig
from spool.engine.distributed import TensorParallelError, TPGroup
from spool.engine.model_runner import ModelRunner
from spool.engine.step_types import PendingStep, SchedulerOutput
from spool.engine.step_wire import decode_step, encode_step

log = logging.getLogger(__name__)

# After a rank dies during a step on CUDA, how long rank 0's watchdog lets the aborted collective surface as
# an exception before it ends the process itself (a kernel stuck on a dead peer can outlive the abort).
_NCCL_ABORT_GRACE_S = 30.0
# Longest the ranks may take to start (import torch, load their shard: minutes for a 70B checkpoint on a slow
# disk). A rank that dies meanwhile is noticed at once; this bounds only a rank that hangs while loading.
_STARTUP_TIMEOUT_S = 1800.0
_POLL_S = 0.2


def make_runner(config: EngineConfig, model_cfg: ModelConfig, max_model_len: int):
    """The engine's runner: a ModelRunner on one device, or a TPExecutor driving tensor_parallel_size ranks."""
    if config.tensor_parallel_size == 1:
        return ModelRunner(config, model_cfg, max_model_len)
    return TPExecutor(config, model_cfg, max_model_len)


def rank_devices(config: EngineConfig) -> list[str]:
    """Each rank's device: consecutive GPUs from --device's index (cuda means cuda:0), or the CPU for all."""
    device = config.resolve_device()
    if device.type == "cpu":
        return ["cpu"] * config.tensor_parallel_size
    first = device.index or 0
    return [f"cuda:{first + r}" for r in range(config.tensor_parallel_size)]


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "is still running"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class _RankSet:
    """Ranks 1..N-1: their processes, pipes and failure state, and the watchdog over them.

    Kept apart from TPExecutor so that the watchdog thread and the finalizer hold no reference to the
    executor: an engine that is dropped is collected, and its ranks stopped, as with any object.
    """

    def __init__(self) -> None:
        self.processes: list[mp.Process] = []
        self.pipes: list[Connection] = []
        self.tp: TPGroup | None = None
        self.failure: str | None = None  # set once, when the first rank fails; every later call raises it
        self.in_step = False  # rank 0 is between launch() and the step's result
        self.stopping = threading.Event()
        self.closed = False

    def close(self, kill: bool = False) -> None:
        """Stop the ranks (politely unless kill), then leave the process group; safe to call again."""
        if self.closed:
            return
        self.closed = True
        self.stopping.set()
        for pipe in self.pipes:
            try:
                if not kill:
                    pipe.send_bytes(b'{"op": "stop"}')
                pipe.close()
            except OSError:
                pass
        for p in self.processes:
            if kill and p.is_alive():
                p.kill()
            p.join(timeout=10)
            if p.is_alive():
                log.warning("tensor-parallel rank process %d did not stop: killing it", p.pid)
                p.kill()
                p.join(timeout=5)
        if self.tp is not None:
            if kill:  # a rank failed: a clean NCCL teardown could wait on it, an abort cannot
                distributed.abort_group(self.tp)
            distributed.destroy_group(self.tp)

    def dead_rank(self, wait_s: float = 0.0) -> str | None:
        """'tensor-parallel rank R (pid P) was killed by SIGKILL' for the first rank process that is gone
        (waiting up to wait_s for one to go), or None."""
        gone = wait([p.sentinel for p in self.processes], timeout=wait_s)
        for rank, proc in enumerate(self.processes, start=1):
            if proc.sentinel in gone:
                # Its pipes close a moment before its exit status can be collected (by this thread or another).
                deadline = time.monotonic() + 5.0
                while proc.exitcode is None and time.monotonic() < deadline:
                    time.sleep(0.005)
                return f"tensor-parallel rank {rank} (pid {proc.pid}) {_describe_exit(proc.exitcode)}"
        return None

    def watch(self) -> None:
        """Rank 0's watchdog thread: notice a rank process that exits while the engine runs."""
        while not self.stopping.is_set():
            dead = self.dead_rank(_POLL_S)
            if self.stopping.is_set():
                return
            if dead is None:
                continue
            if self.failure is None:
                self.failure = dead
            log.error("%s", dead)
            if self.tp is None or self.tp.backend != "nccl":
                return  # gloo: a collective blocked on the dead rank raises by itself (its socket closed)
            distributed.abort_group(self.tp)
            deadline = time.monotonic() + _NCCL_ABORT_GRACE_S
            while self.in_step and not self.closed and time.monotonic() < deadline:
                time.sleep(_POLL_S)
            if self.in_step and not self.closed:
                log.critical("%s, and rank 0 is still blocked in its step %.0fs after aborting NCCL: exiting",
                             dead, _NCCL_ABORT_GRACE_S)
                os._exit(1)
            return


class TPExecutor:
    """Rank 0 of a tensor-parallel engine: the runner LLMEngine talks to; starts and watches the other ranks.

    It behaves like ModelRunner (launch(sched) -> PendingStep, num_blocks, device, ...): anything not defined
    here is rank 0's own ModelRunner's.
    """

    def __init__(self, config: EngineConfig, model_cfg: ModelConfig, max_model_len: int):
        config.validate_for(model_cfg)
        world = config.tensor_parallel_size
        devices = rank_devices(config)
        timeout_s = distributed.COLLECTIVE_TIMEOUT_S
        self.ranks = ranks = _RankSet()
        weakref.finalize(self, ranks.close)
        started = time.monotonic()
        store = distributed.open_store(world, timeout_s)
        ctx = mp.get_context("spawn")
        # CPU ranks share rank 0's cores (its intra-op threads, split); a GPU rank's host work needs one thread.
        threads = max(1, torch.get_num_threads() // world) if devices[0] == "cpu" else 1
        for rank in range(1, world):
            spec = {"rank": rank, "world_size": world, "store_port": store.port, "timeout_s": timeout_s,
                    "config": dataclasses.asdict(dataclasses.replace(config, device=devices[rank])),
                    "max_model_len": max_model_len, "log_level": logging.getLogger().getEffectiveLevel(),
                    "num_threads": threads}
            parent_end, child_end = ctx.Pipe(duplex=True)
            proc = ctx.Process(target=rank_main, args=(json.dumps(spec), child_end), daemon=True,
                               name=f"spool-tp-rank{rank}")
            proc.start()
            child_end.close()
            ranks.processes.append(proc)
            ranks.pipes.append(parent_end)
        threading.Thread(target=ranks.watch, name="spool-tp-watchdog", daemon=True).start()
        try:
            self._await_all("hello", started + _STARTUP_TIMEOUT_S)  # every rank imported torch: the rendezvous is quick
            ranks.tp = distributed.init_group(0, world, store.port, torch.device(devices[0]), timeout_s, store)
            self.tp = ranks.tp
            self.runner = ModelRunner(dataclasses.replace(config, device=devices[0]), model_cfg, max_model_len,
                                      self.tp)
            ready = self._await_all("ready", started + _STARTUP_TIMEOUT_S)
        except (ConfigError, OSError):  # rank 0's own checkpoint or setting is bad: the operator's error as is
            ranks.close(kill=True)
            raise
        except Exception as e:
            raise self._fail(e) from e
        blocks = {msg["num_blocks"] for msg in ready} | {self.runner.num_blocks}
        if len(blocks) != 1:
            raise self._fail(RuntimeError(f"ranks disagree on the KV cache size: {sorted(blocks)} blocks"))
        log.info("tensor parallel: %d ranks on %s ready in %.1fs", world, ", ".join(devices),
                 time.monotonic() - started)

    def __getattr__(self, name: str):
        # Only called for names not found on the executor: num_blocks, device, dtype, model, graphs, ...
        if name in ("runner", "tp", "ranks"):
            raise AttributeError(name)
        return getattr(self.runner, name)

    @property
    def failure(self) -> str | None:
        """Why the engine stopped (a rank died, a collective failed), or None while it runs."""
        return self.ranks.failure

    # -- the step path ----------------------------------------------------------------------------------
    def launch(self, sched: SchedulerOutput, previous: PendingStep | None = None) -> PendingStep:
        """Send the step's inputs to every rank, then run rank 0's forward pass and sampling."""
        if previous is not None:
            # Input tokens still on rank 0's device (async scheduling) would never reach the other ranks.
            raise TensorParallelError("tensor parallelism runs synchronous steps: async scheduling must be off")
        ranks = self.ranks
        if ranks.failure is not None:
            raise self._fail(TensorParallelError(ranks.failure))
        if ranks.closed:
            raise TensorParallelError("this tensor-parallel engine was shut down")
        try:
            if sched.chunks:
                ranks.in_step = True
                payload = encode_step(sched)
                ring = json.dumps({"op": "step", "len": payload.numel()}).encode()
                for pipe in ranks.pipes:
                    pipe.send_bytes(ring)
                self.tp.broadcast_host(payload)
            pending = self.runner.launch(sched)
        except Exception as e:
            ranks.in_step = False
            raise self._fail(e) from e
        if pending.sample is None:
            ranks.in_step = False
            return pending
        return dataclasses.replace(pending, sample=_GuardedSample(pending.sample, self))

    def shutdown(self) -> None:
        """Stop the other ranks and leave the process group (also done when the engine is collected or at exit)."""
        self.ranks.close()

    # -- failures -------------------------------------------------------------------------------------
    def _fail(self, error: BaseException) -> TensorParallelError:
        """The engine's error for what a call raised (naming the rank that died, if one did); stops the ranks."""
        ranks = self.ranks
        if ranks.failure is None and not ranks.closed:
            # A collective that failed because a rank died can raise before that rank's exit is visible.
            dead = ranks.dead_rank(1.0)
            if dead is not None:
                ranks.failure = dead + self._last_words()
        if ranks.failure is None:
            ranks.failure = (f"tensor-parallel step failed on rank 0 (collective timeout {self.tp.timeout_s:.0f}s): "
                             f"{type(error).__name__}: {error}" if getattr(self, "tp", None) is not None else
                             f"tensor-parallel start-up failed on rank 0: {type(error).__name__}: {error}")
        if not ranks.closed:
            log.error("%s; stopping the engine", ranks.failure)
        ranks.close(kill=True)
        return TensorParallelError(ranks.failure)

    def _last_words(self) -> str:
        """The error message a failed rank sent before it exited, if any."""
        for pipe in self.ranks.pipes:
            try:
                while pipe.poll():
                    msg = json.loads(pipe.recv_bytes())
                    if msg.get("op") == "error":
                        return f": {msg['message']}"
            except (OSError, EOFError, ValueError):
                continue
        return ""

    def _await_all(self, op: str, deadline: float) -> list[dict]:
        """Wait for message `op` from every rank; a rank that dies or reports an error raises at once."""
        ranks = self.ranks
        got: dict[int, dict] = {}
        while len(got) < len(ranks.pipes):
            waiting = [i for i in range(len(ranks.pipes)) if i not in got]
            ready = wait([ranks.pipes[i] for i in waiting] + [ranks.processes[i].sentinel for i in waiting],
                         timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                ranks.failure = f"tensor-parallel ranks did not report {op!r} within {_STARTUP_TIMEOUT_S:.0f}s"
                raise TensorParallelError(ranks.failure)
            for i in waiting:
                if ranks.pipes[i] in ready:
                    try:
                        msg = json.loads(ranks.pipes[i].recv_bytes())
                    except (EOFError, OSError):
                        msg = {"op": "error", "message": "its pipe closed"}
                    if msg["op"] == "error":
                        ranks.failure = f"tensor-parallel rank {i + 1} failed: {msg['message']}"
                        raise TensorParallelError(ranks.failure)
                    got[i] = msg
                elif ranks.processes[i].sentinel in ready:
                    ranks.failure = (ranks.dead_rank() or f"tensor-parallel rank {i + 1} died") + self._last_words()
                    raise TensorParallelError(ranks.failure)
        return [got[i] for i in range(len(ranks.pipes))]


class _GuardedSample:
    """A step's pending sample whose result() reports a failed rank as the engine's error."""

    __slots__ = ("sample", "executor")

    def __init__(self, sample, executor: TPExecutor):
        self.sample, self.executor = sample, executor

    def result(self):
        try:
            return self.sample.result()
        except Exception as e:
            raise self.executor._fail(e) from e
        finally:
            self.executor.ranks.in_step = False


# -- ranks 1..N-1 ---------------------------------------------------------------------------------------
def rank_main(spec_json: str, pipe: Connection) -> None:
    """Entry point of a rank process: join the group, build this rank's shard, then run every step rank 0 sends."""
    spec = json.loads(spec_json)
    rank = spec["rank"]
    # Rank 0 decides when this process ends (stop message, closed pipe, its death): a Ctrl-C or SIGTERM sent
    # to the whole process group must not kill a rank under a worker that is finishing its jobs.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=spec["log_level"], stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s tp-rank{rank} %(name)s: %(message)s")
    torch.set_num_threads(spec["num_threads"])
    threading.Thread(target=_exit_with_parent, name="spool-tp-parent-watch", daemon=True).start()
    tp = None
    try:
        pipe.send_bytes(json.dumps({"op": "hello"}).encode())
        config = EngineConfig(**spec["config"])
        model_cfg = ModelConfig.from_dir(config.model)
        tp = distributed.init_group(rank, spec["world_size"], spec["store_port"], config.resolve_device(),
                                    spec["timeout_s"])
        runner = ModelRunner(config, model_cfg, spec["max_model_len"], tp)
        pipe.send_bytes(json.dumps({"op": "ready", "num_blocks": runner.num_blocks}).encode())
        while True:
            try:
                msg = json.loads(pipe.recv_bytes())
            except (EOFError, OSError):
                return  # rank 0 is gone
            if msg["op"] == "stop":
                return
            payload = torch.empty(msg["len"], dtype=torch.int32)
            tp.broadcast_host(payload)
            runner.launch(decode_step(payload))
            if runner.device.type == "cuda":
                # Free in lock-step (rank 0 sends the next step only after this one's logits reached it), and it
                # keeps the next step's host staging buffers (decode graphs) from racing this step's copies.
                torch.cuda.current_stream(runner.device).synchronize()
    except BaseException as e:
        log.error("rank %d failed: %s", rank, "".join(traceback.format_exception(e)).rstrip())
        try:
            pipe.send_bytes(json.dumps({"op": "error", "message": f"{type(e).__name__}: {e}"}).encode())
        except OSError:
            pass
        sys.exit(1)
    finally:
        if tp is not None:
            distributed.destroy_group(tp)


def _exit_with_parent() -> None:
    """A rank outlives rank 0 by at most this thread's reaction time (a collective may be blocked on it)."""
    parent = mp.parent_process()
    if parent is None:
        return
    wait([parent.sentinel])
    os._exit(1)
