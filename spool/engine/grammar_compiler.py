"""Compiling structured-output specs with xgrammar: an LRU of compiled grammars and a small thread pool.

A new JSON schema can take from milliseconds to seconds to compile, so compiling never runs on the step
path: LLMEngine.add_request asks for a Future here and keeps the request's sequences out of the scheduler
until it is done (xgrammar releases the GIL while it compiles, so steps go on meanwhile). Each distinct spec
compiles once: the LRU holds the Future itself, so a second request for a spec still compiling waits on the
same compile, and a spec that failed fails again at once (compiling is deterministic).
"""
from __future__ import annotations

import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import xgrammar as xgr

from spool.engine.grammar import SequenceGrammar
from spool.engine.structured_outputs import StructuredOutputsParams

MAX_ERROR_CHARS = 500
# xgrammar's C++ errors start with "[hh:mm:ss] /path/file.cc:123: "; the user needs only what follows.
_LOG_PREFIX = re.compile(r"^\[[0-9:]+\] \S+:\d+: ")


class GrammarError(ValueError):
    """A spec that does not compile (bad schema, regex or grammar); str() is the user-facing reason."""


# xgrammar 0.2.9 writes a string with minLength/maxLength as a bounded repeat of this character class, which
# lets raw control characters (tab, U+0001...) into the JSON text, where strict parsers refuse them; its plain
# strings exclude U+0000-U+001F as JSON requires. Such strings still cannot hold escapes (xgrammar's limit).
_LENGTH_LIMITED_CHARS = '[^\\"\\\\\\r\\n]'  # [^\"\\\r\n] as the grammar prints it
_JSON_STRING_CHARS = '[^\\"\\\\\\0-\\x1f]'


def compile_spec(compiler: xgr.GrammarCompiler, kind: str, source: str) -> xgr.CompiledGrammar:
    """Compile one spec source (see StructuredOutputsParams.cache_key); module-level so tests can slow it down."""
    if kind == "json":
        # No free-running whitespace: fixed ", " and ": " separators, so a finite schema ends with the closing
        # brace and then only EOS is allowed (finish_reason "stop" instead of running to max_tokens on spaces).
        grammar = xgr.Grammar.from_json_schema(source, any_whitespace=False)
        text = str(grammar)
        if _LENGTH_LIMITED_CHARS in text:  # length-limited strings: keep control characters out
            grammar = xgr.Grammar.from_ebnf(text.replace(_LENGTH_LIMITED_CHARS, _JSON_STRING_CHARS))
        return compiler.compile_grammar(grammar)  # the schema is converted once, whichever way
    if kind == "regex":
        return compiler.compile_regex(source)
    return compiler.compile_grammar(source)


def error_message(e: BaseException) -> str:
    """The first meaningful line of a compile error, without xgrammar's source-location prefix."""
    lines = [ln for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
    return _LOG_PREFIX.sub("", lines[0])[:MAX_ERROR_CHARS]


class GrammarCache:
    """Compiled grammars by canonical spec (LRU), compiled on a background pool; makes per-sequence matchers."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int], max_entries: int = 128,
                 max_workers: int = 2):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(stop_token_ids)
        self.max_entries = max_entries
        self.num_compiles = 0  # compiles started (cache misses), for tests and stats
        self._entries: OrderedDict[tuple[str, str], Future] = OrderedDict()
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grammar")
        self._compiler: xgr.GrammarCompiler | None = None
        self._compiler_lock = threading.Lock()

    def get(self, spec: StructuredOutputsParams) -> Future:
        """A Future of the spec's CompiledGrammar (done at once on a cache hit); it fails with GrammarError."""
        key = spec.cache_key()
        fut = self._entries.get(key)
        if fut is not None:
            self._entries.move_to_end(key)
            return fut
        self.num_compiles += 1
        fut = self._pool.submit(self._compile, *key)
        self._entries[key] = fut
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)  # requests waiting on an evicted Future still hold it
        return fut

    def give_up(self, fut: Future, reason: str) -> None:
        """A compile took too long: its spec's entry becomes a failed Future, so later requests fail at once."""
        failed: Future = Future()
        failed.set_exception(GrammarError(reason))
        for key, entry in self._entries.items():
            if entry is fut:
                self._entries[key] = failed
                break

    def matcher(self, compiled: xgr.CompiledGrammar) -> SequenceGrammar:
        """A fresh matcher for one sequence (n > 1 sequences each get their own)."""
        return SequenceGrammar(xgr.GrammarMatcher(compiled))

    def _compile(self, kind: str, source: str) -> xgr.CompiledGrammar:
        """Runs on a pool thread."""
        try:
            return compile_spec(self._xgr_compiler(), kind, source)
        except Exception as e:  # noqa: BLE001 - xgrammar reports every bad spec as RuntimeError/ValueError
            raise GrammarError(error_message(e)) from None

    def _xgr_compiler(self) -> xgr.GrammarCompiler:
        """Built on first use, on a pool thread: reading a large vocabulary takes a while."""
        with self._compiler_lock:
            if self._compiler is None:
                # vocab_size is the model's (lm_head rows, often padded past the tokenizer), so bitmask rows
                # match the logits; the stop tokens are the engine's EOS ids, which end a complete grammar.
                info = xgr.TokenizerInfo.from_huggingface(
                    self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.stop_token_ids
                )
                # xgrammar's own cache is off: this LRU bounds what is kept.
                self._compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
            return self._compiler
