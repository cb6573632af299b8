"""The scheduler alone on a virtual clock: bulk beside interactive probes, noise-free and in seconds.

  python bench/schedule_sim.py                          # llama3-8b workload, caps 2048 / 4096 / none, mixed vs split
  python bench/schedule_sim.py --caps 4096 --split on --probe-every-ms 250

The real Scheduler and BlockManager step the bulk workload (512 requests, prompt U[128,1024], 256 out, as
bench/e2e.py) with async scheduling's shape: step N+1 is scheduled when step N-1's tokens are applied, so it
queues behind step N on the device. Each step takes spool.testing.timed_runner.StepCost's seconds of a virtual
device; host time is a constant per step (--host-ms). One 64-token, 16-out priority-0 probe arrives every
--probe-every-ms and is added before the next schedule, as the worker's interactive read before each launch;
its TTFT is from its arrival to the end of the step that samples its first token. Nothing sleeps, so a run takes
seconds and repeats exactly: what the scheduling costs on the device, without the worker, Redis or the machine's
noise (bench/e2e.py --sim has those, on the wall clock).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from spool.engine.block_manager import BlockManager  # noqa: E402
from spool.engine.sampling_params import SamplingParams  # noqa: E402
from spool.engine.scheduler import Scheduler  # noqa: E402
from spool.engine.sequence import Sequence  # noqa: E402
from spool.engine.step_types import RunnerOutput  # noqa: E402
from spool.testing.timed_runner import StepCost  # noqa: E402


@dataclass(slots=True)
class Workload:
    """Bulk requests (prompt lengths, output length) and the probes beside them."""

    num_requests: int = 512
    prompt_len: tuple[int, int] = (128, 1024)
    output_len: int = 256
    probe_every_s: float = 0.5  # 0: no probes
    probe_prompt: int = 64
    probe_output: int = 16
    seed: int = 0


def simulate(cost: StepCost, wl: Workload, cap: int, split: bool, window_s: float = 10.0, budget: int = 8192,
             max_num_seqs: int = 512, reserve: float = 0.05, num_blocks: int = 56024, host_s: float = 0.0005) -> dict:
    """One pass on the virtual clock: bulk wall (last bulk token applied), steps, device time, probe TTFTs."""
    now = [0.0]
    sched = Scheduler(BlockManager(num_blocks, 16), max_num_seqs, budget, 4096, [2], reserve, cap, window_s,
                      split, clock=lambda: now[0])
    rng = random.Random(wl.seed)
    arrival = 0

    def add(name: str, prompt_len: int, max_tokens: int, priority: int) -> str:
        nonlocal arrival
        prompt = [rng.randrange(100, 128_000) for _ in range(prompt_len)]
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        sched.add(Sequence(f"{name}#0", name, 0, prompt, params, None, priority, arrival))
        arrival += 1
        return f"{name}#0"

    for i in range(wl.num_requests):
        add(f"b{i}", rng.randint(*wl.prompt_len), wl.output_len, 1)
    probes: dict[str, float] = {}
    next_probe = wl.probe_every_s or float("inf")
    t = free_at = busy = 0.0
    launched: list = []
    steps = mixed_steps = mixed_decode_rows = 0
    bulk_done = None
    ttft: list[float] = []
    while sched.has_unfinished() or launched:
        while next_probe <= t and bulk_done is None:
            now[0] = next_probe
            probes[add(f"p{len(probes) + len(ttft)}", wl.probe_prompt, wl.probe_output, 0)] = next_probe
            next_probe += wl.probe_every_s
        now[0] = t
        out = sched.schedule()
        if out.chunks:
            seconds = cost.seconds(out)
            free_at = max(t, free_at) + seconds
            busy += seconds
            steps += 1
            decodes = sum(1 for c in out.chunks if len(c.token_ids) == 1)
            if decodes < len(out.chunks):
                mixed_steps += 1
                mixed_decode_rows += decodes
            launched.append((out, free_at))
        if len(launched) >= 2 or (launched and not out.chunks):
            done, end = launched.pop(0)  # collect the older step: wait for the device, apply its tokens
            t = max(t, end) + host_s
            sched.update_from_output(done, RunnerOutput(sampled={c.seq_id: 5 for c in done.chunks if c.sample}))
            for c in done.chunks:
                if c.sample and c.seq_id in probes:
                    ttft.append(end - probes.pop(c.seq_id))
            if bulk_done is None and not any(s.priority > 0 for s in sched.seqs.values()):
                bulk_done = t
        else:
            t += host_s
    ttft.sort()

    def pct(q: float) -> float | None:
        return round(1000 * ttft[min(len(ttft) - 1, int(q * len(ttft)))], 1) if ttft else None

    return {"cap": cap, "split": split, "bulk_s": round(bulk_done or t, 3), "steps": steps,
            "device_s": round(busy, 3), "mixed_steps": mixed_steps, "mixed_decode_rows": mixed_decode_rows,
            "probes": len(ttft), "ttft_ms_p50": pct(0.5), "ttft_ms_p90": pct(0.9), "ttft_ms_p99": pct(0.99)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--caps", default="2048,4096,0", help="interactive_prefill_tokens values, comma-separated")
    p.add_argument("--split", choices=("on", "off", "both"), default="both", help="interactive_split_steps")
    p.add_argument("--probe-every-ms", type=float, default=500)
    p.add_argument("--num-requests", type=int, default=512)
    p.add_argument("--host-ms", type=float, default=0.5, help="host time per step, outside the device")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    cost = StepCost()
    wl = Workload(num_requests=args.num_requests, probe_every_s=args.probe_every_ms / 1000)
    alone = simulate(cost, Workload(num_requests=args.num_requests, probe_every_s=0), 0, False,
                     host_s=args.host_ms / 1000)
    rows = [dict(alone, cap=None, probes=0)]
    print(json.dumps(rows[0]))
    splits = {"on": (True,), "off": (False,), "both": (False, True)}[args.split]
    for split in splits:
        for cap in (int(c) for c in args.caps.split(",")):
            r = simulate(cost, wl, cap, split, host_s=args.host_ms / 1000)
            r["bulk_over_alone"] = round(alone["bulk_s"] / r["bulk_s"], 3)
            rows.append(r)
            print(json.dumps(r), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
