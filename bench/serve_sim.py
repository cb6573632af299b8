"""`bench/serve_load.py --sim`: the GPU run's shape on a CPU, a stub engine paced as the H200 runs llama3-8b.

  python bench/serve_load.py --sim                      # streamed, through spool serve (4 processes)
  python bench/serve_load.py --sim --no-stream          # plain
  python bench/serve_load.py --sim --path direct        # the same requests through producer.AsyncClient (no HTTP)

The engine is spool.testing.stub_engine.StubEngine with its prefill model: a token budget per step
(max_num_batched_tokens, 8192 as the real engine's default), decodes first, prompt chunks in arrival order; a
step takes --step-ms plus --prefill-us-per-token per prompt token in it. The defaults (25 ms, 22 us) give the
llama3-8b workload (512 requests, prompt U[128,1024], 256 out) about 13.9 s offline, the H200's 9,400 output
tok/s (bench/RESULTS.md 2026-12-02 run4), with 25 ms decode steps at 512 sequences and ~200 ms for a full
8192-token prefill step. "Offline" is that stub run alone (every request added at once, no Redis), timed here;
the served run is the real Worker loop around the same stub in its own process, `spool serve`, a private
redis-server and the load client (bench/serve_load.py's, in its own process), all timed by the client: from
its first request to its last response read.

CPU: this machine's cores are shared by every process of the run (on the GPU host 16 cores), so besides the
ratio each process group's CPU seconds during the run are reported, per 1,000 output tokens: gateway (the
`spool serve` process tree), load client, redis-server, worker. On the GPU host they compete with the worker's
step loop only when the host runs out of cores.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def stub_engine(args):
    """The stub engine the flags describe."""
    from spool.testing.stub_engine import StubEngine

    return StubEngine(max_num_seqs=args.max_num_seqs, step_s=args.step_ms / 1000,
                      max_num_batched_tokens=args.max_num_batched_tokens,
                      prefill_token_s=args.prefill_us_per_token / 1e6)


def offline(args, prompts: list[list[int]], output_lens: list[int]) -> dict:
    """Every request added at once, stepped to the end without Redis: the run to compare with."""
    from types import SimpleNamespace

    eng = stub_engine(args)
    t0 = time.perf_counter()
    for i, (q, n) in enumerate(zip(prompts, output_lens)):
        eng.add_request(f"offline-{i}", {"prompt_token_ids": q}, SimpleNamespace(max_tokens=n, n=1))
    tokens = 0
    while eng.has_unfinished_requests():
        tokens += sum(len(d.new_token_ids) for d in eng.step())
    return {"offline_s": time.perf_counter() - t0, "steps": eng.stats.num_steps, "tokens": tokens}


def serve_worker(url: str, args, stats_path: Path) -> int:
    """The real worker loop around the stub engine until SIGTERM; its step figures go to `stats_path`."""
    import logging

    from spool.protocol.connection import connect
    from spool.worker.loop import Worker
    from spool.worker.settings import WorkerSettings

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    eng = stub_engine(args)
    interval = {} if args.stream_interval_ms is None else {"stream_interval_ms": args.stream_interval_ms}
    worker = Worker(eng, connect(url), WorkerSettings(redis_url=url, name="bench", block_ms=50, **interval))
    worker.settings.grace_period_s = 0.0
    worker.install_signal_handlers()
    # How much longer than the stub's own step time each step took: the host work that did not fit inside it.
    collect, over = eng.collect, []

    def timed_collect(step):
        out = collect(step)
        over.append(time.perf_counter() - step.began - step.duration)
        return out

    eng.collect = timed_collect  # type: ignore[method-assign]
    rc = worker.run()
    busy = [o for o in over if o >= 0]
    stats_path.write_text(json.dumps({"steps": eng.stats.num_steps, "tokens": eng.stats.generation_tokens,
                                      "overrun_s_total": round(sum(busy), 3),
                                      "overrun_ms_p50": round(sorted(busy)[len(busy) // 2] * 1000, 2) if busy else 0,
                                      "overrun_ms_max": round(max(busy) * 1000, 2) if busy else 0}))
    return rc


# -- CPU accounting ---------------------------------------------------------------------------------
def _stat(pid: int) -> tuple[int, float]:
    """(parent pid, utime + stime in seconds) of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu(root: int) -> dict[int, float]:
    """CPU seconds of `root` and each of its descendants now, by pid."""
    parents, cpu = {}, {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parents[int(entry)], cpu[int(entry)] = _stat(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    out, frontier = {}, [root]
    while frontier:
        pid = frontier.pop()
        if pid in cpu:
            out[pid] = cpu[pid]
            frontier.extend(child for child, parent in parents.items() if parent == pid)
    return out


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds spent between two tree_cpu() snapshots (processes that appeared count from zero)."""
    return sum(v - before.get(pid, 0.0) for pid, v in after.items())


# -- the direct path ------------------------------------------------------------------------------
async def direct_client(url: str, spec: dict) -> dict:
    """The workload as concurrent producer.AsyncClient enqueues + result waits (or stream tails): the gateway's
    own Redis work without HTTP. Same clock and fields as serve_load.workload_client."""
    import asyncio
    import resource

    from spool.producer import AsyncClient
    from spool.protocol.connection import connect_async

    n = len(spec["prompts"])
    client = AsyncClient(url, connection=connect_async(url, max_connections=n + 16))
    ttft, latency, tokens, timeline = [], [], [0], []

    async def one(i: int) -> None:
        t0, sent = time.perf_counter(), time.time()
        rid = await client.enqueue(prompt_token_ids=spec["prompts"][i], max_tokens=spec["output_lens"][i],
                                   temperature=0, ignore_eos=True, stream=spec["stream"])
        if spec["stream"]:
            first = None
            async for ev in client.stream(rid, timeout=3600):
                if first is None and ev.type == "delta":
                    first = time.perf_counter() - t0
            ttft.append(first)
        res = await client.result(rid, timeout=3600)
        tokens[0] += res.usage.completion_tokens
        latency.append(time.perf_counter() - t0)
        timeline.append((rid, sent, time.time()))

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    wall = time.perf_counter() - t0
    await client.aclose()
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"wall_s": wall, "output_tokens": tokens[0], "ttft_s": [t for t in ttft if t is not None],
            "latency_s": latency, "failures": [], "cpu_s": ru.ru_utime + ru.ru_stime, "timeline": timeline}


def run(args, workload_client_main: str) -> dict:
    """Offline, then the workload through spool serve (or directly through Redis) to the stub worker."""
    import subprocess
    import tempfile

    import redis as redis_lib

    from bench.workload import make_workload
    from spool.protocol.keys import Keys
    from spool.testing.gateway import GatewayProcess
    from spool.testing.redis_server import RedisServer

    wl = make_workload(args, 128_256)
    base = offline(args, wl.prompts, wl.output_lens)
    out_tokens = sum(wl.output_lens)
    assert base["tokens"] == out_tokens, base
    tmp = Path(tempfile.mkdtemp(prefix="spool-serve-sim-"))
    redis_server = RedisServer(tmp / "redis").start()
    stats_path = tmp / "worker.json"
    sim_flags = ["--step-ms", str(args.step_ms), "--prefill-us-per-token", str(args.prefill_us_per_token),
                 "--max-num-seqs", str(args.max_num_seqs), "--max-num-batched-tokens",
                 str(args.max_num_batched_tokens)]
    if args.stream_interval_ms is not None:
        sim_flags += ["--stream-interval-ms", str(args.stream_interval_ms)]
    worker = subprocess.Popen([sys.executable, workload_client_main, "--sim-worker", redis_server.url,
                               str(stats_path), *sim_flags], cwd=ROOT)
    gateway = None
    if args.path == "http":
        gateway = GatewayProcess(redis_server.url, tmp, "--served-model-name", "bench", "--workers",
                                 str(args.gateway_workers), *args.serve_args, api_key=None).start()
    r = redis_server.client()
    end = time.monotonic() + 60
    while not r.exists(Keys().worker("bench")):
        if time.monotonic() > end or worker.poll() is not None:
            raise SystemExit("the sim worker did not start")
        time.sleep(0.1)
    time.sleep(1.0)  # every gateway process has read the heartbeat (poll_s 0.5)
    spec = {"model": "bench", "api": "completions", "stream": args.stream, "prompts": wl.prompts,
            "output_lens": wl.output_lens}
    spec_path, result_path = tmp / "spec.json", tmp / "client.json"
    spec_path.write_text(json.dumps(spec))
    target = gateway.base_url if gateway else redis_server.url
    mode = "--client" if gateway else "--direct-client"
    try:
        before = {"gateway": tree_cpu(gateway.proc.pid) if gateway else {}, "worker": tree_cpu(worker.pid),
                  "redis": tree_cpu(redis_server.proc.pid)}
        done = subprocess.run([sys.executable, workload_client_main, mode, target, str(spec_path), str(result_path)],
                              cwd=ROOT)
        after = {"gateway": tree_cpu(gateway.proc.pid) if gateway else {}, "worker": tree_cpu(worker.pid),
                 "redis": tree_cpu(redis_server.proc.pid)}
        stats = r.info("commandstats")
        commands = sum(v["calls"] for v in stats.values())
        top = sorted(((v["calls"], name.removeprefix("cmdstat_")) for name, v in stats.items()), reverse=True)[:8]
        res = json.loads(result_path.read_text()) if done.returncode == 0 else {}
        phases = timeline(r, res.get("timeline", []))
    finally:
        if gateway is not None:
            gateway.stop()
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
        redis_server.stop()
    if done.returncode != 0:
        raise SystemExit(f"the load client failed ({done.returncode})")
    wstats = json.loads(stats_path.read_text()) if stats_path.exists() else {}
    k = res["output_tokens"] / 1000
    cpu = {name: cpu_delta(before[name], after[name]) for name in before}
    # Per gateway process (uvicorn's workers share one listening socket: is the burst spread evenly?).
    per_process = sorted((round(v - before["gateway"].get(pid, 0.0), 2) for pid, v in after["gateway"].items()),
                         reverse=True)
    cpu["client"] = res["cpu_s"]
    return {
        "mode": "sim", "path": args.path, "stream": args.stream, "cpus": os.cpu_count(),
        "gateway_workers": args.gateway_workers if gateway else 0, "serve_args": args.serve_args,
        "requests": len(wl.prompts), "failures": res["failures"][:5], "output_tokens": out_tokens,
        "delivered_tokens": res["output_tokens"], "chunks": res.get("chunks"), "offline_s": round(base["offline_s"], 3),
        "offline_steps": base["steps"], "served_s": round(res["wall_s"], 3),
        "served_over_offline": round(base["offline_s"] / res["wall_s"], 3),
        "worker": wstats, "redis_commands": commands,
        "redis_top_commands": {name: calls for calls, name in top}, "timeline_s": phases,
        "cpu_s": {name: round(v, 2) for name, v in cpu.items()}, "gateway_cpu_s_by_process": per_process,
        "cpu_s_per_1k_tokens": {name: round(v / k, 4) for name, v in cpu.items()},
        **ttft_fields(res["ttft_s"]),
    }


def timeline(r, rows: list) -> dict:
    """When the requests' milestones fell, in seconds from the first request sent: (first, median, last) of
    sent, enqueued, started (admitted by the worker), first token, finished (result written), answered (the
    client has it all)."""
    from spool.protocol import Result
    from spool.protocol.keys import Keys

    if not rows:
        return {}
    keys = Keys()
    raws = r.mget([keys.result(rid) for rid, _, _ in rows])
    marks: dict[str, list[float]] = {name: [] for name in ("sent", "enqueued", "started", "first_token",
                                                           "finished", "answered")}
    for (_, sent, answered), raw in zip(rows, raws):
        marks["sent"].append(sent)
        marks["answered"].append(answered)
        if raw is not None:
            t = Result.from_json(raw).timings
            for name in ("enqueued", "started", "first_token", "finished"):
                if getattr(t, name) is not None:
                    marks[name].append(getattr(t, name))
    t0 = min(marks["sent"])
    return {name: [round(min(v) - t0, 3), round(sorted(v)[len(v) // 2] - t0, 3), round(max(v) - t0, 3)]
            for name, v in marks.items() if v}


def ttft_fields(ttft_s: list[float]) -> dict:
    """TTFT percentiles in ms, as the clients saw them."""
    if not ttft_s:
        return {}
    ms = sorted(x * 1000 for x in ttft_s)
    return {f"ttft_ms_p{q}": round(ms[min(len(ms) - 1, int(q / 100 * len(ms)))], 1) for q in (50, 90, 99)}


def add_flags(p) -> None:
    """The stub engine's pace and the --sim run's options."""
    p.add_argument("--step-ms", type=float, default=25.0, help="--sim: a decode step's time")
    p.add_argument("--prefill-us-per-token", type=float, default=22.0, help="--sim: added per prompt token in a step")
    p.add_argument("--path", choices=("http", "direct"), default="http",
                   help="--sim: through spool serve, or directly through Redis with producer.AsyncClient")
    p.add_argument("--serve-args", nargs="*", default=[], help="--sim: more `spool serve` flags")
