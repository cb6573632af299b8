"""`spool serve`: the OpenAI-compatible HTTP API in front of the queue (spool/gateway/, docs/SERVER.md). No GPU, no
torch."""
from __future__ import annotations

import argparse
from pathlib import Path

from spool.protocol.env import env_text
from spool.cli.common import EXIT_USAGE, CliError, add_redis_flags, client, say, seconds

ENV_API_KEYS = "SPOOL_API_KEYS"
ENV_SERVED_MODEL_NAMES = "SPOOL_SERVED_MODEL_NAME"


def add_commands(sub) -> None:
    """Register `spool serve`."""
    p = sub.add_parser("serve", help="serve the OpenAI API (chat, completions, files, batches) over the queue",
                       description="An OpenAI-compatible HTTP server in front of the Redis queue: requests become "
                                   "jobs for the workers of the deployment (docs/SERVER.md). Every flag also reads "
                                   "the SPOOL_* variable named in its help.")
    g = p.add_argument_group("server")
    g.add_argument("--host", default=env_text("SPOOL_SERVE_HOST", "127.0.0.1"),
                   help="address to bind [SPOOL_SERVE_HOST; default: 127.0.0.1; 0.0.0.0 for every interface]")
    g.add_argument("--port", type=int, default=env_text("SPOOL_SERVE_PORT", "8000"),
                   help="TCP port [SPOOL_SERVE_PORT; default: 8000]")
    g.add_argument("--workers", type=int, default=env_text("SPOOL_SERVE_WORKERS", "1"),
                   help="server processes sharing the port [SPOOL_SERVE_WORKERS; default: 1]")
    g.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True,
                   help="one log line per HTTP request (default: on)")
    g.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn's and the gateway's log threshold (default: info)")
    a = p.add_argument_group("access")
    a.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help=f"a key clients send as 'Authorization: Bearer KEY'; repeatable [{ENV_API_KEYS}, "
                        "comma-separated; none: the API is open]")
    a.add_argument("--api-key-file", metavar="PATH",
                   help="a file of keys, one per line (keeps them out of `ps` and shell history)")
    m = p.add_argument_group("requests")
    m.add_argument("--served-model-name", action="append", default=[], metavar="NAME",
                   help=f"the model name(s) requests must use; repeatable [{ENV_SERVED_MODEL_NAMES}, comma-separated; "
                        "default: whatever model the live workers report, or its directory's name]")
    m.add_argument("--max-backlog", type=int, default=env_text("SPOOL_MAX_BACKLOG", "0"), metavar="JOBS",
                   help="answer 429 (with Retry-After) while a request's jobs stream holds this many jobs "
                        "[SPOOL_MAX_BACKLOG; default: 0, no limit]")
    m.add_argument("--retry-after", type=int, default=env_text("SPOOL_RETRY_AFTER_S", "1"), metavar="SECONDS",
                   help="the Retry-After of a 429 or 503 [SPOOL_RETRY_AFTER_S; default: 1]")
    m.add_argument("--no-worker-timeout", type=seconds, default=env_text("SPOOL_NO_WORKER_TIMEOUT_S", "10"),
                   metavar="SECONDS", help="with no live worker, wait this long for one, then answer 503 "
                                           "[SPOOL_NO_WORKER_TIMEOUT_S; default: 10]")
    m.add_argument("--request-timeout", type=seconds, default=env_text("SPOOL_REQUEST_TIMEOUT_S", "600"),
                   metavar="SECONDS", help="cancel a job not final by then and answer 504 "
                                           "[SPOOL_REQUEST_TIMEOUT_S; default: 600]")
    m.add_argument("--durable", action=argparse.BooleanOptionalAction, default=env_text("SPOOL_DURABLE", "") == "1",
                   help="answer a request only once a Redis replica has its job (WAIT 1; plain or Sentinel Redis, "
                        "not Cluster); else 503 not_replicated [SPOOL_DURABLE=1]")
    m.add_argument("--keepalive", type=float, default=env_text("SPOOL_SSE_KEEPALIVE_S", "15"), metavar="SECONDS",
                   help="send a streamed response an SSE comment (': ping') after this much silence, so proxies "
                        "keep it open; 0: never [SPOOL_SSE_KEEPALIVE_S; default: 15]")
    f = p.add_argument_group("files and batches")
    f.add_argument("--files-dir", default=env_text("SPOOL_FILES_DIR"), metavar="DIR",
                   help="where uploaded files and batch outputs live; share it between gateways "
                        "[SPOOL_FILES_DIR; default: $SPOOL_STATE_DIR/files]")
    f.add_argument("--max-file-bytes", type=int, default=env_text("SPOOL_MAX_FILE_BYTES", str(200 << 20)),
                   metavar="BYTES", help="largest upload [SPOOL_MAX_FILE_BYTES; default: 209715200, 200 MiB]")
    f.add_argument("--batch-max-in-flight", type=int, default=env_text("SPOOL_BATCH_MAX_IN_FLIGHT", "256"),
                   metavar="JOBS", help="per batch, jobs enqueued and not yet written [default: 256]")
    add_redis_flags(p)
    p.set_defaults(func=cmd_serve)


def _keys(args: argparse.Namespace) -> tuple[str, ...]:
    from spool.gateway.auth import parse_keys

    values = list(args.api_key) + [env_text(ENV_API_KEYS, "")]
    if args.api_key_file:
        try:
            values.append(Path(args.api_key_file).read_text())
        except OSError as e:
            raise CliError(f"cannot read --api-key-file {args.api_key_file}: {e.strerror or e}", EXIT_USAGE) from None
    return parse_keys(values)


def cmd_serve(args: argparse.Namespace) -> int:
    """Check the flags and Redis, then serve until stopped."""
    from spool.gateway.auth import parse_keys
    from spool.gateway.server import serve
    from spool.gateway.settings import GatewaySettings

    for name in ("port", "workers", "max_file_bytes", "batch_max_in_flight", "retry_after"):
        if getattr(args, name) < (0 if name == "retry_after" else 1):
            raise CliError(f"--{name.replace('_', '-')} must be positive", EXIT_USAGE)
    if not args.keepalive >= 0:  # NaN too
        raise CliError("--keepalive must be 0 (never) or more", EXIT_USAGE)
    if args.max_backlog < 0:
        raise CliError("--max-backlog must be 0 (no limit) or more", EXIT_USAGE)
    keys = _keys(args)
    names = parse_keys(list(args.served_model_name) or [env_text(ENV_SERVED_MODEL_NAMES, "")])
    probe = client(args)  # resolves the URL (the embedded server's too) and waits for Redis, else exit 4
    probe.close()
    settings = GatewaySettings(
        redis_url=args.resolved_url, prefix=args.prefix, host=args.host, port=args.port, api_keys=keys,
        served_model_names=names, files_dir=args.files_dir or "", max_file_bytes=args.max_file_bytes,
        max_backlog=args.max_backlog, retry_after_s=args.retry_after, no_worker_timeout_s=args.no_worker_timeout,
        request_timeout_s=min(args.request_timeout, 1e9),  # inf: JSON has no infinity; 1e9 s is as good
        keepalive_s=min(args.keepalive, 1e9), batch_max_in_flight=args.batch_max_in_flight, workers=args.workers,
        log_level=args.log_level, durable=args.durable)
    if not keys:
        say(f"no API key configured: anyone who can reach {args.host}:{args.port} can use the API "
            f"(--api-key, {ENV_API_KEYS})")
    files = settings.files_path()
    try:
        files.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CliError(f"cannot create the files directory {files}: {e.strerror or e}", EXIT_USAGE) from None
    say(f"serving the OpenAI API on http://{args.host}:{args.port}/v1 ({len(keys)} API key(s), files in {files})")
    serve(settings, access_log=args.access_log)
    return 0
