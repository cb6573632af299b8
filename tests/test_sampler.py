"""Sampler: greedy, penalties, min_tokens, top-k/top-p/min-p against per-row references, logprobs, seeds."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from spool.engine.sampler import Sampler, SamplingRow
from spool.engine.sampling_ops import apply_min_p, apply_penalties, apply_top_k_top_p, flat_token_index, token_counts
from spool.engine.sampling_params import SamplingParams, generator_seed
from spool.engine.token_bitmask import apply_token_bitmask, bitmask_words, forbid_unless_only

V = 64
EOS = V - 1


def make_row(key="s", seed=None, prompt=(), out=(), eos=(EOS,), **params) -> SamplingRow:
    return SamplingRow(SamplingParams(**params), list(prompt), list(out), seed, list(eos), key)


def randn(*shape, seed=0, scale=1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


# ---- per-row references, written the slow obvious way (float64, one row at a time) ----

def ref_keep(logits: list[float], temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> set[int]:
    """Tokens a row may sample: top-k, then the smallest top set with mass >= top_p, then min-p."""
    x = [v / temperature for v in logits]
    order = sorted(range(len(x)), key=lambda t: -x[t])
    keep = order[: top_k] if 0 < top_k < len(x) else order
    z = sum(math.exp(x[t]) for t in keep)
    nucleus, mass = [], 0.0
    for t in keep:  # descending
        if mass < top_p:
            nucleus.append(t)
        mass += math.exp(x[t]) / z
    best = max(x[t] for t in nucleus)
    return {t for t in nucleus if math.exp(x[t] - best) >= min_p}


def ref_probs(logits: list[float], keep: set[int], temperature=1.0) -> dict[int, float]:
    z = sum(math.exp(logits[t] / temperature) for t in keep)
    return {t: math.exp(logits[t] / temperature) / z for t in keep}


def ref_penalize(logits: list[float], prompt, out, rep=1.0, freq=0.0, pres=0.0) -> list[float]:
    x = list(logits)
    for t in range(len(x)):
        if t in prompt or t in out:
            x[t] = x[t] / rep if x[t] > 0 else x[t] * rep
        x[t] -= freq * out.count(t) + pres * (t in out)
    return x


# ---- greedy ----

def test_greedy_is_argmax_and_ignores_padded_vocab():
    logits = randn(5, V + 8).to(torch.bfloat16)
    logits[:, V:] = 100.0  # lm_head padding past the vocabulary must never be sampled
    out = Sampler(V, "cpu")(logits, [make_row(str(i), temperature=0.0) for i in range(5)])
    assert out.token_ids == logits[:, :V].float().argmax(-1).tolist()
    assert out.logprobs == [None] * 5 and out.ranks == [None] * 5


def test_near_zero_temperature_and_top_k_1_match_greedy():
    logits = randn(32, V, scale=3.0)
    logits[torch.arange(32), logits.argmax(-1)] += 0.2  # a clear winner, so T=1e-3 is effectively greedy
    expect = logits.argmax(-1).tolist()
    sampler = Sampler(V, "cpu")
    assert sampler(logits, [make_row(str(i), temperature=1e-3) for i in range(32)]).token_ids == expect
    assert sampler(logits, [make_row(str(i), top_k=1, temperature=2.0) for i in range(32)]).token_ids == expect


def test_top1_always_survives():
    logits = randn(4, V, seed=3)
    rows = [make_row(top_p=1e-6), make_row(top_k=1, top_p=1e-6, min_p=1.0), make_row(min_p=1.0), make_row(top_p=0.01)]
    assert Sampler(V, "cpu")(logits, rows).token_ids == logits.argmax(-1).tolist()
    x = apply_min_p(apply_top_k_top_p(logits.clone(), None, torch.full((4,), 1e-6)), torch.ones(4))
    assert torch.isfinite(x).sum(-1).tolist() == [1, 1, 1, 1]


# ---- top-k / top-p / min-p ----

CASES = [  # (temperature, top_k, top_p, min_p)
    (1.0, 0, 1.0, 0.0), (1.0, 5, 1.0, 0.0), (0.7, 3, 1.0, 0.0), (1.0, 0, 0.8, 0.0), (1.3, 20, 0.9, 0.0),
    (1.0, 0, 1.0, 0.1), (0.8, 10, 0.7, 0.05), (1.0, 40, 1.0, 0.3), (2.0, 0, 0.5, 0.2), (1.0, -1, 0.95, 0.0),
]


@pytest.mark.parametrize("top_k_only", [False, True])
def test_masks_match_reference(top_k_only):
    cases = [c for c in CASES if c[2] == 1.0] if top_k_only else CASES  # top_k_only exercises the topk path
    logits = randn(len(cases), V, seed=1, scale=2.0)
    temp = torch.tensor([c[0] for c in cases]).unsqueeze(1)
    k = torch.tensor([c[1] if c[1] > 0 else V for c in cases])
    p = None if top_k_only else torch.tensor([c[2] for c in cases])
    max_k = max(c[1] for c in cases)
    x = apply_top_k_top_p(logits / temp, k, p, max_k)
    x = apply_min_p(x, torch.tensor([c[3] for c in cases]))
    for i, (t, tk, tp, mp) in enumerate(cases):
        got = set(torch.isfinite(x[i]).nonzero().flatten().tolist())
        assert got == ref_keep(logits[i].tolist(), t, tk, tp, mp), cases[i]


@pytest.mark.parametrize("case", CASES[1:9:2])
def test_sampled_frequencies_match_reference(case):
    temperature, top_k, top_p, min_p = case
    n = 6000
    logits = randn(1, V, seed=2, scale=1.5).expand(n, V)
    torch.manual_seed(0)
    rows = [make_row(str(i), temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p) for i in range(n)]
    tokens = Sampler(V, "cpu")(logits, rows).token_ids
    keep = ref_keep(logits[0].tolist(), *case)
    assert set(tokens) <= keep
    for t, prob in ref_probs(logits[0].tolist(), keep, temperature).items():
        assert abs(tokens.count(t) / n - prob) < 0.025, (t, prob)


def test_mixed_greedy_and_random_batch():
    logits = randn(8, V, seed=4)
    rows = [make_row(str(i), temperature=0.0) if i % 2 else make_row(str(i), top_k=3) for i in range(8)]
    tokens = Sampler(V, "cpu")(logits, rows).token_ids
    for i, tok in enumerate(tokens):
        if i % 2:
            assert tok == logits[i].argmax().item()
        else:
            assert tok in logits[i].topk(3).indices.tolist()


# ---- penalties and min_tokens ----

def test_penalties_hand_computed():
    logits = torch.tensor([[1.0, -1.0, 2.0, -2.0, 0.5, 0.0, 3.0, -0.5]])
    counts = token_counts(flat_token_index([[2, 2, 3]], [0], 8), 1, 8)
    prompt = torch.zeros(8, dtype=torch.bool)
    prompt[[0, 1]] = True
    out = apply_penalties(logits, prompt[None], counts, torch.tensor([2.0]), torch.tensor([0.5]), torch.tensor([0.25]))
    # 0,1 prompt only: 1/2, -1*2; 2: 2/2 - 0.5*2 - 0.25; 3: -2*2 - 0.5 - 0.25; others untouched
    assert out[0].tolist() == [0.5, -2.0, -0.25, -4.75, 0.5, 0.0, 3.0, -0.5]


def test_penalties_match_reference_through_sampler():
    n = 48
    g = torch.Generator().manual_seed(5)
    logits = randn(n, V, seed=5, scale=2.0)
    rows, expect = [], []
    for i in range(n):
        prompt = torch.randint(0, V, (int(torch.randint(0, 20, (1,), generator=g)),), generator=g).tolist()
        out = torch.randint(0, V, (int(torch.randint(0, 20, (1,), generator=g)),), generator=g).tolist()
        pen = dict(repetition_penalty=[1.0, 1.3, 0.7][i % 3], frequency_penalty=[0.0, 0.8, -0.5, 1.5][i % 4],
                   presence_penalty=[0.0, 1.0, -1.2][i % 3 if i % 5 else 0])
        rows.append(make_row(str(i), prompt=prompt, out=out, temperature=0.0, **pen))
        x = ref_penalize(logits[i].tolist(), prompt, out, pen["repetition_penalty"], pen["frequency_penalty"],
                         pen["presence_penalty"])
        expect.append(max(range(V), key=x.__getitem__))
    assert Sampler(V, "cpu")(logits, rows).token_ids == expect
    # The same rows sampled at low temperature go through the random path with identical penalties.
    hot = [make_row(r.key, prompt=r.prompt_token_ids, out=r.output_token_ids, temperature=1e-4,
                    repetition_penalty=r.params.repetition_penalty, frequency_penalty=r.params.frequency_penalty,
                    presence_penalty=r.params.presence_penalty) for r in rows]
    assert Sampler(V, "cpu")(logits, hot).token_ids == expect


def test_min_tokens_masks_eos_and_stop_ids():
    logits = torch.arange(V, dtype=torch.float32).repeat(4, 1)  # EOS (V-1) best, then V-2, V-3
    rows = [
        make_row("a", temperature=0.0, min_tokens=2, stop_token_ids=[V - 2]),
        make_row("b", temperature=0.0, min_tokens=2, stop_token_ids=[V - 2], out=[1, 2]),  # min reached
        make_row("c", temperature=0.0, min_tokens=3, ignore_eos=True, out=[1]),  # vLLM masks EOS even then
        make_row("d", temperature=0.0),
    ]
    assert Sampler(V, "cpu")(logits, rows).token_ids == [V - 3, EOS, V - 2, EOS]
    torch.manual_seed(1)
    flat = torch.zeros(200, V)
    many = [make_row(str(i), min_tokens=1, stop_token_ids=[3, 7], eos=[EOS, 5]) for i in range(200)]
    assert not {EOS, 5, 3, 7} & set(Sampler(V, "cpu")(flat, many).token_ids)


# ---- logprobs ----

@pytest.mark.parametrize("all_rows", [False, True])
def test_logprobs_are_raw_with_ranks(all_rows):
    logits = randn(4, V, seed=6, scale=2.0)  # float32: no ties, so every rank convention agrees
    rows = [
        make_row("a", logprobs=3, temperature=0.7, top_k=10, repetition_penalty=1.5, prompt=[1, 2], out=[3]),
        make_row("b", logprobs=0, temperature=0.0, frequency_penalty=1.0, out=[int(logits[1].argmax())]),
        make_row("c", logprobs=None if not all_rows else 5, min_p=0.2),
        make_row("d", logprobs=20, seed=3),
    ]
    out = Sampler(V, "cpu")(logits, rows)
    raw = logits.float().log_softmax(-1)
    for i, row in enumerate(rows):
        n = row.params.logprobs
        if n is None:
            assert out.logprobs[i] is None and out.ranks[i] is None
            continue
        tok = out.token_ids[i]
        expect_ids = {tok, *raw[i].topk(n).indices.tolist()}
        assert set(out.logprobs[i]) == expect_ids == set(out.ranks[i])
        assert next(iter(out.logprobs[i])) == tok  # the sampled token comes first
        for t, lp in out.logprobs[i].items():
            assert lp == pytest.approx(raw[i, t].item(), abs=1e-6)
            assert out.ranks[i][t] == 1 + int((raw[i] > raw[i, t]).sum())
    assert out.token_ids[1] != logits[1].argmax().item()  # penalized greedy, yet logprobs stay raw


# ---- seeds ----

def run_steps(sampler, batches, logits_of, steps):
    """Run `steps` steps; batches(step) gives the row list; returns {key: tokens} of seeded rows."""
    got: dict[str, list[int]] = {}
    for step in range(steps):
        rows = batches(step)
        out = sampler(torch.stack([logits_of(r.key, step) for r in rows]), rows)
        for r, tok in zip(rows, out.token_ids):
            r.output_token_ids.append(tok)
            if r.seed is not None:
                got.setdefault(r.key, []).append(tok)
    return got


def test_seeded_rows_are_batch_invariant():
    table = {k: randn(8, V, seed=i) for i, k in enumerate("ABXYZ")}

    def logits_of(key, step):
        return table[key][step]

    def fresh_rows():
        return {
            "A": make_row("A", seed=7, top_p=0.9, frequency_penalty=0.3),
            "B": make_row("B", seed=11, top_k=10, temperature=1.5),
            "X": make_row("X"),
            "Y": make_row("Y", temperature=0.0),
            "Z": make_row("Z", seed=99, min_p=0.05),
        }

    alone = {}
    for key in "AB":
        row = fresh_rows()[key]
        alone.update(run_steps(Sampler(V, "cpu"), lambda step, row=row: [row], logits_of, 8))
    rows = fresh_rows()
    orders = ["XBAY", "ABZ", "YZXAB", "BA", "ZYXBA", "AXB", "BYA", "XYZAB"]  # other rows, other positions
    torch.manual_seed(123)
    batched = run_steps(Sampler(V, "cpu"), lambda step: [rows[k] for k in orders[step]], logits_of, 8)
    assert batched["A"] == alone["A"] and batched["B"] == alone["B"]
    assert batched["A"] != batched["B"]


def test_different_seeds_differ_and_release_restarts():
    flat = torch.zeros(1, 1000)
    sampler = Sampler(1000, "cpu")

    def draw(key, seed, steps=6):
        return [sampler(flat, [make_row(key, seed=seed, eos=[])]).token_ids[0] for _ in range(steps)]

    first = draw("a", 1)
    assert draw("b", 1) == first  # a pure function of the seed, not the key
    assert draw("c", 2) != first
    assert draw("a", 1) != first  # "a" continues its stream
    sampler.release("a")
    assert draw("a", 1) == first
    sampler.release("never-seen")


# ---- logit_bias, top_p = 0, seeds of any integer ----

def test_logit_bias_is_added_before_penalties_and_steers_greedy():
    logits = randn(3, V, seed=12, scale=2.0)
    bias = {5: 100.0, 9: -100.0, 17: 3.5}
    rows = [make_row("a", temperature=0.0, logit_bias={5: 100.0}),
            make_row("b", temperature=0.0, logit_bias=bias, repetition_penalty=2.0, prompt=[17], out=[5]),
            make_row("c", temperature=0.0)]  # no bias: untouched
    out = Sampler(V, "cpu")(logits, rows).token_ids
    biased = logits[1].tolist()
    for t, b in bias.items():
        biased[t] += b
    ref = ref_penalize(biased, [17], [5], rep=2.0)  # bias first, then the penalty divides (or multiplies) it
    assert out == [5, max(range(V), key=lambda t: ref[t]), int(logits[2].argmax())]
    for _ in range(3):  # a +100 bias wins under sampling too; -100 never comes up
        assert set(Sampler(V, "cpu")(torch.zeros(64, V), [make_row(str(i), logit_bias={7: 100.0, EOS: -100.0})
                                                         for i in range(64)]).token_ids) == {7}


def test_top_p_zero_is_greedy():
    logits = randn(16, V, seed=13, scale=3.0)
    rows = [make_row(str(i), top_p=0.0, temperature=1.5, seed=i) for i in range(16)]
    assert all(r.params.greedy for r in rows)
    assert Sampler(V, "cpu")(logits, rows).token_ids == logits.argmax(-1).tolist()


def test_any_integer_seed_maps_to_64_bits():
    assert generator_seed(None, 0) is None
    assert generator_seed(-1, 0) == 2**64 - 1 and generator_seed(-1, 1) == 0
    assert generator_seed(2**64 + 5, 0) == 5 and generator_seed(7, 2) == 9
    flat = torch.zeros(1, 1000)

    def draw(seed):
        sampler = Sampler(1000, "cpu")
        return [sampler(flat, [make_row("k", seed=generator_seed(seed, 0), eos=[])]).token_ids[0] for _ in range(5)]

    assert draw(-12345) == draw(-12345) == draw(2**64 - 12345) != draw(-12346)


# ---- grammar bitmask ----

def ref_mask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """Element by element: logits[rows[j], t] = -inf unless bit t of bitmask row j is set."""
    out = logits.clone()
    for j, r in enumerate(rows):
        for t in range(logits.shape[1]):
            if not (int(bitmask[j, t // 32]) >> (t % 32)) & 1:
                out[r, t] = float("-inf")
    return out


@pytest.mark.parametrize("vocab", [64, 70, 95])
def test_apply_token_bitmask_matches_reference_and_xgrammar(vocab):
    xgr = pytest.importorskip("xgrammar")
    gen = torch.Generator().manual_seed(vocab)
    bitmask = torch.randint(-2**31, 2**31, (3, bitmask_words(vocab)), generator=gen, dtype=torch.int64).to(torch.int32)
    bitmask[1, 0] = -2**31  # only bit 31 of the first word
    logits = torch.randn(5, vocab, generator=gen)
    rows = [4, 0, 2]
    got = apply_token_bitmask(logits.clone(), bitmask, torch.tensor(rows))
    assert torch.equal(got, ref_mask(logits, bitmask, rows))
    dense = torch.full((5, bitmask_words(vocab)), -1, dtype=torch.int32)
    dense[rows] = bitmask
    theirs = logits.clone()
    xgr.apply_token_bitmask_inplace(theirs, dense, vocab_size=vocab)
    assert torch.equal(got, theirs)
    assert torch.equal(apply_token_bitmask(logits[:3].clone(), bitmask, None), ref_mask(logits[:3], bitmask, [0, 1, 2]))


def test_forbid_unless_only():
    row = torch.zeros(3, dtype=torch.int32)
    row[0], row[2] = 1 << 4, -2**31  # tokens 4 and 95 allowed
    assert forbid_unless_only(row, [95], 96) and allowed_ids(row) == [4]
    assert not forbid_unless_only(row, [4, 200], 96) and allowed_ids(row) == [4]  # the only one: kept
    full = torch.full((2,), -1, dtype=torch.int32)
    assert forbid_unless_only(full, [31, 63, 0], 64) and allowed_ids(full) == [t for t in range(1, 63) if t != 31]


def allowed_ids(row: torch.Tensor) -> list[int]:
    return [t for t in range(32 * len(row)) if (int(row[t // 32]) >> (t % 32)) & 1]


class FakeGrammar:
    """Allows a fixed token set (what SequenceGrammar.fill_bitmask does from its matcher)."""

    def __init__(self, allowed):
        self.allowed = list(allowed)

    def fill_bitmask(self, bitmask, index):
        bitmask[index] = 0
        for t in self.allowed:
            word = int(bitmask[index, t // 32]) | (1 << (t % 32))
            bitmask[index, t // 32] = word - 2**32 if word >= 2**31 else word


def test_grammar_mask_after_penalties_before_top_k():
    logits = torch.arange(V, dtype=torch.float32).repeat(4, 1)  # higher id = better
    allowed = [3, 10, 40]
    rows = [
        make_row("greedy", temperature=0.0),
        make_row("top1", top_k=1, temperature=2.0),  # top-k after the mask: the best *allowed* token survives
        make_row("biased", temperature=0.0, logit_bias={3: 100.0, 50: 100.0}),  # bias cannot unmask 50
        make_row("free", temperature=0.0),  # no grammar in the same batch
    ]
    for r in rows[:3]:
        r.grammar = FakeGrammar(allowed)
    assert Sampler(V, "cpu")(logits, rows).token_ids == [40, 40, 3, V - 1]
    many = [make_row(str(i), temperature=5.0, top_p=0.5, seed=i, repetition_penalty=3.0, out=[40]) for i in range(100)]
    for r in many[::2]:
        r.grammar = FakeGrammar(allowed)
    out = Sampler(V, "cpu")(randn(100, V, seed=14, scale=4.0), many).token_ids
    assert set(out[::2]) <= set(allowed) and not set(out[1::2]) <= set(allowed)


def test_min_tokens_with_grammar_allows_eos_only_when_nothing_else_is_allowed():
    logits = torch.arange(V, dtype=torch.float32).repeat(3, 1)  # EOS (V-1) is the best token
    rows = [make_row("only-eos", temperature=0.0, min_tokens=4), make_row("eos-or-3", temperature=0.0, min_tokens=4),
            make_row("done", temperature=0.0, min_tokens=1, out=[2])]
    rows[0].grammar, rows[1].grammar, rows[2].grammar = FakeGrammar([EOS]), FakeGrammar([3, EOS]), FakeGrammar([3, EOS])
    assert Sampler(V, "cpu")(logits, rows).token_ids == [EOS, 3, EOS]


# ---- CUDA: host syncs (not run in CPU CI) ----

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_at_most_one_host_sync():
    rows = [make_row("a", seed=1, top_p=0.9, logprobs=2, frequency_penalty=0.5, out=[1, 2], min_tokens=5),
            make_row("b", top_k=5, repetition_penalty=1.2, prompt=[3], logit_bias={4: 2.0}),
            make_row("c", temperature=0.0), make_row("d", min_tokens=3)]
    rows[3].grammar = FakeGrammar([2, 5, EOS])  # the bitmask is filled on the host and copied without a sync
    logits = randn(4, V, seed=8).cuda()
    sampler = Sampler(V, "cuda")
    sampler(logits, rows)  # warm-up: lazy CUDA init may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sampler(logits, rows)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len([w for w in caught if "synchroniz" in str(w.message)]) <= 1
