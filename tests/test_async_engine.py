"""vLLM's async engine API (engine.AsyncLLMEngine): the seed's example as written, cumulative outputs equal to the
offline API's, the reused-request-id trap, aborts that free the KV cache, errors that reach the caller."""
from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from spool.engine import LLM, AsyncEngineArgs, AsyncLLMEngine, SamplingParams, random_uuid

ROOT = Path(__file__).resolve().parent.parent

# The seed's example, as a vLLM user writes it; only the import line differs (`from vllm import ...` and
# `from vllm.utils import random_uuid`).
SEED_EXAMPLE = '''
import asyncio
from spool.engine import AsyncEngineArgs, AsyncLLMEngine, SamplingParams, random_uuid

engine = AsyncLLMEngine.from_engine_args(
    AsyncEngineArgs(model=MODEL, max_model_len=256, gpu_memory_utilization=0.5))


async def generate(prompt: str) -> str:
    request_id = random_uuid()
    final = None
    async for output in engine.generate(prompt, SamplingParams(temperature=0.8, top_p=0.95, max_tokens=16),
                                        request_id):
        final = output
    return final.outputs[0].text


async def main() -> None:
    prompts = ["Hello, my name is", "The capital of France is", "The future of AI is",
               "Once upon a time", "In a galaxy far away"]
    texts = await asyncio.gather(*(generate(p) for p in prompts))
    for prompt, text in zip(prompts, texts):
        print(repr(prompt), "->", repr(text))


asyncio.run(main())
'''


@pytest.fixture(scope="module")
def engine(tiny_llama):
    eng = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(model=str(tiny_llama), device="cpu", block_size=8,
                                                          max_num_seqs=8))
    yield eng
    eng.shutdown_background_loop()


def test_the_seed_example_runs_as_written(tiny_llama, tmp_path):
    script = tmp_path / "example.py"
    script.write_text(f"MODEL = {str(tiny_llama)!r}\n" + textwrap.dedent(SEED_EXAMPLE))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=ROOT, timeout=240,
                         env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 5 and all(" -> " in line for line in lines), out.stdout


def test_concurrent_generates_are_cumulative_and_equal_the_offline_api(engine, tiny_llama):
    prompts = ["Once upon a time", "Hello there", [5, 6, 7, 8], "The cat", {"prompt_token_ids": [9, 10, 11]}]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)

    async def one(prompt):
        seen = []
        async for out in engine.generate(prompt, params, random_uuid()):
            seen.append(out)
        return seen

    async def main():
        return await asyncio.gather(*(one(p) for p in prompts))

    steps_before = engine.engine.stats.num_steps
    runs = asyncio.run(main())
    steps = engine.engine.stats.num_steps - steps_before
    offline = LLM(str(tiny_llama), device="cpu", block_size=8).generate(prompts, params)
    for seen, want in zip(runs, offline):
        assert [o.finished for o in seen] == [False] * (len(seen) - 1) + [True]
        texts = [o.outputs[0].text for o in seen]
        ids = [o.outputs[0].token_ids for o in seen]
        assert all(b.startswith(a) for a, b in zip(texts, texts[1:])), texts  # cumulative, as vLLM's
        assert all(b[:len(a)] == a for a, b in zip(ids, ids[1:]))
        assert ids[-1] == want.outputs[0].token_ids and texts[-1] == want.outputs[0].text
        assert seen[-1].outputs[0].finish_reason == "length" and seen[-1].prompt_token_ids == want.prompt_token_ids
    assert steps < 5 * 12  # the five requests shared engine steps


def test_a_live_request_id_is_refused_and_free_again_once_finished(engine):
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)

    async def main():
        first = engine.generate("Once upon a time", params, "same-id")
        out = await first.__anext__()
        with pytest.raises(ValueError, match="already live"):
            async for _ in engine.generate("Something else", params, "same-id"):
                pass
        async for out in first:
            pass
        assert out.finished
        again = [o async for o in engine.generate("Another", SamplingParams(max_tokens=2), "same-id")]
        return out, again

    out, again = asyncio.run(main())
    assert len(out.outputs[0].token_ids) == 40 and again[-1].finished and again[-1].request_id == "same-id"


def test_closing_a_generator_aborts_its_request_and_frees_the_cache(engine):
    async def main():
        gen = engine.generate("Once upon a time", SamplingParams(max_tokens=400, ignore_eos=True), "left")
        await gen.__anext__()
        await gen.aclose()  # what a disconnected HTTP client's handler does
        for _ in range(200):
            if not engine.engine.requests:
                return True
            await asyncio.sleep(0.01)
        return False

    assert asyncio.run(main())
    assert engine.engine.kv_cache_usage() == 0.0


def test_abort_and_request_errors_reach_the_caller(engine):
    async def main():
        outs = []
        gen = engine.generate("Once upon a time", SamplingParams(max_tokens=400, ignore_eos=True), "to-abort")
        async for out in gen:
            outs.append(out)
            if len(outs) == 2:
                await engine.abort("to-abort")
        with pytest.raises(ValueError, match="logit_bias"):
            async for _ in engine.generate("x", SamplingParams(logit_bias={10**6: 1.0}), random_uuid()):
                pass
        too_long = [o async for o in engine.generate([5] * 300, SamplingParams(max_tokens=400), random_uuid())]
        return outs, too_long

    outs, too_long = asyncio.run(main())
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort" and len(outs) < 50
    assert too_long[-1].finished and too_long[-1].outputs[0].finish_reason == "error" and too_long[-1].error


def test_engine_args_name_unknown_options():
    with pytest.raises(TypeError, match="unknown engine option"):
        AsyncEngineArgs(model="/nowhere", max_model_length=5)
    with pytest.raises(TypeError, match="tensor_parallel_size"):
        AsyncEngineArgs(model="/nowhere", tensor_parallel_size=2)
    args = AsyncEngineArgs(model="/nowhere", max_model_len=128, disable_log_requests=True)
    assert args.max_model_len == 128 and args.create_engine_config().max_model_len == 128
