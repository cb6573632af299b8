"""Named model shapes for benchmarks with dummy weights: a config.json written to a temp dir, no checkpoint."""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

# What Llama 3's configs share; the sizes below differ.
_LLAMA3 = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_key_value_heads": 8, "vocab_size": 128256,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 128000, "eos_token_id": 128001,
}

SHAPES = {
    "llama3-8b": {**_LLAMA3, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                  "num_attention_heads": 32},
    # Issue 16's tensor-parallel shape (Llama-3-70B's config): 2 x H200 at tp=2, ~70 GB of bf16 weights per GPU.
    "llama3-70b": {**_LLAMA3, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                   "num_attention_heads": 64},
    "qwen3-0.6b": {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 1024,
        "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
        "head_dim": 128, "vocab_size": 151936, "max_position_embeddings": 40960, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "bos_token_id": 151643, "eos_token_id": 151645,
    },
}


def shape_dir(name: str, tokenizer: bool = False, tokenizer_file: Path | None = None) -> Path:
    """A directory holding config.json for a named shape (use with load_format='dummy').

    With `tokenizer`, also a tokenizer of the shape's vocabulary, for runs that need one: structured outputs,
    detokenized text. It is the real vocabulary of `tokenizer_file` (a tiktoken rank file such as Llama 3's
    tokenizer.model: bench/tiktoken_tokenizer.py, built once per file), else a synthetic byte-level BPE
    (bench/synthetic_tokenizer.py). Without, outputs are token ids only.
    """
    if name not in SHAPES:
        raise SystemExit(f"unknown shape {name!r}; known: {', '.join(SHAPES)}")
    d = Path(tempfile.mkdtemp(prefix=f"spool-{name}-"))
    cfg = SHAPES[name]
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    if tokenizer and tokenizer_file is not None:
        _real_tokenizer(d, name, Path(tokenizer_file))
    elif tokenizer:
        from bench.synthetic_tokenizer import build_synthetic_tokenizer

        build_synthetic_tokenizer(d, cfg["vocab_size"], cfg["bos_token_id"], cfg["eos_token_id"])
    return d


def _real_tokenizer(d: Path, name: str, rank_file: Path) -> None:
    """Copy rank_file's tokenizer into d, if its vocabulary and bos/eos ids are the shape's."""
    from bench.tiktoken_tokenizer import LLAMA3_SPECIALS, read_ranks

    if not rank_file.is_file():
        raise SystemExit(f"--tokenizer-file {rank_file}: no such file (Llama 3's is tokenizer.model from "
                         "github.com/meta-llama/llama-models, models/llama3/: see bench/tiktoken_tokenizer.py)")
    cfg = SHAPES[name]
    base = len(read_ranks(rank_file))
    have = (base + len(LLAMA3_SPECIALS), base, base + 1)
    want = (cfg["vocab_size"], cfg["bos_token_id"], cfg["eos_token_id"])
    if have != want:
        raise SystemExit(f"--tokenizer-file {rank_file} gives vocab/bos/eos {have}; shape {name} has {want}")
    from bench.tiktoken_tokenizer import copy_tokenizer

    copy_tokenizer(rank_file, d)


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """--model DIR or --shape NAME, one of them required."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path, help="HF model directory")
    src.add_argument("--shape", choices=sorted(SHAPES), help="named shape with dummy weights")
    p.add_argument("--tokenizer-file", type=Path, metavar="PATH",
                   help="with --shape: the real vocabulary from this tiktoken rank file (Llama 3's tokenizer.model, "
                        "e.g. .vocab/llama3.tiktoken) instead of a synthetic one; implies a tokenizer")


def model_source(args: argparse.Namespace, tokenizer: bool = False) -> tuple[Path, str]:
    """(directory, load_format): the --model checkpoint, or a --shape directory for dummy weights."""
    tokenizer_file = getattr(args, "tokenizer_file", None)
    if args.model:
        if tokenizer_file is not None:
            raise SystemExit("--tokenizer-file goes with --shape (a --model directory has its own tokenizer)")
        return Path(args.model), "auto"
    return shape_dir(args.shape, tokenizer or tokenizer_file is not None, tokenizer_file), "dummy"
