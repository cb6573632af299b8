"""Which sequence a query-tile slot belongs to: the grid layout shared by the prompt-attention kernels.

A launch over prompt chunks has T // BLOCK_Q + S tile slots (an upper bound on sum_s cdiv(L_s, BLOCK_Q)), and
sequence s owns the slots from query_start_loc[s] // BLOCK_Q + s on, so a slot finds its sequence by binary search
with no host sync. spool.kernels.paged_attention (Triton) and spool.kernels.prefill_hopper (Gluon, which calls this
Triton function: the sm_90 code is the same as a Gluon restatement's) both use it.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def find_seq(qsl_ptr, tile, num_seqs, BLOCK_Q: tl.constexpr):
    """Largest s whose first tile slot (qsl[s] // BLOCK_Q + s, or qsl[s] if BLOCK_Q == 1) <= tile."""
    lo: tl.int32 = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first = tl.load(qsl_ptr + mid)
        if BLOCK_Q > 1:
            first = first // BLOCK_Q + mid
        if first <= tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1
