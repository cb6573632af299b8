"""The error-message table of docs/OPERATIONS.md, row by row: the real `spool` command against a real
redis-server (or none), one line on stderr naming what went wrong, no traceback (unless -v), the documented
exit code, and never a silent hang. Also: every `spool ...` command written in README.md and docs/ parses."""
from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spool.cli.main import build_parser
from spool.testing.redis_server import free_port

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def spool(*args: str, timeout: float = 60, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spool", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, env=env, **kw)


def one_line(err: str) -> str:
    """The stderr of an expected failure: exactly one line, no traceback."""
    lines = [x for x in err.splitlines() if x.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


# -- Redis unreachable (exit 4) ------------------------------------------------------------------------

def test_unreachable_redis_names_the_url_says_it_retries_and_gives_up():
    url = f"redis://admin:hunter2@127.0.0.1:{free_port()}/0"
    t0 = time.monotonic()
    out = spool("status", "--redis-url", url, "--redis-wait", "1.5")
    assert time.monotonic() - t0 < 20
    assert out.returncode == 4, out.stderr
    lines = out.stderr.splitlines()
    assert "Traceback" not in out.stderr and len(lines) == 2, out.stderr
    assert "retrying for up to 1.5s" in lines[0] and "127.0.0.1" in lines[0]
    assert lines[1].startswith("spool status: cannot reach Redis at redis://admin:***@127.0.0.1:")
    assert "hunter2" not in out.stderr  # the password never reaches a terminal or a log


def test_verbose_shows_the_traceback():
    out = spool("-v", "status", "--redis-url", f"redis://127.0.0.1:{free_port()}/0", "--redis-wait", "0.5")
    assert out.returncode == 4 and "Traceback" in out.stderr and "cannot reach Redis" in out.stderr


def test_redis_wait_from_the_environment():
    env = dict(os.environ, SPOOL_REDIS_WAIT_S="0.5")
    out = spool("result", "x", "--redis-url", f"redis://127.0.0.1:{free_port()}/0", env=env)
    assert out.returncode == 4 and "after 0.5s" in out.stderr


def test_bad_redis_url_is_a_usage_error():
    out = spool("status", "--redis-url", "http://localhost:6379")
    assert out.returncode == 2 and "bad Redis URL" in one_line(out.stderr)


# -- jobs: not found (1), queued (5), running (6), timeout (3), bad values (2) ----------------------------

def test_unknown_id(redis_url):
    for verb in ("result", "tail", "cancel"):
        t0 = time.monotonic()
        out = spool(verb, "no-such-job", "--redis-url", redis_url)
        assert time.monotonic() - t0 < 20, f"{verb} hung"
        assert out.returncode == 1, (verb, out.stderr)
        line = one_line(out.stderr)
        assert "no job 'no-such-job' on redis://127.0.0.1:" in line, line
    assert spool("result", "no-such-job", "--redis-url", redis_url).stdout.strip() == "unknown"


def test_result_of_queued_and_running_jobs(redis_server, redis_url):
    assert spool("enqueue", "hi", "--id", "q1", "--redis-url", redis_url).returncode == 0
    out = spool("result", "q1", "--redis-url", redis_url)
    assert (out.returncode, out.stdout.strip(), out.stderr) == (5, "queued", "")
    redis_server.client().set("spool:status:{q1}", "running")  # as a worker does on admission
    out = spool("result", "q1", "--redis-url", redis_url)
    assert (out.returncode, out.stdout.strip(), out.stderr) == (6, "running", "")


@pytest.mark.parametrize("verb", [["enqueue", "hi", "--wait"], ["enqueue", "hi", "--stream"]])
def test_wait_without_a_live_worker_says_so_at_once_and_times_out(redis_url, verb):
    t0 = time.monotonic()
    out = spool(*verb, "--timeout", "1", "--redis-url", redis_url)
    assert time.monotonic() - t0 < 20
    assert out.returncode == 3, out.stderr
    lines = out.stderr.splitlines()
    assert "Traceback" not in out.stderr and len(lines) == 2, out.stderr
    assert lines[0].startswith(f"spool: no live worker on {redis_url}") and "up to 1s (--timeout)" in lines[0]
    assert "is still queued after 1s (--timeout)" in lines[1] and "spool cancel" in lines[1]


def test_result_wait_and_tail_of_a_queued_job_without_worker(redis_url):
    spool("enqueue", "hi", "--id", "w1", "--redis-url", redis_url)
    for verb in (["result", "w1", "--wait"], ["tail", "w1"]):
        out = spool(*verb, "--timeout", "1", "--redis-url", redis_url)
        assert out.returncode == 3 and "no live worker" in out.stderr and "still queued" in out.stderr, out.stderr


def test_the_embedded_redis_is_named(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "SPOOL_REDIS_URL"}
    env["SPOOL_STATE_DIR"] = str(tmp_path / "state")
    try:
        out = spool("enqueue", "hi", "--wait", "--timeout", "1", env=env)
        assert out.returncode == 3
        assert f"no live worker on the embedded Redis at unix://{tmp_path / 'state'}" in out.stderr
        assert "(no --redis-url or SPOOL_REDIS_URL given)" in out.stderr
        status = spool("redis", "status", env=env)
        assert status.returncode == 0 and "(running)" in status.stdout
        stop = spool("redis", "stop", env=env)
        assert stop.returncode == 0 and "stopped the embedded Redis" in stop.stdout
        assert spool("redis", "status", env=env).returncode == 1
    finally:
        from spool.producer.embedded import stop_local_redis

        stop_local_redis(tmp_path / "state")


@pytest.mark.parametrize("args,message", [
    (["enqueue", "hi", "--temperature", "-1"], "invalid_job: temperature"),
    (["enqueue", "--messages", "[{not json"], "--messages is not JSON"),
    (["enqueue", "hi", "--max-tokens", "0"], "invalid_job: max_tokens"),
    (["enqueue", "hi", "--timeout", "0", "--wait"], "expected a positive number of seconds"),
])
def test_bad_job_values_are_usage_errors(redis_url, args, message):
    out = spool(*args, "--redis-url", redis_url)
    assert out.returncode == 2 and "Traceback" not in out.stderr and message in out.stderr, out.stderr


def test_duplicate_id_is_refused_in_one_line(redis_url):
    assert spool("enqueue", "one", "--id", "dup", "--redis-url", redis_url).returncode == 0
    out = spool("enqueue", "another", "--id", "dup", "--redis-url", redis_url)
    assert out.returncode == 2 and "duplicate_id" in one_line(out.stderr)


# -- batches -------------------------------------------------------------------------------------------

def test_missing_batch_file_fails_before_a_batch_exists(redis_url, tmp_path):
    out = spool("batch", "run", str(tmp_path / "nope.jsonl"), "-o", str(tmp_path / "out.jsonl"),
                "--redis-url", redis_url)
    assert out.returncode == 2
    assert one_line(out.stderr) == f"spool batch run: input file '{tmp_path / 'nope.jsonl'}' does not exist"
    listed = spool("batch", "list", "--json", "--redis-url", redis_url)
    assert listed.returncode == 0 and listed.stdout.strip() == "[]"  # nothing stuck in `validating`


def test_batch_list_is_a_table_with_a_header(redis_url, tmp_path):
    from spool.producer.batch.state import BatchStore
    from spool.producer.client import Client

    client = Client(redis_url)
    BatchStore(client.redis, client.keys).create("nightly-1", output_file="/data/out.jsonl", total=3)
    out = spool("batch", "list", "--redis-url", redis_url)
    header, row = out.stdout.splitlines()
    assert header.split() == ["ID", "STATUS", "DONE", "FAILED", "TOTAL", "CREATED", "OUTPUT"]
    assert row.split()[:5] == ["nightly-1", "validating", "0", "0", "3"] and row.endswith("/data/out.jsonl")


def test_broken_pipe_exits_quietly(redis_url):
    proc = subprocess.Popen([sys.executable, "-m", "spool", "batch", "list", "--redis-url", redis_url],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    proc.stdout.close()  # the reader is gone before the first line is written (`| head -0`)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0 and err == ""


# -- the worker: a daemon that explains itself ------------------------------------------------------------

def test_worker_with_a_missing_model_directory(tmp_path):
    out = spool("worker", "--model", str(tmp_path / "missing"), "--redis-url", "redis://127.0.0.1:1/0",
                timeout=120)
    assert out.returncode == 2
    assert one_line(out.stderr) == (f"spool worker: cannot start the engine: model directory "
                                    f"'{tmp_path / 'missing'}' does not exist")


def test_worker_metrics_port_in_use(tiny_llama, redis_url):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = spool("worker", "--model", str(tiny_llama), "--device", "cpu", "--redis-url", redis_url,
                    "--metrics-port", str(port), "--metrics-host", "127.0.0.1", timeout=120)
    assert out.returncode == 2, out.stderr
    assert f"spool worker: cannot serve metrics on 127.0.0.1:{port}" in out.stderr and "Traceback" not in out.stderr


def test_worker_keeps_retrying_an_unreachable_redis_and_logs_each_attempt(tiny_llama):
    url = f"redis://ops:s3cret@127.0.0.1:{free_port()}/0"
    proc = subprocess.Popen([sys.executable, "-m", "spool", "worker", "--model", str(tiny_llama), "--device", "cpu",
                             "--redis-url", url], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=ROOT)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 120
        while sum("not ready at start-up" in x for x in lines) < 3 and time.monotonic() < deadline:
            lines.append(proc.stdout.readline())
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = "".join(lines) + rest
    assert proc.returncode == 0, log
    retries = [x for x in log.splitlines() if "not ready at start-up" in x]
    assert len(retries) >= 3 and all("redis at redis://ops:***@127.0.0.1:" in x for x in retries), log
    assert "s3cret" not in log
    startup = next(x for x in log.splitlines() if " starting worker=" in x)
    for field in ("model=", "dtype=float32", "device=cpu", "kv_cache_blocks=", "kv_cache_tokens=",
                  "max_num_seqs=512", "cuda_graphs=off", "redis=redis://ops:***@"):
        assert field in startup, (field, startup)


# -- every documented command is a real command ---------------------------------------------------------

def _documented_commands() -> list[tuple[str, str]]:
    """(where, command) for each `spool ...` line in a fenced code block of README.md and docs/*.md."""
    found = []
    for path in DOCS:
        blocks, current, lang = [], None, ""
        for line in path.read_text().splitlines():
            if line.lstrip().startswith("```"):
                if current is None:
                    current, lang = [], line.strip()[3:]
                else:
                    if lang in ("", "bash", "sh", "shell", "console"):
                        blocks.append("\n".join(current))
                    current = None
            elif current is not None:
                current.append(line)
        for block in blocks:
            block = block.replace("\\\n", " ")
            for line in block.splitlines():
                line = line.split(" #")[0].strip()
                line = re.sub(r"\[(--[^\]]*)\]", r"\1", line)  # `[--now]`: an optional flag, parse it too
                for part in line.split(" ; "):
                    part = part.strip().removeprefix(".venv/bin/")
                    if "&&" in part:
                        part = part.split("&&")[-1].strip().removeprefix(".venv/bin/")
                    if part.startswith("spool "):
                        found.append((path.name, part))
    return found


DOCUMENTED = _documented_commands()


def test_docs_have_spool_commands():
    names = {where for where, _ in DOCUMENTED}
    assert {"README.md", "OPERATIONS.md", "BATCH.md"} <= names
    assert len(DOCUMENTED) >= 20


@pytest.mark.parametrize("where,command", DOCUMENTED, ids=[f"{w}:{c[:60]}" for w, c in DOCUMENTED])
def test_documented_command_parses(where, command):
    words = shlex.split(command)[1:]
    if "|" in words:
        words = words[:words.index("|")]
    args = build_parser(worker_flags="worker" in words).parse_args(words)
    assert callable(args.func)


def test_readme_after_the_demo(tiny_llama, tmp_path):
    """README's "after the demo" block on the embedded Redis: serve a model, enqueue --wait, top, redis stop."""
    env = {k: v for k, v in os.environ.items() if k != "SPOOL_REDIS_URL"}
    env["SPOOL_STATE_DIR"] = str(tmp_path / "state")
    worker = subprocess.Popen([sys.executable, "-m", "spool", "worker", "--model", str(tiny_llama), "--device", "cpu",
                               "--name", "readme-worker"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, cwd=ROOT, env=env)
    try:
        while " serving " not in (line := worker.stderr.readline()):  # the person waits for it to come up
            assert line, "the worker exited"
        text = spool("enqueue", "Once upon a time", "--max-tokens", "16", "--wait", "--timeout", "120", env=env,
                     timeout=180)
        top = spool("top", "--once", env=env)
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.communicate(timeout=60)
        stop = spool("redis", "stop", env=env)
    assert text.returncode == 0 and text.stdout.strip() and "no live worker" not in text.stderr, text.stderr
    assert top.returncode == 0 and "readme-worker" in top.stdout and "the embedded Redis at unix://" in top.stdout
    assert worker.returncode == 0
    assert stop.returncode == 0 and "stopped the embedded Redis" in stop.stdout
