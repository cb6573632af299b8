"""Where a whole run's wall time goes, step by step: each engine step's wall time beside what it scheduled.

bench/profile_step.py profiles two short windows; a run's time also goes to its tail (batches shrinking as
sequences finish) and to the prompt-heavy steps at its start. StepTimeline wraps one LLMEngine's step() and
records, for every step, when it returned and what its launch scheduled: decode rows (one-token chunks), their
summed context (the KV the decode attention reads), and prompt tokens. summarize() groups the steps into the
mixed ones (any prompt token) and decode-only ones by batch size, so a run's seconds can be set beside the
kernels' cost at each size.

With async scheduling a step() returns once it has launched its own work and applied the previous step's
tokens, so the interval between two returns is the device's time for the step in flight (when the host keeps
up): each interval is charged to the step launched in it. Costs about two clock reads and a pass over the
chunks per step (~20 us at 256 rows on the CPU): throughput.py records it only with --timeline.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

# Decode-only steps are grouped by their row count: (lowest, highest) inclusive.
ROW_BUCKETS = ((1, 16), (17, 64), (65, 128), (129, 192), (193, 256), (257, 384), (385, 512), (513, 1 << 30))


@dataclass
class StepTimeline:
    """Per-step records of one engine's run; attach() before the run, summarize() after."""

    t: list[float] = field(default_factory=list)  # seconds from start() to the step's return
    rows: list[int] = field(default_factory=list)  # decode rows (one-token chunks) launched in the step
    ctx: list[int] = field(default_factory=list)  # their summed context lengths, in tokens
    prompt_tokens: list[int] = field(default_factory=list)  # tokens of multi-token chunks (prompt chunks)
    _t0: float = 0.0
    _last: tuple[int, int, int] = (0, 0, 0)

    def attach(self, engine) -> "StepTimeline":
        """Wrap engine.launch and engine.step (instance attributes: the class is untouched)."""
        launch, step = engine.launch, engine.step

        def timed_launch():
            in_flight = launch()
            rows = ctx = prompt = 0
            for c in in_flight.sched.chunks:
                n = len(c.token_ids)
                if n == 1:
                    rows += 1
                    ctx += c.start_pos + 1
                else:
                    prompt += n
            self._last = (rows, ctx, prompt)
            return in_flight

        def timed_step():
            deltas = step()
            self.t.append(time.perf_counter() - self._t0)
            rows, ctx, prompt = self._last
            self.rows.append(rows)
            self.ctx.append(ctx)
            self.prompt_tokens.append(prompt)
            return deltas

        engine.launch, engine.step = timed_launch, timed_step
        return self

    def start(self) -> None:
        """Clear what was recorded (the warm-up) and start the clock."""
        self.t, self.rows, self.ctx, self.prompt_tokens = [], [], [], []
        self._t0 = time.perf_counter()

    def summarize(self) -> list[dict]:
        """One entry per group: mixed steps, then decode-only steps by batch size (empty groups left out)."""
        seconds = self.step_seconds()
        groups: dict[str, list[int]] = {}
        for i, prompt in enumerate(self.prompt_tokens):
            if prompt:
                key = "mixed"
            elif self.rows[i] == 0:
                key = "empty"
            else:
                lo, hi = next(b for b in ROW_BUCKETS if b[0] <= self.rows[i] <= b[1])
                key = f"decode {lo}-{hi}"
            groups.setdefault(key, []).append(i)
        out = []
        for key, idx in groups.items():
            wall = sum(seconds[i] for i in idx)
            rows = sum(self.rows[i] for i in idx)
            out.append({
                "group": key, "steps": len(idx), "wall_s": round(wall, 4),
                "ms_per_step": round(1e3 * wall / len(idx), 3),
                "decode_rows": rows, "prompt_tokens": sum(self.prompt_tokens[i] for i in idx),
                "mean_ctx": round(sum(self.ctx[i] for i in idx) / rows, 1) if rows else 0.0,
                "us_per_row": round(1e6 * wall / rows, 2) if rows else None,
            })
        order = ["mixed"] + [f"decode {lo}-{hi}" for lo, hi in ROW_BUCKETS] + ["empty"]
        return sorted(out, key=lambda g: order.index(g["group"]))

    def step_seconds(self) -> list[float]:
        """Each step's interval: from the previous step's return (or start()) to its own."""
        return [t - prev for prev, t in zip([0.0, *self.t], self.t)]

    def to_json(self) -> dict:
        """The groups and the raw per-step lists (milliseconds between returns, rounded to microseconds)."""
        step_ms = [round(1e3 * s, 3) for s in self.step_seconds()]
        return {"groups": self.summarize(),
                "steps": {"ms": step_ms, "rows": self.rows, "ctx": self.ctx, "prompt_tokens": self.prompt_tokens}}


def format_groups(groups: list[dict]) -> str:
    """A small table of summarize()'s groups."""
    lines = [f"{'group':<16}{'steps':>7}{'wall s':>9}{'ms/step':>9}{'rows':>9}{'prompt tok':>12}{'mean ctx':>10}"
             f"{'us/row':>9}"]
    for g in groups:
        us = "" if g["us_per_row"] is None else f"{g['us_per_row']:.1f}"
        lines.append(f"{g['group']:<16}{g['steps']:>7}{g['wall_s']:>9.3f}{g['ms_per_step']:>9.2f}{g['decode_rows']:>9}"
                     f"{g['prompt_tokens']:>12}{g['mean_ctx']:>10.0f}{us:>9}")
    return "\n".join(lines)
