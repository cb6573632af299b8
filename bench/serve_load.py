"""`spool serve` under load: what the HTTP face costs.

  python bench/serve_load.py --stub                          # CPU: the gateway's ceiling and added latency
  python bench/serve_load.py --stub --concurrency 1 8 32 128 --requests 2000 --json out.json
  python bench/serve_load.py --shape llama3-8b --num-requests 512 --prompt-len 128 1024 --output-len 256 256
  python bench/serve_load.py --model /models/Llama-3.1-8B-Instruct --api chat ...   # real chat requests
  python bench/serve_load.py --sim [--no-stream] [--path direct]   # CPU: the GPU run's shape, a paced stub engine

--stub: a stub worker process answers every job at once (one token; one delta first when the job streams), so
the numbers are the gateway's own: requests/s it sustains (the load generator, the gateway, the stub and
redis-server share the machine), its CPU time per request, and the latency it adds over a direct producer
AsyncClient doing the same enqueue + wait, at each concurrency (p50 / p99), for plain and streamed requests.

GPU (--shape / --model): the workload runs offline (LLM.generate) on the engine, then the same workload goes
through a real Worker on the same engine (on the main thread, as `spool worker` runs it) behind a `spool
serve` subprocess, sent all at once by a load-generator subprocess as concurrent HTTP requests
(`/v1/completions` with the token ids by default: a dummy-weight shape has no tokenizer, and the gateway's
work is the same for chat; `--api chat` needs --model with a chat template). Reported: output tok/s through
HTTP over offline (target >= 90%), and TTFT p50/p90/p99 as the clients see it (streamed requests).

--sim: the GPU run's shape on a CPU: a stub engine paced as the H200 runs llama3-8b in a real Worker process,
and the CPU each process spends (bench/serve_sim.py).
Not a test: figures go to bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STUB_MODEL = "stub-model"


# -- the stub worker --------------------------------------------------------------------------------
def serve_stub(url: str, tokens: int = 1, per_entry: int = 1) -> None:
    """Answer every job at once, written as a worker writes it (`tokens` tokens as deltas of `per_entry`
    tokens each first for a streamed job, as a coalescing worker writes them, in one round trip); heartbeat."""
    import orjson
    import redis

    from spool.protocol import Choice, Result, TokenEvent, Usage
    from spool.protocol.keys import Keys

    r, k = redis.Redis.from_url(url), Keys()
    for stream in k.all_jobs:
        try:
            r.xgroup_create(stream, k.group, id="0", mkstream=True)
        except redis.ResponseError:
            pass
    next_beat = 0.0
    while True:
        if time.monotonic() >= next_beat:
            r.hset(k.worker("stub"), mapping={"model": orjson.dumps(STUB_MODEL), "last_seen": time.time()})
            r.expire(k.worker("stub"), 30)
            r.sadd(k.workers, "stub")
            next_beat = time.monotonic() + 1.0
        got = r.xreadgroup(k.group, "stub", {s: ">" for s in k.all_jobs}, count=512, block=100)
        if not got:
            continue
        pipe = r.pipeline(transaction=False)
        for stream, entries in got:
            for eid, fields in entries:
                job = orjson.loads(fields[b"job"])
                rid, now = job["id"], time.time()
                res = Result(id=rid, status="completed", choices=[Choice(index=0, text=" x" * tokens,
                                                                          token_ids=[7] * tokens,
                                                                          finish_reason="length")],
                             usage=Usage(prompt_tokens=4, completion_tokens=tokens))
                res.timings.enqueued = res.timings.started = res.timings.first_token = res.timings.finished = now
                for first in range(0, tokens if job.get("stream") else 0, per_entry):
                    n = min(per_entry, tokens - first)
                    pipe.xadd(k.tokens(rid), TokenEvent.delta_fields(0, " x" * n, [7] * n))
                pipe.set(k.result(rid), res.to_json(), ex=3600)
                pipe.xadd(k.tokens(rid), TokenEvent.done("completed", "length").to_fields())
                pipe.expire(k.tokens(rid), 60)
                pipe.delete(k.status(rid))
                pipe.xack(stream, k.group, eid)
                pipe.xdel(stream, eid)
        pipe.execute()


# -- load generators ----------------------------------------------------------------------------------
def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


async def _drive(n: int, concurrency: int, one) -> tuple[float, list[float]]:
    """Run `one(i)` for i < n with `concurrency` in flight; (wall seconds, per-request latencies in ms)."""
    latencies: list[float] = []
    counter = iter(range(n))

    async def lane() -> None:
        for i in counter:
            t0 = time.perf_counter()
            await one(i)
            latencies.append((time.perf_counter() - t0) * 1000)

    t0 = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    return time.perf_counter() - t0, latencies


async def direct_pass(url: str, n: int, concurrency: int, stream: bool) -> tuple[float, list[float]]:
    """The same job through producer.AsyncClient: enqueue, then wait for the result (or tail the stream)."""
    from spool.producer import AsyncClient
    from spool.protocol.connection import connect_async

    client = AsyncClient(url, connection=connect_async(url, max_connections=concurrency + 8))

    async def one(i: int) -> None:
        rid = await client.enqueue(messages=[{"role": "user", "content": f"question {i}"}], max_tokens=1,
                                   stream=stream)
        if stream:
            async for _ in client.stream(rid, timeout=60):
                pass
        res = await client.result(rid, timeout=60)
        assert res.status == "completed", res.error

    try:
        return await _drive(n, concurrency, one)
    finally:
        await client.aclose()


async def http_pass(base_url: str, n: int, concurrency: int, stream: bool) -> tuple[float, list[float]]:
    """The same request over HTTP (raw httpx2 with pre-encoded bodies: the client's own cost stays small)."""
    import httpx2
    import orjson

    limits = httpx2.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx2.AsyncClient(base_url=base_url, limits=limits, timeout=60) as client:

        async def one(i: int) -> None:
            body = orjson.dumps({"model": STUB_MODEL, "messages": [{"role": "user", "content": f"question {i}"}],
                                 "max_tokens": 1, "stream": stream})
            headers = {"content-type": "application/json"}
            if not stream:
                reply = await client.post("/chat/completions", content=body, headers=headers)
                assert reply.status_code == 200, reply.text
                return
            async with client.stream("POST", "/chat/completions", content=body, headers=headers) as reply:
                assert reply.status_code == 200
                async for line in reply.aiter_lines():
                    if line == "data: [DONE]":
                        return
            raise AssertionError("stream ended without [DONE]")

        return await _drive(n, concurrency, one)


def _cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_stub(args: argparse.Namespace) -> dict:
    """Gateway ceiling and added latency against the stub worker."""
    from spool.testing.gateway import GatewayProcess
    from spool.testing.redis_server import RedisServer

    tmp = Path(tempfile.mkdtemp(prefix="spool-serve-load-"))
    redis_server = RedisServer(tmp / "redis").start()
    stub = subprocess.Popen([sys.executable, __file__, "--serve-stub", redis_server.url, "--stub-tokens",
                             str(args.stub_tokens), "--stub-entry-tokens", str(args.stub_entry_tokens)], cwd=ROOT)
    gateway = GatewayProcess(redis_server.url, tmp, "--workers", str(args.gateway_workers), api_key=None).start()
    rows = []
    try:
        asyncio.run(http_pass(gateway.base_url, 200, 8, False))  # warm-up (and the stub's first heartbeat)
        asyncio.run(direct_pass(redis_server.url, 200, 8, False))
        for stream in (False, True):
            for c in args.concurrency:
                d_wall, d_lat = asyncio.run(direct_pass(redis_server.url, args.requests, c, stream))
                cpu0 = _cpu_s(gateway.proc.pid) if args.gateway_workers == 1 else None
                h_wall, h_lat = asyncio.run(http_pass(gateway.base_url, args.requests, c, stream))
                cpu = None if cpu0 is None else _cpu_s(gateway.proc.pid) - cpu0
                row = {"stream": stream, "concurrency": c, "requests": args.requests,
                       "direct_rps": round(args.requests / d_wall, 1), "http_rps": round(args.requests / h_wall, 1),
                       "direct_ms_p50": round(_pct(d_lat, 0.5), 2), "direct_ms_p99": round(_pct(d_lat, 0.99), 2),
                       "http_ms_p50": round(_pct(h_lat, 0.5), 2), "http_ms_p99": round(_pct(h_lat, 0.99), 2),
                       "added_ms_p50": round(_pct(h_lat, 0.5) - _pct(d_lat, 0.5), 2),
                       "added_ms_p99": round(_pct(h_lat, 0.99) - _pct(d_lat, 0.99), 2),
                       "gateway_cpu_ms_per_request": None if cpu is None else round(cpu * 1000 / args.requests, 3)}
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    finally:
        gateway.stop()
        stub.terminate()
        stub.wait()
        redis_server.stop()
    return {"mode": "stub", "cpus": os.cpu_count(), "gateway_workers": args.gateway_workers,
            "stub_tokens": args.stub_tokens, "stub_entry_tokens": args.stub_entry_tokens, "rows": rows}


# -- the GPU run ------------------------------------------------------------------------------------
async def workload_client(base_url: str, spec: dict) -> dict:
    """Send every request of `spec` at once over HTTP; per request: TTFT (first output), latency, tokens.

    The client is bench/http_load.py (one connection per request, each body read as it arrives): with httpx2
    this one process spent more CPU per request and per SSE chunk than a gateway process (its pool checks every
    connection each time a request starts or ends: ~5 ms per response at 512 connections, which delayed the last
    answers of a burst by seconds), so on a busy host the load generator set the pace. The clock runs from the
    first request sent to the last byte of the last response read.
    """
    import orjson

    from bench.http_load import post, split_url

    host, port, prefix = split_url(base_url)
    n = len(spec["prompts"])
    ttft, latency, tokens, chunks, failures = [], [], [0], [0], []
    timeline: list[tuple[str, float, float]] = []  # (request id, epoch sent, epoch answered in full)

    async def one(i: int) -> None:
        body = {"model": spec["model"], "max_tokens": spec["output_lens"][i], "temperature": 0,
                "ignore_eos": True, "stream": spec["stream"]}
        if spec["api"] == "chat":
            body["messages"] = [{"role": "user", "content": spec["prompts"][i]}]
            path = "/chat/completions"
        else:
            body["prompt"] = spec["prompts"][i]
            path = "/completions"
        if spec["stream"]:
            body["stream_options"] = {"include_usage": True}
        t0, sent = time.perf_counter(), time.time()
        # Every byte is read as it arrives; only the events that matter are parsed (a chunk's JSON is the
        # client's cost, not the server's): each one until the first output, then the usage at the end.
        first, parts, pending = [None], [], [b""]

        def on_data(data: bytes) -> None:
            parts.append(data)
            if first[0] is None and spec["stream"]:
                *events, pending[0] = (pending[0] + data).split(b"\n\n")
                if any(_first_output(e) for e in events):
                    first[0] = time.perf_counter() - t0

        reply = await post(host, port, prefix + path, orjson.dumps(body), on_data)
        rid = reply.headers.get("x-request-id", "")
        raw = b"".join(parts)
        if reply.status != 200:
            failures.append(f"{reply.status}: {raw[:200]!r}")
            return
        if not spec["stream"]:
            tokens[0] += orjson.loads(raw)["usage"]["completion_tokens"]
        else:
            events = [e for e in raw.split(b"\n\n") if e]
            if not events or events[-1] != b"data: [DONE]":
                failures.append(f"stream of {rid} ended without [DONE]")
                return
            tokens[0] += orjson.loads(events[-2][6:])["usage"]["completion_tokens"]
            chunks[0] += len(events) - 1
            if first[0] is not None:
                ttft.append(first[0])
        latency.append(time.perf_counter() - t0)
        timeline.append((rid, sent, time.time()))

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    wall = time.perf_counter() - t0
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"wall_s": wall, "output_tokens": tokens[0], "ttft_s": ttft, "latency_s": latency, "failures": failures,
            "cpu_s": ru.ru_utime + ru.ru_stime, "timeline": timeline, "chunks": chunks[0]}


def _first_output(event: bytes) -> bool:
    """True for the SSE event that carries a request's first output: a choice that is not finishing (its text
    may be empty: a dummy-weight shape without a tokenizer streams token counts but no text)."""
    import orjson

    if not event.startswith(b"data: {"):
        return False
    chunk = orjson.loads(event[6:])
    if not chunk.get("choices"):
        return False
    c = chunk["choices"][0]
    if "delta" in c and set(c["delta"]) == {"role", "content"} and not c["delta"]["content"]:
        return False  # chat's opening chunk announces the role: no output yet
    return bool(c.get("text") or (c.get("delta") or {}).get("content") or c.get("finish_reason") is None)


def run_gpu(args: argparse.Namespace) -> dict:
    """Offline throughput, then the same workload as concurrent HTTP requests through spool serve."""
    import torch

    from bench.shapes import model_source
    from bench.workload import make_workload
    from spool.engine import LLM, SamplingParams
    from spool.protocol.connection import connect
    from spool.testing.gateway import GatewayProcess
    from spool.testing.redis_server import RedisServer
    from spool.worker.loop import Worker
    from spool.worker.settings import WorkerSettings

    path, fmt = model_source(args)
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    wl = make_workload(args, vocab)
    llm = LLM(str(path), device=args.device, load_format=fmt, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len)
    eng = llm.engine
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in wl.output_lens]
    llm.generate([{"prompt_token_ids": q[:64]} for q in wl.prompts[:8]], params[:8])  # warm-up
    eng.block_manager.reset_prefix_cache()
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    llm.generate([{"prompt_token_ids": q} for q in wl.prompts], params)
    sync()
    offline_s = time.perf_counter() - t0
    eng.block_manager.reset_prefix_cache()
    out_tokens = sum(wl.output_lens)

    tmp = Path(tempfile.mkdtemp(prefix="spool-serve-gpu-"))
    redis_server = RedisServer(tmp / "redis").start()
    gateway = GatewayProcess(redis_server.url, tmp, "--served-model-name", "bench", "--workers",
                             str(args.gateway_workers), api_key=None).start()
    prompts: list = wl.prompts
    if args.api == "chat":  # text that tokenizes to about the same length
        prompts = [eng.tokenizer.decode(q, skip_special_tokens=True) for q in wl.prompts]
    spec = {"model": "bench", "api": args.api, "stream": args.stream, "prompts": prompts,
            "output_lens": wl.output_lens}
    spec_path, result_path = tmp / "spec.json", tmp / "client.json"
    spec_path.write_text(json.dumps(spec))
    interval = {} if args.stream_interval_ms is None else {"stream_interval_ms": args.stream_interval_ms}
    worker = Worker(eng, connect(redis_server.url), WorkerSettings(redis_url=redis_server.url, name="bench",
                                                                   block_ms=50, **interval))
    client_rc: list[int] = []

    def client_then_stop() -> None:
        time.sleep(1.5)  # the worker's first heartbeat, so the gateway admits at once
        out = subprocess.run([sys.executable, __file__, "--client", gateway.base_url, str(spec_path),
                              str(result_path)], cwd=ROOT)
        client_rc.append(out.returncode)
        worker.request_stop()

    t = threading.Thread(target=client_then_stop, daemon=True)
    t.start()
    try:
        worker.run()  # on the main thread, as `spool worker` runs it
        t.join()
    finally:
        gateway.stop()
        redis_server.stop()
    if client_rc != [0]:
        raise SystemExit(f"the load generator failed ({client_rc})")
    res = json.loads(result_path.read_text())
    ttft_ms = [x * 1000 for x in res["ttft_s"]]
    return {
        "mode": "gpu", "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "model": str(args.model or args.shape), "api": args.api, "stream": args.stream,
        "gateway_workers": args.gateway_workers, "stream_interval_ms": worker.settings.stream_interval_ms,
        "requests": len(wl.prompts), "failures": res["failures"][:5],
        "output_tokens": out_tokens, "http_output_tokens": res["output_tokens"],
        "offline_output_tok_per_s": round(out_tokens / offline_s, 1),
        "http_output_tok_per_s": round(res["output_tokens"] / res["wall_s"], 1),
        "http_over_offline": round(offline_s / res["wall_s"], 3),
        **({f"ttft_ms_p{int(q * 100)}": round(_pct(ttft_ms, q), 1) for q in (0.5, 0.9, 0.99)} if ttft_ms else {}),
        "ttft_ms_mean": round(statistics.fmean(ttft_ms), 1) if ttft_ms else None,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--stub", action="store_true", help="CPU: a stub worker; measure the gateway alone")
    mode.add_argument("--model", type=Path, help="GPU: a model directory")
    mode.add_argument("--shape", help="GPU: a named shape with dummy weights (bench/shapes.py)")
    mode.add_argument("--serve-stub", metavar="URL", help=argparse.SUPPRESS)
    mode.add_argument("--sim", action="store_true",
                      help="CPU: the GPU run's shape with a stub engine paced as the H200 (bench/serve_sim.py)")
    mode.add_argument("--client", nargs=3, metavar=("BASE_URL", "SPEC", "OUT"), help=argparse.SUPPRESS)
    mode.add_argument("--direct-client", nargs=3, metavar=("REDIS_URL", "SPEC", "OUT"), help=argparse.SUPPRESS)
    mode.add_argument("--sim-worker", nargs=2, metavar=("REDIS_URL", "STATS"), help=argparse.SUPPRESS)
    p.add_argument("--requests", type=int, default=2000, help="--stub: requests per pass")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 128], help="--stub: in flight")
    p.add_argument("--stub-tokens", type=int, default=1, help="--stub: tokens per streamed job")
    p.add_argument("--stub-entry-tokens", type=int, default=1,
                   help="--stub: tokens per stream entry (chunk), as a worker coalescing its stream writes")
    p.add_argument("--gateway-workers", type=int, default=0,
                   help="spool serve --workers (default: 1 with --stub, to measure one process; 4 on the GPU)")
    p.add_argument("--api", choices=("completions", "chat"), default="completions")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                   help="GPU: streamed requests (TTFT as clients see it); default on")
    p.add_argument("--stream-interval-ms", type=int, default=None,
                   help="GPU: the worker's stream interval (default: the worker's default)")
    p.add_argument("--json", type=Path)
    if not {"--stub", "--serve-stub", "--client", "--direct-client"} & set(sys.argv):
        from bench.serve_sim import add_flags
        from bench.workload import add_engine_flags, add_workload_flags

        add_workload_flags(p)
        add_engine_flags(p)
        add_flags(p)
    args = p.parse_args()
    args.gateway_workers = args.gateway_workers or (1 if args.stub else 4)
    if args.serve_stub:
        serve_stub(args.serve_stub, args.stub_tokens, args.stub_entry_tokens)
        return 0
    if args.client or args.direct_client:
        from bench.serve_sim import direct_client

        url, spec, out = args.client or args.direct_client
        drive = workload_client if args.client else direct_client
        Path(out).write_text(json.dumps(asyncio.run(drive(url, json.loads(Path(spec).read_text())))))
        return 0
    if args.sim_worker:
        from bench.serve_sim import serve_worker

        return serve_worker(args.sim_worker[0], args, Path(args.sim_worker[1]))
    if args.sim:
        from bench.serve_sim import run as run_sim
    result = run_sim(args, __file__) if args.sim else run_stub(args) if args.stub else run_gpu(args)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
