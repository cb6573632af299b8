"""The synthetic tokenizer that gives dummy-weight bench shapes a vocabulary (structured outputs need one)."""
from __future__ import annotations

import xgrammar as xgr
from transformers import AutoTokenizer

from bench.synthetic_tokenizer import build_synthetic_tokenizer


def test_synthetic_tokenizer_has_the_shape_vocab_and_round_trips_any_text(tmp_path):
    build_synthetic_tokenizer(tmp_path, vocab_size=70_000, bos_id=69_990, eos_id=69_991)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tok) == 70_000 and (tok.bos_token_id, tok.eos_token_id) == (69_990, 69_991)
    text = '{"items": [1, 2, 3]}\n\ttabs, émoji 🚀 and 世界'
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert max(ids) < 69_990  # regular text never lands on the special tail
    assert len(ids) < len(text.encode())  # pairs and triples are reachable through the merges


def test_synthetic_tokenizer_compiles_a_json_schema_with_xgrammar(tmp_path):
    tok = build_synthetic_tokenizer(tmp_path, vocab_size=70_000, bos_id=69_990, eos_id=69_991)
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=70_000)
    grammar = xgr.GrammarCompiler(info).compile_json_schema('{"type": "object"}')
    assert xgr.GrammarMatcher(grammar).accept_string('{"a": 1}')
    assert not xgr.GrammarMatcher(grammar).accept_string('[1]')
