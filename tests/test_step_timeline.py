"""bench/step_timeline.py: every step of a run recorded with what it scheduled, and throughput.py's --timeline."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.step_timeline import StepTimeline, format_groups
from spool.engine import LLM, SamplingParams

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_timeline_counts_every_step_row_and_prompt_token(tiny_llama, async_scheduling):
    llm = LLM(str(tiny_llama), device="cpu", block_size=8, max_num_seqs=4, max_num_batched_tokens=64,
              async_scheduling=async_scheduling)
    prompts = [list(range(10, 10 + n)) for n in (5, 30, 90)]  # 90 > 64: a prompt in two chunks
    outs = [4, 7, 3]
    timeline = StepTimeline().attach(llm.engine)
    steps_before = llm.engine.stats.num_steps
    timeline.start()
    llm.generate([{"prompt_token_ids": p} for p in prompts],
                 [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in outs])
    n = len(timeline.t)
    assert n >= llm.engine.stats.num_steps - steps_before > 0  # async: one more step() than applied steps
    assert timeline.t == sorted(timeline.t) and len(timeline.rows) == len(timeline.ctx) == n
    # The first token comes from the prompt chunk; each later one from a one-token decode row.
    assert sum(timeline.rows) == sum(o - 1 for o in outs)
    assert sum(timeline.prompt_tokens) == sum(map(len, prompts))
    # Each decode row reads its whole context: the prompt and the tokens before it.
    assert sum(timeline.ctx) == sum(len(p) + i for p, o in zip(prompts, outs) for i in range(1, o))
    groups = {g["group"]: g for g in timeline.summarize()}
    assert groups["mixed"]["prompt_tokens"] == sum(map(len, prompts))
    assert sum(g["steps"] for g in groups.values()) == n
    assert sum(g["wall_s"] for g in groups.values()) == pytest.approx(timeline.t[-1], abs=1e-3)
    assert set(groups) <= {"mixed", "decode 1-16", "empty"}
    assert "decode 1-16" in format_groups(timeline.summarize())
    raw = timeline.to_json()["steps"]
    assert len(raw["ms"]) == n and sum(raw["ms"]) == pytest.approx(1e3 * timeline.t[-1], abs=0.1)


def test_start_forgets_the_warm_up(tiny_llama):
    llm = LLM(str(tiny_llama), device="cpu", block_size=8, max_num_seqs=4)
    timeline = StepTimeline().attach(llm.engine)
    llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert timeline.t
    timeline.start()
    assert timeline.t == [] and timeline.summarize() == []


def test_throughput_timeline_flag_writes_the_groups(tiny_llama, tmp_path):
    out = tmp_path / "t.json"
    cmd = [sys.executable, str(ROOT / "bench/throughput.py"), "--model", str(tiny_llama), "--device", "cpu",
           "--num-requests", "6", "--prompt-len", "8", "40", "--output-len", "3", "6", "--max-model-len", "128",
           "--timeline", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ms/step" in proc.stdout and "mixed" in proc.stdout
    res = json.loads(out.read_text())["results"][0]
    groups = res["timeline"]["groups"]
    assert groups[0]["group"] == "mixed" and sum(g["steps"] for g in groups) == len(res["timeline"]["steps"]["ms"])
    assert sum(res["timeline"]["steps"]["rows"]) == res["output_tokens"] - 6
