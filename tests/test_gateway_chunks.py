"""spool.gateway.chunks: token events -> OpenAI stream chunks, including a worker crash mid-stream (restart), a rerun
that diverges, tool calls sent whole, usage, and output the stream lacked filled in from the Result. Every
chunk is validated with the openai SDK's own types."""
from __future__ import annotations

import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletionChunk

from spool.gateway.chunks import ChunkShaper, StreamDiverged
from spool.protocol import Result, TokenEvent


def result(*texts: str, finish="length", tool_calls=None, content=None) -> Result:
    choices = [{"index": i, "text": t, "token_ids": list(range(len(t))), "finish_reason": finish,
                "tool_calls": tool_calls, "content": content} for i, t in enumerate(texts)]
    return Result.model_validate({"id": "r1", "status": "completed", "choices": choices,
                                  "usage": {"prompt_tokens": 3, "completion_tokens": sum(map(len, texts))}})


def delta(text: str, index: int = 0) -> TokenEvent:
    return TokenEvent.delta(index, text, list(range(len(text))))


def content(chunks: list[dict], index: int = 0) -> str:
    return "".join((c["delta"].get("content") or "") if "delta" in c else c["text"]
                   for chunk in chunks for c in chunk["choices"] if c["index"] == index)


def test_chat_chunks_validate_and_end_with_usage():
    s = ChunkShaper("chat", "r1", "m", 1700000000, 2, None, True, False)
    chunks = s.start() + s.delta(delta("Hel")) + s.delta(delta("ab", 1)) + s.delta(delta("lo"))
    chunks += s.finish(result("Hello", "abc"))
    for c in chunks:
        ChatCompletionChunk.model_validate(c)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""} and chunks[0]["usage"] is None
    assert content(chunks) == "Hello" and content(chunks, 1) == "abc"  # "c" was only in the Result
    assert [c["choices"][0]["finish_reason"] for c in chunks[-3:-1]] == ["length", "length"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 8


def test_a_restarted_run_is_followed_until_it_passes_what_was_sent():
    s = ChunkShaper("completion", "r1", "m", 1, 1, None, False, False)
    sent = s.delta(delta("Once up")) + s.delta(delta("on"))
    s.restart()  # the worker died; another one starts the job over
    assert s.delta(delta("Once")) == [] and s.delta(delta(" up")) == []  # already sent: nothing new
    more = s.delta(delta("on a")) + s.delta(delta(" time"))
    chunks = sent + more + s.finish(result("Once upon a time"))
    for c in chunks:  # the SDK reads stream chunks leniently: finish_reason is null until a choice's last chunk
        Completion.model_validate({**c, "choices": [{**x, "finish_reason": x["finish_reason"] or "length"}
                                                    for x in c["choices"]]})
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
    assert content(chunks) == "Once upon a time"
    s2 = ChunkShaper("completion", "r1", "m", 1, 1, None, False, False)
    s2.delta(delta("Once"))
    s2.restart()
    with pytest.raises(StreamDiverged):
        s2.delta(delta("Twice"))  # a sampled rerun said something else


def test_tool_calls_are_sent_whole_at_the_end():
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    s = ChunkShaper("chat", "r1", "m", 1, 1, None, False, True)
    assert s.delta(delta("<tool_call>{...")) == []
    chunks = s.start() + s.finish(result("<tool_call>...", finish="tool_calls", tool_calls=[call]))
    for c in chunks:
        ChatCompletionChunk.model_validate(c)
    last = chunks[-1]["choices"][0]
    assert last["finish_reason"] == "tool_calls" and last["delta"]["content"] is None
    assert last["delta"]["tool_calls"] == [{"index": 0, **call}]


def test_a_result_that_contradicts_the_stream_is_an_error():
    s = ChunkShaper("chat", "r1", "m", 1, 1, None, False, False)
    s.delta(delta("abc"))
    with pytest.raises(StreamDiverged):
        s.finish(result("xyz"))
