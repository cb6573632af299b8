"""Sampler: the runner's logits to one token per sequence, in one batched pass with vLLM's semantics.

Order of stages (vLLM): float32 -> logit_bias -> min_tokens mask -> repetition, frequency, presence
penalties -> grammar bitmask (structured outputs) -> greedy argmax | temperature -> top-k -> top-p -> min-p
-> exponential race. Logprobs and ranks come from the raw model distribution (vLLM v1's default), not the
processed one. Stages no row needs are skipped.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from spool.engine.grammar_mask import GrammarMasks, MaskFill
from spool.engine.sampling_ops import (
    NEG_INF,
    apply_min_p,
    apply_penalties,
    apply_top_k_top_p,
    exponential_race,
    flat_token_index,
    gather_logprobs,
    to_device,
    token_counts,
)
from spool.engine.sampling_params import SamplingParams
from spool.engine.token_bitmask import RowGrammar, apply_token_bitmask, forbid_unless_only

# Columns of the per-row parameter table, sent to the device in one copy per step.
_TEMP, _TOP_K, _TOP_P, _MIN_P, _REP, _FREQ, _PRES, _GREEDY = range(8)


@dataclass(slots=True)
class SamplingRow:
    """One sequence being sampled this step (built by the runner)."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # tokens generated so far by this sequence (before this step)
    seed: int | None  # effective seed (already derived for n>1 children) or None
    eos_token_ids: list[int]  # the model's EOS ids (masked until min_tokens is reached)
    key: str  # the sequence id; owns this row's seeded generator until Sampler.release(key)
    # structured outputs: the sequence's matcher (spool.engine.grammar.SequenceGrammar)
    grammar: RowGrammar | None = None


@dataclass(slots=True)
class SamplerOutput:
    """One step's result, one entry per row, in row order."""

    token_ids: list[int]
    # per row: None if params.logprobs is None, else {sampled id: logprob, plus top-N ids: logprob}
    logprobs: list[dict[int, float] | None]
    ranks: list[dict[int, int] | None]  # 1-based rank of each id of that dict in the raw distribution


class Sampler:
    """Batched token sampler; keeps one torch.Generator per seeded sequence so seeds are batch-invariant."""

    def __init__(self, vocab_size: int, device: torch.device | str):
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self._generators: dict[str, torch.Generator] = {}
        self.masks = GrammarMasks(vocab_size, self.device)  # the grammar rows' host bitmask buffer

    def release(self, key: str) -> None:
        """Drop a finished sequence's generator (a no-op for unknown keys)."""
        self._generators.pop(key, None)

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        """Sample one token per row from logits [num_rows, >= vocab_size] (any float dtype)."""
        return self.launch(logits, rows).result()

    def start_mask(self, grammars: list[RowGrammar]) -> MaskFill:
        """Start filling the bitmask of a coming launch()'s grammar rows (in row order) in the background."""
        return self.masks.start(grammars)

    @torch.inference_mode()
    def launch_greedy(self, logits: torch.Tensor) -> "PendingSample":
        """launch() for rows that are all plain greedy (is_plain_greedy: argmax, no logprobs), without rows."""
        self._check_logits(logits, logits.shape[0])
        tokens = self._argmax(logits[:, : self.vocab_size])  # [R] int64
        flat, event = self._to_host(tokens.to(torch.float64))
        return PendingSample(flat, event, logits.shape[0], [], 0, tokens)

    def _argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """launch_greedy's device work (a hook: bench/host_fakes.py replaces it at a real vocabulary)."""
        return logits.argmax(dim=-1)

    def _check_logits(self, logits: torch.Tensor, num_rows: int) -> None:
        if logits.dim() != 2 or logits.shape[0] != num_rows or logits.shape[1] < self.vocab_size:
            raise ValueError(f"logits {tuple(logits.shape)} do not match {num_rows} rows x vocab {self.vocab_size}")
        if logits.device.type != self.device.type or self.device.index not in (None, logits.device.index):
            raise ValueError(f"logits on {logits.device}, sampler on {self.device}")

    @torch.inference_mode()
    def launch(self, logits: torch.Tensor, rows: list[SamplingRow], mask: MaskFill | None = None) -> "PendingSample":
        """Queue the sampling on the logits' device; the tokens reach the host when result() is called.

        `mask`: a fill from start_mask() for these rows' grammars (else they are filled here).
        """
        self._check_logits(logits, len(rows))
        if not rows:
            return PendingSample(torch.zeros(0, dtype=torch.float64), None, 0, [], 0)
        logits = logits[:, : self.vocab_size]  # [R, V]; columns past the vocabulary are lm_head padding
        tokens = self._sample(logits, rows, mask)  # [R] int64
        return self._finish(logits, rows, tokens)

    def _sample(self, logits: torch.Tensor, rows: list[SamplingRow], mask: MaskFill | None = None) -> torch.Tensor:
        """Token ids [R] int64 on the logits' device, without a host sync."""
        vocab, device = self.vocab_size, logits.device
        greedy = [r.params.greedy for r in rows]
        bias = [i for i, r in enumerate(rows) if r.params.logit_bias]
        grammar = [i for i, r in enumerate(rows) if r.grammar is not None]
        min_tok = [i for i, r in enumerate(rows) if len(r.output_token_ids) < r.params.min_tokens]
        rep = any(r.params.repetition_penalty != 1.0 for r in rows)
        freq = any(r.params.frequency_penalty != 0.0 for r in rows)
        pres = any(r.params.presence_penalty != 0.0 for r in rows)
        if all(greedy) and not (bias or grammar or min_tok or rep or freq or pres):
            return logits.argmax(dim=-1)  # [R]

        # The grammar rows' bitmask is filled on the host first: on CUDA the forward pass is still running.
        bitmask = self._grammar_bitmask(rows, grammar, min_tok, mask) if grammar else None
        x = logits.to(torch.float32, copy=True)  # [R, V], processed in place from here on
        if bias:
            self._add_logit_bias(x, rows, bias)
        min_tok = [i for i in min_tok if rows[i].grammar is None]  # grammar rows: handled in their bitmask
        if min_tok:
            stops = [rows[i].eos_token_ids + rows[i].params.stop_token_ids for i in min_tok]
            flat = to_device(flat_token_index(stops, min_tok, vocab), torch.int64, device)  # [S]
            x.view(-1).index_fill_(0, flat, NEG_INF)
        all_greedy = all(greedy)
        # The table feeds penalties and random sampling; greedy grammar rows (the common structured case) skip it.
        table = None
        if rep or freq or pres or not all_greedy:
            table = to_device(_param_table(rows, greedy, vocab), torch.float32, device)  # [R, 8]
        if rep or freq or pres:
            x = self._penalize(x, rows, table, rep, freq, pres)
        if bitmask is not None:
            # After logit_bias and penalties, before temperature/top-k/top-p, so a disallowed token can never
            # come back. On CUDA this runs after the decode graph's replay (the logits leave the graph, which
            # holds only the model), so structured outputs never change or re-capture a CUDA graph.
            rows_idx = None if len(grammar) == len(rows) else to_device(grammar, torch.int64, device)  # [G]
            device_mask = to_device(bitmask, torch.int32, device)  # the pinned buffer's one copy
            self.masks.copied()
            x = apply_token_bitmask(x, device_mask, rows_idx)
        if all_greedy:
            return x.argmax(dim=-1)
        greedy_tokens = x.argmax(dim=-1) if any(greedy) else None  # [R]; before temperature, as in vLLM

        # Greedy rows carry neutral values in the table, so every stage below can run on all rows.
        sampled = [not g for g in greedy]
        rp = [r.params for r, s in zip(rows, sampled) if s]
        if any(p.temperature != 1.0 for p in rp):
            x.div_(table[:, _TEMP : _TEMP + 1])
        top_ks = [k for p in rp if 0 < (k := p.effective_top_k) < vocab]
        use_top_p = any(p.top_p < 1.0 for p in rp)
        if top_ks or use_top_p:
            k = table[:, _TOP_K].long() if top_ks else None  # [R]
            x = apply_top_k_top_p(x, k, table[:, _TOP_P] if use_top_p else None, max(top_ks, default=0))
        if any(p.min_p > 0.0 for p in rp):
            x = apply_min_p(x, table[:, _MIN_P])
        probs = x.softmax(dim=-1)  # [R, V]
        tokens = exponential_race(probs, self._noise(rows, sampled, probs))  # [R]
        if greedy_tokens is None:
            return tokens
        return torch.where(table[:, _GREEDY] > 0, greedy_tokens, tokens)

    def _grammar_bitmask(self, rows: list[SamplingRow], grammar: list[int], min_tok: list[int],
                         mask: MaskFill | None = None) -> torch.Tensor:
        """CPU int32 [G, W]: what each grammar row may sample next, with EOS and stop ids held back until
        min_tokens unless the grammar allows nothing else (then ending early beats an invalid token)."""
        bitmask = self.masks.take([rows[i].grammar for i in grammar], mask)
        held = set(min_tok)
        for j, i in enumerate(grammar):
            if i in held:
                r = rows[i]
                forbid_unless_only(bitmask[j], r.eos_token_ids + r.params.stop_token_ids, self.vocab_size)
        return bitmask

    def _add_logit_bias(self, x: torch.Tensor, rows: list[SamplingRow], bias: list[int]) -> None:
        """x[row, token] += bias for every row's logit_bias entry (in place, one index_add)."""
        vocab = self.vocab_size
        flat, values = [], []
        for i in bias:
            for token, b in rows[i].params.logit_bias.items():
                if token < vocab:  # add_request rejects larger ids; the sampler stays safe without it
                    flat.append(i * vocab + token)
                    values.append(b)
        device = x.device
        x.view(-1).index_add_(0, to_device(flat, torch.int64, device), to_device(values, torch.float32, device))

    def _penalize(
        self, x: torch.Tensor, rows: list[SamplingRow], table: torch.Tensor, rep: bool, freq: bool, pres: bool
    ) -> torch.Tensor:
        """Apply the penalties, counting tokens with scatter_add over flat (row, token) indices."""
        num_rows, vocab, device = len(rows), self.vocab_size, x.device
        out_rows = [i for i, r in enumerate(rows) if r.output_token_ids and _has_penalty(r.params)]
        flat = flat_token_index([rows[i].output_token_ids for i in out_rows], out_rows, vocab)  # [T]
        counts = token_counts(to_device(flat, torch.int64, device), num_rows, vocab)  # [R, V]
        prompt_mask = None
        if rep:
            rep_rows = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0]
            flat = flat_token_index([rows[i].prompt_token_ids for i in rep_rows], rep_rows, vocab)  # [P]
            prompt_mask = torch.zeros(num_rows * vocab, dtype=torch.bool, device=device)
            prompt_mask = prompt_mask.index_fill_(0, to_device(flat, torch.int64, device), True).view(num_rows, vocab)
        return apply_penalties(
            x,
            prompt_mask,
            counts,
            table[:, _REP] if rep else None,
            table[:, _FREQ] if freq else None,
            table[:, _PRES] if pres else None,
        )

    def _noise(self, rows: list[SamplingRow], sampled: list[bool], like: torch.Tensor) -> torch.Tensor:
        """Exp(1) noise [R, V]: seeded rows from their own generator, the rest from torch's default one."""
        q = torch.empty_like(like)  # [R, V]
        seeded = [i for i, r in enumerate(rows) if sampled[i] and r.seed is not None]
        if len(seeded) < sum(sampled):
            q.exponential_()
        else:
            q.fill_(1.0)  # only greedy rows are left, whose draw is discarded
        # One draw of exactly V values per seeded row and step: its stream never depends on the batch.
        for i in seeded:
            q[i].exponential_(generator=self._generator(rows[i], like.device))
        return q

    def _generator(self, row: SamplingRow, device: torch.device) -> torch.Generator:
        """The row's generator, seeded once on first use (or again if its key now has another seed)."""
        gen = self._generators.get(row.key)
        if gen is None or gen.initial_seed() != row.seed:
            gen = torch.Generator(device=device)
            gen.manual_seed(row.seed)
            self._generators[row.key] = gen
        return gen

    def _finish(self, logits: torch.Tensor, rows: list[SamplingRow], tokens: torch.Tensor) -> "PendingSample":
        """Gather raw-distribution logprobs into one float64 vector and start its copy to the host."""
        num_rows = len(rows)
        sampled = tokens  # [R] int64, kept on the device: async scheduling feeds it to the next step
        lp_rows = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        parts = [tokens.to(torch.float64)]  # ids, ranks and float32 values are all exact in float64
        num_top = max((rows[i].params.logprobs for i in lp_rows), default=0)
        if lp_rows:
            if len(lp_rows) < num_rows:
                idx = to_device(lp_rows, torch.int64, logits.device)  # [L]
                logits, tokens = logits.index_select(0, idx), tokens.index_select(0, idx)
            raw = logits.to(torch.float32).log_softmax(dim=-1)  # [L, V]: the unprocessed distribution
            lp, rank, top_lp, top_ids = gather_logprobs(raw, tokens, num_top)
            parts += [lp.double(), rank.double(), top_lp.double().flatten(), top_ids.double().flatten()]
        flat, event = self._to_host(torch.cat(parts))
        wanted = [(i, rows[i].params.logprobs) for i in lp_rows]
        return PendingSample(flat, event, num_rows, wanted, num_top, sampled)

    @staticmethod
    def _to_host(flat: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """Start the async copy of a device vector into pinned host memory: (host tensor, event after the copy)."""
        if flat.device.type != "cuda":
            return flat, None
        host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
        host.copy_(flat, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return host, event


@dataclass(slots=True)
class PendingSample:
    """One step's sampled ids (and logprobs) on their way to the host; result() is the step's only host sync."""

    host: torch.Tensor  # float64 [R + 2L + 2*L*top]; pinned and filled by an async copy on CUDA
    event: torch.cuda.Event | None  # recorded after that copy (None on the CPU)
    num_rows: int
    lp_rows: list[tuple[int, int]]  # (row, number of top logprobs it asked for)
    num_top: int
    tokens: torch.Tensor | None = None  # [num_rows] int64 on the device: the sampled ids before the host copy

    def result(self) -> SamplerOutput:
        """Wait for the device, then unpack ids, logprobs and ranks per row."""
        if self.event is not None:
            self.event.synchronize()
        num_rows, num_lp, num_top = self.num_rows, len(self.lp_rows), self.num_top
        token_ids = self.host[:num_rows].to(torch.int64).tolist()
        logprobs: list[dict[int, float] | None] = [None] * num_rows
        ranks: list[dict[int, int] | None] = [None] * num_rows
        if not num_lp:
            return SamplerOutput(token_ids, logprobs, ranks)
        host = self.host[num_rows:].tolist()
        lps, rks = host[:num_lp], host[num_lp : 2 * num_lp]
        tops, tids = host[2 * num_lp : 2 * num_lp + num_lp * num_top], host[2 * num_lp + num_lp * num_top :]
        for j, (i, wanted) in enumerate(self.lp_rows):
            tok = token_ids[i]
            values, order = {tok: lps[j]}, {tok: int(rks[j])}
            for m in range(wanted):
                tid = int(tids[j * num_top + m])
                if tid not in values:
                    values[tid], order[tid] = tops[j * num_top + m], m + 1
            logprobs[i], ranks[i] = values, order
        return SamplerOutput(token_ids, logprobs, ranks)


def is_plain_greedy(p: SamplingParams) -> bool:
    """Sampling p is a bare argmax of the raw logits: greedy, no logit_bias, min_tokens, penalties or logprobs
    (Sampler.launch_greedy). A row with a grammar is never plain, whatever its params."""
    return (p.greedy and p.logprobs is None and not p.logit_bias
            and p.min_tokens == 0 and p.repetition_penalty == 1.0 and p.frequency_penalty == 0.0
            and p.presence_penalty == 0.0)


def _has_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0


def _param_table(rows: list[SamplingRow], greedy: list[bool], vocab: int) -> list[list[float]]:
    """Rows of [temp, top_k, top_p, min_p, rep, freq, pres, greedy]; greedy rows get neutral sampling values."""
    table = []
    for r, g in zip(rows, greedy):
        p = r.params
        pen = [p.repetition_penalty, p.frequency_penalty, p.presence_penalty]
        if g:
            table.append([1.0, vocab, 1.0, 0.0, *pen, 1.0])
        else:
            k = p.effective_top_k
            table.append([p.temperature, k if 0 < k < vocab else vocab, p.top_p, p.min_p, *pen, 0.0])
    return table
