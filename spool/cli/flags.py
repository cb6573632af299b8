"""CLI flags generated from config dataclasses, each defaulting to its SPOOL_<NAME> environment variable."""
from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

from spool.protocol.env import base_type, env_name, field_defaults

_HELP = {
    # engine (spool.engine.config.EngineConfig)
    "model": "path of a local Hugging Face model directory (config.json, *.safetensors, tokenizer files)",
    "tokenizer": "tokenizer directory, if not the model's",
    "device": "cpu | cuda | cuda:N | auto (CUDA when torch sees a GPU)",
    "dtype": "auto | float32 | bfloat16 | float16 (auto: the checkpoint's on CUDA, float32 on CPU)",
    "block_size": "tokens per KV cache block: 8 | 16 | 32 | 64 | 128",
    "num_kv_blocks": "KV cache blocks (default: sized from --gpu-memory-utilization or --cpu-kv-cache-bytes)",
    "gpu_memory_utilization": "fraction of GPU memory for weights, activations, CUDA graphs and the KV cache",
    "cpu_kv_cache_bytes": "KV cache size on the CPU, in bytes",
    "max_num_seqs": "most sequences in one batch (also the most jobs read from Redis at once)",
    "max_num_batched_tokens": "most tokens one engine step computes (prefill chunks plus decodes)",
    "max_model_len": "longest prompt + output in tokens (default: the model's limit)",
    "load_format": "auto | safetensors | dummy (random weights, for benchmarks)",
    "seed": "seed of the engine's sampling generator (a job's own seed overrides it)",
    "enable_prefix_caching": "reuse the KV cache of shared prompt prefixes",
    "priority_reserve": "fraction of KV blocks that bulk admission leaves to interactive jobs, and of max_num_seqs "
                        "as extra rows interactive jobs may run beside a full bulk batch",
    "interactive_prefill_tokens": "while interactive jobs keep arriving, bulk prompt tokens per engine step at most "
                                  "(short steps for their first token; 0: no cap)",
    "interactive_window_s": "how long after an interactive job arrives the bulk prefill cap holds",
    "interactive_split_steps": "while the bulk prefill cap holds, run bulk prompt chunks and bulk decodes in "
                               "separate steps, in turns (on by default)",
    "swap_space_bytes": "host memory for preempted sequences' KV, in bytes (default: 4 GiB on CUDA, 0 on CPU)",
    "swap_min_tokens": "preempted sequences with fewer computed tokens are recomputed instead of swapped",
    "async_scheduling": "schedule the next step while the GPU computes this one (default: on for CUDA)",
    "kernel_backend": "auto | torch | triton (auto: triton on CUDA)",
    "enforce_eager": "disable CUDA graphs",
    "piecewise_graph_tokens": "steps with prompt tokens up to this many replay piecewise CUDA graphs (attention "
                              "eager between them); default: measured at start-up, the size below which eager "
                              "steps are host-bound; 0: off",
    "quantization": "fp8: W8A8 FP8 projections (per-channel weight, per-token activation scales; needs compute "
                    "capability >= 8.9 on CUDA); FP8 checkpoints run in fp8 without it",
    "grammar_compile_timeout_s": "seconds a structured-output request waits for its grammar to compile before it "
                                 "fails (invalid_structured_output); the spec then fails at once",
    "kv_cache_dtype": "auto | fp8 (e4m3: half the bytes, twice the tokens; k/v scales from the checkpoint, else 1.0)",
    "tensor_parallel_size": "shard the model over this many GPUs (from --device's index), one process each; "
                            "on the CPU, processes sharing its cores",
    # worker (spool.worker.settings.WorkerSettings)
    "redis_url": "redis://, rediss:// or unix:// URL (default: SPOOL_REDIS_URL, else an embedded local server)",
    "prefix": "key prefix of the deployment",
    "job_shards": "jobs streams per priority (spread over Redis Cluster nodes); producers pick one by the id's hash",
    "name": "worker name: unique among live workers; keys its heartbeat and names its consumer",
    "grace_period_s": "on SIGTERM, seconds to finish in-flight jobs",
    "claim_idle_ms": "reclaim other workers' jobs idle this long",
    "max_deliveries": "run a job delivered more often than this alone (quarantine) before it can be condemned",
    "tool_call_parser": "how tool calls are read from output: auto (from the chat template) | hermes | llama3_json",
    "max_quarantine_deaths": "dead-letter a job as poison after workers died this often while it ran alone",
    "heartbeat_s": "seconds between heartbeats (what `spool status` and `spool top` show)",
    "stream_interval_ms": "write a streamed job's tokens at most this often, coalesced (0: every engine step; "
                          "the first token is written at once)",
    "block_ms": "longest blocking Redis read while idle, in milliseconds",
    "redis_timeout_s": "seconds to wait for a Redis reply (beyond --block-ms) before the connection counts as "
                       "dead and is replaced; keep it well under --claim-idle-ms",
    "step_timeout_s": "an engine step running longer than this means a hung device: the worker exits (code 8) "
                      "and its jobs are reclaimed elsewhere; 0 turns the watchdog off",
    "max_jobs": "exit after this many finished jobs",
    "metrics_port": "serve Prometheus metrics on http://HOST:PORT/metrics (0: any free port; default: off)",
    "metrics_host": "address the metrics server binds to",
    "log_format": "text | json (one JSON object per line)",
}
# checked by argparse, so a typo is a usage error
CHOICES = {"log_format": ("text", "json"), "quantization": ("none", "fp8")}


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = (),
                        title: str | None = None) -> None:
    """Add --field-name for each field of `cls`; defaults come from SPOOL_FIELD_NAME, else the dataclass."""
    hints = typing.get_type_hints(cls)
    try:
        defaults = field_defaults(cls)
    except ValueError as e:  # SPOOL_MAX_NUM_SEQS=abc: a usage error, not a traceback
        parser.error(str(e))
    group = parser.add_argument_group(title or cls.__name__)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp = base_type(hints[f.name])
        env = env_name(f.name)
        default = defaults[f.name]
        flag = "--" + f.name.replace("_", "-")
        required = default is None and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        where = "required" if required else f"default: {default}"
        help_ = f"{_HELP.get(f.name, f.name.replace('_', ' '))} [{env}; {where}]"
        if tp is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=help_)
        else:
            group.add_argument(flag, dest=f.name, type=tp, default=default, required=required, help=help_,
                               choices=CHOICES.get(f.name))


def dataclass_from_args(cls: type, args: argparse.Namespace, **overrides: Any) -> Any:
    """Instantiate `cls` from the parsed flags of add_dataclass_flags."""
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    kw.update(overrides)
    return cls(**kw)


def dataclass_flags(cls: type, args: argparse.Namespace, skip: tuple[str, ...] = ()) -> list[str]:
    """The command-line flags that give `cls` the same parsed values again (the inverse of dataclass_from_args)."""
    out: list[str] = []
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name, None)
        if f.name in skip or value is None:  # None: unset, so the same default (environment) applies again
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + flag[2:])
        else:
            out.append(f"{flag}={value}")  # one token: a value that starts with '-' is not read as a flag
    return out
