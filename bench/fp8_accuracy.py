"""FP8 weights vs bf16 on one shape with dummy weights: logits error and greedy agreement (GPU).

  python bench/fp8_accuracy.py --shape llama3-8b --prompts 32 --steps 64 --json out.json

Three engines run one after another on the same random weights (std 0.02, the bf16 draw of load_format=dummy):
bf16, fp8 (quantization="fp8": those bf16 weights quantized per output channel at load, activations per
token), and fp32 with the bf16 weights upcast, the truth both are measured against. Reports, over M random
prompts: ||logits - ref|| / ||ref|| of the last prompt token (fp8 vs bf16, fp8 vs fp32, bf16 vs fp32), top-1
agreement, and greedy agreement over N steps (prompts whose N tokens all match, mean matching prefix).
Random weights give flatter logits than a trained model, so greedy agreement here is a pessimistic figure;
bf16 vs fp32 is printed beside it as the yardstick.
"""
from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.shapes import SHAPES, shape_dir  # noqa: E402
from spool.engine import LLM, SamplingParams  # noqa: E402


def last_logits(llm: LLM, prompts: list[list[int]], batch: int = 8) -> torch.Tensor:
    """Last-token logits [len(prompts), vocab] (float32, on the CPU), from prefill steps of `batch` prompts."""
    r = llm.engine.runner
    out = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        tables, start = [], 0
        for p in chunk:
            n = -(-len(p) // r.block_size)
            tables.append(list(range(start, start + n)))
            start += n
        meta = r._metadata(chunk, [0] * len(chunk), tables, list(range(len(chunk))))
        with torch.inference_mode():
            out.append(r.model.compute_logits(r.model(meta, r.kv_caches, r.cos_sin)[meta.logits_indices]).float().cpu())
    return torch.cat(out)


def greedy(llm: LLM, prompts: list[list[int]], steps: int) -> list[list[int]]:
    """N greedy tokens for each prompt."""
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True))
    return [o.outputs[0].token_ids for o in outs]


def run(path: Path, args, **kw) -> tuple[LLM, torch.Tensor, list[list[int]], float]:
    """Build an engine, measure its logits and greedy tokens; returns (llm, logits, tokens, load seconds)."""
    t0 = time.perf_counter()
    llm = LLM(str(path), device=args.device, load_format="dummy", num_kv_blocks=args.num_kv_blocks,
              max_model_len=args.max_model_len, max_num_seqs=args.prompts, **kw)
    load_s = time.perf_counter() - t0
    return llm, last_logits(llm, args.prompt_ids), greedy(llm, args.prompt_ids, args.steps), load_s


def free(llm: LLM) -> None:
    """Give the engine's GPU memory back before the next one starts."""
    del llm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def compare(a: torch.Tensor, ta: list[list[int]], b: torch.Tensor, tb: list[list[int]]) -> dict:
    """Logits error of a against reference b, top-1 and greedy agreement."""
    per_prompt = ((a - b).norm(dim=-1) / b.norm(dim=-1)).tolist()
    prefix = []
    for x, y in zip(ta, tb):
        n = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
        prefix.append(n)
    steps = len(tb[0])
    return {"logits_rel_err": round(((a - b).norm() / b.norm()).item(), 5),
            "logits_rel_err_max_prompt": round(max(per_prompt), 5),
            "top1_agreement": round((a.argmax(-1) == b.argmax(-1)).float().mean().item(), 4),
            "greedy_all_steps_equal": round(sum(n == steps for n in prefix) / len(prefix), 4),
            "greedy_mean_matching_prefix": round(sum(prefix) / len(prefix), 2),
            "greedy_token_agreement": round(sum(u == v for x, y in zip(ta, tb) for u, v in zip(x, y))
                                            / sum(map(len, tb)), 4)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    p.add_argument("--prompts", type=int, default=32, help="M prompts")
    p.add_argument("--steps", type=int, default=64, help="N greedy steps")
    p.add_argument("--prompt-len", type=int, nargs=2, default=(64, 512), metavar=("MIN", "MAX"))
    p.add_argument("--num-kv-blocks", type=int, default=4096)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-fp32", action="store_true", help="skip the fp32 truth run")
    p.add_argument("--device", default="cuda", help="cuda (the measurement); cpu only smoke-tests the script")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("fp8_accuracy.py needs a CUDA GPU (FP8 tensor cores: compute capability >= 8.9)")
    path = shape_dir(args.shape)
    vocab = SHAPES[args.shape]["vocab_size"]
    rng = random.Random(args.seed)
    args.prompt_ids = [[rng.randrange(100, vocab - 100) for _ in range(rng.randint(*args.prompt_len))]
                       for _ in range(args.prompts)]
    dev = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"device: {dev}; shape {args.shape}; {args.prompts} prompts, {args.steps} greedy steps", flush=True)

    llm, bf16, bf16_tokens, bf16_load = run(path, args, dtype="bfloat16")
    weights = {n: t.detach().cpu() for n, t in llm.engine.runner.model.state_dict().items()}
    free(llm)
    llm, fp8, fp8_tokens, fp8_load = run(path, args, dtype="bfloat16", quantization="fp8")
    fp8_bytes = sum(t.numel() * t.element_size() for t in llm.engine.runner.model.state_dict().values())
    free(llm)
    result = {"device": dev, "shape": args.shape, "prompts": args.prompts, "steps": args.steps,
              "load_s": {"bf16": round(bf16_load, 1), "fp8": round(fp8_load, 1)},
              "weight_gib": {"bf16": round(sum(t.numel() * t.element_size() for t in weights.values()) / 2**30, 2),
                             "fp8": round(fp8_bytes / 2**30, 2)},
              "fp8_vs_bf16": compare(fp8, fp8_tokens, bf16, bf16_tokens)}
    print("fp8 vs bf16:", json.dumps(result["fp8_vs_bf16"]), flush=True)
    if not args.no_fp32:
        t0 = time.perf_counter()
        llm = LLM(str(path), device=args.device, load_format="dummy", dtype="float32", num_kv_blocks=args.num_kv_blocks,
                  max_model_len=args.max_model_len, max_num_seqs=args.prompts)
        with torch.no_grad():
            for name, param in llm.engine.runner.model.named_parameters():
                param.copy_(weights[name])  # the bf16 weights, upcast: both runs are measured against their exact math
        del weights
        fp32, fp32_tokens = last_logits(llm, args.prompt_ids), greedy(llm, args.prompt_ids, args.steps)
        free(llm)
        result["fp32_load_s"] = round(time.perf_counter() - t0, 1)
        result["fp8_vs_fp32"] = compare(fp8, fp8_tokens, fp32, fp32_tokens)
        result["bf16_vs_fp32"] = compare(bf16, bf16_tokens, fp32, fp32_tokens)
        print("fp8 vs fp32:", json.dumps(result["fp8_vs_fp32"]), flush=True)
        print("bf16 vs fp32:", json.dumps(result["bf16_vs_fp32"]), flush=True)
    print(json.dumps(result), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
