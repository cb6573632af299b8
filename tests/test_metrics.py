"""Prometheus metrics: a real worker serves /metrics over HTTP and the series move as jobs finish, fail, are
cancelled or dead-lettered and as Redis goes away; `spool worker --metrics-port --log-format json` end to end;
the Grafana dashboard queries only exported metrics; the deploy/ files fit together."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import orjson
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from spool.producer.client import Client
from spool.cli.main import build_parser
from spool.testing.redis_server import RedisServer
from tests.worker_harness import running_worker

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "spool.json"
ISSUE_METRICS = [  # issue 13's list, under vLLM's names
    "spool_jobs_finished_total", "spool_prompt_tokens_total", "spool_generation_tokens_total",
    "spool_running_requests", "spool_waiting_requests", "spool_kv_cache_usage_ratio",
    "spool_prefix_cache_queries_total", "spool_prefix_cache_hits_total", "spool_preemptions_total",
    "spool_queue_backlog", "spool_time_to_first_token_seconds", "spool_time_per_output_token_seconds",
    "spool_e2e_request_latency_seconds", "spool_queue_wait_seconds", "spool_step_duration_seconds",
    "spool_redis_errors_total", "spool_redis_reconnects_total", "spool_dead_letters_total",
    "spool_reclaimed_jobs_total", "spool_duplicate_finals_total",
]


def scrape(port: int) -> dict[str, dict[tuple, float]]:
    """GET /metrics and return {sample name: {sorted labels: value}}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        assert reply.headers["Content-Type"].startswith("text/plain")
        text = reply.read().decode()
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return samples


def value(samples, name: str, **labels) -> float:
    return samples[name][tuple(sorted(labels.items()))]


@pytest.fixture(scope="module")
def engine(tiny_llama):
    from spool.engine import LLMEngine

    return LLMEngine.from_kwargs(str(tiny_llama), device="cpu", block_size=8, max_model_len=256)


@pytest.fixture(scope="module")
def finished_run(engine, tmp_path_factory):
    """A worker with metrics on, after completed (interactive, bulk), failed, cancelled and dead-lettered jobs."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    client = Client(server.url)
    client.enqueue("queued then cancelled", id="cancelled-1")
    client.cancel("cancelled-1")
    before = engine.stats.generation_tokens
    try:
        with running_worker(engine, server.url, metrics_port=0, metrics_host="127.0.0.1") as worker:
            ids = [client.enqueue("Once upon a time", max_tokens=6, ignore_eos=True, id=f"ok-{i}") for i in range(3)]
            ids.append(client.enqueue("in bulk", max_tokens=4, ignore_eos=True, priority="bulk", id="bulk-1"))
            ids.append(client.enqueue("word " * 300, max_tokens=8, id="too-long"))  # > max_model_len: failed
            client.redis.xadd("spool:jobs", {"job": b"not json at all"})  # no id: a dead letter
            results = {rid: client.result(rid, timeout=60) for rid in [*ids, "cancelled-1"]}
            deadline = time.monotonic() + 30
            samples = scrape(worker.metrics.port)
            while time.monotonic() < deadline and not (  # finals are counted as they are queued, the dead letter too
                    sum(samples["spool_jobs_finished_total"].values()) >= 6 and samples["spool_dead_letters_total"][()]):
                time.sleep(0.1)
                samples = scrape(worker.metrics.port)
            port = worker.metrics.port
        yield samples, results, engine.stats.generation_tokens - before, port
    finally:
        server.stop()


def test_every_issue_metric_is_exported(finished_run):
    samples, *_ = finished_run
    names = set(samples)
    missing = [m for m in ISSUE_METRICS if m not in names and f"{m}_count" not in names]
    assert not missing, missing


def test_finished_jobs_by_status_and_priority(finished_run):
    samples, results, generated, _ = finished_run
    assert {r.status for r in results.values()} == {"completed", "failed", "cancelled"}
    assert value(samples, "spool_jobs_finished_total", status="completed", priority="interactive") == 3
    assert value(samples, "spool_jobs_finished_total", status="completed", priority="bulk") == 1
    assert value(samples, "spool_jobs_finished_total", status="failed", priority="interactive") == 1
    assert value(samples, "spool_jobs_finished_total", status="cancelled", priority="interactive") == 1
    assert value(samples, "spool_dead_letters_total") == 1
    prompt = sum(r.usage.prompt_tokens for r in results.values())
    assert value(samples, "spool_prompt_tokens_total") == prompt > 0
    assert value(samples, "spool_generation_tokens_total") >= generated == 3 * 6 + 4


def test_histograms_are_observed_once_per_job_and_per_step(finished_run):
    samples, *_ = finished_run
    interactive, bulk = {"priority": "interactive"}, {"priority": "bulk"}
    assert value(samples, "spool_time_to_first_token_seconds_count", **interactive) == 3
    assert value(samples, "spool_time_to_first_token_seconds_count", **bulk) == 1
    assert value(samples, "spool_time_per_output_token_seconds_count", **interactive) == 3
    # every final with an enqueue time: the 3 that ran, the failed one and the one cancelled before it started
    assert value(samples, "spool_e2e_request_latency_seconds_count", **interactive) == 5
    assert value(samples, "spool_queue_wait_seconds_count", **interactive) >= 3
    assert value(samples, "spool_step_duration_seconds_count") >= 6  # at least one step per generated token
    assert value(samples, "spool_time_to_first_token_seconds_bucket", le="+Inf", **interactive) == 3


def test_gauges_and_backlog(finished_run):
    samples, *_ = finished_run
    assert value(samples, "spool_running_requests") == 0 and value(samples, "spool_waiting_requests") == 0
    assert 0 <= value(samples, "spool_kv_cache_usage_ratio") <= 1
    assert value(samples, "spool_queue_backlog", stream="spool:jobs") == 0
    assert value(samples, "spool_queue_backlog", stream="spool:jobs:bulk") == 0
    assert value(samples, "spool_prefix_cache_queries_total") > 0


def test_the_metrics_server_stops_with_the_worker(finished_run):
    *_, port = finished_run
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_redis_errors_and_reconnects_are_counted(engine, redis_server):
    with running_worker(engine, redis_server.url, metrics_port=0, metrics_host="127.0.0.1") as worker:
        time.sleep(0.3)
        redis_server.stop()
        deadline = time.monotonic() + 10
        while worker.gate.failures < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        redis_server.start()
        while worker.gate.recoveries < 1 and time.monotonic() < deadline + 20:
            time.sleep(0.05)
        samples = scrape(worker.metrics.port)
        backlog_seen = ("spool_queue_backlog" in samples)
    assert value(samples, "spool_redis_errors_total") >= 2
    assert value(samples, "spool_redis_reconnects_total") >= 1
    assert backlog_seen


def test_stream_backlog_is_lag_plus_pending(redis_server):
    from spool.protocol.commands import queue_backlog as stream_backlog

    r = redis_server.client()
    for i in range(5):
        r.xadd("s", {"job": str(i)})
    assert stream_backlog(r, ["s", "empty"], "workers") == {"s": 5, "empty": 0}  # no group yet: all waiting
    r.xgroup_create("s", "workers", id="0")
    (_, entries), = r.xreadgroup("workers", "w", {"s": ">"}, count=2)
    r.xack("s", "workers", entries[0][0])
    r.xdel("s", entries[0][0])  # a finished job: acked and deleted
    assert stream_backlog(r, ["s"], "workers") == {"s": 4}  # 3 waiting (lag) + 1 running (pending)


def test_spool_worker_serves_metrics_and_logs_json(tiny_llama, redis_url):
    proc = subprocess.Popen([sys.executable, "-m", "spool", "worker", "--model", str(tiny_llama), "--device", "cpu",
                             "--redis-url", redis_url, "--metrics-port", "0", "--metrics-host", "127.0.0.1",
                             "--log-format", "json", "--name", "json-worker"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    lines: list[dict] = []

    def read_until(pred):
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith("{"):
                lines.append(json.loads(line))
                if pred(lines[-1]):
                    return lines[-1]
        raise AssertionError(f"not found in the worker's log: {lines}")

    try:
        start = read_until(lambda d: d["message"] == "starting")
        port = int(re.match(r":(\d+)/metrics", start["metrics"]).group(1))
        assert start["worker"] == "json-worker" and start["device"] == "cpu" and start["cuda_graphs"] == "off"
        assert start["kv_cache_tokens"] == start["kv_cache_blocks"] * start["block_size"]
        Client(redis_url).enqueue("Once upon a time", max_tokens=5, ignore_eos=True, id="json-1")
        job = read_until(lambda d: d["message"] == "job finished")
        samples = scrape(port)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert job["id"] == "json-1" and job["status"] == "completed" and job["priority"] == "interactive"
    assert job["completion_tokens"] == 5 and job["prompt_tokens"] > 0
    assert 0 <= job["queue_wait_s"] <= job["ttft_s"] <= job["total_s"]
    assert value(samples, "spool_jobs_finished_total", status="completed", priority="interactive") == 1


# -- deploy/ ------------------------------------------------------------------------------------------------

def _dashboard_metrics() -> set[str]:
    doc = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    assert exprs, "the dashboard has no queries"
    return {m for e in exprs for m in re.findall(r"\bspool_[a-z0-9_]+", e)}


def test_dashboard_queries_only_exported_metrics(finished_run):
    samples, *_ = finished_run
    queried = _dashboard_metrics()
    assert not queried - set(samples), f"dashboard queries metrics no worker exports: {queried - set(samples)}"
    for base in ("spool_jobs_finished_total", "spool_queue_backlog", "spool_time_to_first_token_seconds_bucket",
                 "spool_kv_cache_usage_ratio", "spool_generation_tokens_total"):
        assert base in queried


def test_prometheus_scrapes_the_workers_metrics_port():
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in prom["scrape_configs"]}
    (sd,) = jobs["spool-worker"]["dns_sd_configs"]  # every replica of the compose service `worker`
    assert sd["names"] == ["worker"] and sd["port"] == 9400
    (sd,) = jobs["spool-gateway"]["dns_sd_configs"]  # every `spool serve` replica, /metrics on its API port
    assert sd["names"] == ["gateway"] and sd["port"] == 8000
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    assert services["prometheus"]["profiles"] == ["monitoring"] and services["grafana"]["profiles"] == ["monitoring"]
    assert services["worker"]["environment"]["SPOOL_METRICS_PORT"] in ("9400", 9400)
    assert "8000" in services["gateway"]["command"]
    for svc in ("prometheus", "grafana"):
        for volume in services[svc].get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), volume


def test_keda_scales_workers_on_the_consumer_group_lag():
    docs = [d for d in yaml.safe_load_all((DEPLOY / "kubernetes" / "worker.yaml").read_text()) if d]
    kinds = {d["kind"]: d for d in docs}
    deployment, scaled = kinds["Deployment"], kinds["ScaledObject"]
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    triggers = scaled["spec"]["triggers"]
    assert all(t["type"] == "redis-streams" and t["metadata"]["consumerGroup"] == "workers" for t in triggers)
    lag = {t["metadata"]["stream"] for t in triggers if "lagCount" in t["metadata"]}
    pending = {t["metadata"]["stream"] for t in triggers if "pendingEntriesCount" in t["metadata"]}
    assert lag == pending == {"spool:jobs", "spool:jobs:bulk"}  # waiting jobs add pods; running ones keep them
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    args = build_parser().parse_args(container["command"][1:])
    assert callable(args.func) and args.command == "worker"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["SPOOL_METRICS_PORT"] == "9400"
    pending_target = {t["metadata"]["pendingEntriesCount"] for t in triggers if "pendingEntriesCount" in t["metadata"]}
    assert pending_target == {env["SPOOL_MAX_NUM_SEQS"]}
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > float(env["SPOOL_GRACE_PERIOD_S"])  # in-flight jobs finish before Kubernetes kills the pod
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    orjson.dumps(docs)  # plain data, nothing YAML-specific
