"""The gateway's settings: one dataclass, from `spool serve`'s flags (each defaulting to a SPOOL_* variable)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import orjson

from spool.protocol.defaults import DEFAULT_PREFIX

ENV_SETTINGS = "SPOOL_GATEWAY_SETTINGS"  # how `spool serve --workers N` hands the settings to its processes


@dataclass(slots=True)
class GatewaySettings:
    """Everything `spool serve` can be told; see docs/SERVER.md."""

    redis_url: str  # resolved (the embedded server's socket URL when none was given)
    prefix: str = DEFAULT_PREFIX
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = ()  # none: the API is open (a warning at start)
    served_model_names: tuple[str, ...] = ()  # none: the models live workers report
    files_dir: str = ""  # uploaded files and batch outputs; "" = $SPOOL_STATE_DIR/files
    max_file_bytes: int = 200 << 20  # OpenAI's limit for a batch input file
    max_backlog: int = 0  # refuse (429) a request whose jobs stream holds this many jobs; 0 = no limit
    retry_after_s: int = 1  # the Retry-After of a 429 / 503
    no_worker_timeout_s: float = 10.0  # wait this long for a live worker before answering 503
    request_timeout_s: float = 600.0  # a job not final by then is cancelled (504)
    durable: bool = False  # an enqueue is answered only once a replica has it (WAIT 1); else 503 not_replicated
    keepalive_s: float = 15.0  # a streamed response silent this long gets an SSE comment (`: ping`); 0: never
    batch_max_in_flight: int = 256  # per batch: jobs enqueued and not yet written
    workers: int = 1  # uvicorn worker processes (the gateway is stateless apart from files_dir)
    max_redis_connections: int = 4096  # waits share one blocking XREAD (spool/producer/reads.py); this bounds the rest
    poll_s: float = 0.5  # live workers and backlog are re-read this often
    log_level: str = "info"

    def files_path(self) -> Path:
        """The files directory (created on first use)."""
        if self.files_dir:
            return Path(self.files_dir).expanduser()
        from spool.producer.embedded import state_dir_path

        return state_dir_path() / "files"

    def to_json(self) -> bytes:
        """JSON for ENV_SETTINGS."""
        return orjson.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, raw: str | bytes) -> GatewaySettings:
        """Inverse of to_json."""
        data = orjson.loads(raw)
        for name in ("api_keys", "served_model_names"):
            data[name] = tuple(data.get(name) or ())
        return cls(**data)
