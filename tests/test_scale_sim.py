"""Smoke test of bench/scale_sim.py: the real worker loop around its StubEngine against a real redis-server."""
from __future__ import annotations

import argparse

from bench.scale_sim import measure


def test_scale_sim_measures_redis_cost_per_token(redis_url):
    args = argparse.Namespace(seqs=16, steps_per_s=40.0, output_tokens=20, warmup_s=0.5, window_s=1.5,
                              stream_interval_ms=None)
    streamed = measure(redis_url, 1, True, args, inline=True)
    assert streamed["tokens"] > 0 and streamed["redis_cpu_s_per_million_tokens"] > 0, streamed
    assert streamed["first_token_samples"] > 0 and streamed["first_token_p99_ms"] > 0, streamed
    # Streamed tokens go out through the APPEND script (one per token today, fewer once deltas are coalesced).
    assert streamed["redis_calls_per_token_by_command"].get("evalsha", 0) > 0, streamed
