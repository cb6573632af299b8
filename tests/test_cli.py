"""The CLI: compose.yaml uses real verbs and flags; every verb and flag has help; no abbreviations; a typo shows
the verb's own usage; enqueue/result/status/cancel/tail round-trip through a real worker and redis-server."""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
import yaml

from spool.cli.main import build_parser

ROOT = Path(__file__).resolve().parent.parent


def spool(*args: str, url: str | None = None, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    """Run the real `spool` command (python -m spool) and capture its output."""
    cmd = [sys.executable, "-m", "spool", *args] + (["--redis-url", url] if url else [])
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout, **kw)


def test_compose_commands_are_real_spool_verbs(monkeypatch):
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    seen = 0
    for name, svc in compose["services"].items():
        cmd = svc.get("command")
        if not cmd or cmd[0] != "spool":
            continue
        for k, v in (svc.get("environment") or {}).items():
            monkeypatch.setenv(k, str(v))
        args = build_parser().parse_args(cmd[1:])  # exits (SystemExit) on an unknown verb or flag
        assert callable(args.func), name
        seen += 1
    assert seen >= 2
    assert compose["services"]["redis"]["command"][:3] == ["redis-server", "--appendonly", "yes"]


def test_env_vars_become_flag_defaults(monkeypatch):
    monkeypatch.setenv("SPOOL_MAX_NUM_SEQS", "7")
    monkeypatch.setenv("SPOOL_ENABLE_PREFIX_CACHING", "false")
    monkeypatch.setenv("SPOOL_METRICS_PORT", "9400")
    monkeypatch.setenv("SPOOL_LOG_FORMAT", "json")
    args = build_parser().parse_args(["worker", "--model", "/m"])
    assert args.max_num_seqs == 7 and args.enable_prefix_caching is False
    assert args.metrics_port == 9400 and args.log_format == "json"


VERBS = ["worker", "demo", "enqueue", "tail", "result", "cancel", "status", "dead", "redis", "top", "batch",
         "batch run", "batch list", "dead retry"]


@pytest.mark.parametrize("verb", VERBS)
def test_help_of_every_verb(verb):
    out = spool(*verb.split(), "--help")
    assert out.returncode == 0 and f"usage: spool {verb}" in out.stdout


def _parsers(parser: argparse.ArgumentParser, path: str = "spool"):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, f"{path} {name}")


def test_every_flag_has_real_help():
    """No help line that only repeats the flag's name (`--max-num-seqs  max num seqs`)."""
    bad = []
    for path, parser in _parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            text = (action.help or "").split("[")[0].strip().lower()
            name = (action.option_strings[-1] if action.option_strings else action.dest).lstrip("-")
            if not text or text in (name.replace("-", " "), name.replace("_", " ")):
                bad.append(f"{path} {name}: {action.help!r}")
    assert not bad, "\n".join(bad)


def test_no_abbreviations_and_typos_show_the_verbs_usage():
    out = spool("enqueue", "hi", "--max-token", "5")
    assert out.returncode == 2
    assert "usage: spool enqueue" in out.stderr and "unrecognized arguments: --max-token 5" in out.stderr
    out = spool("batch", "list", "--limt", "3")
    assert out.returncode == 2 and "usage: spool batch list" in out.stderr
    assert "Traceback" not in out.stderr


def test_bad_worker_numbers_and_sentinel_urls_are_one_line_usage_errors(tmp_path):
    """Checked before any model loads (the directory does not even exist) or any Redis is asked."""
    out = spool("worker", "--model", str(tmp_path / "none"), "--device", "cpu", "--stream-interval-ms", "-5")
    assert out.returncode == 2
    assert out.stderr.strip() == "spool worker: stream_interval_ms (--stream-interval-ms) must be >= 0, got -5"
    out = spool("status", url="redis+sentinel://127.0.0.1:1/")  # no master name
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "bad sentinel URL" in out.stderr and "Traceback" not in out.stderr


def test_verbose_flag_works_before_and_after_the_verb():
    assert build_parser(worker_flags=False).parse_args(["-v", "status"]).verbose is True
    assert build_parser(worker_flags=False).parse_args(["status", "-v"]).verbose is True
    assert build_parser(worker_flags=False).parse_args(["status"]).verbose is False


def test_enqueue_result_status_cancel_tail(engine_for_cli, redis_url):
    from tests.worker_harness import running_worker

    enq = spool("enqueue", "hello from the cli", "--max-tokens", "5", "--id", "cli-1", url=redis_url)
    assert enq.returncode == 0 and enq.stdout.strip() == "cli-1"
    assert spool("status", "cli-1", url=redis_url).stdout.strip() == "queued"
    queued = spool("result", "cli-1", url=redis_url)
    assert (queued.returncode, queued.stdout.strip()) == (5, "queued")
    spool("enqueue", "never runs", "--id", "cli-cancel", url=redis_url)
    cancel = spool("cancel", "cli-cancel", url=redis_url)
    assert cancel.returncode == 0 and "cli-cancel: cancel requested (was queued)" in cancel.stdout
    with running_worker(engine_for_cli, redis_url):
        res = spool("result", "cli-1", "--wait", "--json", "--timeout", "60", url=redis_url)
        text = spool("enqueue", "Once upon a time", "--max-tokens", "6", "--ignore-eos", "--wait", url=redis_url)
        streamed = spool("enqueue", "Once upon a time", "--max-tokens", "6", "--ignore-eos", "--stream",
                         "--id", "cli-s", url=redis_url)
        cancelled = spool("result", "cli-cancel", "--wait", "--timeout", "60", url=redis_url)
        overview = spool("status", url=redis_url)
    assert res.returncode == 0 and orjson.loads(res.stdout)["status"] == "completed"
    # --wait prints the text alone (a line), not ~50 lines of JSON
    assert text.returncode == 0 and text.stdout.count("\n") == 1 and not text.stdout.lstrip().startswith("{")
    assert streamed.returncode == 0 and streamed.stdout.strip()
    tail = spool("tail", "cli-s", url=redis_url)  # finished and streamed: replays the stream
    assert tail.returncode == 0 and tail.stdout == streamed.stdout
    tail_plain = spool("tail", "cli-1", url=redis_url)  # finished, not streamed: its final text, not an empty line
    assert tail_plain.returncode == 0
    assert tail_plain.stdout.strip() == orjson.loads(res.stdout)["text"].strip() != ""
    assert cancelled.returncode == 1 and "job cli-cancel cancelled" in cancelled.stderr
    doc = orjson.loads(overview.stdout)
    assert doc["streams"]["spool:jobs"]["length"] == 0  # acked entries are deleted: length is the backlog
    assert doc["streams"]["spool:jobs"]["backlog"] == 0
    assert spool("status", "cli-1", url=redis_url).stdout.strip() == "completed"
    done = spool("cancel", "cli-1", url=redis_url)
    assert done.returncode == 0 and "cli-1: already completed" in done.stdout


def test_prompt_from_stdin(redis_url):
    out = spool("enqueue", "--id", "from-stdin", url=redis_url, input="a prompt on stdin")
    assert out.returncode == 0 and out.stdout.strip() == "from-stdin"


@pytest.fixture(scope="module")
def engine_for_cli(tiny_llama):
    from spool.engine import LLMEngine

    return LLMEngine.from_kwargs(str(tiny_llama), device="cpu", block_size=8)
