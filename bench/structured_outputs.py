"""Structured outputs on a device: valid output through the decode CUDA graphs, and what the mask costs.

  python bench/structured_outputs.py [--device cuda] [--json out.json]

1. Correctness: a tiny random-weight model (spool.testing) serves structured requests (JSON schema, regex,
   choice, EBNF) beside plain greedy ones; every structured output must validate, every plain output must
   equal a run without structured neighbours, and on CUDA decode steps must still replay the CUDA graphs
   (the grammar mask acts on the logits after the graph).
2. Cost: (a) the sampler alone at a real vocabulary (128256 ids): time per call with no row, half the rows and
   every row masked (the bitmask's copy to the device, its unpacking and the masked_fill; the host fill is
   replaced by a copy of a prepared row); (b) xgrammar's host fill of a JSON-schema bitmask at a synthetic
   ~110k-token vocabulary, row by row and with SequenceGrammar.fill_many (threads), into pinned memory on CUDA;
   (c) engine step time of a grammar batch on the tiny model, with the part spent filling and accepting.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

SCHEMA = {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                                           "tag": {"type": "string", "pattern": "[a-z]{1,6}"},
                                           "ok": {"type": "boolean"}},
          "required": ["id", "tag", "ok"]}
REGEX = r"[a-z]{2,6}-\d{2,4}"
CHOICES = ["alpha", "beta", "gamma delta"]
EBNF = 'root ::= "(" [0-9]{1,3} ("+" [0-9]{1,3}){0,3} ")"'
EBNF_RE = r"\(\d{1,3}(\+\d{1,3}){0,3}\)"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def check_correctness(path: Path, device: str) -> dict:
    from spool.engine import LLM, SamplingParams, StructuredOutputsParams as SO

    llm = LLM(str(path), device=device, dtype="float32", block_size=16, max_num_seqs=64, num_kv_blocks=512)
    replays = {"n": 0}
    graphs = llm.engine.runner.graphs
    if graphs is not None:
        real_run = graphs.run

        def counting(*a, **kw):
            replays["n"] += 1
            return real_run(*a, **kw)

        graphs.run = counting
    plain_prompts = [{"prompt_token_ids": [10 + i, 20 + 2 * i, 30 + 3 * i]} for i in range(16)]
    plain = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    specs = [(SO(json=SCHEMA), "json"), (SO(regex=REGEX), "regex"), (SO(choice=CHOICES), "choice"),
             (SO(grammar=EBNF), "ebnf")]
    structured = [SamplingParams(temperature=1.0, seed=i, n=2, max_tokens=64, structured_outputs=s)
                  for i, (s, _) in enumerate(specs * 4)]
    alone = [o.outputs[0].token_ids for o in llm.generate(plain_prompts, plain)]
    outs = llm.generate(plain_prompts + [{"prompt_token_ids": [40 + i, 41]} for i in range(len(structured))],
                        [plain] * len(plain_prompts) + structured)
    mixed = [o.outputs[0].token_ids for o in outs[: len(plain_prompts)]]
    bad = []
    for o, (_, kind) in zip(outs[len(plain_prompts):], specs * 4):
        for c in o.outputs:
            ok = c.finish_reason == "stop"
            if ok and kind == "json":
                v = json.loads(c.text)
                ok = set(v) == {"id", "tag", "ok"} and re.fullmatch("[a-z]{1,6}", v["tag"]) is not None
            elif ok and kind == "regex":
                ok = re.fullmatch(REGEX, c.text) is not None
            elif ok and kind == "choice":
                ok = c.text in CHOICES
            elif ok:
                ok = re.fullmatch(EBNF_RE, c.text) is not None
            if not ok:
                bad.append((kind, c.finish_reason, c.text))
    return {"plain_equal": alone == mixed, "invalid": bad, "graph_replays": replays["n"],
            "graphs": graphs is not None, "num_structured": 2 * len(structured)}


class _CopyRow:
    """Stands in for a matcher: copies a prepared bitmask row (so only the sampler's own work is timed)."""

    def __init__(self, row: torch.Tensor):
        self.row = row

    def fill_bitmask(self, bitmask, index):
        bitmask[index].copy_(self.row)


def bench_sampler(device: str, vocab: int = 128256, rows: int = 256, iters: int = 50) -> dict:
    from spool.engine.sampler import Sampler, SamplingRow
    from spool.engine.sampling_params import SamplingParams
    from spool.engine.token_bitmask import bitmask_words

    sampler = Sampler(vocab, device)
    logits = torch.randn(rows, vocab, device=device)
    row = torch.randint(-2**31, 2**31, (bitmask_words(vocab),), dtype=torch.int64).to(torch.int32)
    out = {}
    for label, masked in (("none", 0), ("half", rows // 2), ("all", rows)):
        params = SamplingParams(temperature=0.8, top_p=0.95)
        batch = [SamplingRow(params, [1], [], None, [2], f"k{i}", _CopyRow(row) if i < masked else None)
                 for i in range(rows)]
        for _ in range(5):
            sampler(logits, batch)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            sampler(logits, batch)
        _sync(device)
        out[label] = round((time.perf_counter() - t0) / iters * 1e3, 3)
    return {"vocab": vocab, "rows": rows, "ms_per_call": out}


def bench_fill(device: str, rows: int = 256) -> dict:
    """xgrammar's host fill at a ~110k vocabulary (random RAW strings), row by row vs fill_many."""
    import random
    import string

    import xgrammar as xgr

    from spool.engine.grammar import SequenceGrammar
    from spool.engine.token_bitmask import fill_bitmask

    rng = random.Random(0)
    chars = string.ascii_letters + string.digits + ' "{}[]:,.-_'
    vocab = ["<eos>"] + [chr(i) for i in range(32, 127)]
    vocab += sorted({"".join(rng.choice(chars) for _ in range(rng.randint(2, 8))) for _ in range(110_000)})
    info = xgr.TokenizerInfo(vocab, vocab_type=xgr.VocabType.RAW, vocab_size=len(vocab), stop_token_ids=[0])
    compiled = xgr.GrammarCompiler(info, max_threads=8).compile_json_schema(SCHEMA, any_whitespace=False)
    prefixes = ["", '{"id": ', '{"id": 12, "tag": "ab', '{"id": 3, "tag": "x", "ok": ']
    grammars = []
    for i in range(rows):
        g = SequenceGrammar(xgr.GrammarMatcher(compiled))
        assert g.matcher.accept_string(prefixes[i % len(prefixes)])
        grammars.append(g)
    pin = device.startswith("cuda")

    class One:  # a different class per row wrapper: forces fill_bitmask() row by row
        def __init__(self, g):
            self.g = g

        def fill_bitmask(self, bitmask, index):
            self.g.fill_bitmask(bitmask, index)

    out = {"vocab": len(vocab), "rows": rows, "pinned": pin}
    for label, gs in (("row_by_row", [One(g) for g in grammars]), ("fill_many", grammars)):
        fill_bitmask(gs, len(vocab), pin)
        t0 = time.perf_counter()
        for _ in range(5):
            bm = fill_bitmask(gs, len(vocab), pin)
        out[f"{label}_ms"] = round((time.perf_counter() - t0) / 5 * 1e3, 3)
    ref = fill_bitmask([One(g) for g in grammars], len(vocab))
    out["same_bits"] = bool(torch.equal(bm.cpu(), ref))
    return out


def bench_engine(path: Path, device: str, batch: int = 64, steps: int = 40) -> dict:
    """Step time of a batch of grammar rows, and the part of it spent in the host fill and the accepts."""
    from spool.engine import LLMEngine, SamplingParams, StructuredOutputsParams as SO
    from spool.engine.grammar import SequenceGrammar

    spent = {"fill": 0.0, "accept": 0.0}
    real_fill, real_accept = SequenceGrammar.fill_many.__func__, SequenceGrammar.accept

    def timed_fill(cls, grammars, bitmask):
        t0 = time.perf_counter()
        real_fill(cls, grammars, bitmask)
        spent["fill"] += time.perf_counter() - t0

    def timed_accept(self, token):
        t0 = time.perf_counter()
        ok = real_accept(self, token)
        spent["accept"] += time.perf_counter() - t0
        return ok

    SequenceGrammar.fill_many, SequenceGrammar.accept = classmethod(timed_fill), timed_accept
    try:
        eng = LLMEngine.from_kwargs(str(path), device=device, dtype="float32", block_size=16, max_num_seqs=batch,
                                    num_kv_blocks=2048)
        eos = eng.tokenizer.eos_token_id
        p = SamplingParams(temperature=1.0, seed=1, max_tokens=steps + 20, logit_bias={eos: -100.0},
                           structured_outputs=SO(grammar="root ::= [a-z ]*"))
        for i in range(batch):
            eng.add_request(f"r{i}", [10 + i % 400, 11], p)
        for _ in range(5):
            eng.step()
        _sync(device)
        spent.update(fill=0.0, accept=0.0)
        t0 = time.perf_counter()
        for _ in range(steps):
            eng.step()
        _sync(device)
        total = time.perf_counter() - t0
        assert len(eng.scheduler.running) == batch
    finally:
        SequenceGrammar.fill_many, SequenceGrammar.accept = classmethod(real_fill), real_accept
    ms = {k: round(v / steps * 1e3, 3) for k, v in (("step", total), *spent.items())}
    return {"batch": batch, "vocab": eng.model_cfg.vocab_size, "ms_per_step": ms}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--rows", type=int, default=256, help="rows of the sampler and fill benchmarks")
    ap.add_argument("--vocab", type=int, default=128256, help="vocabulary of the sampler benchmark")
    args = ap.parse_args()
    from spool.testing.tiny_model import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_model(Path(tmp) / "llama", "llama")
        result = {"device": args.device, "correctness": check_correctness(path, args.device),
                  "sampler": bench_sampler(args.device, rows=args.rows, vocab=args.vocab),
                  "fill": bench_fill(args.device, rows=args.rows), "engine": bench_engine(path, args.device)}
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    c = result["correctness"]
    assert c["plain_equal"] and not c["invalid"], c
    assert not c["graphs"] or c["graph_replays"] > 0, c
    assert result["fill"]["same_bits"], result["fill"]


if __name__ == "__main__":
    main()
