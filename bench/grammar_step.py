"""Host cost of one decode step's grammar work at a real vocabulary: bitmask fill and batched accept. CPU only.

  python bench/grammar_step.py --tokenizer-file .vocab/llama3.tiktoken     # Llama 3's vocabulary
  python bench/grammar_step.py --vocab 128256                              # bench/synthetic_tokenizer.py's
  python bench/grammar_step.py ... --rows 512 --steps 60 --threads 1 2

Every row holds the throughput benchmark's schema (bench/workload.py integer_array_schema), compiled and
matched through the engine's own GrammarCache and SequenceGrammar. Each step, as with dummy weights (random
logits under the mask), every row takes a uniformly random allowed token; rows start staggered (0 to
--stagger tokens in) so their states differ. Timed per step (mean and p50 over --steps, µs per row too), by the
wall clock and by the process's CPU time (all threads; the figure to trust on a busy machine):
  fill[t]   SequenceGrammar.fill_many into a preallocated bitmask on t xgrammar threads
  engine    the sampler's host fill as the engine runs it (spool/engine/grammar_mask.py: a reused buffer, the
            fill started on its background thread, then taken)
  accept    SequenceGrammar.accept_many (xgrammar's batch_accept_token; threaded for large batches on many cores)
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.workload import integer_array_schema  # noqa: E402


def load_vocab(tokenizer_file: Path | None, vocab: int, root: Path):
    """(tokenizer, vocab size, eos id): the rank file's real vocabulary, else a synthetic one of `vocab` ids."""
    from spool.engine.tokenizer import load_tokenizer

    if tokenizer_file is not None:
        from bench.tiktoken_tokenizer import cached_tokenizer_dir

        tok = load_tokenizer(cached_tokenizer_dir(tokenizer_file))
        return tok, len(tok), tok.eos_token_id
    from bench.synthetic_tokenizer import build_synthetic_tokenizer

    build_synthetic_tokenizer(root, vocab, vocab - 256, vocab - 255)
    return load_tokenizer(root), vocab, vocab - 255


def make_rows(tok, vocab: int, eos: int, rows: int):
    """`rows` fresh SequenceGrammar matchers of the bench schema, and the compile time in seconds."""
    from spool.engine.grammar_compiler import GrammarCache
    from spool.engine.structured_outputs import StructuredOutputsParams

    cache = GrammarCache(tok, vocab, [eos])
    t0 = time.perf_counter()
    compiled = cache.get(StructuredOutputsParams(json=integer_array_schema())).result()
    return [cache.matcher(compiled) for _ in range(rows)], time.perf_counter() - t0


def pick_allowed(bitmask: torch.Tensor, vocab: int, gen: torch.Generator) -> list[int]:
    """One uniformly random allowed token per row (argmax of random logits under the mask, as dummy weights)."""
    from spool.engine.token_bitmask import unpack_bitmask

    allowed = unpack_bitmask(bitmask, vocab)  # [R, V] bool
    scores = torch.rand(allowed.shape, generator=gen).masked_fill_(~allowed, -1.0)
    return scores.argmax(dim=-1).tolist()


def run(grammars, vocab: int, steps: int, stagger: int, threads: list[int], seed: int = 0) -> dict:
    """Walk every row `steps` tokens, timing each fill variant and the accept per step."""
    import xgrammar as xgr

    from spool.engine.grammar import SequenceGrammar
    from spool.engine.grammar_mask import GrammarMasks
    from spool.engine.token_bitmask import bitmask_words

    rows = len(grammars)
    masks = GrammarMasks(vocab, torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    bitmask = torch.empty(rows, bitmask_words(vocab), dtype=torch.int32)
    lead = [rng.randint(0, stagger) for _ in range(rows)]
    for k in range(stagger):  # staggered starts: row j has taken lead[j] tokens before the timed steps
        SequenceGrammar.fill_many(grammars, bitmask)
        tokens = pick_allowed(bitmask, vocab, gen)
        ahead = [j for j in range(rows) if lead[j] > k]
        if ahead:
            SequenceGrammar.accept_many([grammars[j] for j in ahead], [tokens[j] for j in ahead])
    batches = {t: xgr.BatchGrammarMatcher(max_threads=t) for t in threads}
    laps: dict[str, list[tuple[float, float]]] = {f"fill[{t}]": [] for t in threads}
    laps.update(engine=[], accept=[])

    def timed(key, fn):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        laps[key].append((time.perf_counter() - t0, time.process_time() - c0))
        return out

    for _ in range(steps):
        for t, batch in batches.items():
            timed(f"fill[{t}]", lambda: batch.batch_fill_next_token_bitmask([g.matcher for g in grammars], bitmask))
        engine_mask = timed("engine", lambda: masks.take(grammars, masks.start(grammars)))
        assert torch.equal(engine_mask, bitmask), "the engine's fill differs from xgrammar's"
        tokens = pick_allowed(bitmask, vocab, gen)
        accepted = timed("accept", lambda: SequenceGrammar.accept_many(grammars, tokens))
        assert all(accepted) and not any(g.terminated for g in grammars), "a row left the schema's array"
    out = {}
    for k, v in laps.items():
        wall, cpu = statistics.fmean(w for w, _ in v), statistics.fmean(c for _, c in v)
        out[k] = {"ms_per_step": round(wall * 1e3, 3), "p50_ms": round(statistics.median(w for w, _ in v) * 1e3, 3),
                  "us_per_row": round(wall / rows * 1e6, 2), "cpu_ms_per_step": round(cpu * 1e3, 3),
                  "cpu_us_per_row": round(cpu / rows * 1e6, 2)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer-file", type=Path, help="a tiktoken rank file (Llama 3's tokenizer.model)")
    ap.add_argument("--vocab", type=int, default=128256, help="without --tokenizer-file: synthetic vocabulary size")
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--steps", type=int, default=60, help="timed steps")
    ap.add_argument("--stagger", type=int, default=40, help="rows start 0..N tokens into the output")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="xgrammar fill thread counts to time")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tok, vocab, eos = load_vocab(args.tokenizer_file, args.vocab, Path(tmp))
        grammars, compile_s = make_rows(tok, vocab, eos, args.rows)
        res = {"vocabulary": args.tokenizer_file.name if args.tokenizer_file else f"synthetic-{vocab}",
               "vocab": vocab, "rows": args.rows, "compile_s": round(compile_s, 2),
               **run(grammars, vocab, args.steps, args.stagger, args.threads)}
    print(json.dumps(res, indent=1))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
