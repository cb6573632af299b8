"""bench/tiktoken_tokenizer.py: a tiktoken rank file becomes an HF fast tokenizer that encodes as tiktoken does."""
from __future__ import annotations

import argparse
import base64
import collections
import random

import pytest
import regex
import xgrammar as xgr
from transformers import AutoTokenizer

from bench import shapes, tiktoken_tokenizer
from bench.tiktoken_tokenizer import LLAMA3_PATTERN, LLAMA3_SPECIALS, build_tiktoken_tokenizer, cached_tokenizer_dir
from spool.engine.tokenizer import load_tokenizer

CORPUS = """The quick brown fox jumps over the lazy dog. It's the dog's day; they'll say we've won.
{"items": [1, 22, 333, 4444], "name": "spool", "ok": true, "nested": {"a": [0.5, -7e3]}}
def encode(self, text: str) -> list[int]:
    return [self.ranks[piece] for piece in pieces]  # comments, too
Ünïcödé wörds, 世界 and 🚀🚀 — numbers 1234567 and 3.14159; tabs\there\r\nand   spaces.
"""
SAMPLES = [
    "The lazy fox's 12345 items: {\"items\": [7, 88, 999]}",
    "  leading spaces, trailing spaces   \n\n\nnew lines\r\n",
    "wörds 世界 🚀 unseen: zqxj vvvv kkkk 0000000",
    "'S 'LL 'Ve IT'S",
    "",
]


def _train_ranks(text: str, size: int, seed: int) -> dict[bytes, int]:
    """A tiny tiktoken vocabulary: the 256 bytes in shuffled rank order, then the most frequent pairs."""
    rng = random.Random(seed)
    byte_order = list(range(256))
    rng.shuffle(byte_order)
    ranks = {bytes([b]): r for r, b in enumerate(byte_order)}
    words = collections.Counter(tuple(bytes([b]) for b in p.encode()) for p in regex.findall(LLAMA3_PATTERN, text))
    while len(ranks) < size:
        pairs: collections.Counter = collections.Counter()
        for w, n in words.items():
            for a, b in zip(w, w[1:]):
                pairs[a, b] += n
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        ranks.setdefault(a + b, len(ranks))
        merged: collections.Counter = collections.Counter()
        for w, n in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == (a, b):
                    out.append(a + b)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged
    return ranks


def _tiktoken_encode(text: str, ranks: dict[bytes, int]) -> list[int]:
    """tiktoken's algorithm: split by the regex; a piece that is a token stays whole, else merge the adjacent
    pair whose concatenation has the lowest rank (leftmost on ties) until none is a token."""
    ids = []
    for piece in regex.findall(LLAMA3_PATTERN, text):
        data = piece.encode()
        if data in ranks:
            ids.append(ranks[data])
            continue
        parts = [bytes([b]) for b in data]
        while True:
            best = min(((ranks[parts[i] + parts[i + 1]], i) for i in range(len(parts) - 1)
                        if parts[i] + parts[i + 1] in ranks), default=None)
            if best is None:
                break
            i = best[1]
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        ids.extend(ranks[p] for p in parts)
    return ids


def _write_ranks(path, ranks: dict[bytes, int]) -> None:
    by_rank = sorted(ranks.items(), key=lambda kv: kv[1])
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in by_rank))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(rank file, ranks, tokenizer directory) of a 400-token vocabulary trained on CORPUS."""
    root = tmp_path_factory.mktemp("tiktoken")
    ranks = _train_ranks(CORPUS * 3, 400, seed=1)
    rank_file = root / "tiny.tiktoken"
    _write_ranks(rank_file, ranks)
    build_tiktoken_tokenizer(root / "tok", rank_file)
    return rank_file, ranks, root / "tok"


def test_token_ids_are_tiktoken_s_on_seen_and_unseen_text(tiny):
    rank_file, ranks, tok_dir = tiny
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    assert len(ranks) == 400 and len(tok) == 400 + 256
    lines = CORPUS.splitlines(keepends=True) + SAMPLES
    multi = 0
    for text in lines:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == _tiktoken_encode(text, ranks), text
        assert tok.decode(ids) == text
        multi += sum(1 for i in ids if i >= 256 and i < 400)
    assert multi > 50  # the merges are used, not only single bytes


def test_token_ids_are_tiktoken_s_on_random_text(tiny):
    _, ranks, tok_dir = tiny
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    rng = random.Random(7)
    alphabet = sorted(set(CORPUS)) + ["é", "\u00a0", "ß"]
    for _ in range(300):
        start = rng.randrange(len(CORPUS))
        noise = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        text = CORPUS[start:start + rng.randint(1, 40)] + noise
        assert tok.encode(text, add_special_tokens=False) == _tiktoken_encode(text, ranks), repr(text)


def test_specials_bos_and_the_engine_loader(tiny):
    _, _, tok_dir = tiny
    tok = load_tokenizer(tok_dir)  # the engine's own loading path
    assert (tok.bos_token_id, tok.eos_token_id) == (400, 401)
    assert tok.convert_ids_to_tokens([406, 407, 409, 655]) == [
        "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|reserved_special_token_245|>"]
    ids = tok.encode("hi<|eot_id|>")
    assert ids[0] == 400 and ids[-1] == 409  # bos first (Llama 3's template); specials are whole tokens
    assert tok.decode(ids, skip_special_tokens=True) == "hi"


def test_xgrammar_compiles_a_schema_over_the_vocabulary(tiny):
    _, _, tok_dir = tiny
    tok = load_tokenizer(tok_dir)
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok), stop_token_ids=[401])
    assert info.vocab_type == xgr.VocabType.BYTE_LEVEL
    compiled = xgr.GrammarCompiler(info).compile_json_schema({"type": "array", "items": {"type": "integer"}})
    matcher = xgr.GrammarMatcher(compiled)
    for t in tok.encode("[1, 22, 333]", add_special_tokens=False):
        assert matcher.accept_token(t)
    assert matcher.accept_token(401) and matcher.is_terminated()


def test_the_cache_builds_once_per_file_content(tiny, tmp_path, monkeypatch):
    rank_file, ranks, _ = tiny
    builds = []
    real = tiktoken_tokenizer.build_tiktoken_tokenizer
    monkeypatch.setattr(tiktoken_tokenizer, "build_tiktoken_tokenizer", lambda *a: builds.append(a) or real(*a))
    first = cached_tokenizer_dir(rank_file, tmp_path)
    assert cached_tokenizer_dir(rank_file, tmp_path) == first and len(builds) == 1
    other = tmp_path / "other.tiktoken"
    _write_ranks(other, dict(list(ranks.items())[:300]))
    assert cached_tokenizer_dir(other, tmp_path) != first and len(builds) == 2
    assert [p.name for p in first.parent.iterdir() if p.name.startswith(".build-")] == []


def test_shape_flags_refuse_a_vocabulary_of_another_size(tiny, monkeypatch, tmp_path):
    rank_file, _, _ = tiny
    monkeypatch.setenv("SPOOL_BENCH_CACHE", str(tmp_path))
    p = argparse.ArgumentParser()
    shapes.add_model_flags(p)
    args = p.parse_args(["--shape", "llama3-8b", "--tokenizer-file", str(rank_file)])
    with pytest.raises(SystemExit, match=r"vocab/bos/eos \(656, 400, 401\); shape llama3-8b has \(128256"):
        shapes.model_source(args)
    with pytest.raises(SystemExit, match="no such file"):
        shapes.model_source(p.parse_args(["--shape", "llama3-8b", "--tokenizer-file", str(tmp_path / "nope")]))
    with pytest.raises(SystemExit, match="goes with --shape"):
        shapes.model_source(p.parse_args(["--model", str(tmp_path), "--tokenizer-file", str(rank_file)]))


def test_a_shape_of_the_file_s_size_gets_its_tokenizer(tiny, monkeypatch, tmp_path):
    rank_file, _, _ = tiny
    monkeypatch.setenv("SPOOL_BENCH_CACHE", str(tmp_path))
    monkeypatch.setitem(shapes.SHAPES, "tiny-tiktoken", {"vocab_size": 656, "bos_token_id": 400, "eos_token_id": 401})
    d = shapes.shape_dir("tiny-tiktoken", tokenizer=True, tokenizer_file=rank_file)
    tok = load_tokenizer(d)
    assert len(tok) == 656 and tok.decode(tok.encode("dog's day", add_special_tokens=False)) == "dog's day"
