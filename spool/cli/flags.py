"""CLI flags generated from config dataclasses, each defaulting to its SPOOL_<NAME> environment variable."""
from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

from protocol.env import base_type, env_name, field_defaults

_HELP = {
    "model": "path of a local Hugging Face model directory",
    "device": "cpu | cuda | cuda:N | auto",
    "dtype": "auto | float32 | bfloat16 | float16",
    "num_kv_blocks": "KV cache blocks (default: sized from memory)",
    "load_format": "auto | safetensors | dummy (random weights)",
    "kernel_backend": "auto | torch | triton",
    "enforce_eager": "disable CUDA graphs",
    "redis_url": "redis://, rediss:// or unix:// URL (default: SPOOL_REDIS_URL, else an embedded local server)",
    "grace_period_s": "on SIGTERM, seconds to finish in-flight jobs",
    "claim_idle_ms": "reclaim other workers' jobs idle this long",
    "max_deliveries": "run a job delivered more often than this alone (quarantine) before it can be condemned",
    "max_quarantine_deaths": "dead-letter a job as poison after workers died this often while it ran alone",
    "max_jobs": "exit after this many finished jobs",
}


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add --field-name for each field of `cls`; defaults come from SPOOL_FIELD_NAME, else the dataclass."""
    hints = typing.get_type_hints(cls)
    defaults = field_defaults(cls)
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp = base_type(hints[f.name])
        env = env_name(f.name)
        default = defaults[f.name]
        flag = "--" + f.name.replace("_", "-")
        help_ = f"{_HELP.get(f.name, f.name.replace('_', ' '))} [{env}; default: {default}]"
        if tp is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=help_)
        else:
            required = default is None and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            group.add_argument(flag, dest=f.name, type=tp, default=default, required=required, help=help_)


def dataclass_from_args(cls: type, args: argparse.Namespace, **overrides: Any) -> Any:
    """Instantiate `cls` from the parsed flags of add_dataclass_flags."""
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    kw.update(overrides)
    return cls(**kw)
