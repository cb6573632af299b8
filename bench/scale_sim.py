"""Scale by simulation: how many H200-class workers one Redis core serves, measured with the real worker code.

  python bench/scale_sim.py                                   # K = 1 2 4 workers, streaming and not, 20 s each
  python bench/scale_sim.py --workers 1 2 4 8 --window-s 30 --json out.json
  python bench/scale_sim.py --redis-url redis://host:6379/0   # an existing single Redis (it is FLUSHALLed!)
  python bench/scale_sim.py --cluster-url redis://127.0.0.1:7000/0   # a Redis Cluster (after the cluster merge)
  python bench/scale_sim.py --stream-interval-ms 50           # the worker's coalescing setting, where it exists

Each simulated worker is a process running the real worker loop (spool.worker.loop.Worker: intake, leases,
outbox, token streams, finish) around StubEngine, which stands in for the GPU: max_num_seqs sequences, one
token per running sequence per step, steps paced at the measured H200 rate. The default, 33.1 steps/s at
512 sequences, is bench/RESULTS.md's 2026-12-02 run1 (H200, llama3-8b, 512 requests, 549 engine steps in
16.6 s; bench/results/2026-12-02/run1-h200-llama8b.json). 512 tokens a step is every sequence decoding: that
run's steps averaged 239 output tokens (prefill chunks share them), so the simulated load per worker
(16,947 tok/s) is 2.1x the measured 7,894 output tok/s: a conservative (heavy) model of one worker.

A closed-loop producer keeps K x max_num_seqs jobs outstanding (a job is enqueued when one is taken off the
stream), so queue wait stays near zero and the first-token latency is the system's own. Per K it reports
Redis CPU (INFO cpu, main thread) per generated token and per job, Redis commands per token, the Redis core
utilization, the tokens/s the workers reached against their target, and p50/p99 enqueue-to-first-token
(result timings). Workers per Redis core is extrapolated as 1 / (Redis CPU-s per token x one worker's
tokens/s): on a small machine the simulated workers, not Redis, run out of CPU first, so that figure is an
extrapolation from the measured per-token cost, and is labelled as one.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import multiprocessing
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # first: spool from this checkout

import orjson  # noqa: E402
import redis  # noqa: E402

H200_STEPS_PER_S = 549 / 16.6  # bench/RESULTS.md 2026-12-02 run1: llama3-8b, 512 requests, 549 steps in 16.6 s
H200_SEQS = 512
OUTPUT_TOKENS = 256  # that run's output length per request


# -- the stub engine -----------------------------------------------------------------------------
@dataclasses.dataclass(slots=True)
class _Seq:
    request_id: str
    max_tokens: int
    num_prompt_tokens: int
    generated: int = 0


@dataclasses.dataclass(slots=True)
class _Stats:
    num_steps: int = 0
    generation_tokens: int = 0


@dataclasses.dataclass(slots=True)
class _Config:
    model: str = "stub-h200"
    max_num_seqs: int = H200_SEQS
    block_size: int = 16
    enable_prefix_caching: bool = False


@dataclasses.dataclass(slots=True)
class _Runner:
    device: str = "stub"
    dtype: str = "none"
    num_blocks: int = 0


class _Scheduler:
    """What the worker's heartbeat reads: the running and waiting queues."""

    def __init__(self) -> None:
        self.running: list[_Seq] = []
        self.waiting: list[_Seq] = []


@dataclasses.dataclass(slots=True)
class _Step:
    began: float
    seqs: list[_Seq]


class StubEngine:
    """The LLMEngine surface the worker uses, without a model: every running sequence gains one token per step,
    and a step takes 1/steps_per_s of wall time (spent in collect(), as the worker waits on the GPU)."""

    def __init__(self, max_num_seqs: int = H200_SEQS, steps_per_s: float = H200_STEPS_PER_S):
        self.config = _Config(max_num_seqs=max_num_seqs)
        self.runner = _Runner()
        self.scheduler = _Scheduler()
        self.stats = _Stats()
        self.step_s = 1.0 / steps_per_s
        self.max_model_len = 4096
        self.tokenizer = None
        self.requests: dict[str, _Seq] = {}
        self._pending: list = []  # deltas produced outside a step (aborts)

    # admission
    def encode_prompt(self, prompt):
        """The prompt as (text, ids): one id per word, enough for the usage counts."""
        text = prompt if isinstance(prompt, str) else None
        ids = prompt.get("prompt_token_ids") if isinstance(prompt, dict) else None
        return text, list(ids) if ids else [1] * max(1, len((text or "").split()))

    def add_request(self, request_id, prompt, params=None, priority: int = 0, isolated: bool = False) -> None:
        """Queue a request; it starts at the next step."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in the engine")
        seq = _Seq(request_id, params.max_tokens or OUTPUT_TOKENS, len(prompt.get("prompt_token_ids") or [1]))
        self.requests[request_id] = seq
        self.scheduler.waiting.append(seq)

    def admission_capacity(self, priority: int = 0) -> int:
        """Free sequence slots."""
        return max(0, self.config.max_num_seqs - len(self.scheduler.running) - len(self.scheduler.waiting))

    def abort(self, request_id: str) -> bool:
        """End a request now; its final delta comes out of the next collect()."""
        from spool.engine.outputs import RequestDelta

        seq = self.requests.pop(request_id, None)
        if seq is None:
            return False
        for queue in (self.scheduler.running, self.scheduler.waiting):
            if seq in queue:
                queue.remove(seq)
        self._pending.append(RequestDelta(request_id, 0, [], "", True, "abort", None, None, None,
                                          seq.num_prompt_tokens))
        return True

    def isolated_request(self) -> None:
        """No quarantine in the simulation."""
        return None

    def has_unfinished_requests(self) -> bool:
        """True while anything runs, waits, or has a delta to deliver."""
        return bool(self.scheduler.running or self.scheduler.waiting or self._pending)

    def kv_cache_usage(self) -> float:
        """Running sequences over slots, as a stand-in."""
        return len(self.scheduler.running) / self.config.max_num_seqs

    def get_request_output(self, request_id: str):
        """Not used by the simulation (only after a step error)."""
        return None

    # the step
    def launch(self) -> _Step:
        """Start a step: admit the waiting sequences, mark the time the 'GPU' starts."""
        self.scheduler.running.extend(self.scheduler.waiting)
        self.scheduler.waiting.clear()
        return _Step(time.perf_counter(), list(self.scheduler.running))

    def collect(self, step: _Step) -> list:
        """Wait out the step's device time, then give every sequence of the step its token."""
        from spool.engine.outputs import RequestDelta

        left = step.began + self.step_s - time.perf_counter()
        if left > 0:
            time.sleep(left)
        deltas, self._pending = self._pending, []
        self.stats.num_steps += 1
        finished = []
        for seq in step.seqs:
            if self.requests.get(seq.request_id) is not seq:
                continue  # aborted during the step
            seq.generated += 1
            self.stats.generation_tokens += 1
            done = seq.generated >= seq.max_tokens
            deltas.append(RequestDelta(seq.request_id, 0, [7], "tok ", done, "length" if done else None, None,
                                       None, None, seq.num_prompt_tokens))
            if done:
                finished.append(seq)
        for seq in finished:
            del self.requests[seq.request_id]
        if finished:
            gone = {id(s) for s in finished}
            self.scheduler.running = [s for s in self.scheduler.running if id(s) not in gone]
        return deltas

    def step(self) -> list:
        """launch() and collect() in one."""
        return self.collect(self.launch())


# -- one simulated worker ------------------------------------------------------------------------
def worker_settings(url: str, name: str, stream_interval_ms: float | None):
    """WorkerSettings for a simulated worker; stream_interval_ms only where the setting exists (streams helper)."""
    from spool.worker.settings import WorkerSettings

    kw = {"redis_url": url, "name": name, "block_ms": 100, "heartbeat_s": 1.0, "claim_idle_ms": 60_000}
    names = {f.name for f in dataclasses.fields(WorkerSettings)}
    if stream_interval_ms is not None:
        if "stream_interval_ms" not in names:
            raise SystemExit("this worker has no stream_interval_ms setting (the streams change is not merged): "
                             "drop --stream-interval-ms")
        kw["stream_interval_ms"] = stream_interval_ms
    return WorkerSettings(**kw)


def build_worker(url: str, name: str, seqs: int, steps_per_s: float, stream_interval_ms: float | None):
    """The real worker loop around a StubEngine."""
    from spool.protocol.connection import connect
    from spool.worker.loop import Worker

    settings = worker_settings(url, name, stream_interval_ms)
    return Worker(StubEngine(seqs, steps_per_s), connect(url, fail_fast=True), settings)


def _serve(url: str, name: str, seqs: int, steps_per_s: float, stream_interval_ms: float | None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    w = build_worker(url, name, seqs, steps_per_s, stream_interval_ms)
    w.install_signal_handlers()
    w.settings.grace_period_s = 0.0
    sys.exit(w.run())


# -- tailers: clients reading every streamed job's token stream -----------------------------------
def _tail(url: str, ids, events) -> None:
    """Read the token stream of every id that arrives on `ids` to its done event (AsyncClient.stream, one task
    per job, as a gateway streaming SSE does); adds the events read to `events`."""
    import asyncio
    import queue

    from spool.producer import AsyncClient

    async def one(client, rid: str) -> None:
        n = 0
        try:
            async for _ in client.stream(rid, timeout=300):
                n += 1
        except Exception:  # noqa: BLE001 - the run is being torn down
            return
        with events.get_lock():
            events.value += n

    async def run() -> None:
        client = AsyncClient(url)
        tasks = set()
        while True:
            try:
                rid = ids.get_nowait()
            except queue.Empty:
                await asyncio.sleep(0.01)
                continue
            if rid is None:
                break
            task = asyncio.ensure_future(one(client, rid))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    asyncio.run(run())


# -- the driver ----------------------------------------------------------------------------------
def redis_nodes(url: str) -> list[redis.Redis]:
    """Clients of every master behind `url`: itself, or each primary of a Redis Cluster."""
    node = redis.Redis.from_url(url)
    if int(node.info("cluster").get("cluster_enabled", 0)) != 1:
        return [node]
    from redis.cluster import RedisCluster

    cluster = RedisCluster.from_url(url)
    return [redis.Redis(host=n.host, port=n.port) for n in cluster.get_primaries()]


def _cpu(nodes: list[redis.Redis]) -> float:
    """Redis CPU seconds so far, summed over nodes (the main thread where Redis reports it)."""
    total = 0.0
    for n in nodes:
        info = n.info("cpu")
        if "used_cpu_user_main_thread" in info:
            total += info["used_cpu_user_main_thread"] + info["used_cpu_sys_main_thread"]
        else:
            total += info["used_cpu_user"] + info["used_cpu_sys"]
    return total


def _heartbeats(r, keys) -> dict[str, tuple[int, float]]:
    """Each live worker's (generated tokens, time of that heartbeat)."""
    out = {}
    for name in r.smembers(keys.workers):
        raw = r.hmget(keys.worker(name.decode()), "generated_tokens", "last_seen")
        if raw[0] is not None and raw[1] is not None:
            out[name.decode()] = (int(orjson.loads(raw[0])), float(orjson.loads(raw[1])))
    return out


def _token_rate(before: dict[str, tuple[int, float]], after: dict[str, tuple[int, float]]) -> float:
    """Tokens/s of all workers between two heartbeat snapshots (each worker over its own heartbeat times)."""
    rate = 0.0
    for name, (tokens, seen) in after.items():
        if name in before and seen > before[name][1]:
            rate += (tokens - before[name][0]) / (seen - before[name][1])
    return rate


def _command_calls(nodes: list[redis.Redis]) -> dict[str, int]:
    """Calls per command so far, summed over nodes."""
    calls: dict[str, int] = {}
    for n in nodes:
        for name, v in n.info("commandstats").items():
            calls[name] = calls.get(name, 0) + v["calls"]
    return calls


class ClosedLoopProducer:
    """Keeps `outstanding` jobs in the jobs stream (backlog plus in flight): one enqueued per one finished."""

    def __init__(self, client, outstanding: int, stream: bool, max_tokens: int, tail_queues: list | None = None):
        self.client, self.outstanding, self.stream, self.max_tokens = client, outstanding, stream, max_tokens
        self.tail_queues = tail_queues or []  # each new id goes to one tailer process, round robin
        self.sent: list[str] = []
        self.stop = threading.Event()
        self._n = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        streams = self.client.keys.all_jobs  # every priority (and every shard, where streams are sharded)
        while not self.stop.is_set():
            missing = self.outstanding - sum(self.client.redis.xlen(s) for s in streams)
            if missing > 0:
                batch = [{"id": f"sim-{self._n + i}", "prompt": "simulated prompt of a few words",
                          "max_tokens": self.max_tokens, "ignore_eos": True, "stream": self.stream}
                         for i in range(missing)]
                ids = self.client.enqueue_many(batch)
                for n, rid in enumerate(ids):
                    if self.tail_queues:
                        self.tail_queues[(self._n + n) % len(self.tail_queues)].put(rid)
                self._n += missing
                self.sent.extend(ids)
            time.sleep(0.02)


def _latencies(r, keys, ids: list[str]) -> list[float]:
    """Enqueue-to-first-token of the finished jobs among `ids`, in seconds."""
    out = []
    mget = getattr(r, "mget_nonatomic", r.mget)  # a cluster client splits the keys by slot
    for i in range(0, len(ids), 500):
        for raw in mget([keys.result(rid) for rid in ids[i:i + 500]]):
            if raw is None:
                continue
            t = orjson.loads(raw)["timings"]
            if t.get("first_token") and t.get("enqueued"):
                out.append(t["first_token"] - t["enqueued"])
    return out


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def measure(url: str, k: int, stream: bool, args: argparse.Namespace, inline: bool = False) -> dict:
    """One point: K simulated workers, every job streaming or none; warm-up, then a measured window."""
    from spool.producer import Client
    from spool.protocol import Keys
    from spool.testing.chaos import count_results

    keys = Keys()
    nodes = redis_nodes(url)
    for n in nodes:
        n.flushall()
    client = Client(url)
    procs, threads, inline_workers = [], [], []
    ctx = multiprocessing.get_context("spawn")
    for i in range(k):
        name = f"sim{i}"
        if inline:
            w = build_worker(url, name, args.seqs, args.steps_per_s, args.stream_interval_ms)
            inline_workers.append(w)
            threads.append(threading.Thread(target=w.run, daemon=True))
            threads[-1].start()
        else:
            p = ctx.Process(target=_serve, args=(url, name, args.seqs, args.steps_per_s, args.stream_interval_ms),
                            daemon=True)
            p.start()
            procs.append(p)
    tailers, tail_queues, tail_events = [], [], ctx.Value("q", 0)
    if stream and getattr(args, "tail", False):
        for _ in range(k):  # one tailer process per worker's worth of streams
            q = ctx.Queue()
            tail_queues.append(q)
            tailers.append(ctx.Process(target=_tail, args=(url, q, tail_events), daemon=True))
            tailers[-1].start()
    producer = ClosedLoopProducer(client, k * args.seqs, stream, args.output_tokens, tail_queues)
    producer.thread.start()
    try:
        end = time.monotonic() + 60
        while len(client.redis.smembers(keys.workers)) < k and time.monotonic() < end:
            time.sleep(0.1)
        time.sleep(args.warmup_s)
        first_id = len(producer.sent)
        cpu0, cmd0, hb0, t0 = _cpu(nodes), _command_calls(nodes), _heartbeats(client.redis, keys), time.monotonic()
        time.sleep(args.window_s)
        cpu1, cmd1, hb1, t1 = _cpu(nodes), _command_calls(nodes), _heartbeats(client.redis, keys), time.monotonic()
        window_ids = producer.sent[first_id:]
        # The window's jobs need a job's length to finish: keep the load on until most have their results
        # (workers slower than their target, on a small machine, take longer).
        give_up = time.monotonic() + max(60.0, 3 * args.output_tokens / args.steps_per_s)
        while time.monotonic() < give_up and count_results(client.redis, keys, window_ids) < 0.9 * len(window_ids):
            time.sleep(0.5)
    finally:
        producer.stop.set()
        producer.thread.join(5)
        for p in procs + tailers:
            p.terminate()
        for w in inline_workers:
            w.request_stop()
            w.request_stop()
        for p in procs + tailers:
            p.join(10)
        for t in threads:
            t.join(10)
    wall, cpu = t1 - t0, cpu1 - cpu0
    tokens = int(_token_rate(hb0, hb1) * wall)
    by_command = {name: cmd1[name] - cmd0.get(name, 0) for name in cmd1}
    cmds = sum(by_command.values())
    top = sorted(by_command.items(), key=lambda kv: -kv[1])[:8]
    lat = _latencies(client.redis, keys, window_ids)
    target = k * args.seqs * args.steps_per_s
    per_token = cpu / tokens if tokens else None
    one_worker_tok_s = args.seqs * args.steps_per_s
    return {
        "workers": k, "streaming": stream, "tailed": bool(tailers), "window_s": round(wall, 2), "tokens": tokens,
        "tokens_per_s": round(tokens / wall, 1), "target_tokens_per_s": round(target, 1),
        "reached": round(tokens / wall / target, 3),
        "redis_cpu_s": round(cpu, 3), "redis_core_utilization": round(cpu / wall, 3),
        "redis_cpu_s_per_million_tokens": round(per_token * 1e6, 2) if per_token else None,
        # INFO commandstats counts the calls scripts make too (an APPEND's XADD, EXPIRE, ...).
        "redis_commands_per_token": round(cmds / tokens, 3) if tokens else None,
        "redis_calls_per_token_by_command": {n.removeprefix("cmdstat_"): round(c / tokens, 3) for n, c in top}
        if tokens else None,
        "jobs_enqueued_in_window": len(window_ids), "first_token_samples": len(lat),
        "first_token_p50_ms": round(_pct(lat, 0.5) * 1000, 1) if lat else None,
        "first_token_p99_ms": round(_pct(lat, 0.99) * 1000, 1) if lat else None,
        # Extrapolated, not measured: how many workers at the H200 rate one Redis core would carry.
        "workers_per_redis_core_extrapolated": round(1.0 / (per_token * one_worker_tok_s), 1) if per_token else None,
    }


def main(argv: list[str] | None = None) -> int:
    """Parse flags, run the sweep, print one JSON line per point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4], help="K values to run (default 1 2 4)")
    p.add_argument("--modes", nargs="+", choices=["stream", "plain"], default=["stream", "plain"],
                   help="every job streaming, none streaming (default both)")
    p.add_argument("--seqs", type=int, default=H200_SEQS, help=f"sequences per worker (default {H200_SEQS})")
    p.add_argument("--steps-per-s", type=float, default=H200_STEPS_PER_S,
                   help=f"engine steps per second (default {H200_STEPS_PER_S:.1f}: H200 llama3-8b, RESULTS.md)")
    p.add_argument("--output-tokens", type=int, default=OUTPUT_TOKENS, help="tokens per job (default 256)")
    p.add_argument("--warmup-s", type=float, default=5.0)
    p.add_argument("--window-s", type=float, default=20.0, help="measured seconds per point (default 20)")
    p.add_argument("--tail", action="store_true",
                   help="streaming runs: also read every job's token stream to its end (one tailer process per "
                        "worker, AsyncClient.stream), so the Redis cost includes the readers")
    p.add_argument("--stream-interval-ms", type=float, default=None,
                   help="the workers' stream_interval_ms (only once the worker has that setting)")
    p.add_argument("--redis-url", default=None, help="an existing single Redis (FLUSHALLed); default: a private one")
    p.add_argument("--cluster-url", default=None,
                   help="an existing Redis Cluster (FLUSHALLed): INFO is summed over its primaries; needs the worker "
                        "and producer to speak cluster (the cluster change)")
    p.add_argument("--stop-at-utilization", type=float, default=0.9,
                   help="stop raising K once the Redis core is this busy (default 0.9)")
    p.add_argument("--json", default=None, help="write all points here")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the workers and the private Redis too
    server = None
    url = args.cluster_url or args.redis_url
    if url is None:
        from spool.testing.redis_server import RedisServer

        server = RedisServer(tempfile.mkdtemp(prefix="spool-scale-sim-")).start()
        url = server.url
    points = []
    try:
        for stream in [m == "stream" for m in args.modes]:
            for k in args.workers:
                point = measure(url, k, stream, args)
                points.append(point)
                print(json.dumps(point), flush=True)
                if point["redis_core_utilization"] >= args.stop_at_utilization:
                    break
    finally:
        if server is not None:
            server.stop()
    out = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count(),
           "redis": "cluster" if args.cluster_url else "single", "seqs": args.seqs, "steps_per_s": args.steps_per_s,
           "stream_interval_ms": args.stream_interval_ms, "tail": args.tail, "points": points}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
