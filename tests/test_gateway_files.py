"""The Files and Batches API of `spool serve`, end to end with the openai SDK against a real gateway, worker and
redis-server: upload, create, poll, download (every output line validated as the SDK's own types), errors,
limits, cancel, and a batch that outlives the gateway process that started it."""
from __future__ import annotations

import signal
import time

import httpx2
import openai
import orjson
import pytest
from openai.types import Batch, Completion, FileObject
from openai.types.chat import ChatCompletion

from spool.testing.gateway import GatewayProcess, gateway_deployment

KEY = "sk-files-test"


def line(cid: str, url: str = "/v1/chat/completions", **body) -> dict:
    if url == "/v1/chat/completions":
        body = {"messages": [{"role": "user", "content": f"question {cid}"}], "max_tokens": 5, **body}
    else:
        body = {"prompt": f"prompt {cid}", "max_tokens": 5, **body}
    return {"custom_id": cid, "method": "POST", "url": url, "body": {"model": "whatever", **body}}


def jsonl(lines: list[dict]) -> bytes:
    return b"".join(orjson.dumps(x) + b"\n" for x in lines)


@pytest.fixture(scope="module")
def deployment(tiny_llama, tmp_path_factory):
    """(redis url, gateway, tmp dir, files dir) with one live worker."""
    tmp = tmp_path_factory.mktemp("gateway-files")
    files = tmp / "files"
    with gateway_deployment(tiny_llama, tmp, "--max-file-bytes", "20000", api_key=KEY, files_dir=files) as (url, gw):
        yield url, gw, tmp, files


@pytest.fixture(scope="module")
def sdk(deployment):
    return openai.OpenAI(base_url=deployment[1].base_url, api_key=KEY, max_retries=0, timeout=60)


def wait_batch(sdk, batch_id: str, statuses=("completed", "failed", "cancelled"), timeout=180.0) -> Batch:
    end = time.monotonic() + timeout
    while True:
        b = sdk.batches.retrieve(batch_id)
        if b.status in statuses:
            return b
        assert time.monotonic() < end, f"batch {batch_id} still {b.status}"
        time.sleep(0.2)


def test_files_and_batches_end_to_end(deployment, sdk):
    lines = [line(f"chat-{i}", temperature=0) for i in range(4)]
    lines += [line(f"comp-{i}", "/v1/completions", ignore_eos=True) for i in range(3)]
    lines.append(line("too-long", "/v1/completions", prompt=[5] * 500, max_tokens=100))  # fails in the worker
    data = jsonl(lines)
    uploaded = sdk.files.create(file=("requests.jsonl", data), purpose="batch")
    assert isinstance(uploaded, FileObject) and uploaded.bytes == len(data) and uploaded.purpose == "batch"
    assert sdk.files.retrieve(uploaded.id).filename == "requests.jsonl"
    assert sdk.files.content(uploaded.id).content == data
    assert uploaded.id in [f.id for f in sdk.files.list(purpose="batch")]

    batch = sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h",
                               metadata={"team": "nightly"})
    assert isinstance(batch, Batch) and batch.status in ("validating", "in_progress") and batch.metadata == {
        "team": "nightly"}
    done = wait_batch(sdk, batch.id)
    assert done.status == "completed", done
    assert done.request_counts.total == 8 and done.request_counts.completed == 7 and done.request_counts.failed == 1
    assert done.input_file_id == uploaded.id and done.completed_at and done.endpoint == "/v1/chat/completions"

    out = [orjson.loads(x) for x in sdk.files.content(done.output_file_id).content.splitlines()]
    assert sorted(r["custom_id"] for r in out) == sorted(x["custom_id"] for x in lines[:7])
    for rec in out:
        assert rec["error"] is None and rec["response"]["status_code"] == 200
        kind = ChatCompletion if rec["custom_id"].startswith("chat") else Completion
        kind.model_validate(rec["response"]["body"])  # every line is what the SDK itself would parse
    errors = [orjson.loads(x) for x in sdk.files.content(done.error_file_id).content.splitlines()]
    assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [("too-long", "invalid_prompt")]
    _, gateway, _, _ = deployment
    auth = {"Authorization": f"Bearer {KEY}"}
    Batch.model_validate(httpx2.get(f"{gateway.base_url}/batches/{batch.id}", headers=auth).json())  # strictly
    FileObject.model_validate(httpx2.get(f"{gateway.base_url}/files/{done.output_file_id}", headers=auth).json())
    output_file = sdk.files.retrieve(done.output_file_id)
    assert output_file.purpose == "batch_output" and output_file.bytes > 0
    assert batch.id in [b.id for b in sdk.batches.list(limit=5)]
    assert sdk.batches.cancel(batch.id).status == "completed"  # final: nothing to cancel
    assert sdk.files.delete(uploaded.id).deleted
    with pytest.raises(openai.NotFoundError):
        sdk.files.retrieve(uploaded.id)


def test_invalid_files_and_requests_are_refused(sdk):
    bad = jsonl([line("a"), {"custom_id": "b", "method": "POST", "url": "/v1/chat/completions",
                             "body": {"model": "m", "messages": [], "max_tokens": 2}}])
    f = sdk.files.create(file=("bad.jsonl", bad), purpose="batch")
    failed = wait_batch(sdk, sdk.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                                completion_window="24h").id)
    assert failed.status == "failed" and failed.errors.data[0].line == 2 and "messages" in failed.errors.data[0].message
    with pytest.raises(openai.BadRequestError) as e:
        sdk.files.create(file=("x.jsonl", b"{}\n"), purpose="fine-tune")
    assert e.value.param == "purpose"
    with pytest.raises(openai.APIStatusError) as e:
        sdk.files.create(file=("big.jsonl", b"x" * 30000), purpose="batch")
    assert e.value.status_code == 413 and e.value.code == "file_too_large"
    for kw, param in [({"endpoint": "/v1/embeddings"}, "endpoint"), ({"completion_window": "1h"}, "completion_window"),
                      ({"input_file_id": "file-nope"}, "input_file_id")]:
        args = {"input_file_id": f.id, "endpoint": "/v1/chat/completions", "completion_window": "24h", **kw}
        with pytest.raises(openai.BadRequestError) as e:
            sdk.batches.create(**args)
        assert e.value.param == param
    with pytest.raises(openai.NotFoundError):
        sdk.batches.retrieve("batch_does_not_exist")
    with pytest.raises(openai.NotFoundError):
        sdk.files.content("file-../../etc/passwd")


def test_cancel_a_running_batch(sdk):
    data = jsonl([line(f"long-{i}", "/v1/completions", max_tokens=400, ignore_eos=True) for i in range(40)])
    f = sdk.files.create(file=("long.jsonl", data), purpose="batch")
    batch = sdk.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
    wait_batch(sdk, batch.id, ("in_progress",))
    with pytest.raises(openai.ConflictError):  # the input of a running batch stays
        sdk.files.delete(f.id)
    assert sdk.batches.cancel(batch.id).status in ("cancelling", "cancelled")
    done = wait_batch(sdk, batch.id, ("cancelled",), timeout=60)
    assert done.cancelled_at and done.request_counts.completed + done.request_counts.failed == 40
    assert done.request_counts.failed > 0 and done.error_file_id is not None


def test_a_batch_outlives_the_gateway_that_started_it(deployment, sdk):
    url, _, tmp, files = deployment
    # Ten rounds of the worker's 16 sequences: the runner publishes its counts once a second (heartbeat_s), and on a
    # fast host three rounds could all finish before the first count was published, leaving nothing to kill.
    n = 160
    data = jsonl([line(f"r-{i}", "/v1/completions", max_tokens=300, ignore_eos=True, seed=i) for i in range(n)])
    first = GatewayProcess(url, tmp, api_key=KEY, files_dir=files, name="doomed").start()
    doomed = openai.OpenAI(base_url=first.base_url, api_key=KEY, max_retries=0)
    f = doomed.files.create(file=("survive.jsonl", data), purpose="batch")
    batch = doomed.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
    end = time.monotonic() + 120
    while doomed.batches.retrieve(batch.id).request_counts.completed == 0:  # some written, some in flight
        assert time.monotonic() < end
        time.sleep(0.05)
    first.proc.send_signal(signal.SIGKILL)  # the runner dies with it, mid-batch
    first.proc.wait()
    killed = sdk.batches.retrieve(batch.id)
    assert killed.status == "in_progress" and 0 < killed.request_counts.completed < n
    done = wait_batch(sdk, batch.id, timeout=240)  # the other gateway resumes it within a few seconds
    assert done.status == "completed" and done.request_counts.completed == n, done
    out = [orjson.loads(x) for x in sdk.files.content(done.output_file_id).content.splitlines()]
    assert sorted(r["custom_id"] for r in out) == sorted(f"r-{i}" for i in range(n))  # each exactly once
