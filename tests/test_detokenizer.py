"""IncrementalDetokenizer: deltas rebuild decode() exactly; UTF-8 safety, stop strings, special tokens, window bound."""
from __future__ import annotations

import codecs
import random

import pytest

from spool.engine.detokenizer import IncrementalDetokenizer, decode_logprob_tokens
from tests.fixtures.tokenizer import SPECIAL_TOKENS, build_tokenizer
# tiny_tokenizer and tiny_tokenizer_dir come from tests/fixtures/tokenizer.py via conftest's pytest_plugins.

FFFD = "\ufffd"
# Window length the detokenizer may reach before sliding back, plus the largest chunk fed at once.
MAX_WINDOW = 16 + 4

TEXTS = [
    "Hello world, the engine streams tokens.",
    "café naïve résumé über Straße — “quoted” … ½ ≤ π",
    "日本語のテキスト 東京 中文 你好世界 漢字 한국어",
    "emoji 🙂🚀👍🏽 family 👨‍👩‍👧 flag 🇫🇷 sparkles ✨ ❤️ end",
    "mixed: naïve 日本 🙂 x=42; def f(x): return x * 2\n\ttabs and  double  spaces ",
    "🎉",
    "é",
]


def run(tok, prompt, ids, chunks=1, skip=True, stop=(), include=False, rng=None):
    """Feed ids in chunks of up to `chunks`, collecting deltas like the engine; returns (detok, deltas, stop)."""
    d = IncrementalDetokenizer(tok, prompt, skip, list(stop), include)
    deltas, found, i = [], None, 0
    while i < len(ids):
        n = rng.randint(1, chunks) if rng else chunks
        found = d.add_tokens(ids[i:i + n])
        i += n
        assert len(d._ids) <= MAX_WINDOW, "window must stay bounded (O(new tokens) per step)"
        deltas.append(d.get_delta(found is not None or i >= len(ids)))
        # What was shown is never taken back.
        assert d.output_text.startswith("".join(deltas))
        if found is not None:
            break
    if not ids:
        deltas.append(d.get_delta(True))
    return d, deltas, found


# -- the fixture tokenizer ------------------------------------------------------------------------
def test_fixture_is_deterministic_and_loadable(tmp_path, tiny_tokenizer_dir):
    build_tokenizer(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (tmp_path / name).read_bytes() == (tiny_tokenizer_dir / name).read_bytes()


def test_fixture_tokenizer_shape(tiny_tokenizer):
    tok = tiny_tokenizer
    assert len(tok) == 512
    assert tok.convert_ids_to_tokens(list(range(6))) == SPECIAL_TOKENS
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    assert set(tok.all_special_ids) == set(range(6))
    for text in TEXTS:  # byte-level: any string round-trips, BOS prepended
        ids = tok.encode(text)
        assert ids[0] == tok.bos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == text
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 🙂"}]
    rendered = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert rendered == "<|bos|><|system|>\nBe brief.<|eos|>\n<|user|>\nHi 🙂<|eos|>\n<|assistant|>\n"
    ids = tok.encode(rendered, add_special_tokens=False)
    assert ids.count(tok.convert_tokens_to_ids("<|user|>")) == 1 and ids.count(tok.eos_token_id) == 2


# -- exactness and UTF-8 safety -------------------------------------------------------------------
@pytest.mark.parametrize("skip", [True, False])
def test_random_ids_rebuild_decode_exactly(tiny_tokenizer, skip):
    tok, rng = tiny_tokenizer, random.Random(7 + skip)
    prompts = [[], tok.encode("Hello there"), tok.encode("日本 🙂"), [tok.bos_token_id]]
    for _ in range(300):
        # Random ids hit partial and invalid UTF-8 byte sequences and special tokens mid-text.
        ids = [rng.randrange(len(tok)) for _ in range(rng.randint(0, 60))]
        d, deltas, _ = run(tok, rng.choice(prompts), ids, chunks=4, skip=skip, rng=rng)
        assert "".join(deltas) == d.output_text == tok.decode(ids, skip_special_tokens=skip)


def test_multibyte_text_split_across_tokens(tiny_tokenizer):
    tok = tiny_tokenizer
    split_seen = 0
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        split_seen += sum(FFFD in tok.decode([i]) for i in ids)
        for chunks in (1, 2, 3):
            d, deltas, _ = run(tok, tok.encode("Prompt:"), ids, chunks=chunks)
            assert "".join(deltas) == d.output_text == text
            assert not any(FFFD in x for x in deltas), deltas
    assert split_seen > 20, "the corpus must make the tokenizer split characters across tokens"


def test_partial_character_is_held_then_flushed_at_finish(tiny_tokenizer):
    tok = tiny_tokenizer
    emoji = tok.encode("🚀", add_special_tokens=False)
    assert len(emoji) > 1
    go = tok.encode("go ", add_special_tokens=False)
    d = IncrementalDetokenizer(tok, [])
    d.add_tokens(go + emoji[:1])
    assert d.get_delta(False) == "go " and d.output_text == "go "
    d.add_tokens(emoji[1:])
    assert d.get_delta(False) == "🚀"
    d.add_tokens(emoji[:-1])  # ends inside a character: shown only at finish, as decode() shows it
    assert d.get_delta(False) == ""
    assert d.get_delta(True) == tok.decode(emoji[:-1]) and FFFD in d.output_text
    assert d.output_text == tok.decode(go + emoji + emoji[:-1]) == "go 🚀" + tok.decode(emoji[:-1])


def test_invalid_bytes_stream_keeps_window_bounded(tiny_tokenizer):
    tok = tiny_tokenizer
    lone = next(i for i in range(len(tok)) if tok.decode([i]) == FFFD and tok.decode([i, i]) == FFFD * 2)
    d = IncrementalDetokenizer(tok, tok.encode("x"))
    shown = ""
    for step in range(500):
        d.add_tokens([lone])
        assert len(d._ids) <= MAX_WINDOW
        shown += d.get_delta(False)
        assert len(shown) >= step - 3, "a garbage stream must not stall the text"
    shown += d.get_delta(True)
    assert shown == FFFD * 500


def test_slow_tokenizer_fallback_path(tiny_tokenizer):
    class Slow:  # no backend_tokenizer: the detokenizer must use tokenizer.decode
        def decode(self, ids, skip_special_tokens=False, clean_up_tokenization_spaces=None):
            return tiny_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    ids = tiny_tokenizer.encode(TEXTS[3] + "<|eos|>")
    for skip in (True, False):
        d, deltas, _ = run(Slow(), [], ids, skip=skip)
        assert "".join(deltas) == tiny_tokenizer.decode(ids, skip_special_tokens=skip)
    assert decode_logprob_tokens(Slow(), ids) == decode_logprob_tokens(tiny_tokenizer, ids)


class ByteFallbackTokenizer:
    """Ids are bytes; invalid UTF-8 shows one U+FFFD per byte, as SentencePiece byte-fallback decoders do."""

    def decode(self, ids, skip_special_tokens=False, clean_up_tokenization_spaces=None):
        return bytes(ids).decode("utf-8", errors="spool_test_per_byte")


codecs.register_error("spool_test_per_byte", lambda e: (FFFD * (e.end - e.start), e.end))


def test_byte_fallback_style_decoder():
    rng, tok = random.Random(11), ByteFallbackTokenizer()
    assert tok.decode(list("日".encode())[:2]) == FFFD * 2  # pending bytes are not one character here
    text = "".join(TEXTS).encode()
    for _ in range(300):
        # Valid text with random junk bytes spliced in: long pending runs, partial characters, garbage.
        ids = [b if rng.random() < 0.9 else rng.randrange(128, 256) for b in text[rng.randrange(len(text)):][:80]]
        d, deltas, _ = run(tok, list(b"ab "), ids, chunks=3, rng=rng)
        assert "".join(deltas) == tok.decode(ids)


# -- special tokens -------------------------------------------------------------------------------
def test_skip_special_tokens(tiny_tokenizer):
    tok = tiny_tokenizer
    ids = tok.encode("<|user|>\nhi<|eos|><|assistant|>\nyo 🙂<|eos|>", add_special_tokens=False)
    d, deltas, _ = run(tok, [], ids, skip=True)
    assert "".join(deltas) == "\nhi\nyo 🙂"
    d, deltas, _ = run(tok, [], ids, skip=False)
    assert "".join(deltas) == "<|user|>\nhi<|eos|><|assistant|>\nyo 🙂<|eos|>"


def test_skipped_specials_inside_a_character(tiny_tokenizer):
    tok = tiny_tokenizer
    emoji = tok.encode("🚀", add_special_tokens=False)
    ids = tok.encode("a", add_special_tokens=False) + emoji[:1] + [tok.eos_token_id] * 40 + emoji[1:] + [4] * 20
    for skip in (False, True):
        d, deltas, _ = run(tok, [tok.bos_token_id] * 10, ids, skip=skip)
        assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)
    assert "".join(deltas[:-1]) == "a🚀"  # skip=True


def test_decode_logprob_tokens(tiny_tokenizer):
    tok = tiny_tokenizer
    ids = [tok.eos_token_id, *tok.encode(" world🙂", add_special_tokens=False)]
    assert decode_logprob_tokens(tok, ids) == [tok.decode([i]) for i in ids]
    assert decode_logprob_tokens(tok, ids)[0] == "<|eos|>"
    assert decode_logprob_tokens(tok, []) == []


# -- stop strings ---------------------------------------------------------------------------------
def test_stop_string_across_tokens_is_truncated(tiny_tokenizer):
    tok = tiny_tokenizer
    ids = tok.encode("Hello world, stop here please and more", add_special_tokens=False)
    assert not any("stop here" in tok.decode([i]) for i in ids)
    d, deltas, found = run(tok, [], ids, stop=["stop here"])
    assert found == "stop here" == d.stopped
    assert "".join(deltas) == d.output_text == "Hello world, "
    d, deltas, found = run(tok, [], ids, stop=["stop here"], include=True)
    assert "".join(deltas) == d.output_text == "Hello world, stop here"
    # After a stop, more tokens change nothing.
    assert d.add_tokens(ids[:3]) is None and d.output_text == "Hello world, stop here"
    assert d.get_delta(True) == ""


def test_stop_string_with_multibyte_characters(tiny_tokenizer):
    tok = tiny_tokenizer
    ids = tok.encode("abc 日本語 🙂🚀 tail", add_special_tokens=False)
    for stop, want in (("本語", "abc 日"), ("🚀", "abc 日本語 🙂"), ("🙂🚀 t", "abc 日本語 ")):
        d, deltas, found = run(tok, [], ids, stop=[stop])
        assert (found, "".join(deltas), d.output_text) == (stop, want, want)


def test_earliest_stop_string_wins(tiny_tokenizer):
    tok = tiny_tokenizer
    ids = tok.encode("one two three four", add_special_tokens=False)
    for chunks in (1, len(ids)):
        d, _, found = run(tok, [], ids, chunks=chunks, stop=["four", "two", "three"])
        assert (found, d.output_text) == ("two", "one ")
    # In one step, the stop that completes first wins (what char-by-char generation would do) ...
    ids = tok.encode("a xyz b", add_special_tokens=False)
    d, _, found = run(tok, [], ids, chunks=len(ids), stop=["xyz", "y"])
    assert (found, d.output_text) == ("y", "a x")
    # ... and of two ending at the same character, the longer one.
    d, _, found = run(tok, [], ids, chunks=len(ids), stop=["yz", "xyz"], include=True)
    assert (found, d.output_text) == ("xyz", "a xyz")


def test_stop_prefix_is_held_back_until_resolved(tiny_tokenizer):
    tok = tiny_tokenizer
    d = IncrementalDetokenizer(tok, [], stop=["STOP!"])
    d.add_tokens(tok.encode("go STO", add_special_tokens=False))
    assert d.get_delta(False) == "go"  # the last 4 characters could begin "STOP!"
    d.add_tokens(tok.encode("RM", add_special_tokens=False))
    assert d.get_delta(False) == " S"  # always the last 4 held, whatever they are (vLLM's rule)
    assert d.get_delta(True) == "TORM" and d.output_text == "go STORM"


def test_check_stop_false_ignores_matches(tiny_tokenizer):
    tok = tiny_tokenizer
    d = IncrementalDetokenizer(tok, [], stop=["x"])
    assert d.add_tokens(tok.encode("axb", add_special_tokens=False), check_stop=False) is None
    assert d.add_tokens(tok.encode("cxd", add_special_tokens=False)) == "x"
    assert d.output_text == "axbc"


def test_stop_strings_never_leak_random(tiny_tokenizer):
    tok, rng = tiny_tokenizer, random.Random(3)
    pieces = ["the", " ", "cat", "日本", "🙂", "é", "\n", "END", "E", "ND", "zz", "👍🏽"]
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 30)))
        stops = rng.sample(["END", "日本🙂", "\nthe", "cat cat", "zzz", "é "], k=rng.randint(1, 3))
        include = rng.random() < 0.5
        ids = tok.encode(text, add_special_tokens=False)
        d, deltas, found = run(tok, [], ids, chunks=3, stop=stops, include=include, rng=rng)
        hits = [(text.find(s) + len(s), text.find(s), s) for s in stops if s in text]
        if not hits:
            assert found is None and "".join(deltas) == text
            continue
        end, start, s = min(hits, key=lambda h: (h[0], h[1]))
        want = text[:end] if include else text[:start]
        assert (found, d.output_text, "".join(deltas)) == (s, want, want)
        # Emitted text before the final step never contains a stop string, nor a piece later cut off.
        assert not any(x in "".join(deltas[:-1]) for x in stops)
