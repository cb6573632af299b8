"""`spool demo`: the whole product on one machine, in under a minute on a laptop CPU.

Embedded Redis, a tiny model built on first use, a real `spool worker` subprocess, a few dozen jobs (plain
prompts, chat messages, one raw XADD exactly as any language would send it), one request's tokens shown live,
then every result and the throughput.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson

from spool.producer.client import Client
from spool.producer.embedded import state_dir_path
from spool.producer.ops import resolve_url

PROMPTS = [
    "Once upon a time", "The quick brown fox", "In a galaxy far away", "Dear diary,", "The recipe calls for",
    "Breaking news:", "Chapter one.", "The meeting started at", "My favourite colour is", "Ladies and gentlemen,",
    "It was a dark and stormy night", "To whom it may concern,",
]
CHATS = [
    [{"role": "user", "content": "Write a haiku about queues."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is Redis?"}],
    [{"role": "user", "content": "Name three colours."}],
    [{"role": "user", "content": "Say hello in French."}],
]


def _model_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    from spool.testing.tiny_model import build_tiny_model

    path = state_dir_path() / "demo-model"
    if not (path / "config.json").is_file():
        print(f"building a tiny random-init model in {path} (first run only)")
        build_tiny_model(path, arch="llama", hidden_size=128, num_layers=4)
    return path


def _start_worker(model: Path, url: str, device: str, log_path: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "spool", "worker", "--model", str(model), "--redis-url", url,
           "--device", device, "--max-num-seqs", "32", "--name", f"demo-{os.getpid()}"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(cmd, stdout=log_path.open("w"), stderr=subprocess.STDOUT, env=env)


def run_demo(args) -> int:
    """Run the demo; returns 0 when every job completed."""
    url = args.redis_url or resolve_url(None)
    model = _model_dir(args.model)
    log_path = state_dir_path() / "demo-worker.log"
    print(f"redis: {url}\nmodel: {model}\nworker log: {log_path}")
    worker = _start_worker(model, url, args.device, log_path)
    client = Client(url)
    try:
        return _drive(client, args.jobs, worker)
    finally:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                code = worker.wait(timeout=60)
                print(f"worker stopped gracefully (exit {code})")
            except subprocess.TimeoutExpired:
                worker.kill()
        client.close()
        _next_steps(model, url, embedded=not args.redis_url, device=args.device)


def _next_steps(model: Path, url: str, embedded: bool, device: str) -> None:
    """What a new user asks next: where the model is, how to serve it, and what is still running."""
    print(f"\nThe demo's model is in {model}. Serve it yourself, then send it a job:\n"
          f"  spool worker --model {model} --device {device}{'' if embedded else f' --redis-url {url}'}\n"
          f"  spool enqueue \"Once upon a time\" --max-tokens 16 --wait{'' if embedded else f' --redis-url {url}'}")
    if embedded:
        print(f"The embedded Redis keeps running at {url} (data in {state_dir_path()}); "
              "stop it with: spool redis stop")


def _drive(client: Client, n_jobs: int, worker: subprocess.Popen) -> int:
    t0 = time.time()
    tag = f"demo{int(t0)}"
    jobs = []
    for i in range(max(n_jobs - len(CHATS) - 2, 1)):
        jobs.append({"id": f"{tag}-p{i}", "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 24 + (i % 5) * 8,
                     "temperature": 0.8, "seed": i})
    for i, msgs in enumerate(CHATS):
        jobs.append({"id": f"{tag}-chat{i}", "messages": msgs, "max_tokens": 32, "temperature": 0})
    ids = client.enqueue_many(jobs)
    # A raw XADD: exactly what a Go, Node or shell producer sends; no spool library involved.
    raw_id = f"{tag}-raw"
    raw = orjson.dumps({"id": raw_id, "prompt": "Once upon a time", "max_tokens": 16})
    client.redis.xadd(client.keys.jobs(), {"job": raw})
    ids.append(raw_id)
    live_id = client.enqueue("Tell me a story about a lighthouse", id=f"{tag}-live", stream=True, max_tokens=64,
                             temperature=0.7, seed=1)
    ids.append(live_id)
    print(f"\nenqueued {len(ids)} jobs (plain prompts, chat messages, one raw XADD); live tokens of {live_id}:\n")
    for ev in client.stream(live_id, timeout=300):
        if worker.poll() is not None:
            print(f"worker exited early with {worker.returncode}; see the log")
            return 1
        if ev.type == "delta":
            sys.stdout.write(ev.text)
            sys.stdout.flush()
        elif ev.type == "done":
            print(f"\n[done: {ev.status}, {ev.finish_reason}]\n")
    results = [client.result(i, timeout=300) for i in ids]
    wall = time.time() - t0
    print(f"{'id':<22} {'status':<10} {'finish':<7} {'toks':>4}  text")
    for res in results:
        snippet = res.text.replace("\n", " ")[:48]
        print(f"{res.id:<22} {res.status:<10} {str(res.finish_reason):<7} {res.usage.completion_tokens:>4}  {snippet!r}")
    toks = sum(r.usage.completion_tokens for r in results)
    ok = sum(r.status == "completed" for r in results)
    print(f"\n{ok}/{len(results)} completed in {wall:.1f}s: {len(results) / wall:.1f} jobs/s, "
          f"{toks / wall:.0f} generated tokens/s (through Redis, including worker start-up)")
    return 0 if ok == len(results) else 1
