"""Diagnose bf16 logits agreement with transformers on the llama3-8b shape, by depth.

For each depth: one random model (std 0.02), transformers in bf16 and fp32 (truth) and spool in bf16 on the
same weights (Triton and torch backends with a bf16 KV cache, Triton with an fp8 one); prints ||a-b||/||b||
for spool-vs-hf16, spool-vs-hf32 and hf16-vs-hf32.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from bench.shapes import SHAPES, shape_dir  # noqa: E402
from spool.engine import LLM, SamplingParams  # noqa: E402
from spool.engine.models.loader import load_named_tensors  # noqa: E402


def rel(a, b) -> float:
    """||a - b|| / ||b||."""
    return ((a - b).norm() / b.norm()).item()


def random_model(path: Path, device: str = "cuda", seed: int = 0):
    """A bf16 transformers model for path/config.json, its matrices random (std 0.02), norms as initialised."""
    cfg = AutoConfig.from_pretrained(str(path))
    torch.manual_seed(seed)
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.02)
    return hf


def hf_reference(path: Path, ids: list[int]):
    """A random (std 0.02) transformers model from path/config.json: (bf16 model, bf16 logits, fp32 logits)."""
    hf = random_model(path)
    with torch.no_grad():
        x = torch.tensor([ids], device="cuda")
        ref16 = hf(x).logits[0, -1].float()
        with torch.device("cuda"):
            hf32 = AutoModelForCausalLM.from_config(hf.config, dtype=torch.float32).eval()
        hf32.load_state_dict({k: v.float() for k, v in hf.state_dict().items()})
        ref32 = hf32(x).logits[0, -1].float()
    del hf32
    torch.cuda.empty_cache()
    return hf, ref16, ref32


def spool_logits(path: Path, hf, ids: list[int], backend: str = "auto", kv_cache_dtype: str = "auto") -> torch.Tensor:
    """spool's bf16 last-token logits with the transformers model's weights (KV cache in bf16 or fp8, scale 1.0)."""
    llm = LLM(str(path), device="cuda", dtype="bfloat16", load_format="dummy", num_kv_blocks=64,
              max_model_len=1024, enforce_eager=True, kernel_backend=backend, kv_cache_dtype=kv_cache_dtype)
    load_named_tensors(llm.engine.runner.model, hf.state_dict().items(), torch.bfloat16, "transformers model")
    r = llm.engine.runner
    meta = r._metadata([ids], [0], [list(range(-(-len(ids) // r.block_size)))], [0])
    with torch.inference_mode():
        out = r.model.compute_logits(r.model(meta, r.kv_caches, r.cos_sin)[meta.logits_indices])[0].float()
    del llm, r
    torch.cuda.empty_cache()
    return out


def random_checkpoint(path: Path, device: str = "cuda", seed: int = 0) -> Path:
    """random_model's weights for the config.json in `path`, saved there by transformers as a bf16 safetensors
    checkpoint (llama3-8b: ~16 GB), for engines that load their weights from disk."""
    hf = random_model(path, device, seed)
    hf.save_pretrained(str(path), safe_serialization=True)
    del hf
    return path


def checkpoint_logits(path: Path, prompts: list[list[int]], device: str = "cuda") -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' last-token logits [prompts, vocab] for the checkpoint at `path`, in bf16 and in fp32 (truth)."""
    out = []
    for dtype in (torch.bfloat16, torch.float32):
        hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()
        with torch.no_grad():
            out.append(torch.stack([hf(torch.tensor([p], device=device)).logits[0, -1].float() for p in prompts]))
        del hf
    return out[0], out[1]


def engine_logits(path: Path, prompts: list[list[int]], tensor_parallel_size: int = 1, device: str = "cuda",
                  dtype: str = "bfloat16", **kw) -> torch.Tensor:
    """spool's last-token logits [prompts, vocab] (as fp32) for the checkpoint at `path`, at any
    tensor_parallel_size: the engine prefills each prompt in turn and samples one token, and the logits are taken
    where rank 0 computes them (every rank's vocabulary shard gathered), in eager mode. Unlike spool_logits the
    weights come from the checkpoint, so every rank loads its own slices as in production."""
    llm = LLM(str(path), device=device, dtype=dtype, tensor_parallel_size=tensor_parallel_size, enforce_eager=True,
              **kw)
    try:
        runner = llm.engine.runner
        model = (runner.runner if tensor_parallel_size > 1 else runner).model  # rank 0's, in this process
        inner, seen = model.compute_logits, []

        def capture(hidden: torch.Tensor):
            logits = inner(hidden)
            seen.append(logits[0].float().clone())
            return logits

        model.compute_logits = capture
        rows = []
        for p in prompts:
            seen.clear()
            llm.generate([{"prompt_token_ids": p}], SamplingParams(temperature=0, max_tokens=1))
            rows.append(seen[-1][: llm.engine.model_cfg.vocab_size])  # the prompt's last chunk
        return torch.stack(rows)
    finally:
        llm.engine.shutdown()


def main() -> None:
    ids = list(range(1000, 1200))
    for layers in (1, 4, 16, 32):
        path = shape_dir("llama3-8b")
        (path / "config.json").write_text(json.dumps(dict(SHAPES["llama3-8b"], num_hidden_layers=layers)))
        hf, ref16, ref32 = hf_reference(path, ids)
        for backend, kv in (("triton", "auto"), ("torch", "auto"), ("triton", "fp8")):
            ours = spool_logits(path, hf, ids, backend, kv)
            print(f"layers={layers:2d} {backend:6s} kv={kv:4s} spool-vs-hf16={rel(ours, ref16):.4f} "
                  f"spool-vs-hf32={rel(ours, ref32):.4f} hf16-vs-hf32={rel(ref16, ref32):.4f}", flush=True)
        del hf
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
