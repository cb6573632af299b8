"""Redis bytes a finished job leaves behind: N jobs through a real `spool worker` on the CPU (tiny model),
then INFO memory and MEMORY USAGE of the keys each job left, once its short-lived keys have expired.

    .venv/bin/python bench/redis_bytes.py --jobs 10000 [--stream-every 0] [--settle-s 12] [--json out.json]

Run it from a checkout (PYTHONPATH=<checkout>) to measure that checkout; the numbers go in the issue note
and bench/RESULTS.md (CPU, no GPU needed).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spool.producer import Client  # noqa: E402
from spool.protocol import Keys  # noqa: E402
from spool.testing.chaos import WorkerProcess, count_results, wait_for  # noqa: E402
from spool.testing.redis_server import RedisServer  # noqa: E402
from spool.testing.tiny_model import build_tiny_model  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--stream-every", type=int, default=0, help="every Nth job streams (0: none)")
    ap.add_argument("--settle-s", type=float, default=12.0, help="wait after the last result (done markers expire)")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    keys = Keys()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        model = tmp_path / "model"
        build_tiny_model(model, arch="llama", hidden_size=64, num_layers=2)
        server = RedisServer(tmp_path / "redis")
        server.start()
        worker = WorkerProcess(model, server.url, "bytes", tmp_path, max_num_seqs=128).start()
        try:
            client = Client(server.url)
            r = client.redis
            wait_for(lambda: r.exists(keys.worker("bytes")), 120, what="worker up")
            time.sleep(1.0)
            base = r.info("memory")["used_memory"]
            keys_before = r.dbsize()
            t0 = time.time()
            ids = client.enqueue_many(
                {"id": f"b{i}", "prompt": f"job {i}", "max_tokens": args.max_tokens, "ignore_eos": True,
                 "stream": bool(args.stream_every) and i % args.stream_every == 0}
                for i in range(args.jobs))
            wait_for(lambda: count_results(r, keys, ids) == len(ids), 3600, interval=1.0, what="all results")
            wall = time.time() - t0
            time.sleep(args.settle_s)
            r.execute_command("MEMORY", "PURGE")
            used = r.info("memory")["used_memory"]
            kinds: Counter[str] = Counter()
            per_kind: Counter[str] = Counter()
            per_job_key = re.compile(rf"^{re.escape(keys.prefix)}(\w+):b\d+$")
            for key in r.scan_iter(match=f"{keys.prefix}*", count=1000):
                m = per_job_key.match(key.decode())
                if m:
                    kinds[m.group(1)] += 1
                    per_kind[m.group(1)] += r.memory_usage(key, samples=0) or 0
            out = {
                "jobs": args.jobs, "max_tokens": args.max_tokens, "stream_every": args.stream_every,
                "wall_s": round(wall, 1), "jobs_per_s": round(args.jobs / wall, 1),
                "used_memory_delta_bytes_per_job": round((used - base) / args.jobs, 1),
                "keys_per_job": round((r.dbsize() - keys_before) / args.jobs, 2),
                "memory_usage_bytes_per_job_by_kind": {k: round(v / args.jobs, 1) for k, v in sorted(per_kind.items())},
                "keys_by_kind": dict(sorted(kinds.items())),
            }
        finally:
            worker.stop()
            server.stop()
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
