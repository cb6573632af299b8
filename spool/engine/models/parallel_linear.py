"""Megatron-style tensor-parallel layers: each rank holds a slice of every projection and of the vocabulary.

- Column-parallel (`QKVParallelLinear`, `MergedColumnParallelLinear`): each rank owns a contiguous slice of
  the output features (whole heads of q/k/v, a slice of gate and of up); no communication.
- Row-parallel (`RowParallelLinear`: o_proj, down_proj): each rank owns a slice of the input features, its
  partial products are summed with one all-reduce, and the bias is added by rank 0 only (so once).
- `VocabParallelEmbedding` / `ParallelLMHead`: each rank owns a block of vocabulary rows (the vocabulary
  padded to a multiple of the ranks); lookups outside the block give zeros and one all-reduce combines them;
  the head's logits are gathered on rank 0, which samples.

The layers are `Linear`s whose `in_features`/`out_features` are this rank's sizes, so a weight method
(unquantized, FP8) sees only its shard in `create_weights`. The loader asks each layer which rows or
columns of a checkpoint tensor belong to this rank (`shard_index`) and reads only those.
With one rank every layer is the plain full-size projection and every collective returns at once.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spool.engine.distributed import SINGLE, TPGroup
from spool.engine.models.linear import Linear, empty_param

Index = tuple[slice, ...]  # what to read of a checkpoint tensor


def kv_heads_per_rank(num_kv_heads: int, world_size: int) -> int:
    """KV heads a rank holds: an even share, or one replicated head when there are fewer heads than ranks."""
    return max(1, num_kv_heads // world_size)


def _rows(dst_start: int, src_start: int, size: int) -> tuple[slice, Index]:
    return slice(dst_start, dst_start + size), (slice(src_start, src_start + size),)


class ColumnParallelLinear(Linear):
    """y[:, rank's columns] = x W_shard^T (+ b_shard): the output features of every part split over the ranks.

    `output_sizes` are the full sizes of the fused parts (one part for a plain projection); part k's rank
    slice sits at local offset sum(local sizes before k).
    """

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False, tp: TPGroup = SINGLE,
                 method=None):
        self.tp = tp
        self.output_sizes = list(output_sizes)
        self.local_sizes = [s // tp.world_size for s in output_sizes]
        super().__init__(in_features, sum(self.local_sizes), bias, method)

    def shard_rows(self, shard: int | None) -> tuple[int, int, int]:
        """(local row offset, first checkpoint row, number of rows) this rank holds of part `shard`."""
        k = shard or 0
        size = self.local_sizes[k]
        return sum(self.local_sizes[:k]), self.tp.rank * size, size

    def shard_index(self, param: str, shard: int | None, full_shape: tuple[int, ...]) -> tuple[slice, Index]:
        """(rows of our parameter, index into the checkpoint tensor) for parameter `param` of part `shard`.

        Tensors with one row per output feature (weight, bias, per-channel scales) are sliced by rows;
        anything else (a per-tensor scale) is read whole.
        """
        dst_start, src_start, size = self.shard_rows(shard)
        full_rows = self.output_sizes[shard or 0]
        if not full_shape or full_shape[0] != full_rows:
            return slice(None), ()
        return _rows(dst_start, src_start, size)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Fused gate/up projection: each rank holds its slice of gate, then its slice of up."""


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q/k/v split by heads: rank r holds q heads [r*Hq/tp, (r+1)*Hq/tp) and its KV heads. With fewer
    KV heads than ranks each KV head is replicated on tp/Hk ranks (rank r holds head r // (tp/Hk)), as vLLM does."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False,
                 tp: TPGroup = SINGLE, method=None):
        world = tp.world_size
        self.tp, self.head_dim = tp, head_dim
        self.num_heads = num_heads // world  # this rank's q heads
        self.num_kv_heads = kv_heads_per_rank(num_kv_heads, world)  # this rank's KV heads
        replicas = max(1, world // num_kv_heads)
        self.kv_head_start = (tp.rank // replicas) * self.num_kv_heads
        q, kv = num_heads * head_dim, num_kv_heads * head_dim
        self.output_sizes = [q, kv, kv]
        self.local_sizes = [self.num_heads * head_dim, self.num_kv_heads * head_dim, self.num_kv_heads * head_dim]
        # Not ColumnParallelLinear.__init__: replicated KV heads make the k/v shards larger than kv / world.
        Linear.__init__(self, hidden_size, sum(self.local_sizes), bias, method)

    def shard_rows(self, shard: int | None) -> tuple[int, int, int]:
        k = shard or 0
        first_head = self.tp.rank * self.num_heads if k == 0 else self.kv_head_start
        return sum(self.local_sizes[:k]), first_head * self.head_dim, self.local_sizes[k]


class RowParallelLinear(Linear):
    """y = sum over ranks of x_shard W_shard^T, plus b (added by rank 0 only): one all-reduce per call."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, tp: TPGroup = SINGLE, method=None):
        self.tp = tp
        self.full_in_features = in_features
        super().__init__(in_features // tp.world_size, out_features, bias, method)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, in / tp] -> [T, out], summed over the ranks."""
        bias = self.bias if self.tp.rank == 0 else None
        return self.tp.all_reduce(self.method.apply(self, x, bias))

    def shard_index(self, param: str, shard: int | None, full_shape: tuple[int, ...]) -> tuple[slice, Index]:
        """Columns [rank * in_local, ...) of a [out, in] tensor; 1-D tensors (bias, scales) whole."""
        if len(full_shape) == 2 and full_shape[1] == self.full_in_features:
            start = self.tp.rank * self.in_features
            return slice(None), (slice(None), slice(start, start + self.in_features))
        return slice(None), ()


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the vocabulary split into equal row blocks, one per rank (padded past vocab_size)."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TPGroup = SINGLE):
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.padded_vocab_size = -(-vocab_size // tp.world_size) * tp.world_size
        self.rows = self.padded_vocab_size // tp.world_size  # rows per rank
        self.vocab_start = tp.rank * self.rows
        self.num_real_rows = max(0, min(self.rows, vocab_size - self.vocab_start))  # the rest is padding
        self.weight = empty_param(self.rows, hidden_size)
        if self.num_real_rows < self.rows:
            self.weight.data[self.num_real_rows:].zero_()  # padding rows: zero logits, never looked up

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [T] -> [T, hidden]."""
        if self.tp.world_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start  # [T]
        outside = (local < 0) | (local >= self.rows)
        x = F.embedding(local.masked_fill(outside, 0), self.weight)  # [T, hidden]
        x.masked_fill_(outside.unsqueeze(-1), 0.0)
        return self.tp.all_reduce(x)

    def shard_index(self, param: str, shard: int | None, full_shape: tuple[int, ...]) -> tuple[slice, Index]:
        """This rank's block of vocabulary rows (without the padding, which the checkpoint lacks)."""
        return _rows(0, self.vocab_start, self.num_real_rows)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Use these rows as the LM head: hidden [S, hidden] -> logits [S, padded_vocab] in the model's dtype on
        rank 0 (columns past vocab_size are padding the sampler drops), None on the other ranks.

        Not widened to float32 here: a greedy step's argmax picks the same token from the bf16 values (widening
        is exact and keeps their order), and the sampler widens what it processes (penalties, temperature,
        logprobs) in the copy it makes anyway. At qwen3-0.6b's 151,936-token vocabulary and 256 rows the
        widening was a 0.12 ms kernel per ~6.7 ms decode step (H200, fourth session's trace)."""
        return self.tp.gather_last_dim(F.linear(hidden, self.weight))  # [S, rows] on each rank

    def extra_repr(self) -> str:
        return f"vocab={self.vocab_size}, rows={self.vocab_start}..{self.vocab_start + self.rows}"


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection, sharded like the embedding (a tied head is the embedding itself)."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """hidden [S, hidden] -> logits; see VocabParallelEmbedding.logits."""
        return self.logits(hidden)
