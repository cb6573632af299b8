"""Paged KV block manager: ref-counted blocks, per-sequence block tables, and a hash-chained prefix cache."""
from __future__ import annotations

import hashlib
from array import array
from collections import Counter, OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

# Parent of a sequence's first block; fixed so hashes are stable across processes and restarts.
ROOT_HASH = bytes(32)


def hash_block_tokens(parent: bytes, tokens: Sequence[int]) -> bytes:
    """Chained content hash of one full block: sha256(parent hash || tokens as int64)."""
    # sha256 rather than hash(): collisions would silently serve another prompt's KV (jobs come from
    # any service), and Python's hash() is salted per process for str and not collision-resistant.
    return hashlib.sha256(parent + array("q", tokens).tobytes()).digest()


@dataclass(slots=True)
class Block:
    """One KV block: its id (index into the cache tensor), how many tables hold it, its cached hash."""

    id: int
    ref_count: int = 0
    hash: bytes | None = None  # set only while the block is registered in the prefix cache


def _new_table() -> array:
    return array("i")


@dataclass(slots=True)
class _Seq:
    # int32 block ids: the runner packs tables into int32 tensors with one memcpy per table.
    blocks: array = field(default_factory=_new_table)
    # Chained hashes of this sequence's full computed blocks, in order. Kept per sequence (not read
    # back from Block.hash) because a block whose content was already cached elsewhere stays unhashed.
    hashes: list[bytes] = field(default_factory=list)


@dataclass(slots=True)
class PrefixCacheStats:
    """Prefix-cache counters, in tokens, counted once per admitted sequence (at its first allocate)."""

    queries: int = 0
    hits: int = 0

    @property
    def hit_rate(self) -> float:
        """Fraction of queried prompt tokens served from the cache."""
        return self.hits / self.queries if self.queries else 0.0


class BlockManager:
    """Owns all KV blocks. An unknown seq_id behaves as a sequence holding no blocks.

    Every block is in exactly one place: referenced by >= 1 block table, in the plain free list
    (no cached content), or in the evictable LRU (cached content, no references, reusable on a hit).
    Block id 0 is an ordinary block; block-table padding with 0 is safe because the kernels never
    read past seq_len.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.stats = PrefixCacheStats()
        self._blocks = [Block(i) for i in range(num_blocks)]
        self._free: deque[int] = deque(range(num_blocks))
        # Insertion order is eviction order: first key is the least recently freed.
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._cached: dict[bytes, int] = {}  # chained hash -> block id
        self._seqs: dict[str, _Seq] = {}

    @property
    def num_free_blocks(self) -> int:
        """Blocks allocatable now: plain free plus evictable cached blocks."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        """Blocks referenced by at least one sequence."""
        return self.num_blocks - self.num_free_blocks

    def usage(self) -> float:
        """Fraction of blocks referenced by sequences."""
        return self.num_used_blocks / self.num_blocks

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold num_tokens tokens."""
        return -(-num_tokens // self.block_size)

    def num_blocks_held(self, seq_id: str) -> int:
        """How many blocks seq_id's table holds (0 for an unknown sequence)."""
        seq = self._seqs.get(seq_id)
        return len(seq.blocks) if seq else 0

    def block_table(self, seq_id: str) -> list[int]:
        """A copy of seq_id's block table as a list."""
        seq = self._seqs.get(seq_id)
        return seq.blocks.tolist() if seq else []

    def block_table_array(self, seq_id: str) -> array:
        """seq_id's block table as an int32 array('i'): a copy, so scheduler outputs never alias live state."""
        seq = self._seqs.get(seq_id)
        return seq.blocks[:] if seq else array("i")

    def get_computed_blocks(self, token_ids: Sequence[int]) -> tuple[list[int], int]:
        """Longest cached run of full prefix blocks for a new sequence, leaving >= 1 token to compute."""
        if not self.enable_prefix_caching:
            return [], 0
        bs = self.block_size
        # (n - 1) // bs full blocks at most: a fully cached prompt would give the model nothing to
        # run, hence no logits to sample from, so its last block is always recomputed.
        max_blocks = max(0, (len(token_ids) - 1) // bs)
        hit: list[int] = []
        parent = ROOT_HASH
        for i in range(max_blocks):
            parent = hash_block_tokens(parent, token_ids[i * bs:(i + 1) * bs])
            block_id = self._cached.get(parent)
            if block_id is None:
                break
            hit.append(block_id)
        return hit, len(hit) * bs

    def can_allocate(self, seq_id: str, num_tokens: int, computed_blocks: list[int] | None = None,
                     reserve: int = 0) -> bool:
        """Whether allocate() with the same arguments would succeed; mutates nothing."""
        seq = self._seqs.get(seq_id)
        computed = (computed_blocks or []) if seq is None else []
        return self._num_new_blocks(seq, num_tokens, computed) <= self._num_available(computed) - reserve

    def allocate(self, seq_id: str, num_tokens: int, token_ids: Sequence[int],
                 computed_blocks: list[int] | None = None, reserve: int = 0) -> bool:
        """Grow seq_id's table to cover num_tokens tokens; False (and no change) if blocks run out.

        reserve: blocks that must stay allocatable afterwards (the scheduler's reserve for priority-0 work).
        """
        seq = self._seqs.get(seq_id)
        if seq is not None and len(seq.blocks) * self.block_size >= num_tokens:
            return True  # the common decode step: the last block still has room
        # computed_blocks only seed a new table; for a running sequence they are already its head.
        computed = (computed_blocks or []) if seq is None else []
        hashes = self._verify_computed(computed, token_ids) if computed else []
        need = self._num_new_blocks(seq, num_tokens, computed)
        if need > self._num_available(computed) - reserve:
            return False
        # Everything below succeeds: all checks are done, so no half-done mutation is possible.
        if seq is None:
            seq = self._seqs[seq_id] = _Seq(hashes=hashes)
            if self.enable_prefix_caching:
                self.stats.queries += len(token_ids)
                self.stats.hits += len(computed) * self.block_size
        for block_id in computed:
            block = self._blocks[block_id]
            if block.ref_count == 0:
                del self._evictable[block_id]
            block.ref_count += 1
            seq.blocks.append(block_id)
        # Refs on hit blocks are taken first, so the evictions below can never pick one of them.
        for _ in range(need):
            seq.blocks.append(self._pop_free_block())
        return True

    def cache_blocks(self, seq_id: str, token_ids: Sequence[int], num_computed_tokens: int) -> None:
        """Register chained hashes for seq_id's blocks that are now full of computed tokens."""
        seq = self._seqs.get(seq_id)
        if not self.enable_prefix_caching or seq is None:
            return
        bs = self.block_size
        num_full = min(num_computed_tokens, len(token_ids)) // bs
        num_full = min(num_full, len(seq.blocks))
        # Resume after the blocks already hashed: each step costs O(newly full blocks).
        for i in range(len(seq.hashes), num_full):
            parent = seq.hashes[-1] if seq.hashes else ROOT_HASH
            h = hash_block_tokens(parent, token_ids[i * bs:(i + 1) * bs])
            seq.hashes.append(h)
            block = self._blocks[seq.blocks[i]]
            # Same content already cached by another sequence: keep that mapping; this block
            # stays unhashed and returns to the plain free list when released.
            if block.hash is None and h not in self._cached:
                block.hash = h
                self._cached[h] = block.id

    def free(self, seq_id: str) -> None:
        """Release seq_id's blocks; idempotent for unknown seq_id."""
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            return
        # Tail first: a prefix's tail is less likely to be shared than its head, so it should be
        # evicted first; appending tail blocks earlier puts them nearer the LRU front.
        for block_id in reversed(seq.blocks):
            block = self._blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.hash is not None:
                    self._evictable[block_id] = None
                else:
                    self._free.append(block_id)

    def reset_prefix_cache(self) -> bool:
        """Drop every cached hash; refused (False) while any block is referenced."""
        if self.num_used_blocks:
            return False
        for block_id in self._evictable:
            self._blocks[block_id].hash = None
            self._free.append(block_id)
        self._evictable.clear()
        self._cached.clear()
        return True

    def check_invariants(self) -> None:
        """Assert the bookkeeping is consistent (O(total blocks); for tests)."""
        refs: Counter[int] = Counter()
        for seq_id, seq in self._seqs.items():
            assert len(set(seq.blocks)) == len(seq.blocks), f"duplicate block in table of {seq_id}"
            assert len(seq.hashes) <= len(seq.blocks), f"{seq_id} has hashes for blocks it lacks"
            refs.update(seq.blocks)
        free = set(self._free)
        assert len(free) == len(self._free), "duplicate block in free list"
        assert not free & self._evictable.keys(), "block both free and evictable"
        for block in self._blocks:
            assert block.ref_count == refs[block.id], f"block {block.id}: ref_count {block.ref_count} != {refs[block.id]}"
            places = (block.ref_count > 0) + (block.id in free) + (block.id in self._evictable)
            assert places == 1, f"block {block.id} is in {places} places"
            if block.id in self._evictable:
                assert block.hash is not None, f"evictable block {block.id} has no hash"
            if block.id in free:
                assert block.hash is None, f"free block {block.id} still has a hash"
            if block.hash is not None:
                assert self._cached.get(block.hash) == block.id, f"block {block.id} hash not mapped to it"
        assert all(self._blocks[b].hash == h for h, b in self._cached.items()), "stale hash mapping"
        if not self.enable_prefix_caching:
            assert not self._cached and not self._evictable, "cache state with caching disabled"

    def _num_new_blocks(self, seq: _Seq | None, num_tokens: int, computed: list[int]) -> int:
        held = len(seq.blocks) if seq else len(computed)
        return max(0, self.num_blocks_for(num_tokens) - held)

    def _num_available(self, computed: list[int]) -> int:
        # Hit blocks sitting in the evictable set stop being allocatable once we take refs on them.
        revived = sum(1 for b in computed if self._blocks[b].ref_count == 0)
        return self.num_free_blocks - revived

    def _verify_computed(self, computed: list[int], token_ids: Sequence[int]) -> list[bytes]:
        # A lookup goes stale if another allocate evicted one of its blocks in between; reusing it
        # would serve someone else's KV, so recheck each block's hash against this prompt.
        if not self.enable_prefix_caching:
            raise ValueError("computed_blocks given but prefix caching is disabled")
        bs = self.block_size
        if len(computed) * bs >= len(token_ids):
            raise ValueError("computed_blocks must leave at least one token to compute")
        hashes: list[bytes] = []
        parent = ROOT_HASH
        for i, block_id in enumerate(computed):
            parent = hash_block_tokens(parent, token_ids[i * bs:(i + 1) * bs])
            if self._blocks[block_id].hash != parent:
                raise ValueError(f"stale computed block {block_id} at index {i}: call allocate right after get_computed_blocks")
            hashes.append(parent)
        return hashes

    def _pop_free_block(self) -> int:
        # Plain free blocks first, so cached content survives as long as possible.
        if self._free:
            block_id = self._free.popleft()
        else:
            block_id, _ = self._evictable.popitem(last=False)
            block = self._blocks[block_id]
            del self._cached[block.hash]
            block.hash = None
        self._blocks[block_id].ref_count = 1
        return block_id
