"""IncrementalDetokenizer's byte-level fast path: the same text, deltas and stop strings as the general path,
with far fewer tokenizer calls."""
from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from spool.engine.detokenizer import IncrementalDetokenizer, _token_pieces

STOPS = ["the", "é", "\n", "🙂", "ab"]


def _feed(d: IncrementalDetokenizer, ids: list[int], rng: random.Random, min_tokens: int = 0):
    """Feed ids in random chunks of 1-3 like the engine; every (stop string, delta) and the final text."""
    trace, i = [], 0
    while i < len(ids):
        n = rng.randint(1, 3)
        check = i >= min_tokens
        found = d.add_token(ids[i], check) if n == 1 else d.add_tokens(ids[i:i + n], check)
        i += n
        trace.append((found, d.get_delta(found is not None or i >= len(ids))))
        if found is not None:
            break
    return trace, d.output_text, d.stopped


def _slow(tok, *args) -> IncrementalDetokenizer:
    d = IncrementalDetokenizer(tok, *args)
    d._pieces = None  # the general path only
    return d


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("stops", [[], STOPS])
def test_fast_path_matches_general_path(tiny_tokenizer, skip, stops):
    tok, rng = tiny_tokenizer, random.Random(11 + skip + len(stops))
    text_ids = tok.encode("the café 日本語 🙂 x\n ab ½ emoji 👨‍👩‍👧 end", add_special_tokens=False)
    prompts = [[], tok.encode("Hello"), tok.encode("日本 🙂")[:-1], [tok.bos_token_id]]  # one ends mid-character
    for _ in range(400):
        # Mostly real text (the fast path), with random ids: partial UTF-8 bytes, special tokens, invalid runs.
        ids = [rng.choice(text_ids) if rng.random() < 0.7 else rng.randrange(len(tok))
               for _ in range(rng.randint(0, 50))]
        prompt, include = rng.choice(prompts), rng.random() < 0.5
        seed = rng.random()
        fast = _feed(IncrementalDetokenizer(tok, prompt, skip, stops, include), ids, random.Random(seed), 2)
        slow = _feed(_slow(tok, prompt, skip, stops, include), ids, random.Random(seed), 2)
        assert fast == slow


def test_fast_path_skips_the_tokenizer(tiny_tokenizer):
    """Plain text costs no decode call per token once each id's piece is known."""
    tok = tiny_tokenizer
    ids = tok.encode("the quick brown fox jumps over the lazy dog " * 20, add_special_tokens=False)
    d = IncrementalDetokenizer(tok, tok.encode("Hi"))
    assert d._pieces is not None
    for t in set(ids):
        d._pieces[t]  # noqa: B018 (fill the shared cache first)
    calls = []
    real = d._decode
    d._decode = lambda x: calls.append(list(x)) or real(x)
    for t in ids:
        d.add_token(t)
    assert d.output_text == tok.decode(ids) and not calls


def test_pieces_exclude_partial_and_added_tokens(tiny_tokenizer):
    tok = tiny_tokenizer
    pieces = _token_pieces(tok, False)
    assert pieces is _token_pieces(tok, False)  # shared per tokenizer
    assert pieces[tok.bos_token_id] is None  # added (special) tokens take the general path
    partial = tok.convert_tokens_to_ids("Ã")  # byte 0xC3 alone: half of "é"
    assert pieces[partial] is None
    word = tok.encode(" the", add_special_tokens=False)[0]
    assert pieces[word] == tok.decode([word])


def test_other_decoders_take_the_general_path():
    vocab = {"<unk>": 0, "▁a": 1, "b": 2}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.Metaspace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    assert _token_pieces(tok, True) is None
    d = IncrementalDetokenizer(tok, [])
    d.add_tokens([1, 2, 1])
    assert d._pieces is None and d.output_text == tok.decode([1, 2, 1])


@pytest.mark.parametrize("stops", [[], STOPS])
def test_add_token_delta_is_add_token_then_get_delta(tiny_tokenizer, stops):
    """The engine's one-call step: the same deltas and stop strings, token by token, fast path or not."""
    tok, rng = tiny_tokenizer, random.Random(5 + len(stops))
    text_ids = tok.encode("the café 日本語 🙂 x\n ab ½ end", add_special_tokens=False)
    for _ in range(300):
        ids = [rng.choice(text_ids) if rng.random() < 0.7 else rng.randrange(len(tok)) for _ in range(40)]
        prompt, skip, include = tok.encode("Hi"), rng.random() < 0.5, rng.random() < 0.5
        for fast in (True, False):
            a = IncrementalDetokenizer(tok, prompt, skip, stops, include)
            b = IncrementalDetokenizer(tok, prompt, skip, stops, include)
            if not fast:
                a._pieces = b._pieces = None
            for i, t in enumerate(ids):
                check = i >= 3
                got = (a.add_token_delta(t, check), a.stopped)
                found = b.add_token(t, check)
                assert got == (b.get_delta(False), found)
                if found is not None:
                    break
            assert a.get_delta(True) == b.get_delta(True) and a.output_text == b.output_text


def test_split_characters_take_the_fast_path(tiny_tokenizer):
    """The tiny vocabulary splits most non-ASCII characters into byte tokens: they cost no decode call."""
    tok = tiny_tokenizer
    ids = tok.encode("日本語のテキスト 🙂 café ½ " * 5, add_special_tokens=False)
    d = IncrementalDetokenizer(tok, tok.encode("Hi"))
    for t in set(ids):
        d._pieces[t], d._pieces.raw(t)  # noqa: B018 (fill the shared caches first)
    calls = []
    real = d._decode
    d._decode = lambda x: calls.append(list(x)) or real(x)
    text = "".join(d.add_token_delta(t) for t in ids) + d.get_delta(True)
    assert text == tok.decode(ids)
    # Only window slides decode (a window holding split characters' tokens), at most once per 8 tokens.
    assert all(len(c) in (5, 16) for c in calls) and len(calls) <= len(ids) / 8 + 1


def test_incomplete_utf8_prefixes_match_a_brute_force_definition():
    from spool.engine.detokenizer import _is_incomplete_utf8

    def brute(data: bytes) -> bool:  # some continuation of 1-3 bytes makes exactly one character
        for extra in range(1, 4 - len(data) + 1):
            for tail in _tails(extra):
                try:
                    if len((data + tail).decode("utf-8")) == 1:
                        return True
                except UnicodeDecodeError:
                    pass
        return False

    rng = random.Random(0)
    samples = [bytes([b]) for b in range(256)] + [bytes([a, b]) for a in range(0xC0, 0x100) for b in range(0x70, 0xD0)]
    samples += [bytes(rng.randrange(256) for _ in range(3)) for _ in range(3000)]
    samples += [bytes([0xF0, 0x9F, b]) for b in range(256)] + [bytes([0xE0, b]) for b in range(256)]
    samples += [bytes([lead, b]) for lead in (0xED, 0xF0, 0xF4) for b in range(256)] + [b""]
    for data in samples:
        assert _is_incomplete_utf8(data) == brute(data), data


def _tails(n: int):
    cont = [bytes([b]) for b in (0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF)]  # the continuation ranges' edges
    if n == 1:
        return cont
    return [a + b for a in cont for b in _tails(n - 1)]


def test_token_bytes_are_the_decoders(tiny_tokenizer):
    """raw(): the bytes the ByteLevel decoder makes of each token (checked through a lossy decode)."""
    tok = tiny_tokenizer
    pieces = _token_pieces(tok, True)
    for t in range(len(tok)):
        data = pieces.raw(t)
        if t in pieces._added:
            assert data is None
        else:
            assert data.decode("utf-8", "replace") == tok.decode([t]), t


def test_edge_byte_sequences_match_the_general_path(tiny_tokenizer):
    """Byte tokens around UTF-8's edges (surrogates, overlongs, out of range, truncated): Python's incremental
    decoder leaves some of these pending that the tokenizer already shows as two U+FFFD."""
    from spool.engine.detokenizer import _BYTE_OF

    tok = tiny_tokenizer
    symbol = {b: c for c, b in _BYTE_OF.items()}
    byte_id = {b: tok.convert_tokens_to_ids(symbol[b]) for b in range(256)}
    seqs = [[0xED, 0xA0, 0x80], [0xE0, 0x80, 0x80], [0xF4, 0x90, 0x80, 0x80], [0xF0, 0x9F, 0x98, 0x80],
            [0xC0, 0x80], [0xE2, 0x82], [0xE2, 0x82, 0xAC], [0xF0, 0x9F, 0x98], [0xED, 0x9F, 0xBF], [0xF5, 0x80]]
    word = tok.encode(" the", add_special_tokens=False)
    for seq in seqs:
        raw = [byte_id[b] for b in seq]
        for ids in (raw + word, word + raw * 2, raw, raw[:-1]):  # the last two end mid-sequence
            a = IncrementalDetokenizer(tok, word)
            b = _slow(tok, word)
            got = [a.add_token_delta(t) for t in ids] + [a.get_delta(True)]
            want = []
            for t in ids:
                b.add_token(t)
                want.append(b.get_delta(False))
            assert got == want + [b.get_delta(True)], [hex(x) for x in seq]
            assert "".join(got) == tok.decode(word + ids)[len(tok.decode(word)):]
