"""`spool serve` against real processes: a redis-server, a `spool worker` on a tiny model, the gateway itself (torch
unimportable in it), and the openai SDK (sync and async) as the client: chat and completions, streaming equal to
the non-streamed text, usage, keys, OpenAI-shaped errors, request ids, duplicate ids and client disconnects."""
from __future__ import annotations

import asyncio
import socket
import urllib.error
import urllib.request

import httpx2
import openai
import orjson
import pytest
from openai.types import Completion, Model
from openai.types.chat import ChatCompletion

from spool.producer import Client
from spool.testing.chaos import wait_for
from spool.testing.gateway import gateway_deployment

KEY = "sk-test-0123456789"
MODEL = "tiny"  # --served-model-name
HI = [{"role": "user", "content": "Hello there, how are you?"}]


@pytest.fixture(scope="module")
def deployment(tiny_llama, tmp_path_factory):
    """(redis url, gateway) with one live worker behind it."""
    with gateway_deployment(tiny_llama, tmp_path_factory.mktemp("gateway"), "--served-model-name", MODEL,
                            api_key=KEY) as deployed:
        yield deployed


@pytest.fixture(scope="module")
def sdk(deployment):
    return openai.OpenAI(base_url=deployment[1].base_url, api_key=KEY, max_retries=0, timeout=120)


def test_chat_and_completions_are_openai_objects_with_usage_and_request_ids(deployment, sdk):
    url, _ = deployment
    chat = sdk.chat.completions.create(model=MODEL, messages=HI, max_tokens=6, temperature=0)
    assert isinstance(chat, ChatCompletion) and chat.object == "chat.completion" and chat.model == MODEL
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].finish_reason in ("length", "stop")
    assert chat.usage.prompt_tokens > 0 and 0 < chat.usage.completion_tokens <= 6
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens
    rid = chat._request_id  # the x-request-id header: the spool request id, for `spool tail` / `spool result`
    assert chat.id == "chatcmpl-" + rid
    assert Client(url).result(rid, timeout=5).text == chat.choices[0].message.content

    comp = sdk.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=5, temperature=0,
                                  extra_body={"ignore_eos": True}, logprobs=2)
    assert isinstance(comp, Completion) and comp.object == "text_completion"
    assert comp.usage.completion_tokens == 5 and len(comp.choices[0].logprobs.tokens) == 5
    ids = sdk.completions.create(model=MODEL, prompt=[5, 6, 7, 8], max_tokens=3, n=2, temperature=0,
                                 extra_body={"ignore_eos": True})
    assert [c.index for c in ids.choices] == [0, 1] and ids.choices[0].text == ids.choices[1].text
    assert sdk.models.list().data[0].id == MODEL
    auth = {"Authorization": f"Bearer {KEY}"}  # the raw bodies validate strictly (the SDK itself reads leniently)
    ChatCompletion.model_validate(httpx2.post(deployment[1].base_url + "/chat/completions", headers=auth, json={
        "model": MODEL, "messages": HI, "max_tokens": 2}, timeout=60).json())
    Model.model_validate(httpx2.get(deployment[1].base_url + "/models", headers=auth).json()["data"][0])


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_streamed_chunks_concatenate_to_the_non_streamed_text(sdk, kind):
    if kind == "chat":
        args = dict(model=MODEL, messages=HI, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
        whole = sdk.chat.completions.create(**args)
        text, usage = whole.choices[0].message.content, whole.usage
        stream = sdk.chat.completions.create(**args, stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        got = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert chunks[0].choices[0].delta.role == "assistant"
    else:
        args = dict(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0,
                    extra_body={"ignore_eos": True})
        whole = sdk.completions.create(**args)
        text, usage = whole.choices[0].text, whole.usage
        chunks = list(sdk.completions.create(**args, stream=True, stream_options={"include_usage": True}))
        got = "".join(c.choices[0].text for c in chunks if c.choices)
    assert got == text and len(chunks) > 3  # token by token, not one blob
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])


def test_streamed_logprobs_of_several_choices_equal_the_non_streamed_ones(sdk):
    args = dict(model=MODEL, messages=HI, max_tokens=5, temperature=0, n=2, logprobs=True, top_logprobs=2,
                extra_body={"ignore_eos": True})
    whole = sdk.chat.completions.create(**args)
    chunks = [c for c in sdk.chat.completions.create(**args, stream=True) if c.choices]
    for i in range(2):
        mine = [c.choices[0] for c in chunks if c.choices[0].index == i]
        assert "".join(c.delta.content or "" for c in mine) == whole.choices[i].message.content
        streamed = [t for c in mine if c.logprobs for t in c.logprobs.content]
        want = whole.choices[i].logprobs.content
        assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in want]
        assert len(streamed) == 5 and all(len(t.top_logprobs) == 2 for t in streamed)


def test_fifty_concurrent_requests_with_the_async_sdk(deployment):
    _, gateway = deployment

    async def main():
        client = openai.AsyncOpenAI(base_url=gateway.base_url, api_key=KEY, max_retries=0, timeout=120)
        calls = []
        for i in range(50):
            if i % 2:
                calls.append(client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": f"question {i}"}], max_tokens=3))
            else:
                calls.append(client.completions.create(model=MODEL, prompt=f"line {i}", max_tokens=3,
                                                       stream=i % 4 == 0))
        out = await asyncio.gather(*calls)
        streamed = [[c async for c in s] for s in out if isinstance(s, openai.AsyncStream)]
        await client.close()
        return out, streamed

    out, streamed = asyncio.run(main())
    plain = [o for o in out if not isinstance(o, openai.AsyncStream)]
    assert len(plain) == 37 and len(streamed) == 13
    assert len({o.id for o in plain}) == 37 and all(o.usage.completion_tokens >= 1 for o in plain)
    assert all(s[-1].choices[0].finish_reason for s in streamed)


def test_keys_and_openai_shaped_errors(deployment, sdk):
    _, gateway = deployment
    bad = openai.OpenAI(base_url=gateway.base_url, api_key="wrong-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.chat.completions.create(model=MODEL, messages=HI, max_tokens=2)
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    with pytest.raises(urllib.error.HTTPError) as e:  # no key at all
        urllib.request.urlopen(gateway.base_url + "/models", timeout=10)
    assert e.value.code == 401 and orjson.loads(e.value.read())["error"]["type"] == "invalid_request_error"
    cases = [
        (dict(temperature=-1), "temperature", "greater than or equal"),
        (dict(extra_body={"echo": True}), "echo", "not supported"),
        (dict(stream_options={"include_usage": True}), "stream_options", "only allowed"),
        (dict(messages=[{"role": "narrator", "content": "x"}]), "messages[0].role", "role"),
        (dict(extra_body={"request_id": "no spaces allowed"}), "request_id", "invalid request id"),
    ]
    for extra, param, needle in cases:
        with pytest.raises(openai.BadRequestError) as e:
            sdk.chat.completions.create(**{"model": MODEL, "messages": HI, "max_tokens": 2, **extra})
        assert e.value.status_code == 400 and e.value.param == param and needle in e.value.message, e.value.body
        assert e.value.type == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as e:
        sdk.chat.completions.create(model="gpt-nope", messages=HI, max_tokens=2)
    assert e.value.code == "model_not_found" and e.value.param == "model"
    raw = urllib.request.Request(gateway.base_url + "/chat/completions", data=b"{not json", method="POST",
                                 headers={"Authorization": f"Bearer {KEY}"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(raw, timeout=10)
    assert e.value.code == 400 and orjson.loads(e.value.read())["error"]["code"] == "invalid_json"
    with pytest.raises(openai.BadRequestError, match="too long|max_model_len|exceeds") as e:  # the worker's verdict
        sdk.completions.create(model=MODEL, prompt=[5] * 500, max_tokens=100)
    assert e.value.code == "invalid_prompt"


def test_request_ids_are_idempotent_for_the_same_body_and_409_for_another(sdk):
    args = dict(model=MODEL, prompt="Same body", max_tokens=4, temperature=0)
    first = sdk.completions.create(**args, extra_body={"request_id": "my-id-1"})
    again = sdk.completions.create(**args, extra_body={"request_id": "my-id-1"})  # a retry: the same job
    assert first._request_id == again._request_id == "my-id-1" and first.choices[0].text == again.choices[0].text
    with pytest.raises(openai.ConflictError) as e:
        sdk.completions.create(**{**args, "prompt": "Another body"}, extra_body={"request_id": "my-id-1"})
    assert e.value.code == "duplicate_id" and e.value.response.headers["x-should-retry"] == "false"
    header = sdk.completions.create(**args, extra_headers={"X-Request-Id": "from-header-7"})
    assert header._request_id == "from-header-7"


def test_a_client_that_disconnects_has_its_job_cancelled(deployment, sdk):
    url, gateway = deployment
    client = Client(url)
    stream = sdk.chat.completions.create(model=MODEL, messages=HI, max_tokens=450, stream=True,
                                         extra_body={"ignore_eos": True})
    rid = stream.response.headers["x-request-id"]
    next(iter(stream))  # the role chunk: the job has started
    stream.close()
    res = client.result(rid, timeout=30)
    assert res.status == "cancelled" and res.usage.completion_tokens < 450

    # A plain request whose client goes away while its job runs (a raw socket: closed at a known moment).
    body = orjson.dumps({"model": MODEL, "prompt": "Once", "max_tokens": 480, "ignore_eos": True})
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nX-Request-Id: left-early\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        sock.sendall(head + body)
        wait_for(lambda: client.status("left-early") == "running", 30, interval=0.005, what="the job running")
    res = client.result("left-early", timeout=30)
    assert res.status == "cancelled" and res.usage.completion_tokens < 480


def test_health_models_and_metrics(deployment):
    _, gateway = deployment
    health = orjson.loads(urllib.request.urlopen(gateway.url + "/health", timeout=5).read())
    assert health["status"] == "ok" and health["workers"] == 1
    text = urllib.request.urlopen(gateway.url + "/metrics", timeout=5).read().decode()
    assert 'spool_gateway_requests_total{endpoint="/v1/chat/completions",status="200"}' in text
    assert "spool_gateway_time_to_first_token_seconds_count" in text and "spool_gateway_live_workers 1.0" in text
    listed = orjson.loads(urllib.request.urlopen(urllib.request.Request(
        gateway.base_url + "/models", headers={"Authorization": f"Bearer {KEY}"}), timeout=5).read())
    assert listed["data"][0]["id"] == MODEL and "llama" in listed["data"][0]["root"]
