"""Grammar token masks for the sampler: one packed bitmask per step, filled on the host, applied on the device.

Layout (xgrammar's): int32 words [rows, ceil(V / 32)]; bit j of word w is token 32 * w + j; 1 = allowed.
The host fills only the rows that have a grammar, the bitmask crosses to the device in one copy (V / 8
bytes per row, not V logits), and one masked_fill there sets every disallowed logit to -inf.
"""
from __future__ import annotations

from typing import Protocol

import torch

NEG_INF = float("-inf")
_ALL_ALLOWED = -1  # every bit set


class RowGrammar(Protocol):
    """What the sampler needs of a row's grammar (spool.engine.grammar.SequenceGrammar).

    Its class may also offer fill_many(grammars, bitmask), filling every row at once (xgrammar's threaded
    batch fill); fill_bitmask() then serves rows of mixed classes (tests' stand-ins). Either writes every
    word of its rows: the buffer is reused from step to step, never cleared (spool/engine/grammar_mask.py).
    """

    def fill_bitmask(self, bitmask: torch.Tensor, index: int) -> None: ...


def bitmask_words(vocab_size: int) -> int:
    """int32 words per bitmask row."""
    return (vocab_size + 31) // 32


def fill_bitmask(grammars: list[RowGrammar], vocab_size: int, pin: bool = False) -> torch.Tensor:
    """A new CPU int32 [G, W]: row j holds the tokens grammars[j] allows next (in pinned memory if `pin`, so
    the copy to the GPU needs no staging copy). The sampler reuses one buffer instead (spool/engine/grammar_mask.py)."""
    bitmask = torch.full((len(grammars), bitmask_words(vocab_size)), _ALL_ALLOWED, dtype=torch.int32,
                         pin_memory=pin)
    fill_rows(grammars, bitmask)
    return bitmask


def fill_rows(grammars: list[RowGrammar], bitmask: torch.Tensor) -> None:
    """Write bitmask[j] (CPU int32 [>= G, W]) for grammars[j]: in one batched call when every row's class has
    fill_many, else row by row."""
    if not grammars:
        return
    kind = type(grammars[0])
    fill_many = getattr(kind, "fill_many", None)
    if fill_many is not None and all(type(g) is kind for g in grammars):
        fill_many(grammars, bitmask)
    else:
        for j, g in enumerate(grammars):
            g.fill_bitmask(bitmask, j)


def forbid_unless_only(row: torch.Tensor, token_ids: list[int], vocab_size: int) -> bool:
    """Clear token_ids' bits in one bitmask row (CPU int32 [W]) unless no other token would stay allowed.

    Used for min_tokens: EOS is forbidden until min_tokens are out, but when the grammar allows nothing else
    (its text is complete and cannot go on), forcing some other token would break the grammar, so EOS stays
    allowed and the output ends early (the matcher terminates; finish_reason "stop"). Returns True if cleared.
    """
    before = row.clone()
    for t in token_ids:
        if 0 <= t < vocab_size:
            w, b = divmod(t, 32)
            bit = 1 << b if b < 31 else -(1 << 31)  # bit 31 as a signed int32
            row[w] = int(row[w]) & ~bit
    if bool(row.any()):
        return True
    row.copy_(before)
    return False


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """bool [G, V]: True where a token is allowed (on the bitmask's device, no host sync)."""
    # Little-endian words (x86, ARM, CUDA): byte k of word w holds tokens 32w + 8k .. 32w + 8k + 7, low bit first.
    as_bytes = bitmask.contiguous().view(torch.uint8)  # [G, 4W]
    shifts = torch.arange(8, dtype=torch.uint8, device=bitmask.device)  # [8]
    bits = (as_bytes.unsqueeze(-1) >> shifts) & 1  # [G, 4W, 8] uint8: 1 byte per token, not 4
    return bits.view(bitmask.shape[0], -1)[:, :vocab_size].bool()  # [G, V]


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """Set logits[rows[j], t] = -inf where bitmask row j disallows t (in place); rows None means all rows in order."""
    # logits [R, V] float32 on the device; bitmask [G, W] int32 on the same device; rows [G] int64 or None (G == R)
    blocked = ~unpack_bitmask(bitmask, logits.shape[1])  # [G, V]
    if rows is None:
        return logits.masked_fill_(blocked, NEG_INF)
    return logits.index_put_((rows,), logits.index_select(0, rows).masked_fill_(blocked, NEG_INF))
