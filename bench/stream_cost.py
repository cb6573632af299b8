"""What token streams cost Redis, by stream interval: commands and Redis CPU-seconds per million tokens.

  python bench/stream_cost.py                                   # 512 sequences at 30 ms steps, intervals 0..200
  python bench/stream_cost.py --intervals 0 50 100 --jobs 2048 --json out.json

CPU only, no GPU: a real redis-server, the real worker code (spool.worker.loop.Worker on the main thread, as `spool
worker` runs it) and a stub engine (spool/testing/stub_engine.py) that emits one token per running sequence per
step at the H200's llama3-8b decode rate (bench/RESULTS.md: a decode step at ~512 sequences takes ~30 ms). Each
pass starts a fresh redis-server, enqueues `--jobs` jobs (output lengths uniform in --max-tokens), resets
Redis's statistics and lets one worker run them all; then it reads:

- Redis commands per million generated tokens (INFO commandstats deltas, commands run by scripts included:
  an EVALSHA of APPEND counts as itself plus the EXISTS, XREVRANGE, XADD(s) and EXPIRE inside it),
- Redis CPU-seconds per million generated tokens (INFO cpu: used_cpu_sys + used_cpu_user deltas),
- the worker process's own CPU-seconds per million tokens,
- token latency: from the moment the stub produced a token (collect() returned) to the stream entry that
  carries it (the entry id's millisecond timestamp, Redis's clock, the same host): p50 / p99 / max, and for
  the first token of each request alone (it is written at once whatever the interval),
- the step rate the worker reached (a worker slower than the stub's step time lowers it).

A pass with streaming off (`none`) is the floor: the per-job writes (admission, result, acks, heartbeats).
Not a test: figures go to bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _pct(values: list[float], q: float) -> float | None:
    s = sorted(values)
    return round(s[min(len(s) - 1, int(q * len(s)))], 2) if s else None


def _commandstats(r) -> dict[str, tuple[int, int]]:
    """command -> (calls, usec)."""
    return {name.removeprefix("cmdstat_"): (v["calls"], v["usec"])
            for name, v in r.info("commandstats").items()}


def _redis_cpu(r) -> float:
    info = r.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def _latencies(r, keys, engine, ids: list[str]) -> tuple[list[float], list[float], int]:
    """(every token's latency ms, first tokens' latency ms, stream entries) over the streams of `ids`."""
    every, first, entries = [], [], 0
    for rid in ids:
        produced = engine.produced.get(rid) or []
        position = 0
        for entry_id, fields in r.xrange(keys.tokens(rid)):
            if fields.get(b"type") != b"delta":
                continue
            entries += 1
            landed_ms = int(entry_id.split(b"-")[0])
            n = len(json.loads(fields[b"data"])["token_ids"])
            for k in range(position, min(position + n, len(produced))):
                lat = landed_ms - produced[k] * 1000
                every.append(lat)
                if k == 0:
                    first.append(lat)
            position += n
    return every, first, entries


def one_pass(args: argparse.Namespace, interval_ms: int | None) -> dict:
    """Run every job through one worker; interval_ms None: the jobs do not stream."""
    from spool.producer import Client
    from spool.protocol import Keys
    from spool.protocol.connection import connect
    from spool.testing.redis_server import RedisServer
    from spool.testing.stub_engine import StubEngine
    from spool.worker.loop import Worker
    from spool.worker.settings import WorkerSettings

    tmp = Path(tempfile.mkdtemp(prefix="spool-stream-cost-"))
    server = RedisServer(tmp / "redis").start()
    try:
        keys, r = Keys(), server.client()
        rng = random.Random(args.seed)
        lo, hi = args.max_tokens
        jobs = [{"id": f"j{i}", "prompt": "tell me a story", "max_tokens": rng.randint(lo, hi),
                 "stream": interval_ms is not None} for i in range(args.jobs)]
        client = Client(server.url)
        ids = client.enqueue_many(jobs)
        client.close()
        engine = StubEngine(max_num_seqs=args.seqs, step_s=args.step_ms / 1000, record_times=True)
        # A tree from before coalescing (to measure "before" with this script) has no stream interval.
        coalescing = "stream_interval_ms" in WorkerSettings.__dataclass_fields__
        settings = WorkerSettings(redis_url=server.url, name="bench", block_ms=50, max_jobs=args.jobs,
                                  **({"stream_interval_ms": interval_ms or 0} if coalescing else {}))
        worker = Worker(engine, connect(server.url), settings)
        r.config_resetstat()
        cpu0, wall0, proc0 = _redis_cpu(r), time.perf_counter(), time.process_time()
        worker.run()
        wall, proc = time.perf_counter() - wall0, time.process_time() - proc0
        redis_cpu = _redis_cpu(r) - cpu0
        stats = _commandstats(r)  # before the reads below add their own
        tokens = engine.stats.generation_tokens
        per_m = 1e6 / max(tokens, 1)
        every, first, entries = _latencies(r, keys, engine, ids) if interval_ms is not None else ([], [], 0)
        calls = {name: c for name, (c, _) in stats.items() if name not in ("config", "info")}
        busy_steps = [n for n in engine.step_sizes if n]
        return {
            "interval_ms": "none" if interval_ms is None else interval_ms if coalescing else "before",
            "jobs": args.jobs, "tokens": tokens, "wall_s": round(wall, 2),
            "steps_per_s": round(engine.stats.num_steps / wall, 1),
            "mean_batch": round(statistics.fmean(busy_steps), 1) if busy_steps else 0,
            "tokens_per_s": round(tokens / wall, 1),
            "redis_commands_per_m_tokens": round(sum(calls.values()) * per_m),
            "redis_cpu_s_per_m_tokens": round(redis_cpu * per_m, 2),
            "redis_cpu_share": round(redis_cpu / wall, 3),  # of one core, while this worker ran
            "worker_cpu_s_per_m_tokens": round(proc * per_m, 2),
            "append_calls_per_m_tokens": round(worker.tokens.writes * per_m) if coalescing else None,
            "stream_entries_per_m_tokens": round(entries * per_m),
            "token_latency_ms_p50": _pct(every, 0.5), "token_latency_ms_p99": _pct(every, 0.99),
            "token_latency_ms_max": round(max(every), 1) if every else None,
            "first_token_latency_ms_p50": _pct(first, 0.5), "first_token_latency_ms_p99": _pct(first, 0.99),
            "commands_per_m_tokens": {k: round(v * per_m) for k, v in sorted(calls.items(), key=lambda kv: -kv[1])},
        }
    finally:
        server.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--intervals", type=int, nargs="+", default=[0, 20, 50, 100, 200],
                   help="stream_interval_ms values to measure (0: every step)")
    p.add_argument("--no-baseline", action="store_true", help="skip the pass with streaming off")
    p.add_argument("--seqs", type=int, default=512, help="concurrent sequences (max_num_seqs of the stub)")
    p.add_argument("--step-ms", type=float, default=30.0, help="the stub's step time (H200 llama3-8b decode: ~30)")
    p.add_argument("--jobs", type=int, default=1024)
    p.add_argument("--max-tokens", type=int, nargs=2, default=[128, 256], metavar=("MIN", "MAX"),
                   help="output lengths, uniform")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    rows = []
    for interval in ([] if args.no_baseline else [None]) + args.intervals:
        row = one_pass(args, interval)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "commands_per_m_tokens"}), file=sys.stderr,
              flush=True)
    out = {"seqs": args.seqs, "step_ms": args.step_ms, "jobs": args.jobs, "max_tokens": args.max_tokens,
           "cpus": os.cpu_count(), "rows": rows}
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
