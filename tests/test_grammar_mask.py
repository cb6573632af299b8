"""spool/engine/grammar_mask.py (the reused, background-filled grammar bitmask) and the threaded batch accept."""
from __future__ import annotations

import threading

import pytest
import torch
import xgrammar as xgr

import spool.engine.grammar as grammar_mod
from spool.engine.grammar import SequenceGrammar, _batch_accept
from spool.engine.grammar_mask import GrammarMasks
from spool.engine.token_bitmask import fill_bitmask

VOCAB = ["<eos>", "a", "b", "ab", "ba", "c", "abc", "[", "]", ",", "1", "12", "2"] + [f"x{i}" for i in range(100)]


def _compiled():
    info = xgr.TokenizerInfo(VOCAB, vocab_type=xgr.VocabType.RAW, vocab_size=len(VOCAB), stop_token_ids=[0])
    return xgr.GrammarCompiler(info, max_threads=1).compile_grammar('root ::= "[" ("a" | "b" | "1" | "2")* "]"')


def _rows(n: int, compiled=None) -> list[SequenceGrammar]:
    compiled = compiled or _compiled()
    rows = [SequenceGrammar(xgr.GrammarMatcher(compiled)) for _ in range(n)]
    for i, g in enumerate(rows):
        assert g.matcher.accept_string("[" + "ab12"[: i % 5])
    return rows


class Row:
    """A row grammar without fill_many (filled row by row), allowing tokens {k}; `fail` makes it raise."""

    def __init__(self, k: int, fail: bool = False):
        self.k, self.fail = k, fail
        self.threads: list[str] = []

    def fill_bitmask(self, bitmask, index):
        self.threads.append(threading.current_thread().name)
        if self.fail:
            raise RuntimeError("matcher refused")
        bitmask[index] = 0
        bitmask[index, self.k // 32] = 1 << (self.k % 32)


def test_started_fill_runs_in_the_background_and_equals_a_fresh_fill():
    masks = GrammarMasks(len(VOCAB), torch.device("cpu"))
    rows = _rows(7)
    started = masks.start(rows)
    got = masks.take(rows, started)
    assert torch.equal(got, fill_bitmask(rows, len(VOCAB))) and masks.num_refills == 0
    stand_ins = [Row(k) for k in (3, 40, 100)]
    got = masks.take(stand_ins, masks.start(stand_ins))
    assert [r.threads for r in stand_ins] == [["grammar-mask_0"]] * 3
    assert torch.equal(got, fill_bitmask(stand_ins, len(VOCAB)))


def test_start_returns_once_the_fill_is_under_way():
    """The caller goes on with GIL-bound Python (detokenization): the fill must already be running by then."""
    release = threading.Event()

    class Slow(Row):
        def fill_bitmask(self, bitmask, index):
            release.wait()  # blocks like a long C++ fill (the GIL released)
            super().fill_bitmask(bitmask, index)

    masks = GrammarMasks(len(VOCAB), torch.device("cpu"))
    masks.take([Row(1)], masks.start([Row(1)]))  # the thread exists and waits for work, as in a running engine
    rows = [Slow(7)]
    started = masks.start(rows)
    try:
        assert started._future.running()
    finally:
        release.set()
    assert torch.equal(masks.take(rows, started), fill_bitmask([Row(7)], len(VOCAB)))


def test_the_buffer_is_reused_and_never_needs_clearing():
    masks = GrammarMasks(len(VOCAB), torch.device("cpu"))
    first = masks.take(_rows(5))
    ptr = first.data_ptr()
    first.fill_(12345)  # garbage left by an earlier step: every fill writes whole rows
    rows = _rows(3)
    again = masks.take(rows, masks.start(rows))
    assert again.data_ptr() == ptr and torch.equal(again, fill_bitmask(rows, len(VOCAB)))
    bigger = _rows(9)
    assert torch.equal(masks.take(bigger), fill_bitmask(bigger, len(VOCAB)))  # grows when needed


def test_a_fill_for_other_rows_is_refilled_for_the_right_ones():
    masks = GrammarMasks(len(VOCAB), torch.device("cpu"))
    rows = _rows(6)
    started = masks.start(rows)
    fewer = rows[1:]  # e.g. one row went unmasked after the fill started
    assert torch.equal(masks.take(fewer, started), fill_bitmask(fewer, len(VOCAB)))
    assert masks.num_refills == 1
    stale = masks.start(rows)
    masks.take(rows)  # a synchronous fill in between: the started one is no longer the buffer's
    assert torch.equal(masks.take(rows, stale), fill_bitmask(rows, len(VOCAB))) and masks.num_refills == 2


def test_a_failed_fill_raises_at_take_and_does_not_poison_the_next_step():
    masks = GrammarMasks(len(VOCAB), torch.device("cpu"))
    bad = [Row(1), Row(2, fail=True)]
    with pytest.raises(RuntimeError, match="matcher refused"):
        masks.take(bad, masks.start(bad))
    masks.start(bad)  # started, never taken (its step failed elsewhere)
    rows = [Row(5)]
    assert torch.equal(masks.take(rows, masks.start(rows)), fill_bitmask(rows, len(VOCAB)))


@pytest.mark.parametrize("threads", [1, 3])
def test_accept_many_on_threads_equals_one_call_and_flags_rejections(monkeypatch, threads):
    monkeypatch.setattr(grammar_mod, "host_threads", lambda: threads)
    monkeypatch.setattr(SequenceGrammar, "_ACCEPT_CHUNK", 4)
    compiled = _compiled()
    tokens = [VOCAB.index(t) for t in ("a", "b", "12", "]", "c", "ab", "x5", "2")] * 3  # "c", "x5": rejected
    ours, ref = _rows(len(tokens), compiled), _rows(len(tokens), compiled)
    accepted = SequenceGrammar.accept_many(ours, tokens)
    expected = [g.matcher.accept_token(t) for g, t in zip(ref, tokens)]
    assert accepted == expected and accepted.count(False) == 6
    assert [g.error is not None for g in ours] == [not ok for ok in expected]
    assert [g.matcher.is_terminated() for g in ours] == [g.matcher.is_terminated() for g in ref]
    again = [g.matcher.accept_token(VOCAB.index("]")) for g in ours]
    assert again == [g.matcher.accept_token(VOCAB.index("]")) for g in ref]  # the matchers advanced alike


def test_batch_accept_fast_path_reports_every_row():
    rows = _rows(5)
    handles = [g.matcher._handle for g in rows]
    assert _batch_accept(handles, [VOCAB.index("a")] * 5) == [True] * 5
    assert _batch_accept(handles, [VOCAB.index("b"), VOCAB.index("c")] * 2 + [VOCAB.index("]")]) == [
        True, False, True, False, True]
