"""`spool batch run` on a big OpenAI-format file through a real worker: wall time, peak RSS, lines/s.

  python bench/batch_10k.py                       # 10,000 lines, tiny CPU model, max_tokens 8
  python bench/batch_10k.py --lines 100000 --fake-worker --resume-check
Starts its own redis-server and a `spool worker` subprocess (CPU by default), runs `spool batch run` under
/usr/bin/time -v (else getrusage) and reads the batch process's peak RSS and CPU time. --fake-worker swaps
the engine for a stub that answers every job at once, to measure the batch runner alone (its ceiling and
its memory at 100k lines). --entry module runs `python -m spool batch run` instead of `spool batch
run`: the `spool` entry point imports torch for its worker flags, which dominates the RSS. Not a test.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def make_input(path: Path, lines: int, max_tokens: int) -> None:
    """Half chat, half completion lines, distinct prompts."""
    with open(path, "wb") as f:
        for i in range(lines):
            if i % 2:
                body = {"model": "tiny", "messages": [{"role": "user", "content": f"question {i}: why?"}],
                        "max_tokens": max_tokens, "temperature": 0.7, "seed": i}
                url = "/v1/chat/completions"
            else:
                body = {"model": "tiny", "prompt": f"line {i} of the nightly batch", "max_tokens": max_tokens}
                url = "/v1/completions"
            f.write(json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": url, "body": body}).encode() + b"\n")


def serve_fake(url: str) -> None:
    """A stub worker: every bulk job completes at once with one token, written the way a worker writes it."""
    import redis

    from spool.protocol.keys import Keys
    from spool.protocol import Choice, Result, TokenEvent, Usage

    r, k = redis.Redis.from_url(url), Keys()
    try:
        r.xgroup_create(k.jobs("bulk"), k.group, id="0", mkstream=True)
    except redis.ResponseError:
        pass
    while True:
        got = r.xreadgroup(k.group, "fake", {k.jobs("bulk"): ">"}, count=512, block=1000)
        pipe = r.pipeline(transaction=True)
        for _, msgs in got or []:
            for eid, fields in msgs:
                rid = json.loads(fields[b"job"])["id"]
                res = Result(id=rid, status="completed", choices=[Choice(index=0, text="x", token_ids=[1],
                             finish_reason="length")], usage=Usage(prompt_tokens=4, completion_tokens=1))
                pipe.set(k.result(rid), res.to_json(), ex=86400)
                pipe.xadd(k.tokens(rid), TokenEvent.done("completed", "length").to_fields())
                pipe.expire(k.tokens(rid), 3600)
                pipe.delete(k.status(rid))
                pipe.xack(k.jobs("bulk"), k.group, eid)
        pipe.execute()


def run_batch(cmd: list[str]) -> tuple[float, float, float, str]:
    """Run the batch command; returns (wall s, peak RSS MiB, CPU s of that process, stderr)."""
    timer = shutil.which("time") or ("/usr/bin/time" if os.path.exists("/usr/bin/time") else None)
    t0 = time.perf_counter()
    if timer:
        out = subprocess.run([timer, "-v", *cmd], capture_output=True, text=True, cwd=ROOT)
        wall = time.perf_counter() - t0
        m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", out.stderr)
        rss = int(m.group(1)) / 1024 if m else float("nan")
        cpu = sum(float(x) for x in re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)", out.stderr))
    else:
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        wall = time.perf_counter() - t0
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        rss, cpu = ru.ru_maxrss / 1024, ru.ru_utime + ru.ru_stime  # the largest child so far; all children
    if out.returncode != 0:
        raise SystemExit(f"batch failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return wall, rss, cpu, out.stderr


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lines", type=int, default=10_000)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--max-in-flight", type=int, default=256)
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument("--model", type=Path, help="model dir (default: a tiny random-init model built here)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--resume-check", action="store_true", help="kill the batch half-way, resume, verify")
    p.add_argument("--fake-worker", action="store_true", help="a stub that answers at once (runner alone)")
    p.add_argument("--entry", choices=["spool", "module"], default="spool",
                   help="spool: `spool batch run`; module: `python -m spool batch run` (no torch)")
    p.add_argument("--serve-fake", metavar="URL", help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path, help="also write the numbers here")
    args = p.parse_args()
    if args.serve_fake:
        serve_fake(args.serve_fake)
        return 0

    from spool.testing.redis_server import RedisServer

    tmp = Path(tempfile.mkdtemp(prefix="spool-batch-bench-"))
    model = args.model
    if model is None and not args.fake_worker:
        from spool.testing.tiny_model import build_tiny_model

        model = build_tiny_model(tmp / "model", "llama", False)
    inp, out = tmp / "in.jsonl", tmp / "out.jsonl"
    make_input(inp, args.lines, args.max_tokens)
    srv = RedisServer(tmp / "redis").start()
    spool = [sys.executable, "-m", "spool"]
    wcmd = ([sys.executable, __file__, "--serve-fake", srv.url] if args.fake_worker else
            [*spool, "worker", "--model", str(model), "--device", args.device, "--max-num-seqs",
             str(args.max_num_seqs), "--redis-url", srv.url])
    worker = subprocess.Popen(wcmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(tmp / "worker.log", "wb"))
    try:
        entry = [*spool, "batch"] if args.entry == "spool" else [sys.executable, "-m", "spool", "batch"]
        cmd = [*entry, "run", str(inp), "-o", str(out), "--id", "bench", "--progress", "plain",
               "--progress-interval", "5", "--max-in-flight", str(args.max_in_flight), "--redis-url", srv.url]
        if args.resume_check:
            half = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            while not out.exists() or out.stat().st_size < 200 * args.lines // 2:
                time.sleep(0.2)
            half.kill()
            half.wait()
        wall, rss, cpu, log = run_batch(cmd)
    finally:
        worker.terminate()
        worker.wait(60)
        srv.stop()
    ids = [json.loads(x)["custom_id"] for x in out.read_bytes().splitlines()]
    assert len(ids) == len(set(ids)) == args.lines, (len(ids), len(set(ids)))
    tokens = sum(json.loads(x)["response"]["body"]["usage"]["completion_tokens"]
                 for x in out.read_bytes().splitlines())
    res = {"lines": args.lines, "max_tokens": args.max_tokens, "max_in_flight": args.max_in_flight,
           "max_num_seqs": args.max_num_seqs, "device": args.device, "wall_s": round(wall, 2),
           "peak_rss_mib": round(rss, 1), "batch_cpu_s": round(cpu, 2), "lines_per_s": round(args.lines / wall, 1),
           "completion_tokens": tokens, "resumed": args.resume_check, "fake_worker": args.fake_worker,
           "entry": args.entry}
    print(json.dumps(res, indent=2))
    print("\n".join(x for x in log.strip().splitlines() if "lines/s" in x or "batch" in x), file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
