"""Where a step's time goes: torch.profiler over engine steps of the bulk workload, by phase.

  python bench/profile_step.py --shape llama3-8b --num-requests 512 --prompt-len 128 1024 --output-len 256 256
  python bench/profile_step.py --shape llama3-8b ... --quantization fp8 --kv-cache-dtype fp8

Adds the whole workload to one engine and steps it. Two windows are profiled: steps 15-19 (prefill chunks mixed
with the first decodes) and, once every request is decoding, 10 pure decode steps; each window's steps are first
run unprofiled (the profiler slows the host), and the GPU busy time is also given as a share of that wall. For each
window it prints the wall time per step, the GPU's busy share (union of kernel intervals), the host's CUDA runtime
calls that can block (synchronize, memcpy, malloc/free, kernel launches: a full launch queue blocks), and the
kernels by total time, grouped under readable names. A GPU busy share well under 100% means host time or launch
gaps sit on the critical path; the kernel table says what to make faster.

--trace DIR labels the engine's host phases (schedule, runner launch with its metadata build, the model's eager
forward, the LM head and the sampling, wait for tokens, update, detokenize and deltas) with record_function ranges, prints each phase's
host time per step, writes each window's chrome trace to DIR (gzip), and attributes the GPU's idle gaps to the
host phases that ran during them: the phase that keeps the GPU waiting is the one to shorten.
"""
from __future__ import annotations

import argparse
import functools
import gzip
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.shapes import model_source  # noqa: E402
from bench.throughput import _schema, add_bench_engine_flags, build_llm  # noqa: E402
from bench.workload import make_workload  # noqa: E402

# First matching pattern names the kernel's group (lower-case substring match on the kernel name).
_COLLECTIVES = "collectives (NCCL)"  # tensor parallelism's all-reduces and logits gather
_GROUPS = (
    (_COLLECTIVES, ("nccl",)),  # before "reduce": NCCL's kernels are named ncclDevKernel_AllReduce_...
    ("attention", ("paged_attn", "merge_splits", "flash", "fmha")),
    ("fp8 gemm", ("f8", "fp8", "e4m3", "scaled_mm")),
    ("gemm", ("gemm", "cutlass", "sm90_xmma", "nvjet", "cublas", "matmul", "wgmma")),
    ("norm", ("rms", "norm")),
    ("rotary", ("rotary", "rope")),
    ("kv write", ("kv_write", "reshape_and_cache", "write_kv", "store_kv")),
    ("activation", ("silu", "act_and_mul", "gelu")),
    ("sampling", ("argmax", "softmax", "topk", "sort", "gumbel", "exponential", "multinomial", "bitmask")),
    ("copy / cast", ("copy", "cast", "convert", "fill", "memset", "memcpy")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "reduce")),
)


def _group(name: str) -> str:
    low = name.lower()
    for group, keys in _GROUPS:
        if any(k in low for k in keys):
            return group
    return "other"


def _merged(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The union of [start, end) intervals as disjoint intervals, in order."""
    out: list[tuple[float, float]] = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


# Host phases labelled with --trace: (the owner's dotted attribute path on the engine, "" for the engine itself;
# the method; the label).
_PHASES = (("", "launch", "launch"), ("", "collect", "collect"), ("scheduler", "schedule", "schedule"),
           ("scheduler", "update_from_output", "update"), ("runner", "launch", "runner.launch"),
           ("", "_deltas", "detok+deltas"), ("runner", "_metadata", "metadata"), ("runner.model", "forward", "forward"),
           ("runner.model", "compute_logits", "logits"), ("runner.sampler", "launch_greedy", "sample"))


def _is_gpu_work(ev) -> bool:
    """A kernel, copy or memset on the device; not the device-side mirror of a record_function range."""
    return ev.device_type == torch.autograd.DeviceType.CUDA and not ev.name.startswith("phase:")


def label_phases(eng) -> None:
    """Wrap the engine's host phases in record_function ranges (instance attributes: nothing else changes)."""
    from spool.engine.step_types import PendingStep

    for owner_name, meth, label in _PHASES:
        owner = functools.reduce(getattr, owner_name.split("."), eng) if owner_name else eng
        fn = getattr(owner, meth)

        def wrapped(*a, _fn=fn, _label=label, **k):
            with torch.profiler.record_function(f"phase:{_label}"):
                return _fn(*a, **k)
        setattr(owner, meth, wrapped)
    if not getattr(PendingStep, "_phase_labelled", False):
        orig = PendingStep.result

        @functools.wraps(orig)
        def result(self):
            with torch.profiler.record_function("phase:wait"):
                return orig(self)
        PendingStep.result = result
        PendingStep._phase_labelled = True


def gap_attribution(prof, busy: list[tuple[float, float]], steps: int, min_gap_us: float = 5.0) -> dict:
    """GPU idle gaps between the busy intervals (_merged kernels, > min_gap_us) and, per host phase, how much of
    them it overlapped."""
    phases = [(ev.name[6:], ev.time_range.start, ev.time_range.end) for ev in prof.events()
              if ev.device_type == torch.autograd.DeviceType.CPU and ev.name.startswith("phase:")]
    gaps = [(e0, s1) for (_, e0), (s1, _) in zip(busy, busy[1:]) if s1 - e0 > min_gap_us]
    by_phase: dict[str, float] = defaultdict(float)
    ended_by: dict[str, float] = defaultdict(float)
    for g0, g1 in gaps:
        inner = None  # the innermost phase running when the gap ended (it queued the kernel that ended it)
        for name, p0, p1 in phases:
            ov = min(g1, p1) - max(g0, p0)
            if ov > 0:
                by_phase[name] += ov
            if p0 <= g1 <= p1 and (inner is None or p1 - p0 < inner[2] - inner[1]):
                inner = (name, p0, p1)
        ended_by[inner[0] if inner else "(no phase)"] += g1 - g0
    total = sum(g1 - g0 for g0, g1 in gaps)
    host: dict[str, float] = defaultdict(float)  # each phase's own host time (phases nest: launch holds schedule)
    for name, p0, p1 in phases:
        host[name] += p1 - p0
    print("  host time by phase (ms/step): " + ", ".join(f"{n} {us / steps / 1e3:.2f}" for n, us in
                                                      sorted(host.items(), key=lambda kv: -kv[1])))
    print(f"  GPU idle gaps > {min_gap_us:.0f} us: {len(gaps) / steps:.1f}/step, {total / steps / 1e3:.3f} ms/step")
    for name, us in sorted(by_phase.items(), key=lambda kv: -kv[1]):
        print(f"    host in {name:<14} during gaps {us / steps / 1e3:8.3f} ms/step")
    for name, us in sorted(ended_by.items(), key=lambda kv: -kv[1]):
        print(f"    gap ended by a launch in {name:<14} {us / steps / 1e3:8.3f} ms/step")
    return {"gap_ms_per_step": round(total / steps / 1e3, 3), "gaps_per_step": len(gaps) / steps,
            "host_phase_ms_per_step": {n: round(us / steps / 1e3, 3) for n, us in host.items()},
            "host_phase_during_gaps_ms_per_step": {n: round(us / steps / 1e3, 3) for n, us in by_phase.items()},
            "gap_ended_by_ms_per_step": {n: round(us / steps / 1e3, 3) for n, us in ended_by.items()}}


def profile_window(eng, steps: int, label: str, top: int, trace: Path | None = None) -> dict:
    """Profile `steps` engine steps; print and return the breakdown."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    t0 = time.perf_counter()  # the same number of steps unprofiled first: the profiler slows the host
    for _ in range(steps):
        eng.step()
    torch.cuda.synchronize()
    plain_us = (time.perf_counter() - t0) * 1e6
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        seqs = []
        for _ in range(steps):
            eng.step()
            seqs.append(len(eng.scheduler.running))
        torch.cuda.synchronize()
        wall_us = (time.perf_counter() - t0) * 1e6
    gaps = None
    if trace is not None:
        trace.mkdir(parents=True, exist_ok=True)
        raw = trace / f"{label.split()[0]}.json"
        prof.export_chrome_trace(str(raw))
        with open(raw, "rb") as f, gzip.open(f"{raw}.gz", "wb") as g:
            g.writelines(f)
        raw.unlink()
    kernels: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    intervals = []
    for ev in prof.events():
        if not _is_gpu_work(ev):
            continue
        dur = ev.time_range.end - ev.time_range.start
        intervals.append((ev.time_range.start, ev.time_range.end))
        k = kernels[ev.name]
        k[0] += dur
        k[1] += 1
    runtime: dict[str, list[float]] = defaultdict(lambda: [0.0, 0, 0.0])  # host CUDA calls that may block: sum, n, max
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CPU and ev.name.startswith("cuda") and any(
                k in ev.name for k in ("Synchronize", "Memcpy", "Malloc", "Free", "HostAlloc", "Query", "Launch")):
            r = runtime[ev.name]
            r[0] += ev.time_range.end - ev.time_range.start
            r[1] += 1
            r[2] = max(r[2], ev.time_range.end - ev.time_range.start)
    merged = _merged(intervals)
    busy = sum(e - s for s, e in merged)
    span = (max(e for _, e in intervals) - min(s for s, _ in intervals)) if intervals else 0.0
    groups: dict[str, float] = defaultdict(float)
    for name, (us, _) in kernels.items():
        groups[_group(name)] += us
    kernel_sum = sum(groups.values()) or 1.0
    print(f"\n=== {label}: {steps} steps, running seqs {seqs[0]}..{seqs[-1]}; wall {wall_us / steps / 1e3:.2f} ms/step; "
          f"GPU busy {busy / steps / 1e3:.2f} ms/step = {100 * busy / wall_us:.1f}% of wall "
          f"(kernel span {100 * span / wall_us:.1f}%); unprofiled wall {plain_us / steps / 1e3:.2f} ms/step, "
          f"GPU busy / unprofiled wall {100 * busy / plain_us:.1f}%")
    for g, us in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"  {g:<18} {us / steps / 1e3:8.3f} ms/step  {100 * us / kernel_sum:5.1f}%")
    collectives = groups.get(_COLLECTIVES, 0.0) / plain_us  # issue 16's all-reduce share of the step
    if collectives:
        print(f"  collectives: {100 * collectives:.1f}% of the unprofiled step wall (rank 0's GPU)")
    for name, (us, n, longest) in sorted(runtime.items(), key=lambda kv: -kv[1][0])[:8]:
        print(f"  host {name:<28} {us / steps / 1e3:8.3f} ms/step  {n / steps:6.1f} calls/step  "
              f"longest {longest / 1e3:.3f} ms")
    if trace is not None:
        gaps = gap_attribution(prof, merged, steps)
    print("  top kernels (ms/step, launches/step):")
    for name, (us, n) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"    {us / steps / 1e3:8.3f}  {n / steps:6.1f}  {name[:110]}")
    return {"label": label, "steps": steps, "running_seqs": seqs, "wall_ms_per_step": round(wall_us / steps / 1e3, 3),
            "unprofiled_wall_ms_per_step": round(plain_us / steps / 1e3, 3),
            "gpu_busy_ms_per_step": round(busy / steps / 1e3, 3), "gpu_busy_share": round(busy / wall_us, 3),
            "groups_ms_per_step": {g: round(us / steps / 1e3, 3) for g, us in groups.items()},
            "collectives_share_of_unprofiled_wall": round(collectives, 4),
            "host_cuda_calls_ms_per_step": {n: round(us / steps / 1e3, 3) for n, (us, _, _) in runtime.items()},
            "gaps": gaps,
            "top_kernels": [{"name": n, "ms_per_step": round(us / steps / 1e3, 3), "launches_per_step": c / steps}
                            for n, (us, c) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_engine_flags(p)
    p.add_argument("--decode-steps", type=int, default=10, help="decode steps in the second window")
    p.add_argument("--top", type=int, default=15, help="kernels listed per window")
    p.add_argument("--structured", choices=["none", "one", "distinct"], default="none",
                   help="a JSON schema on every request (as bench/throughput.py; implies a tokenizer)")
    p.add_argument("--json", type=Path, help="write the breakdowns here")
    p.add_argument("--trace", type=Path, help="label host phases, attribute GPU idle gaps to them, and write "
                                              "each window's chrome trace (gzip) to this folder")
    p.add_argument("--skip-prefill-window", action="store_true", help="profile only the pure decode window")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench/profile_step.py needs a CUDA GPU", file=sys.stderr)
        return 2
    path, load_format = model_source(args, args.structured != "none")
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    wl = make_workload(args, vocab)
    from spool.engine import SamplingParams

    llm = build_llm(path, load_format, args)
    eng = llm.engine
    llm.generate([{"prompt_token_ids": p[:64]} for p in wl.prompts[:8]],
                 [SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)] * 8)  # warm-up
    for i, (prompt, n) in enumerate(zip(wl.prompts, wl.output_lens)):
        eng.add_request(f"p{i}", {"prompt_token_ids": prompt},
                        SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, structured_outputs=_schema(args, i)))
    if args.trace is not None:
        label_phases(eng)
    for _ in range(10):
        eng.step()
    windows = []
    if not args.skip_prefill_window:
        windows.append(profile_window(eng, 5, "prefill + decode (steps 15-19)", args.top, args.trace))
    # Step until nothing is waiting or prefilling: every running sequence then decodes one token per step.
    for _ in range(10_000):
        if not eng.scheduler.waiting and not eng._grammars and all(s.num_computed_tokens >= s.num_prompt_tokens
                                             for s in eng.scheduler.running):
            break
        eng.step()
    for _ in range(3):
        eng.step()
    windows.append(profile_window(eng, args.decode_steps, "pure decode", args.top, args.trace))
    while eng.has_unfinished_requests():
        eng.step()
    if args.json:
        args.json.write_text(json.dumps({"device": torch.cuda.get_device_name(), "args": vars(args) | {"json": str(args.json)},
                                         "windows": windows}, indent=2, default=str))
    eng.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
