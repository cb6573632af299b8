"""The per-step batch description that model code reads, and the packing of block tables into it."""
from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(slots=True)
class AttentionMetadata:
    """One flat (varlen) batch: all scheduled tokens of all running sequences, concatenated.

    Sequence s owns query rows query_start_loc[s]:query_start_loc[s+1]; those are its newest
    tokens, at positions seq_lens[s] - query_len .. seq_lens[s] - 1 of its context.
    """

    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    slot_mapping: torch.Tensor  # [num_tokens] int64: block_id * block_size + offset, where K/V of each token go
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32: context length including this step's tokens
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32, padded with 0
    max_query_len: int
    max_seq_len: int
    logits_indices: torch.Tensor  # [num_sampled] int64: rows whose logits are sampled (a sequence's last token)

    @property
    def num_tokens(self) -> int:
        """Number of query tokens in the batch."""
        return self.input_ids.shape[0]


def pack_block_tables(tables: Sequence[Sequence[int]], width: int | None = None) -> torch.Tensor:
    """Block tables as one [num_tables, width] int32 CPU tensor (width: the longest table unless given), each
    row padded with block 0.

    Padding with 0 is safe: the kernels never read a row past its seq_len. Tables that are array('i')
    (the block manager's format) are copied into a zeroed buffer with one slice assignment each, not converted
    id by id: at 512 sequences a Python list of all ids would cost torch.tensor() about a millisecond per step.
    """
    if width is None:
        width = max(map(len, tables))
    if width == 0:
        return torch.zeros((len(tables), 0), dtype=torch.int32)
    flat = array("i", bytes(4 * width * len(tables)))
    o = 0
    for table in tables:
        try:
            flat[o:o + len(table)] = table
        except TypeError:  # a list, not array('i')
            flat[o:o + len(table)] = array("i", table)
        o += width
    return torch.frombuffer(flat, dtype=torch.int32).view(len(tables), width)
