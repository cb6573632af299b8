"""Batched tensor stages of the sampler: penalties, top-k/top-p/min-p masks, the exponential race, logprobs.

Every function works on all rows at once with per-row parameter tensors; a row whose parameter is the
neutral value (k = vocab, p = 1, min_p = 0, penalty 1/0) is left unchanged. None of them syncs the host.
"""
from __future__ import annotations

from itertools import chain

import torch

NEG_INF = float("-inf")
# The exponential race divides by q; a q of exactly 0 would give inf/nan and pick an arbitrary token.
_TINY = torch.finfo(torch.float32).tiny
# Above this fraction of the vocabulary, one full sort beats torch.topk for the top-k-only path.
_TOPK_SORT_FRACTION = 8


def to_device(data: torch.Tensor | list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host data to `device` without a host sync (pinned, non-blocking copy on CUDA)."""
    t = data.to(dtype) if isinstance(data, torch.Tensor) else torch.tensor(data, dtype=dtype)
    if device.type == "cpu":
        return t
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def flat_token_index(token_lists: list[list[int]], row_ids: list[int], vocab_size: int) -> torch.Tensor:
    """CPU int64 indices row * vocab + token for every token of token_lists[j] (in row row_ids[j])."""
    lens = torch.tensor([len(t) for t in token_lists], dtype=torch.int64)  # [J]
    tokens = torch.tensor(list(chain.from_iterable(token_lists)), dtype=torch.int64)  # [T]
    rows = torch.repeat_interleave(torch.tensor(row_ids, dtype=torch.int64), lens)  # [T]
    keep = (tokens >= 0) & (tokens < vocab_size)  # ids past the (sliced) vocabulary cannot be sampled anyway
    return (rows * vocab_size + tokens)[keep]  # [T']


def token_counts(flat_index: torch.Tensor, num_rows: int, vocab_size: int) -> torch.Tensor:
    """Occurrence counts [num_rows, vocab] float32 from flat row*vocab+token indices (on the target device)."""
    counts = torch.zeros(num_rows * vocab_size, dtype=torch.float32, device=flat_index.device)
    # scatter_add, not bincount: CUDA bincount reads the max index back to the host.
    counts.scatter_add_(0, flat_index, torch.ones_like(flat_index, dtype=torch.float32))
    return counts.view(num_rows, vocab_size)


def apply_penalties(
    logits: torch.Tensor,
    prompt_mask: torch.Tensor | None,
    output_counts: torch.Tensor,
    repetition: torch.Tensor | None,
    frequency: torch.Tensor | None,
    presence: torch.Tensor | None,
) -> torch.Tensor:
    """vLLM repetition (prompt+output), frequency and presence (output) penalties; returns the new logits."""
    # logits [R, V] float32; prompt_mask [R, V] bool; output_counts [R, V] float32; penalties [R] float32
    output_mask = output_counts > 0  # [R, V]
    if repetition is not None:
        seen = output_mask if prompt_mask is None else output_mask | prompt_mask  # [R, V]
        scale = torch.where(seen, repetition.unsqueeze(1), 1.0)  # [R, V]
        logits = torch.where(logits > 0, logits / scale, logits * scale)
    if frequency is not None:
        logits = logits - frequency.unsqueeze(1) * output_counts
    if presence is not None:
        logits = logits - presence.unsqueeze(1) * output_mask
    return logits


def apply_top_k_top_p(
    logits: torch.Tensor, k: torch.Tensor | None, p: torch.Tensor | None, max_k: int = 0
) -> torch.Tensor:
    """Set logits outside each row's top-k, then outside its top-p nucleus, to -inf (in place); top-1 survives."""
    # logits [R, V] float32; k [R] int64 in 1..V (V disables); p [R] float32 in (0, 1] (1 disables)
    # max_k: the largest k below V (host int), which lets the top-k-only path avoid a full sort
    vocab = logits.shape[-1]
    if p is None:
        if k is None:
            return logits
        if 0 < max_k and max_k * _TOPK_SORT_FRACTION <= vocab:
            top = logits.topk(max_k, dim=-1).values  # [R, max_k] descending
            thresh = top.gather(1, (k.clamp(max=max_k) - 1).unsqueeze(1))  # [R, 1]
            thresh = thresh.masked_fill_((k >= vocab).unsqueeze(1), NEG_INF)
            return logits.masked_fill_(logits < thresh, NEG_INF)
    sorted_logits, order = logits.sort(dim=-1)  # [R, V] ascending, [R, V] int64
    if k is not None:
        # Ties with the k-th largest value survive, as in vLLM.
        thresh = sorted_logits.gather(1, (vocab - k).clamp(0, vocab - 1).unsqueeze(1))  # [R, 1]
        sorted_logits.masked_fill_(sorted_logits < thresh, NEG_INF)
    if p is not None:
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # [R, V]
        # Drop the low tail whose mass is <= 1 - p; the last (largest) token is never dropped.
        drop = cum <= (1.0 - p).unsqueeze(1)  # [R, V]
        drop[:, -1] = False
        sorted_logits.masked_fill_(drop, NEG_INF)
    return logits.scatter_(1, order, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Keep tokens with prob >= min_p * max prob (in place); the arg-max always survives."""
    # logits [R, V] float32; min_p [R] float32 in [0, 1]. prob_i / prob_max = exp(l_i - l_max), so compare logits.
    thresh = logits.amax(dim=-1, keepdim=True) + torch.log(min_p).unsqueeze(1)  # [R, 1]; log(0) = -inf keeps all
    return logits.masked_fill_(logits < thresh, NEG_INF)


def exponential_race(probs: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """One sample per row: argmax(probs / q) with q ~ Exp(1) is distributed as probs (no host sync)."""
    # probs [R, V] float32; q [R, V] float32 (overwritten); returns [R] int64
    return probs.div_(q.clamp_(min=_TINY)).argmax(dim=-1)


def gather_logprobs(
    logprobs: torch.Tensor, token_ids: torch.Tensor, num_top: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sampled logprob [L], sampled rank [L], top-N logprobs [L, N], top-N ids [L, N]) of each row."""
    # logprobs [L, V] float32; token_ids [L] int64
    sampled = logprobs.gather(1, token_ids.unsqueeze(1))  # [L, 1]
    # rank = how many tokens are at least as likely (vLLM's count), so the arg-max has rank 1
    ranks = (logprobs >= sampled).sum(dim=-1)  # [L]
    top_lp, top_ids = logprobs.topk(num_top, dim=-1)  # [L, N] each; N = 0 gives empty tensors
    return sampled.squeeze(1), ranks, top_lp, top_ids
