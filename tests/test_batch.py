"""Bulk batches in OpenAI Batch format: parsing, shaping, round trip, resume, cancel (real worker and Redis)."""
from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import orjson
import pytest

from spool.engine import LLMEngine
from spool.producer import Client, batch
from spool.producer.batch.format import LineError, cid_key, parse_line, request_id
from spool.producer.batch.responses import output_record
from spool.producer.batch.files import OutputError, scan_outputs
from spool.producer.batch.progress import Progress
from spool.producer.ops import Context
from spool.protocol import Result
from tests.worker_harness import running_worker

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def engine(tiny_llama):
    return LLMEngine.from_kwargs(str(tiny_llama), device="cpu", block_size=8, max_num_seqs=32)


def chat(cid, text="hi", **body):
    return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "tiny", "messages": [{"role": "user", "content": text}], "max_tokens": 5, **body}}


def comp(cid, prompt="Once upon a time", **body):
    return {"custom_id": cid, "method": "POST", "url": "/v1/completions",
            "body": {"model": "tiny", "prompt": prompt, "max_tokens": 6, **body}}


def write_jsonl(path: Path, lines) -> Path:
    path.write_bytes(b"".join((x if isinstance(x, bytes) else orjson.dumps(x)) + b"\n" for x in lines))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [orjson.loads(x) for x in path.read_bytes().splitlines() if x.strip()] if path.exists() else []


def spool(*args, **kw):
    return subprocess.run([sys.executable, "-m", "spool", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=120, **kw)


def spool_bg(*args):
    return subprocess.Popen([sys.executable, "-m", "spool", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(cond, timeout=60.0, what="condition"):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


# -- format ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("line, code, needle", [
    (b'{"custom_id": "x", ', "invalid_json", "JSON"),
    (orjson.dumps({**comp("x"), "url": "/v1/embeddings"}), "invalid_url", "/v1/embeddings"),
    (orjson.dumps({**comp("x"), "method": "GET"}), "invalid_request", "POST"),
    (orjson.dumps({**comp("x"), "custom_id": 7}), "invalid_request", "custom_id"),
    (orjson.dumps(comp("x", temperature=-1)), "invalid_body", "temperature"),
    (orjson.dumps(comp("x", prompt=["a", "b"])), "unsupported", "one prompt per line"),
    (orjson.dumps(comp("x", logit_bias={"x1": 5})), "invalid_body", "logit_bias"),
    (orjson.dumps(comp("x", suffix="the end")), "unsupported", "suffix"),
    (orjson.dumps(comp("x", best_of=3)), "unsupported", "best_of"),
    (orjson.dumps(comp("x", tools=[{"type": "function", "function": {"name": "f"}}])), "unsupported", "tools"),
    (orjson.dumps(chat("x", tool_choice="required")), "invalid_body", "tool_choice needs tools"),
    (orjson.dumps(chat("x", response_format={"type": "json_schema"})), "invalid_body", "json_schema"),
    (orjson.dumps(comp("x", echo=True)), "unsupported", "echo"),
    (orjson.dumps(comp("x", colour="red")), "unsupported", "colour"),
    (orjson.dumps(chat("x", max_completion_tokens=3)), "invalid_body", "disagree"),
    (orjson.dumps(chat("x", top_logprobs=2)), "invalid_body", "top_logprobs"),
    (orjson.dumps({**chat("x"), "body": {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}}), "unsupported", "image_url parts"),
    (orjson.dumps({**comp("x"), "body": {"prompt": "p"}}), "invalid_body", "model"),
])
def test_invalid_lines_name_the_problem(line, code, needle):
    with pytest.raises(LineError) as e:
        parse_line(Context(), line, 3, "b1", None)
    assert e.value.code == code and needle in e.value.message, e.value


def test_valid_lines_map_to_jobs():
    ctx = Context()
    req = parse_line(ctx, orjson.dumps(chat("c", user="u1", max_completion_tokens=5, stop="\n", seed=3,
                                            logprobs=True, top_logprobs=2)), 1, "b1", None)
    job = orjson.loads(req.raw)
    assert job["messages"] == [{"role": "user", "content": "hi"}] and job["max_tokens"] == 5
    assert job["stop"] == "\n" and job["logprobs"] == 2 and job["metadata"] == {"batch": "b1", "custom_id": "c"}
    assert req.kind == "chat" and req.top_logprobs == 2 and "user" not in job
    assert orjson.loads(parse_line(ctx, orjson.dumps(comp("t", prompt=[[5, 6, 7]])), 2, "b1", None).raw)[
        "prompt_token_ids"] == [5, 6, 7]
    parts = chat("p")
    parts["body"]["messages"] = [{"role": "developer", "content": [{"type": "text", "text": "a"},
                                                                   {"type": "text", "text": "b"}], "name": "n"}]
    assert orjson.loads(parse_line(ctx, orjson.dumps(parts), 3, "b1", 9).raw)["messages"] == [
        {"role": "system", "content": "ab", "name": "n"}]  # name goes to the chat template, as in OpenAI
    del parts["body"]["max_tokens"]
    assert orjson.loads(parse_line(ctx, orjson.dumps(parts), 3, "b1", 9).raw)["max_tokens"] == 9
    rid = request_id("x" * 96, "y" * 1000)
    assert rid == request_id("x" * 96, "y" * 1000) and len(rid) <= 128 and rid != request_id("x" * 96, "z")


def test_output_shapes():
    ctx = Context()
    res = Result.model_validate({"id": "r", "status": "completed", "choices": [
        {"index": 0, "text": "ab", "token_ids": [1, 2], "finish_reason": "length",
         "logprobs": [[{"token_id": 1, "logprob": -0.5, "rank": 1, "token": "a"}],
                      [{"token_id": 2, "logprob": None, "rank": 3, "token": "b"},
                       {"token_id": 9, "logprob": -0.1, "rank": 1, "token": "z"}]]}],
        "usage": {"prompt_tokens": 4, "completion_tokens": 2}, "timings": {"finished": 1700000000.5}})
    req = parse_line(ctx, orjson.dumps(comp("c", logprobs=1)), 1, "b", None)
    rec = output_record(req, res)
    body = rec["response"]["body"]
    assert rec["error"] is None and rec["response"]["status_code"] == 200 and rec["custom_id"] == "c"
    assert body["object"] == "text_completion" and body["created"] == 1700000000 and body["model"] == "tiny"
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6,
                             "prompt_tokens_details": {"cached_tokens": 0}}
    assert body["choices"][0]["logprobs"]["token_logprobs"] == [-0.5, -9999.0]
    chat_req = parse_line(ctx, orjson.dumps(chat("d", logprobs=True, top_logprobs=1)), 2, "b", None)
    cbody = output_record(chat_req, res)["response"]["body"]
    assert cbody["object"] == "chat.completion"
    assert cbody["choices"][0]["message"] == {"role": "assistant", "content": "ab", "refusal": None}
    assert [t["token"] for t in cbody["choices"][0]["logprobs"]["content"][1]["top_logprobs"]] == ["z"]
    failed = output_record(req, Result.failed("r", "invalid_prompt", "too long"))
    assert failed["response"] is None and failed["error"] == {"code": "invalid_prompt", "message": "too long"}


def test_progress_bar_and_plain_lines():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty, plain = Tty(), io.StringIO()
    bar, lines = Progress("auto", stream=tty), Progress("auto", interval_s=0.0, stream=plain)
    for i, p in enumerate((bar, lines)):
        p.update(0, 0, 10, 0, force=True)
        time.sleep(0.01)
        p.update(4, 1, 10, 50, force=True)
    assert bar.mode == "bar" and "\r[" in tty.getvalue() and "ETA 0:00:0" in tty.getvalue()
    assert lines.mode == "plain" and "\r" not in plain.getvalue() and "5/10" in plain.getvalue()
    assert "done=4 failed=1" in plain.getvalue() and "tok/s" in plain.getvalue()


def test_scan_cuts_torn_line_and_refuses_foreign_output(tmp_path):
    out = tmp_path / "out.jsonl"
    good = {"id": "batch_req_" + request_id("b1", "a"), "custom_id": "a", "error": {"code": "x", "message": "m"},
            "response": None}
    out.write_bytes(orjson.dumps(good) + b"\n" + b'{"id": "batch_req_b-b1-')
    sunk = []
    w = scan_outputs([out], "b1", sunk.extend)
    assert w.failed == 1 and w.written == 1 and sunk == [cid_key("a")] and out.read_bytes().endswith(b"}\n")
    with pytest.raises(OutputError, match="b1"):
        scan_outputs([out], "other")


# -- end to end -----------------------------------------------------------------------------------
MIXED = [
    chat("chat-1", "hello", temperature=0),
    comp("comp-1", "Once upon a time", temperature=0, ignore_eos=True),
    b'{"custom_id": "broken", ',  # line 3
    comp("comp-2", prompt=[[5, 6, 7, 8]], ignore_eos=True, n=2, seed=1),
    {**comp("bad-url"), "url": "/v1/embeddings"},  # line 5
    chat("chat-2", "tell me", max_tokens=None, max_completion_tokens=4, ignore_eos=True, logprobs=True,
         top_logprobs=2),
    chat("chat-1", "again"),  # line 7: duplicate custom_id
    comp("bad-body", temperature=-1),  # line 8
    comp("too-long", max_tokens=100000),  # line 9: over the deployment limit
    comp("comp-3", prompt=["a single prompt in a list"], max_tokens=3, ignore_eos=True),
]


def test_mixed_file_round_trips_through_a_real_worker(engine, redis_url, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", MIXED)
    out, err = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    strict = spool("batch", "run", str(inp), "-o", str(out), "--id", "strict", "--redis-url", redis_url)
    assert strict.returncode == 2, strict.stderr
    assert [int(x.split(":")[1]) for x in strict.stderr.splitlines() if "in.jsonl:" in x] == [3, 5, 7, 8, 9]
    assert "nothing was enqueued" in strict.stderr and not out.exists()
    r = Client(redis_url).redis
    assert r.xlen("spool:jobs:bulk") == 0 and batch.status("strict", redis_url=redis_url).status == "failed"

    with running_worker(engine, redis_url):
        run = spool("batch", "run", str(inp), "-o", str(out), "--errors", str(err), "--id", "mixed",
                    "--skip-invalid", "--redis-url", redis_url)
    assert run.returncode == 0, run.stderr
    assert "validating" in run.stderr and "10/10 (100.0%)" in run.stderr  # plain progress lines (no TTY)
    state = orjson.loads(run.stdout)
    assert state["status"] == "completed" and state["request_counts"] == {"total": 10, "completed": 5, "failed": 5}
    good = {rec["custom_id"]: rec for rec in read_jsonl(out)}
    assert sorted(good) == ["chat-1", "chat-2", "comp-1", "comp-2", "comp-3"] and len(read_jsonl(out)) == 5
    bad = read_jsonl(err)
    assert sorted(rec["line"] for rec in bad) == [3, 5, 7, 8, 9]
    assert all(rec["response"] is None and rec["error"]["message"].startswith("line ") for rec in bad)
    assert {rec["line"]: rec["error"]["code"] for rec in bad}[7] == "duplicate_custom_id"
    for cid, rec in good.items():
        body, rid = rec["response"]["body"], rec["response"]["request_id"]
        stored = Result.from_json(r.get(f"spool:result:{{{rid}}}"))
        assert rec["id"] == f"batch_req_{rid}" and stored.metadata == {"batch": "mixed", "custom_id": cid}
        assert body["object"] == ("chat.completion" if cid.startswith("chat") else "text_completion")
        assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
        assert body["usage"]["completion_tokens"] == stored.usage.completion_tokens > 0
        texts = [c["message"]["content"] if "message" in c else c["text"] for c in body["choices"]]
        assert texts == [c.text for c in stored.choices]
    assert len(good["comp-2"]["response"]["body"]["choices"]) == 2
    assert good["comp-1"]["response"]["body"]["usage"]["completion_tokens"] == 6
    lp = good["chat-2"]["response"]["body"]["choices"][0]["logprobs"]["content"]
    assert len(lp) == 4 and all(len(t["top_logprobs"]) == 2 for t in lp)
    again = spool("batch", "run", str(inp), "-o", str(out), "--errors", str(err), "--skip-invalid",
                  "--redis-url", redis_url)  # no --id: found in OUT; already completed, writes nothing
    assert again.returncode == 0 and "already completed" in again.stderr and len(read_jsonl(out)) == 5
    listed = {row.split()[0]: row.split()[1:5] for row in spool("batch", "list", "--redis-url", redis_url).stdout
              .splitlines()[1:]}  # a table under a header: ID STATUS DONE FAILED TOTAL ...
    assert listed["mixed"] == ["completed", "5", "5", "10"] and listed["strict"][0] == "failed"
    assert orjson.loads(spool("batch", "status", "mixed", "--redis-url", redis_url).stdout)["completed_at"]


def test_interrupted_then_resumed_batch_writes_every_line_once(engine, tiny_llama, redis_url, tmp_path):
    n = 60
    inp = write_jsonl(tmp_path / "in.jsonl", [comp(f"c{i}", f"line {i}", ignore_eos=True) if i % 2 else
                                              chat(f"c{i}", f"line {i}") for i in range(n)])
    out = tmp_path / "out.jsonl"
    args = ("batch", "run", str(inp), "-o", str(out), "--max-in-flight", "8", "--redis-url", redis_url)
    proc = spool_bg(*args, "--id", "resume-me")
    # A worker that quits after 25 jobs: the runner writes some lines, has others in flight, and stalls.
    with running_worker(engine, redis_url, max_jobs=25) as w:
        wait_for(lambda: w.jobs_done >= 25, what="25 jobs")
    wait_for(lambda: len(read_jsonl(out)) >= 20, what="20 output lines")
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)  # a crash: no cleanup, lock left behind
    proc.wait(10)
    written = read_jsonl(out)
    with open(out, "ab") as f:
        f.write(b'{"id": "batch_req_b-resume-me-')  # torn last line, as a crash mid-write leaves it
    r = Client(redis_url).redis
    assert batch.status("resume-me", redis_url=redis_url).status == "in_progress"
    # Acked entries are deleted, so count what was ever added (Redis >= 7: entries-added).
    enqueued_before = r.xinfo_stream("spool:jobs:bulk")["entries-added"]
    assert len(written) < n and enqueued_before > len(written)
    second = LLMEngine.from_kwargs(str(tiny_llama), device="cpu", block_size=8, max_num_seqs=32)
    with running_worker(second, redis_url, claim_idle_ms=300):
        res = spool(*args)  # same command, no --id: the batch is recognised from OUT
    assert res.returncode == 0, res.stderr
    assert f"resuming with {len(written)} already written" in res.stderr
    ids = [rec["custom_id"] for rec in read_jsonl(out)]
    assert sorted(ids) == sorted(f"c{i}" for i in range(n)) and len(ids) == n  # every line once
    # jobs of the first run were re-attached, never enqueued twice
    assert r.xinfo_stream("spool:jobs:bulk")["entries-added"] == n
    assert batch.status("resume-me", redis_url=redis_url).to_dict()["request_counts"] == {
        "total": n, "completed": n, "failed": 0}


def test_sigint_stops_cleanly_and_stays_resumable(redis_url, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [comp(f"c{i}") for i in range(5)])
    proc = spool_bg("batch", "run", str(inp), "-o", str(tmp_path / "o.jsonl"), "--id", "ctrl-c",
                    "--redis-url", redis_url)
    r = Client(redis_url).redis
    wait_for(lambda: r.xlen("spool:jobs:bulk") == 5, what="jobs enqueued")  # no worker: they wait
    proc.send_signal(signal.SIGINT)
    assert proc.wait(20) == 130
    assert "resume" in proc.stderr.read()
    assert batch.status("ctrl-c", redis_url=redis_url).status == "in_progress"
    assert not r.exists("spool:batch:{ctrl-c}:lock")


def test_cancel_stops_the_runner_and_the_queued_jobs(engine, redis_url, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [comp(f"c{i}", max_tokens=50) for i in range(20)])
    out, err = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("info", batch.run(
        inp, out, err, batch_id="to-cancel", redis_url=redis_url, max_in_flight=5, cancel_grace_s=1.0)))
    t.start()
    r = Client(redis_url).redis
    wait_for(lambda: r.scard("spool:batch:{to-cancel}:inflight") == 5, what="5 jobs in flight")
    assert spool("batch", "cancel", "to-cancel", "--redis-url", redis_url).stdout.strip() == "cancelling"
    t.join(30)
    assert box["info"].status == "cancelled"
    lines = read_jsonl(err)
    assert len(lines) == 5 and {x["error"]["code"] for x in lines} == {"batch_cancelled"} and not read_jsonl(out)
    assert r.xlen("spool:jobs:bulk") == 5 and not r.exists("spool:batch:{to-cancel}:inflight")
    with running_worker(engine, redis_url):  # the queued jobs never run: they end cancelled at admission
        results = [Client(redis_url).result(x["id"].removeprefix("batch_req_"), timeout=30) for x in lines]
    assert {x.status for x in results} == {"cancelled"} and all(not x.token_ids for x in results)
    assert batch.cancel("to-cancel", redis_url=redis_url) == "cancelled"  # terminal: stays cancelled
    rerun = batch.run(inp, out, err, batch_id="to-cancel", redis_url=redis_url)
    assert rerun.status == "cancelled" and len(read_jsonl(err)) == 5


def test_batch_help():
    out = spool("batch", "--help")
    assert out.returncode == 0 and all(v in out.stdout for v in ("run", "submit", "schedule", "status", "cancel"))
    assert os.path.exists(ROOT / "docs" / "BATCH.md")


# -- rq -------------------------------------------------------------------------------------------
def rq_burst(redis_url):
    """A real `rq worker` in burst mode: moves due scheduled jobs to the queue, runs everything, exits."""
    out = subprocess.run([sys.executable, "-m", "rq.cli", "worker", "--burst", "--with-scheduler", "--serializer",
                          "rq.serializers.JSONSerializer", "--url", redis_url, "spool-batch"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stderr


def assert_rq_jobs_are_json(r):
    import zlib

    datas = [zlib.decompress(r.hget(k, "data")) for k in r.scan_iter("rq:job:*") if r.type(k) == b"hash"]
    assert datas and all(d[:1] in (b"[", b"{") and orjson.loads(d) for d in datas)  # JSON, never pickle


def test_rq_submit_at_a_past_time_runs_in_a_burst_worker(engine, redis_url, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", [comp(f"c{i}") for i in range(12)] + [chat("k")])
    sub = spool("batch", "submit", str(inp), "-o", str(tmp_path / "out.jsonl"), "--id", "via-rq",
                "--at", "2000-01-01T00:00:00", "--redis-url", redis_url)
    assert sub.returncode == 0, sub.stderr
    job_id = orjson.loads(sub.stdout)["rq_job_id"]
    r = Client(redis_url).redis
    assert batch.status("via-rq", redis_url=redis_url).status == "validating"
    assert r.zscore("rq:scheduled:spool-batch", job_id) is not None
    assert_rq_jobs_are_json(r)
    with running_worker(engine, redis_url):
        log = rq_burst(redis_url)
    assert "via-rq" in log or job_id in log
    info = batch.wait("via-rq", redis_url=redis_url, timeout=10, interval_s=0.1)  # follow() to the end
    assert info.status == "completed" and info.fields["rq_job_id"] == job_id
    assert sorted(x["custom_id"] for x in batch.collect(tmp_path / "out.jsonl")) == sorted(
        [f"c{i}" for i in range(12)] + ["k"])

    # Cancelled before an rq worker picked it up: cancelled at once, and the rq job then does nothing.
    bid, _ = batch.submit(inp, tmp_path / "never.jsonl", redis_url=redis_url)
    assert batch.cancel(bid, redis_url=redis_url) == "cancelled"
    rq_burst(redis_url)
    assert batch.status(bid, redis_url=redis_url).status == "cancelled" and not (tmp_path / "never.jsonl").exists()


def test_rq_cron_schedule_runs_now_and_keeps_one_next_occurrence(engine, redis_url, tmp_path):
    from spool.producer.batch.schedule import next_fire

    inp = write_jsonl(tmp_path / "in.jsonl", [comp(f"n{i}") for i in range(8)])
    sched = spool("batch", "schedule", str(inp), "-o", str(tmp_path / "nightly-{date}.jsonl"), "--cron",
                  "0 2 * * *", "--name", "nightly", "--now", "--redis-url", redis_url)
    assert sched.returncode == 0, sched.stderr
    entry = orjson.loads(sched.stdout)
    r = Client(redis_url).redis
    expected = next_fire("0 2 * * *", None, time.time())
    assert (expected.hour, expected.minute) == (2, 0) and entry["next_run"] == expected.isoformat()
    assert r.zrange("rq:scheduled:spool-batch", 0, -1) == [entry["next_job_id"].encode()]
    assert r.zscore("rq:scheduled:spool-batch", entry["next_job_id"]) == expected.timestamp()
    with running_worker(engine, redis_url):
        rq_burst(redis_url)  # runs the --now occurrence; 02:00 is not due, so it stays scheduled
    (last,) = batch.schedules(redis_url=redis_url)
    info = batch.status(last["last_batch_id"], redis_url=redis_url)
    assert info.status == "completed" and last["last_batch_id"].startswith("nightly-")
    out = tmp_path / f"nightly-{time.strftime('%Y-%m-%d', time.localtime(float(info.fields['created_at'])))}.jsonl"
    assert len(read_jsonl(out)) == 8
    assert r.zrange("rq:scheduled:spool-batch", 0, -1) == [entry["next_job_id"].encode()]  # still exactly one
    assert_rq_jobs_are_json(r)
    # Replacing the schedule retires the old chain; removing it leaves nothing scheduled.
    again = spool("batch", "schedule", str(inp), "-o", str(tmp_path / "n-{batch_id}.jsonl"), "--cron",
                  "30 3 * * *", "--name", "nightly", "--redis-url", redis_url)
    assert again.returncode == 0 and r.zcard("rq:scheduled:spool-batch") == 1
    assert "no schedule" not in spool("batch", "unschedule", "nightly", "--redis-url", redis_url).stdout
    assert r.zcard("rq:scheduled:spool-batch") == 0 and batch.schedules(redis_url=redis_url) == []
    bad = spool("batch", "schedule", str(inp), "-o", str(tmp_path / "fixed.jsonl"), "--cron", "0 2 * * *",
                "--redis-url", redis_url)
    assert bad.returncode == 2 and "{date}" in bad.stderr


def test_jobs_queued_by_an_older_spool_run_after_upgrade_jobs(engine, redis_url, tmp_path):
    """rq keeps a job's function as its dotted path. Jobs queued before 0.2 (top-level `producer`, and 0.1.0's
    producer.batch_schedule) are pointed at spool.producer.batch.schedule by `spool batch upgrade-jobs`, then
    run; other jobs are left alone, and a second upgrade rewrites nothing."""
    from rq.job import Job
    from rq.serializers import JSONSerializer

    from spool.producer.batch.schedule import job_spec, rq_queue, run_batch_job

    inp = write_jsonl(tmp_path / "in.jsonl", [comp(f"u{i}") for i in range(4)])
    r = Client(redis_url).redis
    q = rq_queue(r)
    old = [q.enqueue_at(datetime_past(), "producer.batch.schedule.run_batch_job",
                        job_spec(str(inp), str(tmp_path / "a.jsonl"), batch_id="from-02", redis_url=redis_url)),
           q.enqueue("producer.batch_schedule.run_batch_job",
                     job_spec(str(inp), str(tmp_path / "b.jsonl"), batch_id="from-010", redis_url=redis_url))]
    other = q.enqueue_at(datetime_past(), "os.getcwd")
    up = spool("batch", "upgrade-jobs", "--redis-url", redis_url)
    assert up.returncode == 0, up.stderr
    assert up.stdout.startswith("2 rq job(s)") and all(j.id in up.stdout for j in old), up.stdout
    for j in old:
        job = Job.fetch(j.id, connection=r, serializer=JSONSerializer)
        assert job.func is run_batch_job and list(job.args) == list(j.args) and job.kwargs == {}
    assert Job.fetch(other.id, connection=r, serializer=JSONSerializer).func_name == "os.getcwd"
    with running_worker(engine, redis_url):
        rq_burst(redis_url)
    for bid, out in (("from-02", "a.jsonl"), ("from-010", "b.jsonl")):
        assert batch.status(bid, redis_url=redis_url).status == "completed"
        assert sorted(x["custom_id"] for x in batch.collect(tmp_path / out)) == [f"u{i}" for i in range(4)]
    assert spool("batch", "upgrade-jobs", "--redis-url", redis_url).stdout.startswith("0 rq job(s)")


def datetime_past():
    from datetime import datetime, timezone

    return datetime(2000, 1, 1, tzinfo=timezone.utc)


def test_one_runner_per_batch_and_one_input_per_batch(redis_url, tmp_path):
    from spool.producer.batch.state import BatchStore
    from spool.protocol.keys import Keys

    inp = write_jsonl(tmp_path / "in.jsonl", [comp("a")])
    client = Client(redis_url)
    store = BatchStore(client.redis, Keys())
    store.create("locked")
    assert store.acquire("locked", f"{socket.gethostname()}:{os.getpid()}:live")  # a live runner (us)
    with pytest.raises(batch.BatchBusy):
        batch.run(inp, tmp_path / "o.jsonl", batch_id="locked", client=client)
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid is no longer alive
    client.redis.set("spool:batch:{locked}:lock", f"{socket.gethostname()}:{dead.pid}:gone")  # crashed runner
    store.update("locked", status="in_progress", in_progress_at=1.0, input_sha256="0" * 64)
    with pytest.raises(batch.BatchMismatch):  # lock taken over, then refused: not the batch's input file
        batch.run(inp, tmp_path / "o.jsonl", batch_id="locked", client=client)
    assert store.get("locked").status == "in_progress" and not client.redis.exists("spool:batch:{locked}:lock")
    assert client.redis.xlen("spool:jobs:bulk") == 0
