"""Offline throughput: spool's LLM.generate on a workload, optionally beside transformers' generate_batch.

  python bench/throughput.py --shape llama3-8b --num-requests 512 --prompt-len 128 1024 --output-len 256 256 --peer
  python bench/throughput.py --model /path/to/hf_dir ...
  python bench/throughput.py --shape llama3-8b ... --quantization fp8 [--kv-cache-dtype fp8] [--engine-arg KEY=VALUE]
  python bench/throughput.py --shape llama3-8b ... --structured one|distinct   (a JSON schema on every request)
  python bench/throughput.py --shape llama3-8b ... --tokenizer-file .vocab/llama3.tiktoken [--structured one]
      (Llama 3's real vocabulary instead of the synthetic one: bench/tiktoken_tokenizer.py says where to get it)
  python bench/throughput.py --shape llama3-8b ... --tensor-parallel-size 2   (sharded over cuda:0 and cuda:1)
Reports requests/s, output tokens/s and total tokens/s; --json writes them to a file, with `jit_compiles_in_run`:
the Triton kernels compiled inside the timed run (spool/testing/jit_watch.py), which should be none.
--timeline also times every step of the run (bench/step_timeline.py) and prints the run's seconds by step kind:
mixed steps and decode-only steps by batch size (the JSON adds the per-step lists).
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.shapes import add_model_flags, model_source  # noqa: E402
from bench.workload import (  # noqa: E402
    Workload,
    add_engine_flags,
    add_workload_flags,
    async_scheduling,
    integer_array_schema,
    make_workload,
)
from bench.step_timeline import StepTimeline, format_groups  # noqa: E402
from spool.testing.jit_watch import jit_compiles  # noqa: E402


def run_spool(path: Path, load_format: str, wl: Workload, args) -> dict:
    """Time LLM.generate over the whole workload (after a short warm-up)."""
    from spool.engine import SamplingParams

    t0 = time.perf_counter()
    llm = build_llm(path, load_format, args)
    load_s = time.perf_counter() - t0
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, structured_outputs=_schema(args, i))
              for i, n in enumerate(wl.output_lens)]
    llm.generate([{"prompt_token_ids": p[:64]} for p in wl.prompts[:8]],
                 [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in wl.output_lens[:8]])  # warm-up
    compile_s = _time_first_compile(llm, args) if args.structured != "none" else None
    llm.engine.block_manager.reset_prefix_cache()
    steps_before = llm.engine.stats.num_steps  # the warm-up's steps are not the workload's
    timeline = StepTimeline().attach(llm.engine) if args.timeline else None
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    if timeline is not None:
        timeline.start()
    with jit_compiles() as compiled:  # a compile inside the clock is a bench (or engine) defect: reported
        outs = llm.generate([{"prompt_token_ids": p} for p in wl.prompts], params)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    if compiled:
        print(f"warning: {len(compiled)} Triton kernel compiles inside the timed run: {sorted(set(compiled))}")
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    reasons: dict[str, int] = {}
    for o in outs:
        reasons[str(o.outputs[0].finish_reason)] = reasons.get(str(o.outputs[0].finish_reason), 0) + 1
    if args.structured != "none" or out_tokens != sum(wl.output_lens):
        print(f"finish reasons {reasons}; first error: {next((o.error for o in outs if o.error), None)}")
    if args.structured == "none":
        assert out_tokens == sum(wl.output_lens), "spool generated a different number of tokens than asked"
    eng = llm.engine
    res = _summary("spool", wall, len(outs), wl.prompt_tokens, out_tokens)
    res.update(load_s=round(load_s, 1), kv_blocks=eng.block_manager.num_blocks,
               kv_cache_dtype=str(eng.runner.kv_cache_dtype).removeprefix("torch."),
               preemptions=eng.scheduler.num_preemptions,
               steps=eng.stats.num_steps - steps_before, prefix_hit_rate=round(eng.block_manager.stats.hit_rate, 3),
               structured=args.structured, first_compile_s=compile_s, finish_reasons=reasons,
               tokenizer=_tokenizer_label(args),
               kv_tokens=eng.block_manager.num_blocks * eng.runner.block_size, engine_args=_extra_engine_kwargs(args),
               tensor_parallel_size=args.tensor_parallel_size, jit_compiles_in_run=compiled,
               piecewise_graph_tokens=eng.runner.piecewise_graph_tokens)
    if timeline is not None:
        res["timeline"] = timeline.to_json()
        print(format_groups(res["timeline"]["groups"]), flush=True)
    eng.shutdown()  # tensor parallel: stop the other ranks before the peer needs their GPUs' memory
    del llm, eng, outs
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return res


def build_llm(path: Path, load_format: str, args):
    """The engine as the command line describes it (throughput.py's engine flags)."""
    from spool.engine import LLM

    kw = dict(device=args.device, dtype=args.dtype, load_format=load_format, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=not args.no_prefix_caching,
              enforce_eager=args.enforce_eager, gpu_memory_utilization=args.gpu_memory_utilization,
              max_model_len=args.max_model_len, tensor_parallel_size=args.tensor_parallel_size,
              async_scheduling=async_scheduling(args))
    kw.update(_extra_engine_kwargs(args))
    return LLM(str(path), **kw)


def _tokenizer_label(args) -> str:
    """Which vocabulary the run detokenized with: the checkpoint's, a rank file's, the synthetic one, or none."""
    if args.model:
        return "checkpoint"
    if args.tokenizer_file is not None:
        return f"tiktoken:{args.tokenizer_file.name}"
    return "synthetic" if args.with_tokenizer or args.structured != "none" else "none"


def _extra_engine_kwargs(args) -> dict:
    """--quantization, --kv-cache-dtype (when given), each --engine-arg KEY=VALUE (VALUE read as JSON if it parses)."""
    kw = {}
    if args.quantization is not None:
        kw["quantization"] = args.quantization
    if args.kv_cache_dtype is not None:
        kw["kv_cache_dtype"] = args.kv_cache_dtype
    for item in args.engine_arg:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--engine-arg wants KEY=VALUE, got {item!r}")
        try:
            kw[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            kw[key.replace("-", "_")] = value
    return kw


def _schema(args, i: int):
    """A JSON schema that cannot end before max_tokens (>= 256 array items), one for all or one per request."""
    if args.structured == "none":
        return None
    from spool.engine import StructuredOutputsParams

    return StructuredOutputsParams(json=integer_array_schema("items" if args.structured == "one" else f"items_{i}"))


def _time_first_compile(llm, args) -> float:
    """Seconds of one request with a schema nobody compiled yet (compile + a 1-token generation)."""
    from spool.engine import SamplingParams, StructuredOutputsParams

    fresh = StructuredOutputsParams(json={"type": "object", "required": ["probe"],
                                          "properties": {"probe": {"type": "array", "items": {"type": "integer"}}}})
    t0 = time.perf_counter()
    llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=1, structured_outputs=fresh))
    return round(time.perf_counter() - t0, 3)


def run_peer(path: Path, load_format: str, wl: Workload, args) -> dict:
    """The same workload through transformers' continuous batching (generate_batch) on the same card."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    dtype = getattr(torch, args.dtype if args.dtype != "auto" else "bfloat16")
    if load_format == "dummy":
        cfg = AutoConfig.from_pretrained(str(path))
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, device_map="cuda", attn_implementation="sdpa")
    model.eval()
    if len(set(wl.output_lens)) != 1:
        print("peer: generate_batch takes one max_new_tokens; using the workload's mean output length", file=sys.stderr)
    n_out = round(sum(wl.output_lens) / len(wl.output_lens))
    gen = GenerationConfig(max_new_tokens=n_out, min_new_tokens=n_out, do_sample=False, eos_token_id=None,
                           pad_token_id=0)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    # generate_batch manages its own inference mode; wrapping it in ours breaks its static buffers.
    out = model.generate_batch(inputs=wl.prompts, generation_config=gen, progress_bar=False)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    out_tokens = sum(len(o.generated_tokens) for o in out.values())
    return _summary("transformers generate_batch", wall, len(out), wl.prompt_tokens, out_tokens)


def _summary(name: str, wall: float, n: int, prompt_tokens: int, out_tokens: int) -> dict:
    return {"engine": name, "wall_s": round(wall, 2), "requests": n, "requests_per_s": round(n / wall, 2),
            "output_tokens": out_tokens, "output_tok_per_s": round(out_tokens / wall, 1),
            "total_tok_per_s": round((prompt_tokens + out_tokens) / wall, 1)}


def add_bench_engine_flags(p: argparse.ArgumentParser) -> None:
    """Everything build_llm and make_workload read: the model, the workload and the engine's options."""
    add_model_flags(p)
    add_workload_flags(p)
    add_engine_flags(p)
    add_throughput_engine_flags(p)


def add_throughput_engine_flags(p: argparse.ArgumentParser) -> None:
    """The engine options build_llm reads, beyond bench.workload's add_engine_flags."""
    p.add_argument("--dtype", default="auto")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.90)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="shard the model over this many GPUs")
    p.add_argument("--quantization", choices=["fp8"], help="FP8 weights (dummy weights are quantized at load)")
    p.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], help="KV cache element type (engine's kv_cache_dtype)")
    p.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="any other EngineConfig field, e.g. --engine-arg block_size=32 (repeatable)")


def _store_fp8_v_keys_fastest() -> None:
    """The engine allocates its caches through spool.engine.model_runner.allocate_kv_cache: store fp8 V keys-fastest."""
    import functools

    import spool.engine.model_runner as mr

    mr.allocate_kv_cache = functools.partial(mr.allocate_kv_cache, v_keys_fastest=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_engine_flags(p)
    p.add_argument("--peer", action="store_true", help="also run transformers generate_batch and print the ratio")
    p.add_argument("--peer-only", action="store_true", help="run only the transformers peer")
    p.add_argument("--json", type=Path, help="write results here")
    p.add_argument("--timeline", action="store_true",
                   help="time every step of spool's run and report the wall by step kind and batch size "
                        "(bench/step_timeline.py)")
    p.add_argument("--with-tokenizer", action="store_true",
                   help="give a --shape a tokenizer of its vocabulary (implied by --structured and "
                        "--tokenizer-file; synthetic unless --tokenizer-file): outputs are detokenized, as in a real "
                        "deployment")
    p.add_argument("--structured", choices=["none", "one", "distinct"], default="none",
                   help="a JSON schema on every request: the same one, or one per request (compiled each)")
    p.add_argument("--fp8-v-keys-fastest", action="store_true",
                   help="A/B only: store an fp8 V cache keys-fastest (spool.kernels.kv_layout) instead of row-major")
    args = p.parse_args()
    if args.fp8_v_keys_fastest:
        _store_fp8_v_keys_fastest()
    # the engine's start-up lines: KV cache size, graph captures, the piecewise graphs' host/GPU measurement
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    with_tokenizer = args.with_tokenizer or args.structured != "none" or args.tokenizer_file is not None
    path, load_format = model_source(args, with_tokenizer)
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    wl = make_workload(args, vocab)
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"device: {dev}; model: {args.model or args.shape}; {len(wl.prompts)} requests, "
          f"{wl.prompt_tokens} prompt tokens, {sum(wl.output_lens)} output tokens", flush=True)
    results = [] if args.peer_only else [run_spool(path, load_format, wl, args)]
    if results:
        print(json.dumps({k: v for k, v in results[0].items() if k != "timeline"}), flush=True)
    if args.peer or args.peer_only:
        results.append(run_peer(path, load_format, wl, args))
        print(json.dumps(results[-1]), flush=True)
        if len(results) == 2 and results[1]["output_tok_per_s"] > 0:
            ratio = results[0]["output_tok_per_s"] / results[1]["output_tok_per_s"]
            print(f"spool / transformers output tok/s: {ratio:.1f}x")
    if args.json:
        args.json.write_text(json.dumps({"device": dev, "args": {k: str(v) for k, v in vars(args).items()},
                                         "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
