"""What the worker tells the people who run it in its log: a start-up summary and one line per finished job,
as text or JSON lines (--log-format), with Redis URLs shown without their password.

The per-job line is fed by spool.worker.observe.ObservedFinisher, which sees every way a job ends. This module
imports neither the engine nor torch.
"""
from __future__ import annotations

import json
import logging
import time
from typing import Any

from spool.protocol import Result
from spool.protocol.connection import redact_url

log = logging.getLogger("spool.worker.jobs")
LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and a record's structured `fields`."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": getattr(record, "summary", None) or record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            doc.update(fields)
        if record.exc_info:
            doc["traceback"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def configure_logging(log_format: str) -> None:
    """Switch the root logger's handlers to `log_format` (text | json)."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}; got {log_format!r}")
    formatter = JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig()
    for handler in root.handlers:
        handler.setFormatter(formatter)


def _text(fields: dict[str, Any]) -> str:
    return " ".join(f"{k}={json.dumps(v) if isinstance(v, str) and (' ' in v or not v) else v}"
                    for k, v in fields.items())


def _seconds(later: float | None, earlier: float | None) -> float | None:
    return None if later is None or earlier is None else round(max(0.0, later - earlier), 4)


def log_startup(worker: Any, redis_url: str | None) -> None:
    """One INFO line with what an operator checks first: model, dtype, device, KV capacity, limits, Redis.

    `worker` is the spool.worker.loop.Worker (typed Any: the loop imports this module).
    """
    engine, settings = worker.engine, worker.settings
    runner = engine.runner
    blocks, block_size = runner.num_blocks, engine.config.block_size
    fields = {
        "worker": settings.name,
        "model": engine.config.model,
        "dtype": str(runner.dtype).removeprefix("torch."),
        "device": str(runner.device),
        "kv_cache_blocks": blocks,
        "kv_cache_tokens": blocks * block_size,
        "block_size": block_size,
        "max_num_seqs": engine.config.max_num_seqs,
        "max_model_len": engine.max_model_len,
        "cuda_graphs": "on" if getattr(runner, "graphs", None) is not None else "off",
        "prefix_caching": "on" if engine.config.enable_prefix_caching else "off",
        "redis": redact_url(redis_url or worker.settings.redis_url),
        "metrics": f":{worker.metrics.port}/metrics" if worker.metrics is not None else "off",
    }
    logging.getLogger("spool.worker").info("starting %s", _text(fields),
                                           extra={"fields": fields, "summary": "starting"})


class JobLog:
    """Writes the one INFO line per finished job (id, status, priority, tokens, queue wait, TTFT, total)."""

    def __init__(self, jobs_streams: dict[str, str]):
        self._priority = jobs_streams  # stream key -> priority

    @classmethod
    def for_keys(cls, keys: Any) -> JobLog:
        """A JobLog that names priorities by the jobs streams of `keys`."""
        return cls({s: keys.priority_of(s) for s in keys.all_jobs})  # every shard

    def on_final(self, result: Result, stream: str) -> None:
        """Log one finished job (nothing is built when INFO is off)."""
        if not log.isEnabledFor(logging.INFO):
            return
        t, usage = result.timings, result.usage
        fields: dict[str, Any] = {
            "id": result.id,
            "status": result.status,
            "priority": self._priority.get(stream, stream),
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "queue_wait_s": _seconds(t.started, t.enqueued),
            "ttft_s": _seconds(t.first_token, t.enqueued),
            "total_s": _seconds(t.finished, t.enqueued),
            "finish_reason": result.finish_reason,
        }
        if result.error is not None:
            fields["error"] = f"{result.error.code}: {result.error.message[:300]}"
        log.info("job %s", _text(fields), extra={"fields": fields, "summary": "job finished"})
