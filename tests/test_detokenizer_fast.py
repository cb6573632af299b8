"""IncrementalDetokenizer's byte-level fast path: the same text, deltas and stop strings as the general path,
with far fewer tokenizer calls."""
from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from engine.detokenizer import IncrementalDetokenizer, _token_pieces

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
    d._decode = lambda x: calls.append(x) or real(x)
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
