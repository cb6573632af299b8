"""`spool worker --gpus`: GPU lists and tensor-parallel groups, the worker processes' command lines, restart and
stop policy on stand-in processes, and the real thing on two fake GPUs (CPU workers, SPOOL_FAKE_GPUS)."""
from __future__ import annotations

import io
import os
import signal
import stat
import subprocess
import sys
import threading

import pytest

from spool.engine.config import EngineConfig
from spool.producer import Client
from spool.producer.admin import live_workers
from spool.protocol.keys import Keys
from spool.cli.flags import dataclass_flags, dataclass_from_args
from spool.cli.main import build_parser, main
from spool.cli.worker import cuda_index
from spool.testing.chaos import ROOT, WorkerProcess, audit, count_results, wait_for
from spool.testing.history import History, check, summary
from spool.worker.placement import placement, supervisor_pid
from spool.worker.settings import WorkerSettings
from spool.worker.supervisor import (DONE, FAILED, ChildSpec, FoundGpus, GpuSpecError, RestartPolicy, Supervisor,
                               child_specs, discover_gpus, group_gpus, nvidia_smi_gpus, parse_cuda_visible,
                               parse_gpu_spec, select_gpus)

KEYS = Keys()


# -- which GPUs -----------------------------------------------------------------------------------------
def test_gpu_spec_is_all_or_distinct_numbers():
    assert parse_gpu_spec("all") == "all"
    assert parse_gpu_spec(" 0,1,3 ") == [0, 1, 3]
    assert parse_gpu_spec("2") == [2]
    for bad in ("", "a", "0,,1", "-1", "1.5", "0;1", "all,0"):
        with pytest.raises(ValueError, match="expected all or GPU numbers"):
            parse_gpu_spec(bad)
    with pytest.raises(ValueError, match="GPU 1 is listed twice"):
        parse_gpu_spec("1,0,1")


def test_cuda_visible_devices_is_read_as_cuda_reads_it():
    assert parse_cuda_visible("0,1") == ["0", "1"]
    assert parse_cuda_visible(" 4, 5 ") == ["4", "5"]
    assert parse_cuda_visible("") == [] and parse_cuda_visible("-1") == []
    assert parse_cuda_visible("2,-1,3") == ["2"]  # CUDA stops at the first invalid entry
    assert parse_cuda_visible("GPU-8f3c,GPU-11aa") == ["GPU-8f3c", "GPU-11aa"]


def test_discovery_prefers_fake_then_cuda_visible_devices_then_nvidia_smi():
    smi = lambda: ["0", "1", "2"]  # noqa: E731
    assert discover_gpus({}, smi) == FoundGpus(["0", "1", "2"], "nvidia-smi -L")
    assert discover_gpus({"CUDA_VISIBLE_DEVICES": "6,7"}, smi) == FoundGpus(["6", "7"], "CUDA_VISIBLE_DEVICES")
    assert discover_gpus({"CUDA_VISIBLE_DEVICES": ""}, smi).ids == []
    assert discover_gpus({"SPOOL_FAKE_GPUS": "2", "CUDA_VISIBLE_DEVICES": ""}, smi) == \
        FoundGpus(["0", "1"], "SPOOL_FAKE_GPUS", fake=True)
    assert discover_gpus({}, lambda: None).ids is None
    with pytest.raises(GpuSpecError, match="SPOOL_FAKE_GPUS must be a number"):
        discover_gpus({"SPOOL_FAKE_GPUS": "two"}, smi)


def test_nvidia_smi_gpus_counts_the_gpu_lines(tmp_path, monkeypatch):
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-a)'\n"
                    "echo '  MIG 1g.18gb Device 0: (UUID: MIG-b)'\necho 'GPU 1: NVIDIA H200 (UUID: GPU-c)'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert nvidia_smi_gpus() == ["0", "1"]
    fake.write_text("#!/bin/sh\necho 'No devices were found'\nexit 6\n")
    assert nvidia_smi_gpus() is None
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    assert nvidia_smi_gpus() is None


def test_selected_numbers_count_the_visible_gpus():
    four = FoundGpus(["4", "5", "6", "7"], "CUDA_VISIBLE_DEVICES")
    assert select_gpus("all", four) == ["4", "5", "6", "7"]
    assert select_gpus([1, 3], four) == ["5", "7"]
    with pytest.raises(GpuSpecError, match="there is no GPU 4; CUDA_VISIBLE_DEVICES shows GPUs 0-3"):
        select_gpus([0, 4], four)
    with pytest.raises(GpuSpecError, match=r"--gpus all: no GPU found on this host \(nvidia-smi -L shows none\)"):
        select_gpus("all", FoundGpus([], "nvidia-smi -L"))
    with pytest.raises(GpuSpecError, match="nvidia-smi is missing or failed"):
        select_gpus("all", FoundGpus(None, "nvidia-smi -L"))
    with pytest.raises(GpuSpecError, match="there is no GPU 0; nvidia-smi -L shows no GPU"):
        select_gpus([0], FoundGpus([], "nvidia-smi -L"))
    assert select_gpus([0, 2], FoundGpus(None, "nvidia-smi -L")) == ["0", "2"]  # unknown: trusted


def test_gpus_split_into_tensor_parallel_groups():
    gpus = ["0", "1", "2", "3"]
    assert group_gpus(gpus) == [["0"], ["1"], ["2"], ["3"]]
    assert group_gpus(gpus, 2) == [["0", "1"], ["2", "3"]]
    assert group_gpus(gpus, 4) == [gpus]
    with pytest.raises(GpuSpecError, match="3 GPUs, which do not split into groups of tensor_parallel_size 2"):
        group_gpus(["0", "1", "3"], 2)
    with pytest.raises(GpuSpecError, match="must be >= 1"):
        group_gpus(gpus, 0)


# -- the worker processes' command lines ------------------------------------------------------------------
def test_each_worker_process_gets_its_gpus_name_device_and_metrics_port():
    env = {"PATH": "/bin", "SPOOL_GPUS": "all", "SPOOL_FAKE_GPUS": "4", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    specs = child_specs([["0", "1"], ["2", "3"]], ["python", "-m", "spool", "worker"], "host-1", metrics_port=9400,
                        env=env)
    assert [s.name for s in specs] == ["host-1-gpu0-1", "host-1-gpu2-3"]
    assert specs[1].argv[-6:] == ["--name", "host-1-gpu2-3", "--device", "cuda", "--metrics-port", "9401"]
    for spec, gpus in zip(specs, ("0,1", "2,3")):
        assert spec.env["CUDA_VISIBLE_DEVICES"] == gpus and spec.env["SPOOL_GPU_GROUP"] == gpus
        assert "SPOOL_GPUS" not in spec.env and "SPOOL_FAKE_GPUS" not in spec.env  # no supervisor of its own
        assert supervisor_pid(spec.env) == os.getpid()
        assert placement(spec.env)["gpus"] == gpus
    fake = child_specs([["0"]], ["w"], "t", fake=True, metrics_port=0, env=env)[0]
    assert fake.argv == ["w", "--name", "t-gpu0", "--device", "cpu", "--metrics-port", "0"]
    assert fake.env["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"  # left alone: these workers run on the CPU
    uuids = child_specs([["GPU-8f3c"], ["GPU-11aa"]], ["w"], "h", env={})
    assert [s.name for s in uuids] == ["h-gpu0", "h-gpu1"] and uuids[1].env["CUDA_VISIBLE_DEVICES"] == "GPU-11aa"
    with pytest.raises(GpuSpecError, match="use a shorter name"):
        child_specs([["0"]], ["w"], "x" * 125, env={})


def test_placement_outside_a_supervisor_is_host_and_pid():
    assert set(placement({})) == {"host", "pid"} and placement({})["pid"] == os.getpid()
    assert supervisor_pid({}) is None and supervisor_pid({"SPOOL_SUPERVISOR": "h:x"}) is None


def test_worker_flags_round_trip_into_the_worker_processes():
    parser = build_parser()
    args = parser.parse_args(["worker", "--model", "/m", "--max-num-seqs", "7", "--no-enable-prefix-caching",
                              "--gpu-memory-utilization", "0.5", "--grace-period-s", "4", "--gpus", "0,1"])
    assert args.gpus == [0, 1]
    flags = dataclass_flags(EngineConfig, args) + dataclass_flags(WorkerSettings, args, skip=("name",))
    again = parser.parse_args(["worker", *flags])
    assert dataclass_from_args(EngineConfig, again) == dataclass_from_args(EngineConfig, args)
    assert again.gpus is None
    kept = dataclass_from_args(WorkerSettings, again, name="n")
    assert kept == dataclass_from_args(WorkerSettings, args, name="n") and kept.grace_period_s == 4.0


def test_device_and_gpus_flags(monkeypatch):
    args = build_parser().parse_args(["worker", "--model", "/m", "--device", "cuda:1"])
    assert dataclass_from_args(EngineConfig, args).device == "cuda:1" and args.gpus is None
    assert [cuda_index(d) for d in ("cuda:1", "cuda:12", "cuda", "auto", "cpu", "cuda:x")] == [1, 12, None, None,
                                                                                                None, None]
    monkeypatch.setenv("SPOOL_GPUS", "all")
    assert build_parser().parse_args(["worker", "--model", "/m"]).gpus == "all"
    monkeypatch.setenv("SPOOL_GPUS", "0,0")
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["worker", "--model", "/m"])
    assert exc.value.code == 2


def test_gpus_all_without_a_gpu_is_one_line_and_exit_2(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.delenv("SPOOL_FAKE_GPUS", raising=False)
    assert main(["worker", "--model", str(tmp_path), "--gpus", "all"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "spool worker: --gpus all: no GPU found on this host (CUDA_VISIBLE_DEVICES shows none)"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert main(["worker", "--model", str(tmp_path), "--gpus", "0", "--device", "cpu"]) == 2
    assert "drop --device cpu" in capsys.readouterr().err


# -- restart and stop policy, on stand-in processes ------------------------------------------------------
def _spec(name: str, code: str) -> ChildSpec:
    return ChildSpec(name, ["0"], [sys.executable, "-c", code], dict(os.environ))


FAST = RestartPolicy(initial_backoff_s=0.05, max_backoff_s=0.2, healthy_after_s=30.0, max_quick_failures=3)


def test_backoff_doubles_and_is_capped():
    policy = RestartPolicy(initial_backoff_s=1.0, max_backoff_s=10.0)
    assert [policy.backoff_s(n) for n in range(7)] == [1.0, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_a_worker_that_keeps_dying_at_start_is_given_up(caplog):
    out = io.StringIO()
    sup = Supervisor([_spec("crash", "print('boom'); raise SystemExit(3)"), _spec("fine", "pass")], FAST, output=out)
    with caplog.at_level("INFO", logger="spool.worker.supervisor"):
        assert sup.run() == 1
    crash, fine = sup.children
    assert crash.state == FAILED and crash.starts == 3 and crash.last_exit == 3
    assert fine.state == DONE and fine.starts == 1  # exit 0 is an end on purpose: not restarted
    assert out.getvalue().count("[crash] boom") == 3
    text = caplog.text
    assert "worker crash (GPU 0) exited with code 3 after" in text and "restarting it in 0.1s" in text
    assert "its 3 death in a row within 30s of its start; giving up on it" in text


def test_a_usage_error_is_not_retried():
    sup = Supervisor([_spec("bad", "raise SystemExit(2)")], FAST, output=io.StringIO())
    assert sup.run() == 2 and sup.children[0].starts == 1


def test_a_worker_killed_mid_run_is_restarted():
    marker = "import os, sys, time; print('pid', os.getpid(), flush=True); time.sleep(60)"
    sup = Supervisor([_spec("w", marker)], FAST, output=io.StringIO())
    thread = threading.Thread(target=sup.run, daemon=True)
    thread.start()
    wait_for(lambda: sup.children[0].starts == 1 and sup.children[0].proc is not None, 10)
    first = sup.children[0].proc.pid
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: sup.children[0].starts == 2, 10, what="a restart")
    assert sup.children[0].proc.pid != first and sup.children[0].quick_failures == 1
    sup._on_signal()
    thread.join(10)
    assert not thread.is_alive() and sup.exit_code() == 0


# A stand-in worker with the stop contract: the first SIGTERM is a warm stop, the second a cold one.
TWO_STOPS = """
import signal, sys, time
seen = []
def stop(*_):
    seen.append(1)
    print("cold" if len(seen) > 1 else "warm", flush=True)
signal.signal(signal.SIGTERM, stop)
print("ready", flush=True)
while len(seen) < 2:
    time.sleep(0.01)
"""


def test_signals_fan_out_warm_then_cold_then_kill():
    out = io.StringIO()
    sup = Supervisor([_spec("a", TWO_STOPS), _spec("b", TWO_STOPS)], FAST, output=out)
    thread = threading.Thread(target=sup.run, daemon=True)
    thread.start()
    wait_for(lambda: out.getvalue().count("ready") == 2, 10, what="both ready")
    sup._on_signal()  # what SIGTERM does (the handler only counts; the loop forwards)
    wait_for(lambda: out.getvalue().count("warm") == 2, 10, what="warm stops")
    assert all(c.proc.poll() is None for c in sup.children)  # a warm stop lets them finish
    sup._on_signal()
    thread.join(10)
    assert not thread.is_alive() and out.getvalue().count("cold") == 2
    assert sup.exit_code() == 0 and {c.last_exit for c in sup.children} == {0}

    out = io.StringIO()
    stubborn = Supervisor([_spec("s", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                                      "print('ready', flush=True); time.sleep(60)")], FAST, output=out)
    thread = threading.Thread(target=stubborn.run, daemon=True)
    thread.start()
    wait_for(lambda: "ready" in out.getvalue(), 10)
    for _ in range(3):
        stubborn._on_signal()
    thread.join(10)
    assert not thread.is_alive() and stubborn.children[0].last_exit == -signal.SIGKILL


def test_a_stop_that_outlasts_the_timeout_kills():
    out = io.StringIO()
    sup = Supervisor([_spec("h", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                                 "print('ready', flush=True); time.sleep(60)")], FAST, stop_timeout_s=0.3, output=out)
    thread = threading.Thread(target=sup.run, daemon=True)
    thread.start()
    wait_for(lambda: "ready" in out.getvalue(), 10)
    sup._on_signal()
    thread.join(10)
    assert not thread.is_alive() and sup.children[0].last_exit == -signal.SIGKILL


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_worker_process_gets_sigterm_when_its_supervisor_dies(tmp_path):
    marker = tmp_path / "stopped"
    worker = (f"import signal, sys, time; from spool.worker.placement import follow_supervisor; "
              f"signal.signal(signal.SIGTERM, lambda *_: (open({str(marker)!r}, 'w').close(), sys.exit(0))); "
              f"follow_supervisor(); print('ready', flush=True); time.sleep(60)")
    supervisor = ("import os, subprocess, sys, time; "
                  "env = dict(os.environ, SPOOL_SUPERVISOR=f'h:{os.getpid()}'); "
                  f"subprocess.Popen([sys.executable, '-c', {worker!r}], env=env); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", supervisor], cwd=ROOT, stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"ready"  # the worker process is up and follows its parent
        proc.kill()
        wait_for(marker.exists, 10, what="SIGTERM in the orphaned worker process")
    finally:
        proc.kill()
        proc.wait()


def test_the_supervisor_modules_do_not_load_torch():
    code = "import sys, spool.worker.supervisor, spool.worker.placement; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


def test_json_log_lines_get_the_worker_name():
    sup = Supervisor([], log_format="json")
    assert sup._tag('{"level": "INFO", "message": "x"}', "w-gpu1") == '{"worker": "w-gpu1", "level": "INFO", ' \
                                                                      '"message": "x"}'
    assert sup._tag("Traceback (most recent call last):", "w-gpu1") == "[w-gpu1] Traceback (most recent call last):"
    assert Supervisor([])._tag('{"a": 1}', "w") == '[w] {"a": 1}'


def test_top_shows_each_gpus_worker_in_gpu_order():
    from rich.console import Console

    from spool.cli.top import render

    beat = {"model": "/models/llama", "running": 1, "waiting": 0, "kv_usage": 0.5, "tokens_per_s": 10,
            "jobs_done": 3, "last_seen": 100.0, "supervisor": "h:1"}
    snap = {"workers": {"h-gpu10": {**beat, "device": "cuda:0", "gpus": "10"},
                        "h-gpu2-3": {**beat, "device": "cuda:0", "gpus": "2,3"},
                        "cpu-one": {**beat, "device": "cpu"}},
            "streams": {}, "batches": [], "dead_letters": 0}
    console = Console(width=160, file=io.StringIO(), highlight=False)
    console.print(render(snap, "redis://x", now=101.0))
    rows = [line for line in console.file.getvalue().splitlines() if "llama" in line]
    assert [row.split("│")[1].strip() for row in rows] == ["cpu-one", "h-gpu2-3", "h-gpu10"]
    assert [row.split("│")[3].strip() for row in rows] == ["cpu", "GPU 2,3", "GPU 10"]


# -- the real thing: two CPU "GPUs", a real redis-server, the tiny model -------------------------------------
def _heartbeats(r) -> dict[str, dict]:
    from spool.producer.admin import deployment_status

    return deployment_status(r, KEYS)["workers"]


def _done_by(r, ids: list[str], worker: str) -> int:
    """How many of `ids` have a result that `worker` wrote (read straight from the result keys, not a heartbeat)."""
    from spool.protocol.results import Result

    pipe = r.pipeline(transaction=False)
    for rid in ids:
        pipe.get(KEYS.result(rid))
    return sum(Result.from_json(raw).worker == worker for raw in pipe.execute() if raw is not None)


def test_two_fake_gpus_serve_survive_a_kill_and_stop_warm(tiny_llama, redis_server, tmp_path):
    client = Client(redis_server.url)
    r = client.redis
    sup = WorkerProcess(tiny_llama, redis_server.url, "sup", tmp_path, "--gpus", "all",
                        env={"SPOOL_FAKE_GPUS": "2"}).start()
    try:
        beats = wait_for(lambda: (hb := _heartbeats(r)) and len(hb) == 2 and hb, 120, what="two heartbeats")
        assert set(beats) == {"sup-gpu0", "sup-gpu1"}
        assert [beats[n]["gpus"] for n in sorted(beats)] == ["0", "1"]
        assert beats["sup-gpu0"]["supervisor"] == beats["sup-gpu1"]["supervisor"] == f"{os.uname().nodename}:" \
                                                                                       f"{sup.proc.pid}"
        assert beats["sup-gpu0"]["pid"] != beats["sup-gpu1"]["pid"]
        assert all(hb["device"] == "cpu" for hb in beats.values())

        history = History()
        jobs = [{"id": f"g{i}", "prompt": f"gpus {i}", "max_tokens": 24 + i % 16, "ignore_eos": True,
                 "temperature": 0.7, "seed": i, "stream": i % 2 == 0} for i in range(80)]
        ids = client.enqueue_many(jobs)
        for job in jobs:
            history.acknowledged(job["id"], job["stream"])
        held = lambda: r.xpending_range(KEYS.jobs(), KEYS.group, "-", "+", 100, consumername="sup-gpu0")  # noqa: E731
        # Kill sup-gpu0 once it has finished jobs of its own and holds more mid-generation. Its results are read
        # from Redis, not from its heartbeat: a heartbeat (every 2 s) can report the finished jobs only after the
        # worker has finished all it held, and then no moment satisfies both.
        wait_for(lambda: held() and _done_by(r, ids, "sup-gpu0") >= 2 and held(), 60, what="sup-gpu0 busy")
        victim = beats["sup-gpu0"]["pid"]
        os.kill(victim, signal.SIGKILL)
        reborn = wait_for(lambda: (pid := _heartbeats(r).get("sup-gpu0", {}).get("pid")) not in (None, victim) and pid,
                          90, what="sup-gpu0 restarted")
        wait_for(lambda: count_results(r, KEYS, ids) == len(ids), 90, interval=0.2, what="all results")
        assert not check(history, r, KEYS), summary(check(history, r, KEYS))
        a = audit(r, KEYS, ids)
        assert a.ok and a.statuses == {"completed": len(ids)}, a.summary()
        assert {client.result(i).worker for i in ids} == {"sup-gpu0", "sup-gpu1"}
        assert sup.alive and "was killed by SIGKILL" in sup.log_tail(200)
        with open(f"/proc/{reborn}/cmdline", "rb") as cmdline:  # the URL (and its password) stays out of `ps`
            assert redis_server.url.encode() not in cmdline.read()

        # SIGTERM with work in flight: every job is either finished or still queued, none held by a dead consumer.
        late = client.enqueue_many([{"id": f"late{i}", "prompt": f"late {i}", "max_tokens": 200, "ignore_eos": True}
                                    for i in range(24)])
        wait_for(lambda: sum(client.status(i) == "running" for i in late) >= 4, 60, what="late jobs running")
        assert sup.stop(timeout=60) == 0, sup.log_tail()
        assert not live_workers(r, KEYS) and not _heartbeats(r)
        for pid in (reborn, beats["sup-gpu1"]["pid"]):
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        assert r.xpending(KEYS.jobs(), KEYS.group)["pending"] == 0
        queued = " ".join(str(f[b"job"], "utf-8") for _, f in r.xrange(KEYS.jobs()))
        for rid in late:  # finished (result, entry deleted) or handed back (no result, entry still queued)
            assert bool(r.exists(KEYS.result(rid))) != (f'"{rid}"' in queued), rid
        assert audit(r, KEYS, [rid for rid in late if r.exists(KEYS.result(rid))]).ok
        log = sup.log_tail(400)
        assert "warm stop of 2 worker processes" in log and "[sup-gpu1]" in log
    finally:
        sup.kill()
        for hb in _heartbeats(r).values():
            try:
                os.kill(hb["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass
