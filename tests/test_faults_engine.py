"""Engine faults in real `spool worker` processes (spool.testing.faulty_worker injects them from inside the
engine's own calls): a step that raises fails its jobs with engine_error and the worker goes on; a CUDA error
ends the worker (exit 7) and a hung step trips the watchdog (exit 8), their jobs reclaimed by another worker.
Each run is checked by spool.testing.history: every job exactly one final result, streams equal results."""
from __future__ import annotations

import pytest

from spool.producer import Client
from spool.protocol import Keys
from spool.testing.chaos import WorkerProcess, count_results, wait_for
from spool.testing.history import History, check, summary
from spool.worker.step_errors import EXIT_DEVICE_ERROR, is_device_fatal
from spool.worker.watchdog import EXIT_STEP_HUNG

KEYS = Keys()
FAULTY = "spool.testing.faulty_worker"


def _enqueue(client: Client, history: History, prefix: str, n: int, prompt: str = "fine", **kw) -> list[str]:
    jobs = [{"id": f"{prefix}{i}", "prompt": f"{prompt} {i}", "max_tokens": 24, "ignore_eos": True,
             "stream": i % 2 == 0, "seed": i, **kw} for i in range(n)]
    ids = client.enqueue_many(jobs)
    for job in jobs:
        history.acknowledged(job["id"], streamed=job["stream"])
    return ids


def _codes(client: Client, ids: list[str]) -> dict[str, str]:
    out = {}
    for rid in ids:
        res = client.result(rid, timeout=1)
        out[rid] = res.error.code if res.error is not None else res.status
    return out


@pytest.mark.parametrize("marker", ["STEP-RAISE", "STEP-LAUNCH-RAISE"])
def test_a_step_that_raises_fails_its_jobs_and_the_worker_goes_on(tiny_llama, redis_server, tmp_path, marker):
    client, history = Client(redis_server.url), History()
    w = WorkerProcess(tiny_llama, redis_server.url, "w", tmp_path, max_num_seqs=8, module=FAULTY).start()
    try:
        before = _enqueue(client, history, "a", 3)
        bad = _enqueue(client, history, "bad", 1, prompt=f"this one breaks the step: {marker}")
        wait_for(lambda: count_results(client.redis, KEYS, before + bad) == 4, 60, what="first results")
        codes = _codes(client, before + bad)
        assert codes["bad0"] == "engine_error", (codes, w.log_tail())
        assert set(codes.values()) <= {"completed", "engine_error"}, codes  # jobs of that step fail with it
        bad_result = client.result("bad0", timeout=1)
        assert bad_result.status == "failed" and "injected fault" in bad_result.error.message
        # The worker lives on and serves new jobs as usual.
        after = _enqueue(client, history, "b", 6)
        wait_for(lambda: count_results(client.redis, KEYS, after) == 6, 60, what="later results")
        assert set(_codes(client, after).values()) == {"completed"}
        assert w.alive, w.log_tail()
        problems = check(history, client.redis, KEYS)
        assert not problems, summary(problems) + "\n" + w.log_tail()
        assert "engine step failed" in w.log_path.read_text()
        wait_for(lambda: client.redis.xpending(KEYS.jobs(), KEYS.group)["pending"] == 0, 10, what="all acked")
    finally:
        w.kill()


def test_a_cuda_error_ends_the_worker_and_another_takes_its_jobs(tiny_llama, redis_server, tmp_path):
    client, history = Client(redis_server.url), History()
    faulty = WorkerProcess(tiny_llama, redis_server.url, "faulty", tmp_path, max_num_seqs=8, module=FAULTY).start()
    rescuer = None
    try:
        ids = _enqueue(client, history, "c", 4) + _enqueue(client, history, "gpu", 1, prompt="STEP-CUDA now")
        wait_for(lambda: client.status("gpu0") == "running", 60, what="faulty took the jobs")
        rescuer = WorkerProcess(tiny_llama, redis_server.url, "rescuer", tmp_path).start()  # a healthy GPU
        assert faulty.proc.wait(60) == EXIT_DEVICE_ERROR, faulty.log_tail()
        assert "device error in an engine step" in faulty.log_path.read_text()
        wait_for(lambda: count_results(client.redis, KEYS, ids) == len(ids), 60, what="all results")
        assert set(_codes(client, ids).values()) == {"completed"}
        assert client.result("gpu0").worker == "rescuer"
        problems = check(history, client.redis, KEYS)
        assert not problems, summary(problems)
    finally:
        faulty.kill()
        if rescuer is not None:
            rescuer.kill()


def test_a_hung_step_trips_the_watchdog_and_its_jobs_are_reclaimed(tiny_llama, redis_server, tmp_path):
    client, history = Client(redis_server.url), History()
    hung = WorkerProcess(tiny_llama, redis_server.url, "hung", tmp_path, "--step-timeout-s", "1", module=FAULTY)
    hung.start()
    rescuer = WorkerProcess(tiny_llama, redis_server.url, "rescuer", tmp_path)
    try:
        ids = _enqueue(client, history, "h", 1, prompt="STEP-HANG here")
        wait_for(lambda: client.status("h0") == "running", 60, what="hung job running")
        rescuer.start()  # loads its model while the watchdog waits
        assert hung.proc.wait(15) == EXIT_STEP_HUNG, hung.log_tail()
        assert "past the 1.0s limit" in hung.log_path.read_text()
        assert client.result("h0", timeout=60).worker == "rescuer"
        problems = check(history, client.redis, KEYS)
        assert not problems, summary(problems)
        assert ids == ["h0"]
    finally:
        hung.kill()
        rescuer.kill()


def test_device_errors_are_told_from_step_errors():
    import torch

    assert is_device_fatal(torch.AcceleratorError("CUDA error: an illegal memory access was encountered"))
    assert is_device_fatal(RuntimeError("CUDA error: device-side assert triggered"))
    assert is_device_fatal(RuntimeError("NCCL error in: ProcessGroupNCCL.cpp:1970, unhandled cuda error"))
    assert not is_device_fatal(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not is_device_fatal(ValueError("token id 99999 is outside the vocabulary"))


def test_a_collect_that_fails_half_way_loses_no_job_and_no_kv_block(tiny_llama, redis_server):
    """In-process (the real worker loop, tests/worker_harness.py): the detokenizing part of collect() raises
    for one request after other sequences of the step got their tokens; every job still ends exactly once, the
    engine frees every block, and the worker serves on."""
    from spool.engine import LLMEngine
    from tests.worker_harness import running_worker

    client, history = Client(redis_server.url), History()
    engine = LLMEngine.from_kwargs(str(tiny_llama), device="cpu", block_size=8, max_num_seqs=8)
    add_request = engine.add_request
    failures = []

    def add_and_arm(request_id, *args, **kwargs):
        """half0's detokenizer chokes on its 5th token (whichever of its methods the engine calls)."""
        add_request(request_id, *args, **kwargs)
        if request_id != "half0":
            return
        detok, seen = engine.requests[request_id].detoks[0], []

        def choking(real):
            def call(token, check_stop=True):
                seen.append(token)
                if len(seen) >= 5 and not failures:
                    failures.append(request_id)
                    raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected: a detokenizer that chokes")
                return real(token, check_stop)
            return call

        detok.add_token, detok.add_token_delta = choking(detok.add_token), choking(detok.add_token_delta)

    engine.add_request = add_and_arm  # the worker calls engine.add_request: this instance's fault only
    with running_worker(engine, redis_server.url, name="half") as w:
        ids = _enqueue(client, history, "half", 6)
        wait_for(lambda: count_results(client.redis, KEYS, ids) == len(ids), 60, what="all results")
        codes = _codes(client, ids)
        assert codes["half0"] == "engine_error" and set(codes.values()) <= {"completed", "engine_error"}, codes
        later = _enqueue(client, history, "next", 4)
        wait_for(lambda: count_results(client.redis, KEYS, later) == len(later), 60, what="later results")
        assert set(_codes(client, later).values()) == {"completed"}
        wait_for(lambda: not w.inflight and not engine.has_unfinished_requests(), 10, what="idle")
    assert failures == ["half0"]
    assert engine.block_manager.num_used_blocks == 0  # the failed step's sequences gave their KV back
    problems = check(history, client.redis, KEYS)
    assert not problems, summary(problems)
