"""A step's model inputs as one flat int32 tensor: what rank 0 broadcasts to the other tensor-parallel ranks.

The other ranks run the same forward pass as rank 0 and need only what decides it: each scheduled chunk's
tokens, first position, block table and whether its logits are sampled. Sampling parameters, grammars and
request state stay on rank 0, which samples. No pickle: plain int32s, laid out as

    [num_chunks, num_batched_tokens,
     (num_tokens, start_pos, num_blocks, sample) x num_chunks,
     every chunk's token ids, every chunk's block table]
"""
from __future__ import annotations

from array import array

import torch

from spool.engine.sampling_params import SamplingParams
from spool.engine.step_types import ScheduledChunk, SchedulerOutput

_HEADER, _PER_CHUNK = 2, 4
_NO_SAMPLING = SamplingParams()  # the other ranks never sample; ScheduledChunk needs params all the same


def encode_step(sched: SchedulerOutput) -> torch.Tensor:
    """The chunks' forward inputs as a CPU int32 tensor [2 + 4 * num_chunks + tokens + block ids]."""
    chunks = sched.chunks
    flat = array("i", (len(chunks), sched.num_batched_tokens))
    for c in chunks:
        flat.extend((len(c.token_ids), c.start_pos, len(c.block_table), int(c.sample)))
    for c in chunks:
        flat.extend(c.token_ids)
    for c in chunks:
        flat.extend(c.block_table)  # array('i'): one memcpy per table
    return torch.frombuffer(flat, dtype=torch.int32)


def decode_step(payload: torch.Tensor) -> SchedulerOutput:
    """Rebuild the SchedulerOutput a rank other than 0 runs (sampling fields are placeholders)."""
    flat = array("i")
    flat.frombytes(payload.numpy().tobytes())
    num_chunks, num_batched_tokens = flat[0], flat[1]
    meta = flat[_HEADER : _HEADER + _PER_CHUNK * num_chunks]
    tok = _HEADER + _PER_CHUNK * num_chunks
    blk = tok + sum(meta[0::_PER_CHUNK])
    chunks = []
    for i in range(num_chunks):
        num_tokens, start_pos, num_blocks, sample = meta[_PER_CHUNK * i : _PER_CHUNK * (i + 1)]
        chunks.append(ScheduledChunk(
            seq_id="", token_ids=flat[tok : tok + num_tokens].tolist(), start_pos=start_pos,
            block_table=flat[blk : blk + num_blocks], sample=bool(sample), params=_NO_SAMPLING,
            prompt_token_ids=[], all_token_ids=[], seed=None, grammar=None))
        tok += num_tokens
        blk += num_blocks
    return SchedulerOutput(chunks, num_batched_tokens)
