"""The real `spool worker` command as a subprocess: one workload through it, timed once its workers are up.

  python bench/worker_cli.py --shape llama3-8b --num-requests 512 --prompt-len 128 1024 --output-len 256 256
  python bench/worker_cli.py --shape llama3-8b ... --worker-args "--gpus 0"     # the same, under a supervisor

Issue 14: `spool worker --gpus 0` on a one-GPU host must serve exactly like `spool worker` without --gpus. This
starts an embedded redis-server and `python -m spool worker --model DIR [--load-format dummy] --device DEVICE
<engine flags> <--worker-args>`, waits until a worker heartbeat is live (model loaded, CUDA graphs captured;
--expect-workers N: N of them, as `--gpus all` starts one worker per GPU or tensor-parallel group), runs a few
short warm-up jobs, then enqueues the workload as bulk jobs in one go and waits for every result: output tok/s
from the first enqueue to the last result. Then SIGTERM, and how long the stop took and the exit code. Compare
runs with and without --gpus in the same session (bench/gpu_session.sh stage gpus1).
Not a test: figures go to bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.shapes import add_model_flags, model_source  # noqa: E402
from bench.workload import add_engine_flags, add_workload_flags, make_workload  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p)
    add_workload_flags(p)
    add_engine_flags(p)
    p.add_argument("--worker-args", default="", help="more `spool worker` flags, one string (e.g. \"--gpus 0\")")
    p.add_argument("--ready-timeout-s", type=float, default=900.0, help="longest wait for the heartbeats")
    p.add_argument("--expect-workers", type=int, default=1,
                   help="wait for this many worker heartbeats before timing (--gpus: one worker per GPU group)")
    p.add_argument("--log", type=Path, default=None, help="the worker's stderr (default: a temporary file)")
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    from spool.producer.admin import deployment_status
    from spool.producer.client import Client
    from spool.producer.embedded import ensure_local_redis, stop_local_redis

    path, fmt = model_source(args)
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    wl = make_workload(args, vocab)
    state = Path(tempfile.mkdtemp(prefix="spool-worker-cli-"))
    url = ensure_local_redis(state)
    log_path = args.log or state / "worker.log"
    cmd = [sys.executable, "-m", "spool", "worker", "--model", str(path), "--load-format", fmt, "--redis-url", url,
           "--device", args.device, "--max-num-seqs", str(args.max_num_seqs), "--max-num-batched-tokens",
           str(args.max_num_batched_tokens), "--max-model-len", str(args.max_model_len), "--name", "bench",
           *shlex.split(args.worker_args)]
    client = Client(url)
    t_start = time.perf_counter()
    with log_path.open("ab") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        workers: dict = {}
        while len(workers) < args.expect_workers:
            if proc.poll() is not None:
                raise SystemExit(f"the worker exited with {proc.returncode} before serving; see {log_path}")
            if time.perf_counter() - t_start > args.ready_timeout_s:
                raise SystemExit(f"{len(workers)} of {args.expect_workers} worker heartbeats within "
                                 f"{args.ready_timeout_s}s; see {log_path}")
            time.sleep(0.5)
            workers = deployment_status(client.redis, client.keys)["workers"]
        ready_s = time.perf_counter() - t_start
        warm = [client.enqueue(prompt_token_ids=q[:64], max_tokens=8, temperature=0, ignore_eos=True,
                               id=f"warm-{i}") for i, q in enumerate(wl.prompts[:8])]
        for rid in warm:
            client.result(rid, timeout=600)
        jobs = [{"id": f"job-{i}", "prompt_token_ids": q, "max_tokens": n, "temperature": 0, "ignore_eos": True,
                 "priority": "bulk"} for i, (q, n) in enumerate(zip(wl.prompts, wl.output_lens))]
        t0 = time.perf_counter()
        for i in range(0, len(jobs), 500):
            client.enqueue_many(jobs[i:i + 500])
        results = [client.result(j["id"], timeout=3600) for j in jobs]
        wall = time.perf_counter() - t0
        heartbeat = deployment_status(client.redis, client.keys)["workers"]
        t_stop = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=300)
        stop_s = time.perf_counter() - t_stop
    finally:
        if proc.poll() is None:
            proc.kill()
        client.close()
        stop_local_redis(state)

    out_tokens = sum(len(r.token_ids) for r in results)
    res = {
        "model": str(args.model or args.shape), "worker_args": args.worker_args, "requests": len(jobs),
        "completed": sum(r.status == "completed" for r in results), "output_tokens": out_tokens,
        "ready_s": round(ready_s, 1), "wall_s": round(wall, 2), "output_tok_per_s": round(out_tokens / wall, 1),
        "stop_s": round(stop_s, 2), "exit_code": code,
        "workers": {name: {k: hb.get(k) for k in ("device", "gpus", "supervisor", "jobs_done")}
                    for name, hb in heartbeat.items()},
    }
    print(json.dumps(res, indent=2))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0 if code == 0 and res["completed"] == len(jobs) else 1


if __name__ == "__main__":
    sys.exit(main())
