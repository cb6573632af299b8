"""The CLI: compose.yaml uses real verbs and flags; --help works; enqueue/result/status round-trip."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest
import yaml

from spool.cli.main import build_parser

ROOT = Path(__file__).resolve().parent.parent


def test_compose_commands_are_real_spool_verbs(monkeypatch):
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    parser = build_parser()
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
    del parser


def test_env_vars_become_flag_defaults(monkeypatch):
    monkeypatch.setenv("SPOOL_MAX_NUM_SEQS", "7")
    monkeypatch.setenv("SPOOL_ENABLE_PREFIX_CACHING", "false")
    args = build_parser().parse_args(["worker", "--model", "/m"])
    assert args.max_num_seqs == 7 and args.enable_prefix_caching is False


@pytest.mark.parametrize("verb", ["worker", "demo", "enqueue", "tail", "result", "status", "dead"])
def test_help_of_every_verb(verb):
    out = subprocess.run([sys.executable, "-m", "spool", verb, "--help"], capture_output=True, text=True,
                         cwd=ROOT, timeout=60)
    assert out.returncode == 0 and "usage: spool" in out.stdout


def test_enqueue_result_status_cli(engine_for_cli, redis_url):
    from tests.worker_harness import running_worker

    def spool(*a):
        return subprocess.run([sys.executable, "-m", "spool", *a, "--redis-url", redis_url],
                              capture_output=True, text=True, cwd=ROOT, timeout=120)

    enq = spool("enqueue", "hello from the cli", "--max-tokens", "5", "--id", "cli-1")
    assert enq.returncode == 0 and enq.stdout.strip() == "cli-1"
    assert spool("status", "cli-1").stdout.strip() == "queued"
    with running_worker(engine_for_cli, redis_url):
        res = spool("result", "cli-1", "--timeout", "60")
        overview = spool("status")
    assert res.returncode == 0 and orjson.loads(res.stdout)["status"] == "completed"
    doc = orjson.loads(overview.stdout)
    assert doc["streams"]["spool:jobs"]["length"] == 0  # acked entries are deleted: length is the backlog
    assert spool("status", "cli-1").stdout.strip() == "completed"


@pytest.fixture(scope="module")
def engine_for_cli(tiny_llama):
    from engine import LLMEngine

    return LLMEngine.from_kwargs(str(tiny_llama), device="cpu", block_size=8)
