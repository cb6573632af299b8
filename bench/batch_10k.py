"""`spool batch run` on a big OpenAI-format file through a real worker: wall time, peak RSS, lines/s.

  python bench/batch_10k.py                       # 10,000 lines, tiny CPU model, max_tokens 8
  python bench/batch_10k.py --lines 100000 --resume-check
Starts its own redis-server and a `spool worker` subprocess (CPU by default), runs `spool batch run` under
/usr/bin/time -v (else getrusage) and reads the batch process's peak RSS. Not a test: record results in
bench/RESULTS.md.
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


def run_batch(cmd: list[str]) -> tuple[float, float, str]:
    """Run the batch command; returns (wall s, peak RSS MiB of that process, stderr)."""
    timer = shutil.which("time") or ("/usr/bin/time" if os.path.exists("/usr/bin/time") else None)
    t0 = time.perf_counter()
    if timer:
        out = subprocess.run([timer, "-v", *cmd], capture_output=True, text=True, cwd=ROOT)
        wall = time.perf_counter() - t0
        m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", out.stderr)
        rss = int(m.group(1)) / 1024 if m else float("nan")
    else:
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        wall = time.perf_counter() - t0
        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest child so far
    if out.returncode != 0:
        raise SystemExit(f"batch failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return wall, rss, out.stderr


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lines", type=int, default=10_000)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--max-in-flight", type=int, default=256)
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument("--model", type=Path, help="model dir (default: a tiny random-init model built here)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--resume-check", action="store_true", help="kill the batch half-way, resume, verify")
    p.add_argument("--json", type=Path, help="also write the numbers here")
    args = p.parse_args()

    from tests.fixtures.redis_server import RedisServer

    tmp = Path(tempfile.mkdtemp(prefix="spool-batch-bench-"))
    model = args.model
    if model is None:
        from engine.tiny_model import build_tiny_model

        model = build_tiny_model(tmp / "model", "llama", False)
    inp, out = tmp / "in.jsonl", tmp / "out.jsonl"
    make_input(inp, args.lines, args.max_tokens)
    srv = RedisServer(tmp / "redis").start()
    spool = [sys.executable, "-m", "worker.cli"]
    worker = subprocess.Popen([*spool, "worker", "--model", str(model), "--device", args.device,
                               "--max-num-seqs", str(args.max_num_seqs), "--redis-url", srv.url],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(tmp / "worker.log", "wb"))
    try:
        cmd = [*spool, "batch", "run", str(inp), "-o", str(out), "--id", "bench", "--progress", "plain",
               "--progress-interval", "5", "--max-in-flight", str(args.max_in_flight), "--redis-url", srv.url]
        if args.resume_check:
            half = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            while not out.exists() or out.stat().st_size < 200 * args.lines // 2:
                time.sleep(0.2)
            half.kill()
            half.wait()
        wall, rss, log = run_batch(cmd)
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
           "peak_rss_mib": round(rss, 1), "lines_per_s": round(args.lines / wall, 1),
           "completion_tokens": tokens, "resumed": args.resume_check}
    print(json.dumps(res, indent=2))
    print(log.strip().splitlines()[-3] if log.strip() else "", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
