"""Priorities: which jobs stream a job sits on, the order workers drain them, and the engine rank of each."""
from __future__ import annotations

import typing
from typing import Literal

Priority = Literal["interactive", "bulk"]
PRIORITIES: tuple[str, ...] = typing.get_args(Priority)  # order is drain order: interactive before bulk
DEFAULT_PRIORITY = "interactive"
BATCH_PRIORITY = "bulk"  # what batches enqueue on, so interactive traffic keeps priority over them
PRIORITY_RANK = {p: rank for rank, p in enumerate(PRIORITIES)}  # engine priority: lower runs first


def validate_priority(priority: object) -> str:
    """Return `priority` if it names a jobs stream, else raise ValueError."""
    if priority not in PRIORITIES:
        raise ValueError(f"priority must be one of {', '.join(PRIORITIES)}; got {priority!r}")
    return priority  # type: ignore[return-value]
