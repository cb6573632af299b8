"""DecodeGraphs.run stages the same inputs ModelRunner._metadata builds for a decode step (on the CPU, with
graphs that replay nothing): ids, positions, KV slots, lengths, block tables; padding rows write no KV."""
from __future__ import annotations

import random
from array import array

import torch

from spool.engine.attention import pack_block_tables
from spool.engine.cuda_graphs import DecodeGraphs
from spool.engine.sampling_params import SamplingParams
from spool.engine.step_types import ScheduledChunk

BLOCK = 4


class _NoReplay:
    def replay(self) -> None:
        pass


def _graphs(max_bs: int) -> DecodeGraphs:
    g = DecodeGraphs(None, [], None, max_bs, 64 * BLOCK, BLOCK, "cpu")
    g.graphs = {bs: _NoReplay() for bs in g.sizes}
    g.outputs = {bs: torch.arange(bs, dtype=torch.float32)[:, None] for bs in g.sizes}
    return g


def _chunks(rng: random.Random, n: int) -> list[ScheduledChunk]:
    out, p = [], SamplingParams()
    for i in range(n):
        pos = rng.randrange(0, 40 * BLOCK)
        table = array("i", rng.sample(range(1000), pos // BLOCK + 1 + rng.randrange(2)))  # may hold a spare block
        out.append(ScheduledChunk(f"s{i}", [rng.randrange(500)], pos, table, True, p, [], [], None, None))
    return out


def test_staged_inputs_match_the_metadata():
    rng = random.Random(0)
    graphs = _graphs(48)
    for n in (37, 5, 48, 1, 20):  # alternating staging sets, shrinking and growing widths, padded buckets
        chunks = _chunks(rng, n)
        maxb = max(len(c.block_table) for c in chunks)
        hidden = graphs.run(chunks, maxb, BLOCK)
        bs = next(s for s in graphs.sizes if s >= n)
        pos = torch.tensor([c.start_pos for c in chunks])
        tables = pack_block_tables([c.block_table for c in chunks])
        slots = tables[torch.arange(n), pos // BLOCK].long() * BLOCK + pos % BLOCK
        assert hidden.shape[0] == n
        assert graphs.input_ids[:n].tolist() == [c.token_ids[0] for c in chunks]
        assert torch.equal(graphs.positions[:n], pos)
        assert torch.equal(graphs.slot_mapping[:n], slots)
        assert torch.equal(graphs.seq_lens[:n], (pos + 1).to(torch.int32))
        assert torch.equal(graphs.block_tables[:n, :maxb], tables)
        assert graphs.slot_mapping[n:bs].eq(-1).all() and graphs.seq_lens[n:bs].eq(1).all()
        assert graphs.input_ids[n:bs].eq(0).all() and graphs.block_tables[n:bs, :maxb].eq(0).all()


def test_fed_ids_replace_placeholders():
    graphs = _graphs(8)
    chunks = _chunks(random.Random(1), 3)
    sampled = torch.tensor([70, 71, 72])
    rows = torch.tensor([[0, 2], [2, 0]])  # input row 0 takes sampled[2], input row 2 takes sampled[0]
    graphs.run(chunks, max(len(c.block_table) for c in chunks), BLOCK, (rows, sampled))
    assert graphs.input_ids[:3].tolist() == [72, chunks[1].token_ids[0], 70]
