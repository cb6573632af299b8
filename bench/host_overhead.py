"""Host (Python) time per decode step at large batch sizes, with the model's cost taken out. CPU only.

  .venv/bin/python bench/host_overhead.py                      # 256 and 512 running sequences
  .venv/bin/python bench/host_overhead.py --num-seqs 512 --steps 300 --profile 30
  .venv/bin/python bench/host_overhead.py --gc off               # or freeze, offline: see --help
  .venv/bin/python bench/host_overhead.py --async-scheduling both --device-ms 15   # sync vs async, simulated GPU
  .venv/bin/python bench/host_overhead.py --structured --async-scheduling both --device-ms 15   # a JSON schema
  .venv/bin/python bench/host_overhead.py --structured --schema bench --tokenizer-file .vocab/llama3.tiktoken \
      --num-seqs 512 --async-scheduling on --device-ms 25     # the throughput bench's schema, Llama 3's vocabulary

A real LLMEngine on a tiny random Llama runs greedy, ignore_eos requests whose prompts are 200-600 tokens.
Only the device work is faked:
- the model returns zero hidden states, and its logits come from a fixed pool of one-hot rows (text-like
  token ids from the tiny tokenizer's corpus), so argmax picks deterministic, varied tokens;
- the decode CUDA graphs are a real DecodeGraphs built on the CPU whose replay does nothing, so
  ModelRunner.launch takes its decode-graph path and builds the graph inputs as it would on the GPU.
- at a real vocabulary (--vocab, --tokenizer-file) the sampler's device math over [rows, vocab] is faked too
  (bench/host_fakes.py FakeSampling): the grammar bitmask is still filled by the engine's code, then each grammar
  row takes an allowed token (the dummy-weight run's random walk) and the others the next corpus tokens; the
  pick's own time is taken off the clock.
Everything else is the engine's own code: scheduler, block manager, SamplingRow building, the sampler's
host checks, PendingStep unpacking, update_from_output, detokenization and delta building.

Phases (mean microseconds per step, decode-only steps with every sequence running):
  schedule    Scheduler.schedule()
  runner      ModelRunner.launch() + PendingStep.result(), of which
  graph_in    DecodeGraphs.run(): the graph's host-side inputs (tensor builds and staging copies)
  update      Scheduler.update_from_output() (with --structured: includes xgrammar's batched accept)
  accept      with --structured: Scheduler._advance_grammars, the grammar accept (part of `update`)
  mask        with --structured: the sampler's host fill of the grammar bitmask (part of `runner`)
  on_token    the rest of LLMEngine.collect(): per-token detokenization and RequestDelta building
  fill        xgrammar's batch fill (SequenceGrammar.fill_many) on any thread: part of `mask` when the sampler
              fills, overlapping `on_token` when the engine starts it in the background (spool/engine/grammar_mask.py)
  window      host time from a step's forward pass queued to its sampling queued: with async scheduling's split
              launch (grammar rows), the previous step's apply and the mask fill, which the forward pass must
              cover or the device idles (else just the sampling's launch)
  window_est  the window on an idle multi-core host: plus the part of a background fill that outlasts the
              detokenization it overlaps (with --clock cpu on a busy machine, the figure to compare)
  total       LLMEngine.launch() + LLMEngine.collect()
  gc          time inside Python's garbage collector (already counted in the phase it interrupted)
  argmax      the sampler's argmax over [S, 512] logits alone: part of `runner` here, but device work
              (queued asynchronously) on the GPU
  wait        time blocked on the simulated device (--device-ms), excluded from every phase above
  gpu_idle    with --device-ms T: per step, how long the simulated device sat idle waiting for the host to
              queue the next step (each step occupies it T ms from max(its launch, the previous step's end))

--async-scheduling on|off|both: the engine's async scheduling (spool/engine/async_step.py). Off, every phase is on
the critical path (the device idles from a step's end until the next launch); on, the next step is queued
before the previous step's outputs are processed, so only host time beyond the device's step time idles it.
--structured: every request has one JSON schema (an unbounded array of strings, which the fake logits never
close). With async scheduling the launch is split (forward queued, previous step applied, bitmask filled,
sampling queued); the simulated device runs the forward pass from its launch and idles from its end until
the sampling is queued. The tiny tokenizer has 512 ids, so the mask fill there is far cheaper than at a real
vocabulary: --tokenizer-file (or --vocab) with --schema bench measures that (bench/grammar_step.py: the xgrammar
calls alone).
Full collections are rare (about one per 200-300 steps at 512 sequences) but scan the whole heap, so
`gc` is noisy over short runs; `p50 total` and `--gc off` leave it out.
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import io
import json
import pstats
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from spool.engine import SamplingParams, StructuredOutputsParams  # noqa: E402
from spool.engine.config import EngineConfig  # noqa: E402
from bench.host_fakes import FAKE_SAMPLING_FROM_VOCAB, FakeSampling, SimulatedDevice, fake_device  # noqa: E402
from bench.workload import integer_array_schema  # noqa: E402
from spool.engine.llm_engine import LLMEngine  # noqa: E402
from spool.engine.step_gc import step_gc  # noqa: E402
from spool.testing.tiny_model import _corpus, build_tiny_model  # noqa: E402

BLOCK_SIZE = 16
MAX_MODEL_LEN = 2048
PROMPT_LENS = (200, 600)
PHASES = ("schedule", "runner", "graph_in", "mask", "fill", "update", "accept", "on_token", "window", "window_est",
          "total", "gc", "argmax", "wait", "gpu_idle")
# --structured: what the fake one-hot logits can never finish (after a string, "," has a lower id than "]");
# at a real vocabulary (--vocab, --tokenizer-file) the throughput benchmark's schema (--schema bench).
SCHEMAS = {"strings": {"type": "array", "items": {"type": "string"}}, "bench": integer_array_schema()}


class _GcTimer:
    """Seconds spent in garbage collections and how many were full (generation 2), via gc.callbacks."""

    def __init__(self):
        self.seconds = 0.0
        self.full = 0
        self._t0 = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._t0
            self.full += info["generation"] == 2

    def close(self) -> None:
        gc.callbacks.remove(self._callback)


class _PhaseTimer:
    """Wraps engine methods with accumulators of device.clock (wall or this thread's CPU time); `laps` holds
    one dict of seconds per step."""

    def __init__(self, engine: LLMEngine, device: SimulatedDevice):
        self.engine = engine
        self.device = device
        self.acc = dict.fromkeys(("schedule", "launch", "result", "graph_in", "mask", "update", "accept", "window",
                                  "fill", "fill_bg"), 0.0)
        self.laps: list[dict[str, float]] = []
        self.gc = _GcTimer()
        self._wrap(engine.scheduler, "schedule", "schedule")
        self._wrap(engine.scheduler, "update_from_output", "update")
        self._wrap(engine.scheduler, "_advance_grammars", "accept")
        self._wrap(engine.runner.graphs, "run", "graph_in")
        self._wrap(engine.runner.sampler, "_grammar_bitmask", "mask")
        self._wrap_fill()
        self._wrap_launch()

    def _wrap_fill(self) -> None:
        """xgrammar's batch fill, on whichever thread runs it: `fill` on this one, `fill_bg` on another (the
        engine's background fill; with --clock cpu, that thread's own CPU time)."""
        from spool.engine.grammar import SequenceGrammar

        real, acc, clock = SequenceGrammar.__dict__["fill_many"], self.acc, self.device.clock
        main = threading.current_thread()

        def timed(cls, grammars, bitmask):
            t0 = clock()
            try:
                return real.__func__(cls, grammars, bitmask)
            finally:
                acc["fill" if threading.current_thread() is main else "fill_bg"] += clock() - t0

        SequenceGrammar.fill_many = classmethod(timed)
        self._restore = lambda: setattr(SequenceGrammar, "fill_many", real)

    def _wrap(self, obj, name: str, key: str) -> None:
        fn = getattr(obj, name)
        acc, clock = self.acc, self.device.clock

        def timed(*args, **kwargs):
            t0 = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                acc[key] += clock() - t0

        setattr(obj, name, timed)

    def _wrap_launch(self) -> None:
        runner, acc, device, clock = self.engine.runner, self.acc, self.device, self.device.clock
        queued = [0.0, 0.0]  # when the last forward pass was queued, and device.waited then

        class TimedPending:
            def __init__(self, pending, ready_at: float):
                self.pending = pending
                self.ready_at = ready_at

            def __getattr__(self, name):  # seq_ids, device_tokens: what the next launch reads
                return getattr(self.pending, name)

            def result(self):
                t0 = clock()
                waited = device.waited
                device.wait_until(self.ready_at)
                try:
                    return self.pending.result()
                finally:
                    acc["result"] += clock() - t0 - (device.waited - waited)

        # ModelRunner.launch is launch_forward then launch_sampling; the engine calls those two itself when it
        # applies the previous step between them (async scheduling with grammar rows: spool/engine/async_step.py).
        launch_forward, launch_sampling = runner.launch_forward, runner.launch_sampling

        def timed_forward(sched, previous=None):  # the forward pass takes the device's step time
            t0, paused = clock(), device.waited
            try:
                forward = launch_forward(sched, getattr(previous, "pending", previous))  # TimedPending unless untimed
                device.queue()
                return forward
            finally:
                queued[:] = clock(), device.waited
                acc["launch"] += queued[0] - t0 - (device.waited - paused)

        def timed_sampling(forward, *args, **kwargs):  # queued behind the forward pass; takes no time
            t0, paused = clock(), device.waited  # FakeSampling's token pick is the device's time
            try:
                return TimedPending(launch_sampling(forward, *args, **kwargs), device.queue(0.0))
            finally:
                now = clock()
                acc["launch"] += now - t0 - (device.waited - paused)
                acc["window"] += now - queued[0] - (device.waited - queued[1])

        runner.launch = lambda sched, previous=None: timed_sampling(timed_forward(sched, previous))
        runner.launch_forward, runner.launch_sampling = timed_forward, timed_sampling

    def step(self) -> list:
        """One engine step (launch + collect), recording its phases."""
        clock = self.device.clock
        for k in self.acc:
            self.acc[k] = 0.0
        gc_before = self.gc.seconds
        waited, idle = self.device.waited, self.device.idle
        t0 = clock()
        inflight = self.engine.launch()
        t1 = clock()
        deltas = self.engine.collect(inflight)
        t2 = clock()
        a = self.acc
        wait = self.device.waited - waited
        # launch() may apply the previous step itself (synchronous fallback): count its update there too.
        self.laps.append({
            "schedule": a["schedule"],
            "runner": a["launch"] + a["result"],
            "graph_in": a["graph_in"],
            "mask": a["mask"],
            "update": a["update"],
            "accept": a["accept"],
            "window": a["window"],
            "fill": a["fill"] + a["fill_bg"],
            # The window on an idle multi-core host: a background fill longer than the detokenization it
            # overlaps (on_token) makes the sampling wait for the rest.
            "window_est": a["window"] + max(0.0, a["fill_bg"] - ((t2 - t0) - wait - a["schedule"] - a["launch"]
                                                                  - a["result"] - a["update"])),
            "on_token": (t2 - t0) - wait - a["schedule"] - a["launch"] - a["result"] - a["update"],
            "total": t2 - t0 - wait,
            "gc": self.gc.seconds - gc_before,
            "wait": wait,
            "gpu_idle": self.device.idle - idle,
        })
        return deltas


def make_model_dir(root: Path, vocab: int | None = None, tokenizer_file: Path | None = None) -> Path:
    """The tiny Llama, with a position limit long enough for 600-token prompts plus long outputs.

    With `tokenizer_file` (a tiktoken rank file: bench/tiktoken_tokenizer.py) its tokenizer is that real
    vocabulary; with `vocab`, bench/synthetic_tokenizer.py's of that size. Either way the engine loads dummy
    weights of that vocabulary (for the grammar mask's cost at a real model's size).
    """
    path = build_tiny_model(root / "tiny-llama")
    cfg_file = path / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["max_position_embeddings"] = MAX_MODEL_LEN
    if vocab is not None or tokenizer_file is not None:
        for f in path.glob("*.safetensors"):
            f.unlink()
        for f in path.glob("tokenizer*"):
            f.unlink()
    if tokenizer_file is not None:
        from bench.tiktoken_tokenizer import copy_tokenizer

        vocab = copy_tokenizer(tokenizer_file, path)
        cfg.update(vocab_size=vocab, bos_token_id=vocab - 256, eos_token_id=vocab - 255)
    elif vocab is not None:
        from bench.synthetic_tokenizer import build_synthetic_tokenizer

        cfg.update(vocab_size=vocab, bos_token_id=vocab - 2, eos_token_id=vocab - 1)
        build_synthetic_tokenizer(path, vocab, vocab - 2, vocab - 1)
    cfg_file.write_text(json.dumps(cfg))
    return path


def build_engine(model_dir: Path, num_seqs: int, max_output: int, async_scheduling: bool) -> LLMEngine:
    """A CPU engine with room for num_seqs sequences of the longest prompt plus max_output tokens."""
    blocks_per_seq = -(-(PROMPT_LENS[1] + max_output) // BLOCK_SIZE)
    config = EngineConfig(
        model=str(model_dir), device="cpu", max_num_seqs=num_seqs, block_size=BLOCK_SIZE,
        num_kv_blocks=num_seqs * blocks_per_seq + 64, max_model_len=MAX_MODEL_LEN, max_num_batched_tokens=8192,
        async_scheduling=async_scheduling,
        load_format="auto" if any(model_dir.glob("*.safetensors")) else "dummy",
    )
    return LLMEngine(config)


def run(model_dir: Path, num_seqs: int, steps: int, warmup: int, profile_top: int, gc_mode: str,
        async_scheduling: bool = False, device_ms: float = 0.0, structured: bool = False,
        schema: str = "strings", clock: str = "wall") -> dict[str, float]:
    """Fill the batch, run `warmup` decode steps, then time `steps` decode steps; returns mean µs per phase."""
    # Prefill takes about num_seqs * 400 / 8192 steps; the output budget covers it with room to spare.
    max_output = MAX_MODEL_LEN - PROMPT_LENS[1]
    engine = build_engine(model_dir, num_seqs, max_output, async_scheduling)
    tok = engine.tokenizer
    stream = [t for line in _corpus() for t in tok.encode(line, add_special_tokens=False)]
    fake_device(engine, stream)
    device = SimulatedDevice(device_ms / 1000, time.thread_time if clock == "cpu" else time.perf_counter)
    if engine.model_cfg.vocab_size >= FAKE_SAMPLING_FROM_VOCAB:
        FakeSampling(engine.runner.sampler, stream, device)
    elif schema != "strings":
        raise SystemExit(f"--schema {schema} needs a real vocabulary (--vocab or --tokenizer-file)")
    rng = random.Random(num_seqs)
    spec = StructuredOutputsParams(json=SCHEMAS[schema]) if structured else None
    params = SamplingParams(temperature=0.0, max_tokens=max_output, ignore_eos=True, structured_outputs=spec)
    for i in range(num_seqs):
        n = rng.randint(*PROMPT_LENS)
        start = rng.randrange(len(stream) - n)
        engine.add_request(f"r{i}", {"prompt_token_ids": stream[start:start + n]}, params)
    while len(engine.scheduler.seqs) < num_seqs:  # --structured: the schema compiles off the step path first
        engine.step()
    timer = _PhaseTimer(engine, device)
    prefill_steps = 0
    while engine.scheduler.waiting or any(s.num_computed_tokens < s.num_tokens - 1 for s in engine.scheduler.running):
        timer.step()
        prefill_steps += 1
    for _ in range(warmup):
        timer.step()
    profile_steps = min(steps, 100) if profile_top else 0
    if prefill_steps + warmup + steps + profile_steps >= max_output:
        raise SystemExit(f"--steps too large: outputs are capped at {max_output} tokens")
    timer.laps.clear()
    gc.collect()  # every run starts its timed steps from the same collector state
    offline = contextlib.ExitStack()
    if gc_mode == "freeze":
        gc.freeze()  # what a long-running process can do once its engine is built (objects now alive: never scanned)
    elif gc_mode == "off":
        gc.disable()
    elif gc_mode == "offline":
        offline.enter_context(step_gc(engine.config.max_running_seqs))  # what LLM.generate runs its steps under
    full_before = timer.gc.full
    num_deltas = 0
    for _ in range(steps):
        num_deltas += len(timer.step())
    assert len(engine.scheduler.running) == num_seqs and num_deltas == num_seqs * steps, "not a full decode batch"
    means = {k: statistics.fmean(lap[k] for lap in timer.laps) * 1e6 for k in PHASES if k != "argmax"}
    fake_sampling = engine.model_cfg.vocab_size >= FAKE_SAMPLING_FROM_VOCAB
    means["argmax"] = 0.0 if fake_sampling else engine.runner.model.argmax_seconds(num_seqs) * 1e6
    means["p50_total"] = statistics.median(lap["total"] for lap in timer.laps) * 1e6
    for k in ("window", "mask", "accept", "on_token", "total"):  # robust to a busy machine's noise
        means[f"p50_{k}"] = statistics.median(lap[k] for lap in timer.laps) * 1e6
        means[f"min_{k}"] = min(lap[k] for lap in timer.laps) * 1e6
    means["full_gcs"] = timer.gc.full - full_before
    if profile_top:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(profile_steps):
            timer.step()
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(profile_top)
        print(f"\n--- cProfile, {num_seqs} sequences, {profile_steps} steps, by tottime ---")
        print("\n".join(line for line in buf.getvalue().splitlines() if line.strip())[:20000])
    offline.close()
    timer.gc.close()
    timer._restore()
    gc.enable()
    gc.unfreeze()
    return means


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num-seqs", type=int, nargs="+", default=[256, 512], help="running sequences (<= 512)")
    ap.add_argument("--steps", type=int, default=200, help="timed decode steps")
    ap.add_argument("--warmup", type=int, default=20, help="untimed decode steps after the prefill")
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="also print the top N cProfile functions")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--gc", choices=("on", "freeze", "off", "offline"), default="on",
                    help="Python's collector during the timed steps: as is, after gc.freeze(), disabled, or as "
                         "LLM.generate runs its steps (spool/engine/step_gc.py)")
    ap.add_argument("--async-scheduling", choices=("on", "off", "both"), default="both",
                    help="the engine's async scheduling (spool/engine/async_step.py): on, off, or each in turn")
    ap.add_argument("--device-ms", type=float, default=0.0,
                    help="simulate a device that takes this long per step (0: results are ready at once)")
    ap.add_argument("--structured", action="store_true",
                    help="give every request one JSON schema (structured outputs; see the module docstring)")
    ap.add_argument("--vocab", type=int, default=None,
                    help="a synthetic tokenizer of this many ids (e.g. 128256) instead of the tiny one's 512")
    ap.add_argument("--tokenizer-file", type=Path, default=None,
                    help="a real vocabulary: a tiktoken rank file (Llama 3's tokenizer.model; "
                         "bench/tiktoken_tokenizer.py)")
    ap.add_argument("--schema", choices=sorted(SCHEMAS), default="strings",
                    help="--structured's schema: strings (the tiny vocabulary's) or bench (bench/throughput.py's; "
                         "needs --vocab or --tokenizer-file)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="time phases by the wall clock, or by the CPU time of the thread that runs them (for a busy "
                         "machine: what they cost on an idle one; needs --device-ms 0)")
    ap.add_argument("--json", type=Path, default=None, help="also write the means here")
    args = ap.parse_args()
    if args.clock == "cpu" and args.device_ms:
        ap.error("--clock cpu times host work only: use --device-ms 0")
    torch.set_num_threads(args.threads)
    modes = {"on": [True], "off": [False], "both": [False, True]}[args.async_scheduling]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model_dir(Path(tmp), args.vocab, args.tokenizer_file)
        results = {(n, a): run(model_dir, n, args.steps, args.warmup, args.profile, args.gc, a, args.device_ms,
                               args.structured, args.schema, args.clock)
                   for n in args.num_seqs for a in modes}
    print(f"\nhost µs per decode step ({args.clock} clock, mean over {args.steps} steps, gc {args.gc}, "
          f"simulated device "
          f"{args.device_ms} ms/step{f', one JSON schema ({args.schema}) per request' if args.structured else ''}; "
          "graph_in and mask are part of runner, accept of update)")
    print(f"{'seqs':>6} {'async':>5} " + " ".join(f"{k:>9}" for k in PHASES)
          + f" {'p50 total':>10} {'µs/seq':>7} {'full gcs':>8}")
    for (n, a), m in results.items():
        print(f"{n:>6} {'on' if a else 'off':>5} " + " ".join(f"{m[k]:>9.0f}" for k in PHASES)
              + f" {m['p50_total']:>10.0f} {m['total'] / n:>7.2f} {m['full_gcs']:>8}")
    if args.json is not None:
        args.json.write_text(json.dumps([{"num_seqs": n, "async_scheduling": a, "device_ms": args.device_ms,
                                          "structured": args.structured and args.schema, "clock": args.clock,
                                          "vocabulary": str(args.tokenizer_file or args.vocab or "tiny"),
                                          **{k: round(v, 1) for k, v in m.items()}}
                                         for (n, a), m in results.items()], indent=2))


if __name__ == "__main__":
    main()
