"""Piecewise graphs (spool/engine/piecewise_graphs.py) on the CPU, where the segments run without capture: the same
static buffers, padding to a bucket and eager attention between segments as on CUDA. The segmented forward must
equal the model's own forward, hidden states and KV cache writes both, for steps of every kind."""
from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from spool.engine.config import ConfigError, EngineConfig
from spool.engine.model_runner import ModelRunner, host_bound_tokens
from spool.engine.piecewise_graphs import PiecewiseGraphs, token_buckets


def test_token_buckets_pad_little():
    sizes = token_buckets(8192)
    assert sizes[:3] == [64, 128, 256] and sizes[-1] == 8192
    assert all(b > a for a, b in zip(sizes, sizes[1:]))
    assert all(b - a <= (256 if b <= 4096 else 512) for a, b in zip(sizes, sizes[1:]))
    assert token_buckets(100) == [64, 100]
    assert token_buckets(64) == [64]
    assert token_buckets(5000) == token_buckets(8192)[:token_buckets(8192).index(4608) + 1] + [5000]


def _llm(path):
    from spool.engine import LLM

    return LLM(str(path), device="cpu", dtype="float32", block_size=16, max_num_seqs=8, max_num_batched_tokens=300,
               num_kv_blocks=64)


def mixed_steps(rng: random.Random, block: int, num_blocks: int, scale: int = 1):
    """Mixed steps over random block tables: prompt chunks (some after a cached prefix) beside decode rows; prompt
    chunks of up to 60 * scale tokens."""
    blocks = list(range(num_blocks))
    for n_prompt, n_decode in ((1, 0), (2, 3), (1, 5), (3, 1), (0, 7), (1, 2)):
        rng.shuffle(blocks)
        chunks, starts, tables, used = [], [], [], 0
        for s in range(n_prompt + n_decode):
            start = rng.randrange(0, 40) if s >= n_prompt or rng.random() < 0.5 else 0
            qlen = 1 if s >= n_prompt else rng.randrange(2, 60 * scale)
            need = -(-(start + qlen) // block)
            tables.append(blocks[used:used + need])
            used += need
            chunks.append([rng.randrange(1, 200) for _ in range(qlen)])
            starts.append(start)
        yield chunks, starts, tables


@torch.inference_mode()
def assert_segmented_forward_equal(runner, pw: PiecewiseGraphs, steps, tol: float) -> set[int]:
    """Each step through pw.run gives the model's own hidden states and KV writes (from the same cache), and its
    padding rows write no KV. Returns the buckets the steps used."""
    seen = set()
    for chunks, starts, tables in steps:
        if sum(map(len, chunks)) > pw.max_tokens:
            continue
        meta = runner._metadata(chunks, starts, tables, list(range(len(chunks))))
        seen.add(next(s for s in pw.sizes if s >= meta.num_tokens))
        before = [(k.clone(), v.clone()) for k, v in runner.kv_caches]
        want = runner.model(meta, runner.kv_caches, runner.cos_sin)
        want_kv = [(k.clone(), v.clone()) for k, v in runner.kv_caches]
        for (k, v), (k0, v0) in zip(runner.kv_caches, before):  # back to the cache before the step
            k.copy_(k0)
            v.copy_(v0)
        got = pw.run(meta)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
        written = torch.zeros(runner.num_blocks * runner.block_size, dtype=torch.bool, device=got.device)
        written[meta.slot_mapping] = True
        for (k, v), (wk, wv), (k0, _) in zip(runner.kv_caches, want_kv, before):
            torch.testing.assert_close(k.float(), wk.float(), rtol=tol, atol=tol)
            torch.testing.assert_close(v.float(), wv.float(), rtol=tol, atol=tol)
            untouched = ~written.view(k.shape[:2])  # padding rows wrote nothing
            assert torch.equal(k[untouched], k0[untouched])
    return seen


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_segmented_forward_equals_the_model(model_factory, arch):
    llm = _llm(model_factory(arch, tie=arch == "qwen2"))
    runner = llm.engine.runner
    pw = PiecewiseGraphs(runner.model, runner.kv_caches, runner.cos_sin, 300, "cpu")
    assert pw.sizes == [64, 128, 256, 300]
    for k, v in runner.kv_caches:
        k.normal_(generator=torch.Generator().manual_seed(2))
        v.normal_(generator=torch.Generator().manual_seed(3))
    seen = assert_segmented_forward_equal(runner, pw, mixed_steps(random.Random(1), runner.block_size, 64), 1e-5)
    assert len(seen) >= 2  # steps padded into more than one bucket


def test_engine_with_piecewise_steps_generates_the_same(tiny_llama):
    """The runner sends steps with prompt tokens through PiecewiseGraphs when it has them: same tokens, with
    async scheduling's device-fed ids too."""
    from spool.engine import SamplingParams

    rng = random.Random(5)
    prompts = [{"prompt_token_ids": [rng.randrange(1, 300) for _ in range(rng.randrange(3, 120))]} for _ in range(10)]
    params = SamplingParams(temperature=0, max_tokens=9, ignore_eos=True)
    outs = []
    for piecewise in (False, True):
        llm = _llm(tiny_llama)
        runner = llm.engine.runner
        if piecewise:
            runner.piecewise = PiecewiseGraphs(runner.model, runner.kv_caches, runner.cos_sin, 300, "cpu")
            calls = []
            run = runner.piecewise.run
            runner.piecewise.run = lambda meta: calls.append(meta.num_tokens) or run(meta)
        outs.append([o.outputs[0].token_ids for o in llm.generate(prompts, params)])
    assert outs[0] == outs[1]
    assert calls and max(calls) > 1


def _runner_stub(setting, max_tokens=8192, tokens_measured=0):
    cfg = SimpleNamespace(piecewise_graph_tokens=setting)
    tp = SimpleNamespace(all_reduce_min=lambda v: v)
    return SimpleNamespace(config=cfg, tp=tp, _max_step_tokens=lambda: max_tokens,
                           _host_bound_tokens=lambda n, kv_caches: tokens_measured)


def test_piecewise_tokens_setting_and_measurement():
    assert ModelRunner._piecewise_tokens(_runner_stub(0), None) == 0
    assert ModelRunner._piecewise_tokens(_runner_stub(2048), None) == 2048
    assert ModelRunner._piecewise_tokens(_runner_stub(20000), None) == 8192  # never above a step's most tokens
    assert ModelRunner._piecewise_tokens(_runner_stub(None, tokens_measured=1500), None) == 1472  # on the 64 grid
    assert ModelRunner._piecewise_tokens(_runner_stub(1500), None) == 1500  # as set
    assert ModelRunner._piecewise_tokens(_runner_stub(None, tokens_measured=10**6), None) == 8192
    assert ModelRunner._piecewise_tokens(_runner_stub(None, tokens_measured=40), None) == 0  # below the smallest bucket


def test_negative_setting_is_a_config_error():
    with pytest.raises(ConfigError, match="piecewise_graph_tokens must be >= 0"):
        EngineConfig(model="m", piecewise_graph_tokens=-1).validate()


def test_no_memory_for_piecewise_graphs_means_eager_steps(monkeypatch, caplog):
    """An OOM while capturing them (a recapture, or a capture that needs more than the dry run measured) leaves
    those steps eager."""
    class _Graphs:
        def capture(self):
            raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    runner = SimpleNamespace(graphs=None, piecewise=_Graphs())
    ModelRunner.capture_graphs(runner)
    assert runner.piecewise is None
    assert "no memory left for the piecewise CUDA graphs" in caplog.text


def test_graph_memory_measured_by_a_dry_capture(monkeypatch, caplog):
    """_graph_bytes: what capturing every graph took off the device's free memory (the warm-ups' cache emptied
    first), the most over the ranks; piecewise graphs that do not fit are dropped (0 tokens), the decode graphs'
    memory still counted."""
    free = [10_000]
    emptied = []

    class _Graphs:
        def __init__(self, cost: int, oom: bool = False):
            self.cost, self.oom = cost, oom

        def capture(self):
            if self.oom:
                raise torch.OutOfMemoryError("CUDA out of memory")
            free[0] -= self.cost + 50  # the graph's pool, and 50 of warm-up activations the cache releases
            emptied.append(50)

    def empty_cache():
        free[0] += sum(emptied)
        emptied.clear()

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", empty_cache)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free[0], 20_000))

    def runner(piecewise_oom=False, other_rank_bytes=0):
        # Another rank that needed other_rank_bytes: _graph_bytes takes the most as -min(-bytes); the token
        # count (positive) is the same on both ranks.
        tp = SimpleNamespace(all_reduce_min=lambda v: min(v, -other_rank_bytes) if v < 0 else v)
        return SimpleNamespace(device="cuda", tp=tp, _make_graphs=lambda kv, tokens: (
            _Graphs(300), _Graphs(700, oom=piecewise_oom) if tokens else None))

    assert ModelRunner._graph_bytes(runner(), None, 1024) == (1024, 1000)
    assert ModelRunner._graph_bytes(runner(), None, 0) == (0, 300)
    assert ModelRunner._graph_bytes(runner(other_rank_bytes=5000), None, 1024) == (1024, 5000)
    assert ModelRunner._graph_bytes(runner(piecewise_oom=True), None, 1024) == (0, 300)
    assert "no memory left for the piecewise CUDA graphs" in caplog.text


def test_host_bound_tokens_from_the_median_host_time():
    assert host_bound_tokens(8192, [0.030, 0.011, 0.022], 0.022) == 8192  # median 22 ms: every size
    assert host_bound_tokens(8192, [0.022, 0.200, 0.021], 0.175) == int(8192 * 0.022 / 0.175)  # one slow sample
    assert host_bound_tokens(64, [0.01], 0.0) == 64


def test_start_up_measurement_runs_its_steps(tiny_llama, monkeypatch):
    """The measurement's own code on the CPU, with CUDA's timing calls stood in: three host samples, one GPU
    timing of 2 ms behind the sleep, no KV written."""
    class _Event:
        def __init__(self, enable_timing=False):
            pass

        def record(self):
            pass

        def elapsed_time(self, other):
            return 2.0

    for name, fake in (("synchronize", lambda device=None: None), ("_sleep", lambda cycles: None),
                       ("empty_cache", lambda: None), ("Event", _Event)):
        monkeypatch.setattr(torch.cuda, name, fake)
    llm = _llm(tiny_llama)
    runner = llm.engine.runner
    before = [k.clone() for k, _ in runner.kv_caches]
    seen = []
    monkeypatch.setattr("spool.engine.model_runner.host_bound_tokens",
                        lambda n, host, gpu: seen.append((n, host, gpu)) or 7)
    assert ModelRunner._host_bound_tokens(runner, 256, runner.kv_caches) == 7
    (n, host, gpu), = seen
    assert n == 256 and len(host) == 3 and all(h > 0 for h in host) and gpu == 0.002
    assert all(torch.equal(k, k0) for (k, _), k0 in zip(runner.kv_caches, before))
