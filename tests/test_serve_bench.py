"""What bench/serve_load.py --sim stands on: the stub engine's prefill model, the load generator's HTTP client, and
one small --sim run end to end (a real worker loop, `spool serve`, a real redis-server)."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from bench.http_load import HttpError, post, split_url
from spool.testing.stub_engine import StubEngine, token_text

ROOT = Path(__file__).resolve().parent.parent


def _params(max_tokens: int) -> SimpleNamespace:
    return SimpleNamespace(max_tokens=max_tokens, n=1)


def test_stub_prefill_takes_the_token_budget_before_the_first_token():
    """Budget 10: decodes first, then prompt chunks in arrival order; a prompt's last chunk gives its first token;
    a step lasts step_s plus prefill_token_s per prompt token in it."""
    eng = StubEngine(max_num_seqs=4, step_s=0.0, max_num_batched_tokens=10, prefill_token_s=0.001)
    eng.add_request("a", {"prompt_token_ids": [1] * 12}, _params(3))
    eng.add_request("b", {"prompt_token_ids": [1] * 5}, _params(2))
    step = eng.launch()
    assert [s.request_id for s in step.sequences] == ["a"] and step.chunks == [10]
    assert step.duration == pytest.approx(0.010)
    assert eng.collect(step) == []  # a's prompt is not finished: nothing sampled
    step = eng.launch()
    assert [(s.request_id, c) for s, c in zip(step.sequences, step.chunks)] == [("a", 2), ("b", 5)]
    out = eng.collect(step)
    assert [(d.request_id, d.new_text) for d in out] == [("a", token_text(0)), ("b", token_text(0))]
    step = eng.launch()  # both decode now: one token each, no prompt time
    assert step.chunks == [0, 0] and step.duration == 0.0
    out = eng.collect(step)
    assert [(d.request_id, d.finished) for d in out] == [("a", False), ("b", True)]
    assert [d.finished for d in eng.step()] == [True] and not eng.has_unfinished_requests()


def test_stub_without_a_budget_decodes_every_sequence_every_step():
    eng = StubEngine(max_num_seqs=4)
    eng.add_request("a", {"prompt_token_ids": [1] * 500}, _params(2))
    assert [d.new_text for d in eng.step()] == [token_text(0)]


async def _serve_once(reply: bytes) -> tuple[int, asyncio.AbstractServer]:
    async def handle(reader, writer):
        while (await reader.readline()) not in (b"\r\n", b""):
            pass
        writer.write(reply)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server.sockets[0].getsockname()[1], server


@pytest.mark.parametrize("reply, body", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Request-Id: r1\r\n\r\nhello", b"hello"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\ndata: \r\na\r\n{\"x\": 1}\n\n\r\n0\r\n\r\n",
     b'data: {"x": 1}\n\n'),
    (b"HTTP/1.1 503 Service Unavailable\r\n\r\nbusy", b"busy"),  # no length: read to EOF
])
def test_http_load_client_reads_each_body_form(reply, body):
    async def main():
        port, server = await _serve_once(reply)
        pieces: list[bytes] = []
        async with server:
            got = await post("127.0.0.1", port, "/v1/x", b"{}", pieces.append)
        return got, pieces

    got, pieces = asyncio.run(main())
    assert b"".join(pieces) == body and got.status == int(reply.split()[1])
    assert got.headers.get("x-request-id") in (None, "r1")


def test_http_load_client_refuses_what_it_cannot_read():
    async def main():
        port, server = await _serve_once(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
        async with server:
            await post("127.0.0.1", port, "/", b"{}")

    with pytest.raises(HttpError):
        asyncio.run(main())
    assert split_url("http://127.0.0.1:8000/v1") == ("127.0.0.1", 8000, "/v1")
    with pytest.raises(ValueError):
        split_url("https://example.invalid/v1")


@pytest.mark.parametrize("stream", [True, False])
def test_serve_load_sim_runs_the_workload_through_the_gateway(tmp_path, stream):
    """A small --sim run: every token delivered, the served time over the stub's offline time, CPU per process
    group, and the requests' milestones."""
    out = tmp_path / "sim.json"
    cmd = [sys.executable, "bench/serve_load.py", "--sim", "--num-requests", "12", "--prompt-len", "16", "64",
           "--output-len", "6", "6", "--step-ms", "5", "--gateway-workers", "1", "--json", str(out),
           "--stream" if stream else "--no-stream"]
    subprocess.run(cmd, cwd=ROOT, check=True, timeout=300, capture_output=True)
    res = json.loads(out.read_text())
    assert res["failures"] == [] and res["delivered_tokens"] == res["output_tokens"] == 72
    assert 0 < res["served_over_offline"] < 2 and res["offline_steps"] >= 6
    assert set(res["cpu_s"]) == {"gateway", "worker", "redis", "client"}
    assert set(res["timeline_s"]) == {"sent", "enqueued", "started", "first_token", "finished", "answered"}
    assert (res["chunks"] > 0) == stream and ("ttft_ms_p50" in res) == stream
