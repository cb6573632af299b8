"""Synthetic workloads shared by the benchmarks: random prompt ids, optional shared prefix, output lengths."""
from __future__ import annotations

import argparse
import random
from dataclasses import dataclass


@dataclass(slots=True)
class Workload:
    """Prompts (token ids) and the number of tokens to generate for each."""

    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def prompt_tokens(self) -> int:
        """Total prompt tokens."""
        return sum(map(len, self.prompts))


def add_workload_flags(p: argparse.ArgumentParser) -> None:
    """--num-requests, --prompt-len MIN MAX, --output-len MIN MAX, --prefix-len, --seed."""
    p.add_argument("--num-requests", type=int, default=512)
    p.add_argument("--prompt-len", type=int, nargs=2, default=(128, 1024), metavar=("MIN", "MAX"))
    p.add_argument("--output-len", type=int, nargs=2, default=(256, 256), metavar=("MIN", "MAX"))
    p.add_argument("--prefix-len", type=int, default=0, help="tokens of one shared prefix before every prompt")
    p.add_argument("--seed", type=int, default=0)


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    """--device, --max-num-seqs, --max-num-batched-tokens, --max-model-len; defaults follow EngineConfig's."""
    from dataclasses import fields

    from spool.engine.config import EngineConfig

    default = {f.name: f.default for f in fields(EngineConfig)}
    p.add_argument("--device", default="auto")
    p.add_argument("--max-num-seqs", type=int, default=default["max_num_seqs"])
    p.add_argument("--max-num-batched-tokens", type=int, default=default["max_num_batched_tokens"])
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--async-scheduling", choices=("auto", "on", "off"), default="auto",
                   help="the engine's async scheduling (auto: on for CUDA)")


def async_scheduling(args: argparse.Namespace) -> bool | None:
    """EngineConfig.async_scheduling from --async-scheduling."""
    return {"auto": None, "on": True, "off": False}[args.async_scheduling]


def make_workload(args: argparse.Namespace, vocab_size: int) -> Workload:
    """Uniform prompt and output lengths in the given ranges; token ids avoid the first/last 100 (specials)."""
    rng = random.Random(args.seed)
    lo, hi = 100, vocab_size - 100
    prefix = [rng.randrange(lo, hi) for _ in range(args.prefix_len)]
    prompts, outs = [], []
    for _ in range(args.num_requests):
        n = rng.randint(*args.prompt_len)
        prompts.append(prefix + [rng.randrange(lo, hi) for _ in range(n)])
        outs.append(rng.randint(*args.output_len))
    return Workload(prompts, outs)


def integer_array_schema(key: str = "items") -> dict:
    """The structured benchmarks' JSON schema: an object whose `key` holds >= 256 integers 0-999 (so an output
    cannot end before 256 tokens)."""
    return {"type": "object", "required": [key],
            "properties": {key: {"type": "array", "minItems": 256,
                                 "items": {"type": "integer", "minimum": 0, "maximum": 999}}}}
