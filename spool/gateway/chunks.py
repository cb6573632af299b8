"""A job's token events shaped as OpenAI stream chunks (chat.completion.chunk / text_completion).

The worker's token stream carries, per choice, `delta` events, `restart` when another worker took the job
over after a crash, and `done`. Chunks already sent cannot be taken back, so after a restart the new run's
output is followed silently until it passes what the client has, and only the rest is sent: a greedy or
seeded request survives a worker crash mid-stream unseen. A new run that says something else ends the
stream with an error. Finish reasons, tool calls and usage come from the final Result, which also fills in
anything the stream lacks (an expired or trimmed stream, a resend that found the job already finished).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from spool.producer.batch.responses import ID_PREFIXES, chat_logprobs, completion_logprobs, finish_reason, usage_body
from spool.protocol import Result, TokenEvent

CHUNK_OBJECTS = {"chat": "chat.completion.chunk", "completion": "text_completion"}


class StreamDiverged(RuntimeError):
    """A restarted run produced other text than what the client was already sent."""


@dataclass(slots=True)
class _Choice:
    sent_text: str = ""
    sent_tokens: int = 0
    seen: bytes = b""  # bytes of the tokens sent (completions' logprobs text_offset continues from here)
    lp_sent: int = 0  # tokens whose logprobs were sent (they may lag: then the last chunk carries the rest)
    replay_text: str | None = None  # after a restart: the new run's text so far
    replay_tokens: int = 0


class ChunkShaper:
    """Turns one request's token events into the chunks of its SSE response."""

    def __init__(self, kind: str, rid: str, model: str, created: int, n: int, top_logprobs: int | None,
                 include_usage: bool, buffer_tools: bool):
        self.kind, self.top_logprobs, self.include_usage = kind, top_logprobs, include_usage
        # Tool calls are parsed from the whole text by the worker: with tools, the message comes at the end.
        self.buffer_tools = buffer_tools and kind == "chat"
        self.base = {"id": ID_PREFIXES[kind] + rid, "object": CHUNK_OBJECTS[kind], "created": created, "model": model}
        self.choices = [_Choice() for _ in range(n)]
        self.sent_content = False

    def start(self) -> list[dict]:
        """The opening chunks: chat streams announce the assistant role for each choice."""
        if self.kind != "chat":
            return []
        return [self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}]) for i in range(len(self.choices))]

    def restart(self) -> None:
        """Another worker runs the job again from the start: follow its output until it passes ours."""
        for st in self.choices:
            st.replay_text, st.replay_tokens = "", 0

    def delta(self, ev: TokenEvent) -> list[dict]:
        """Chunks for one delta event (none while buffering tool calls or replaying a restarted run)."""
        if self.buffer_tools:
            return []
        st = self._state(ev.index)
        text, tids, lps = ev.text, list(ev.token_ids), ev.logprobs
        if st.replay_text is not None:
            before = st.replay_tokens
            st.replay_text += text
            st.replay_tokens += len(tids)
            if not (st.replay_text.startswith(st.sent_text) or st.sent_text.startswith(st.replay_text)):
                raise StreamDiverged(f"choice {ev.index}: the restarted run's output differs from what was sent")
            text = st.replay_text[len(st.sent_text):]
            skip = max(0, min(len(tids), st.sent_tokens - before))
            tids, lps = tids[skip:], (lps[skip:] if lps else lps)
        if not text and not tids:
            return []
        lp_ids = tids if lps and st.lp_sent == st.sent_tokens else []  # only while they are contiguous
        return [self._chunk([self._piece(ev.index, st, text, len(tids), lp_ids, lps if lp_ids else None, None)])]

    def finish(self, res: Result) -> list[dict]:
        """The closing chunks of a completed Result: what the stream lacked, finish reasons, usage."""
        out = []
        for c in res.choices:
            st = self._state(c.index)
            reason = finish_reason(c.finish_reason)
            if self.buffer_tools:
                delta: dict[str, Any] = {"content": c.content if c.tool_calls else c.text}
                if c.tool_calls:
                    delta["tool_calls"] = [{"index": j, **t.model_dump(mode="json")}
                                           for j, t in enumerate(c.tool_calls)]
                out.append(self._chunk([{"index": c.index, "delta": delta, "logprobs": None, "finish_reason": reason}]))
                continue
            if not c.text.startswith(st.sent_text):
                raise StreamDiverged(f"choice {c.index}: the final result differs from what was sent")
            rest, n_rest = c.text[len(st.sent_text):], max(0, len(c.token_ids) - st.sent_tokens)
            # Logprobs the stream did not carry (a worker that streams none) come with the last chunk.
            lp_ids, lps = c.token_ids[st.lp_sent:], (c.logprobs[st.lp_sent:] if c.logprobs else None)
            out.append(self._chunk([self._piece(c.index, st, rest, n_rest, lp_ids, lps, reason)]))
        if self.include_usage:
            out.append({**self.base, "choices": [], "usage": usage_body(res.usage)})
        return out

    def _state(self, index: int) -> _Choice:
        while index >= len(self.choices):
            self.choices.append(_Choice())
        return self.choices[index]

    def _chunk(self, choices: list[dict]) -> dict:
        chunk = {**self.base, "choices": choices}
        if self.include_usage:
            chunk["usage"] = None  # as OpenAI: every chunk has the key, only the last one a value
        return chunk

    def _piece(self, index: int, st: _Choice, text: str, n_tokens: int, lp_ids: list[int], lps,
               reason: str | None) -> dict:
        """One choice of a chunk: `text` (covering `n_tokens` new tokens), and the logprobs of tokens `lp_ids`."""
        k = self.top_logprobs
        logprobs = None
        if k is not None and lps:
            if self.kind == "chat":
                logprobs = {"content": chat_logprobs(lp_ids, lps, k), "refusal": None}
            else:
                logprobs, st.seen = completion_logprobs(lp_ids, lps, st.seen)
            st.lp_sent += len(lp_ids)
        if self.kind == "chat":
            piece = {"index": index, "delta": {"content": text} if text or reason is None else {},
                     "logprobs": logprobs, "finish_reason": reason}
        else:
            piece = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}
        st.sent_text += text
        st.sent_tokens += n_tokens
        self.sent_content = self.sent_content or bool(text)
        return piece
