"""Diagnose bf16 logits agreement with transformers on the llama3-8b shape, by depth.

For each depth: one random model (std 0.02), transformers in bf16 and fp32 (truth) and spool in bf16 on the
same weights; prints ||a-b||/||b|| for spool-vs-hf16, spool-vs-hf32 and hf16-vs-hf32.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from bench.shapes import SHAPES, shape_dir  # noqa: E402
from engine import LLM  # noqa: E402
from engine.models.loader import load_named_tensors  # noqa: E402


def rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def main() -> None:
    ids = list(range(1000, 1200))
    for layers in (1, 4, 16, 32):
        path = shape_dir("llama3-8b")
        cfg_d = dict(SHAPES["llama3-8b"], num_hidden_layers=layers)
        (path / "config.json").write_text(json.dumps(cfg_d))
        cfg = AutoConfig.from_pretrained(str(path))
        torch.manual_seed(0)
        with torch.device("cuda"):
            hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
        with torch.no_grad():
            for p in hf.parameters():
                if p.dim() > 1:
                    p.normal_(0, 0.02)
        x = torch.tensor([ids], device="cuda")
        with torch.no_grad():
            ref16 = hf(x).logits[0, -1].float()
            hf32 = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).cuda().eval()
            hf32.load_state_dict({k: v.float() for k, v in hf.state_dict().items()})
            ref32 = hf32(x).logits[0, -1].float()
            del hf32
        for backend in ("triton", "torch"):
            llm = LLM(str(path), device="cuda", dtype="bfloat16", load_format="dummy", num_kv_blocks=64,
                      max_model_len=1024, enforce_eager=True, kernel_backend=backend)
            load_named_tensors(llm.engine.runner.model, hf.state_dict().items(), torch.bfloat16, "hf")
            r = llm.engine.runner
            meta = r._metadata([ids], [0], [list(range(13))], [0])
            with torch.inference_mode():
                ours = r.model.compute_logits(r.model(meta, r.kv_caches, r.cos_sin)[meta.logits_indices])[0]
            print(f"layers={layers:2d} {backend:6s} spool-vs-hf16={rel(ours, ref16):.4f} "
                  f"spool-vs-hf32={rel(ours, ref32):.4f} hf16-vs-hf32={rel(ref16, ref32):.4f}", flush=True)
            del llm, r
            torch.cuda.empty_cache()
        del hf
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
