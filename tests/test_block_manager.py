"""BlockManager: allocation, no half-done mutation, prefix-cache hits, LRU eviction, randomized invariants."""
from __future__ import annotations

import copy
import random

import pytest

from spool.engine.block_manager import BlockManager

BS = 4


def toks(n: int, start: int = 0) -> list[int]:
    return list(range(start, start + n))


def snapshot(bm: BlockManager) -> tuple:
    """Everything allocate may touch, order included (free-list and LRU order are behaviour)."""
    return (
        [(b.ref_count, b.hash) for b in bm._blocks],
        list(bm._free),
        list(bm._evictable),
        dict(bm._cached),
        {k: (list(s.blocks), list(s.hashes)) for k, s in bm._seqs.items()},
        copy.copy(bm.stats),
    )


def run_seq(bm: BlockManager, seq_id: str, tokens: list[int]) -> list[int]:
    """Admit a sequence, 'compute' its whole prompt in one step and cache its full blocks."""
    hit, n_hit = bm.get_computed_blocks(tokens)
    assert bm.allocate(seq_id, len(tokens), tokens, hit)
    bm.cache_blocks(seq_id, tokens, len(tokens))
    bm.check_invariants()
    return bm.block_table(seq_id)


def test_allocate_and_free_basics():
    bm = BlockManager(num_blocks=8, block_size=BS)
    assert (bm.num_free_blocks, bm.num_used_blocks, bm.usage()) == (8, 0, 0.0)
    assert [bm.num_blocks_for(n) for n in (0, 1, 4, 5, 8)] == [0, 1, 1, 2, 2]
    assert bm.allocate("a", 5, toks(5))
    assert bm.block_table("a") == [0, 1]
    assert (bm.num_free_blocks, bm.num_used_blocks, bm.usage()) == (6, 2, 0.25)
    # Growing within the last block allocates nothing; crossing a boundary allocates one.
    assert bm.allocate("a", 8, toks(8)) and len(bm.block_table("a")) == 2
    assert bm.allocate("a", 9, toks(9)) and len(bm.block_table("a")) == 3
    # Asking for fewer tokens than held never shrinks the table.
    assert bm.allocate("a", 1, toks(9)) and len(bm.block_table("a")) == 3
    bm.check_invariants()
    bm.free("a")
    bm.free("a")  # idempotent
    bm.free("never-seen")
    assert bm.block_table("a") == [] and bm.num_free_blocks == 8
    bm.check_invariants()


def test_block_table_is_a_copy():
    bm = BlockManager(4, BS)
    bm.allocate("a", 4, toks(4))
    bm.block_table("a").append(3)
    assert bm.block_table("a") == [0]


def test_invalid_sizes():
    with pytest.raises(ValueError):
        BlockManager(0, BS)
    with pytest.raises(ValueError):
        BlockManager(4, 0)


def test_failed_allocate_changes_nothing_and_agrees_with_can_allocate():
    bm = BlockManager(num_blocks=4, block_size=BS)
    run_seq(bm, "a", toks(8))  # 2 blocks, both cached
    bm.free("a")  # -> evictable
    assert bm.allocate("b", 4, toks(4, 100))  # takes a plain free block
    hit, _ = bm.get_computed_blocks(toks(9))
    assert len(hit) == 2
    # 2 hit blocks + 1 new block needed, but only 1 plain free block remains once the hits are revived.
    before = snapshot(bm)
    assert not bm.can_allocate("c", 13, hit)
    assert not bm.allocate("c", 13, toks(13), hit)
    assert snapshot(bm) == before
    assert bm.can_allocate("c", 12, hit)
    assert bm.allocate("c", 12, toks(13), hit)
    assert bm.block_table("c") == hit + [3]
    # Growing a running sequence past capacity also fails cleanly.
    before = snapshot(bm)
    assert not bm.can_allocate("b", 9) and not bm.allocate("b", 9, toks(9, 100))
    assert snapshot(bm) == before
    bm.check_invariants()


def test_prefix_hit_after_sequence_finishes():
    bm = BlockManager(num_blocks=16, block_size=BS)
    table_a = run_seq(bm, "a", toks(10))  # blocks 0,1 full; block 2 partial (never cached)
    bm.free("a")
    assert bm.num_free_blocks == 16
    prompt = toks(8) + [99, 98, 97]
    hit, n = bm.get_computed_blocks(prompt)
    assert (hit, n) == (table_a[:2], 8)
    assert bm.get_computed_blocks([5] + toks(10)[1:]) == ([], 0)  # chained: first block differs
    assert bm.allocate("b", len(prompt), prompt, hit)
    assert bm.block_table("b")[:2] == table_a[:2]
    assert bm.stats.queries == 10 + 11 and bm.stats.hits == 8
    assert bm.stats.hit_rate == pytest.approx(8 / 21)
    bm.check_invariants()


def test_shared_prefix_while_first_sequence_runs():
    bm = BlockManager(num_blocks=16, block_size=BS)
    table_a = run_seq(bm, "a", toks(9))
    hit, n = bm.get_computed_blocks(toks(9))
    assert (hit, n) == (table_a[:2], 8)
    assert bm.allocate("b", 9, toks(9), hit)
    assert [bm._blocks[b].ref_count for b in table_a[:2]] == [2, 2]
    assert bm.block_table("b")[2] != table_a[2]  # the partial tail is private
    bm.check_invariants()
    bm.free("a")
    assert bm.num_used_blocks == 3  # b still holds the shared head and its own tail
    bm.free("b")
    assert bm.num_used_blocks == 0
    bm.check_invariants()


def test_duplicate_content_is_not_double_registered():
    bm = BlockManager(num_blocks=8, block_size=BS)
    # Both admitted before either computes, so neither hits; both compute the same blocks.
    assert bm.allocate("a", 8, toks(8)) and bm.allocate("b", 8, toks(8))
    bm.cache_blocks("a", toks(8), 8)
    bm.cache_blocks("b", toks(8), 8)
    assert len(bm._cached) == 2 and all(bm._blocks[b].hash is None for b in bm.block_table("b"))
    bm.free("b")  # uncached duplicates go back to the plain free list
    assert not bm._evictable
    bm.check_invariants()


def test_never_a_full_hit():
    bm = BlockManager(num_blocks=16, block_size=BS)
    run_seq(bm, "a", toks(12))
    bm.free("a")
    assert bm.get_computed_blocks(toks(12)) == (bm.get_computed_blocks(toks(9))[0], 8)
    assert bm.get_computed_blocks(toks(12))[1] == 8
    assert bm.get_computed_blocks(toks(13))[1] == 12
    assert bm.get_computed_blocks(toks(4)) == ([], 0)
    assert bm.get_computed_blocks([]) == ([], 0)
    hit, _ = bm.get_computed_blocks(toks(13))
    with pytest.raises(ValueError):
        bm.allocate("b", 12, toks(12), hit)  # hit covering the whole prompt is refused


def test_partial_blocks_and_uncomputed_tokens_are_not_cached():
    bm = BlockManager(num_blocks=16, block_size=BS)
    assert bm.allocate("a", 12, toks(12))
    bm.cache_blocks("a", toks(12), 7)  # chunked prefill: only block 0 is full of computed tokens
    assert bm.get_computed_blocks(toks(13))[1] == 4
    bm.cache_blocks("a", toks(12), 12)
    assert bm.get_computed_blocks(toks(13))[1] == 12


def test_stale_computed_blocks_are_rejected():
    bm = BlockManager(num_blocks=2, block_size=BS)
    run_seq(bm, "a", toks(5))
    bm.free("a")
    hit, _ = bm.get_computed_blocks(toks(5))
    assert bm.allocate("x", 8, toks(8, 50))  # evicts the cached block behind the lookup's back
    bm.cache_blocks("x", toks(8, 50), 8)
    before = snapshot(bm)
    with pytest.raises(ValueError):
        bm.allocate("b", 5, toks(5), hit)
    assert snapshot(bm) == before


def test_lru_eviction_order():
    bm = BlockManager(num_blocks=6, block_size=BS)
    a, b = toks(9), toks(9, 100)
    run_seq(bm, "a", a)  # blocks 0,1 cached, 2 partial
    run_seq(bm, "b", b)  # blocks 3,4 cached, 5 partial
    bm.free("a")  # a's tail block 1 is evicted before its head block 0
    bm.free("b")  # b freed later: evicted after all of a
    assert list(bm._evictable) == [1, 0, 4, 3]
    assert bm.allocate("c", 12, toks(12, 200))  # 2 plain free blocks, then evicts 1
    assert bm.get_computed_blocks(a)[1] == 4 and bm.get_computed_blocks(b)[1] == 8
    bm.free("c")
    assert bm.allocate("d", 24, toks(24, 300))  # takes everything: the cache is empty
    assert bm.get_computed_blocks(b) == ([], 0) and not bm._cached
    bm.check_invariants()


def test_hit_refreshes_lru_position():
    bm = BlockManager(num_blocks=5, block_size=BS)
    run_seq(bm, "a", toks(5))
    run_seq(bm, "b", toks(5, 100))
    bm.free("a")
    bm.free("b")
    run_seq(bm, "a2", toks(5))  # reuses a's cached block, so a becomes most recently used on free
    bm.free("a2")
    # 3 plain free blocks, then one eviction: b's block, not the block a2 just reused.
    assert bm.allocate("c", 16, toks(16, 200))
    assert bm.get_computed_blocks(toks(5))[1] == 4
    assert bm.get_computed_blocks(toks(5, 100)) == ([], 0)


def test_caching_disabled():
    bm = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    run_seq(bm, "a", toks(9))
    bm.free("a")
    assert bm.get_computed_blocks(toks(9)) == ([], 0)
    assert not bm._evictable and bm.num_free_blocks == 8
    assert bm.stats.queries == 0
    with pytest.raises(ValueError):
        bm.allocate("b", 9, toks(9), [0])
    bm.check_invariants()


def test_reset_prefix_cache():
    bm = BlockManager(num_blocks=8, block_size=BS)
    run_seq(bm, "a", toks(9))
    assert not bm.reset_prefix_cache()  # refused while running
    assert bm.get_computed_blocks(toks(9))[1] == 8
    bm.free("a")
    assert bm.reset_prefix_cache()
    assert bm.get_computed_blocks(toks(9)) == ([], 0) and bm.num_free_blocks == 8
    bm.check_invariants()


@pytest.mark.parametrize("caching,block_size,num_blocks,seed", [
    (True, 4, 24, 0), (True, 1, 40, 1), (True, 3, 16, 2), (False, 4, 24, 3), (True, 16, 8, 4),
])
def test_randomized_invariants(caching, block_size, num_blocks, seed):
    """Scheduler-like random workload; a shadow KV cache checks that every hit serves the right content."""
    rng = random.Random(seed)
    bm = BlockManager(num_blocks, block_size, caching)
    prefixes = [[rng.randrange(50) for _ in range(rng.randrange(1, 3 * block_size + 2))] for _ in range(4)]
    kv: dict[int, tuple[int, ...]] = {}  # slot -> the token prefix whose KV was written there
    seqs: dict[str, dict] = {}  # seq id -> {"tokens", "computed"}
    next_id = 0
    hits = 0

    def holders(block_id: int) -> int:
        return sum(block_id in bm.block_table(s) for s in seqs)

    def compute(sid: str, n: int) -> None:
        """The model runs tokens computed..n-1 of sid, writing KV only into blocks no one else holds."""
        s = seqs[sid]
        table = bm.block_table(sid)
        assert len(table) == bm.num_blocks_for(n)
        for pos in range(s["computed"], n):
            block_id = table[pos // block_size]
            assert holders(block_id) == 1
            kv[block_id * block_size + pos % block_size] = tuple(s["tokens"][:pos + 1])
        s["computed"] = n
        bm.cache_blocks(sid, s["tokens"], n)

    for _ in range(3000):
        op = rng.random()
        if op < 0.25 and len(seqs) < 8:  # admit a new sequence
            sid = f"s{next_id}"
            next_id += 1
            tokens = list(rng.choice(prefixes)) + [rng.randrange(50) for _ in range(rng.randrange(0, 6))]
            hit, n_hit = bm.get_computed_blocks(tokens)
            assert n_hit == len(hit) * block_size and n_hit < len(tokens)
            for pos in range(n_hit):  # the hit's KV must be exactly what this prompt would compute
                slot = hit[pos // block_size] * block_size + pos % block_size
                assert kv[slot] == tuple(tokens[:pos + 1])
            n = min(len(tokens), n_hit + rng.randrange(1, 2 * block_size + 1))
            before = snapshot(bm)
            ok = bm.can_allocate(sid, n, hit)
            assert bm.allocate(sid, n, tokens, hit) == ok
            if not ok:
                assert snapshot(bm) == before
            else:
                hits += n_hit > 0
                seqs[sid] = {"tokens": tokens, "computed": n_hit}
                compute(sid, n)
        elif op < 0.85 and seqs:  # one step of a running sequence: chunked prefill or decode
            sid = rng.choice(sorted(seqs))
            s = seqs[sid]
            if s["computed"] == len(s["tokens"]):
                s["tokens"].append(rng.randrange(50))
            n = min(len(s["tokens"]), s["computed"] + rng.randrange(1, 2 * block_size + 1))
            before = snapshot(bm)
            ok = bm.can_allocate(sid, n)
            assert bm.allocate(sid, n, s["tokens"]) == ok
            if not ok:
                assert snapshot(bm) == before
                bm.free(sid)  # preempt, as a scheduler would
                del seqs[sid]
            else:
                compute(sid, n)
        elif seqs:  # finish or abort
            sid = rng.choice(sorted(seqs))
            bm.free(sid)
            bm.free(sid)
            del seqs[sid]
        elif rng.random() < 0.1:
            assert bm.reset_prefix_cache()
        bm.check_invariants()
        assert bm.num_used_blocks == len({b for s in seqs for b in bm.block_table(s)})
    for sid in list(seqs):
        bm.free(sid)
    bm.check_invariants()
    assert bm.num_free_blocks == num_blocks and bm.num_used_blocks == 0
    if caching:
        assert hits > 0 and bm.stats.hits > 0
