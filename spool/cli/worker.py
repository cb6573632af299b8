"""`spool worker | demo`: serve the jobs streams with an engine, or show the whole product on one machine."""
from __future__ import annotations

import argparse
import signal
import sys

from spool.cli.common import EXIT_USAGE, CliError
from spool.cli.flags import add_dataclass_flags, dataclass_from_args


def cmd_worker(args: argparse.Namespace) -> int:
    """Load the model, connect to Redis and serve until stopped."""
    from engine import LLMEngine, TensorParallelError
    from engine.config import ConfigError, EngineConfig
    from producer.ops import resolve_url
    from protocol.connection import connect
    from worker.joblog import configure_logging
    from worker.loop import Worker
    from worker.metrics import MetricsServerError
    from worker.settings import WorkerSettings

    settings = dataclass_from_args(WorkerSettings, args)
    try:
        configure_logging(settings.log_format)
    except ValueError as e:  # SPOOL_LOG_FORMAT=xml (a flag value is checked by argparse already)
        raise CliError(str(e), EXIT_USAGE) from None
    # Stopped while still loading the model: nothing is in flight yet, so leave at once and cleanly.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        engine = LLMEngine(dataclass_from_args(EngineConfig, args))
    except ConfigError as e:  # a missing model directory, an unsupported setting: the operator's to fix
        raise CliError(f"cannot start the engine: {e}", EXIT_USAGE) from e
    except TensorParallelError as e:  # a rank process failed while loading (out of memory, a bad shard)
        raise CliError(f"cannot start the engine: {e}") from e
    except (OSError, ValueError) as e:  # unreadable weights or tokenizer files
        raise CliError(f"cannot load the model from {args.model!r}: {e}", EXIT_USAGE) from e
    settings.redis_url = resolve_url(settings.redis_url)  # the embedded server's URL too, for the logs
    try:
        # Fail fast: the worker's own loop backs off (logging each retry), so the engine keeps stepping while
        # Redis is away.
        client = connect(settings.redis_url, fail_fast=True, client_name=f"spool-worker-{settings.name}",
                         socket_timeout=settings.block_ms / 1000 + 10.0)  # longer than its blocking reads
        worker = Worker(engine, client, settings)
    except ValueError as e:  # a Redis URL with an unknown scheme, a worker name outside the id charset
        raise CliError(str(e), EXIT_USAGE) from e
    worker.install_signal_handlers()
    try:
        return worker.run()
    except MetricsServerError as e:  # the port is taken: another worker on this host needs its own
        raise CliError(str(e), EXIT_USAGE) from e
    except TensorParallelError as e:  # a rank died or hung: nothing was acknowledged, so its jobs stay pending
        raise CliError(f"the engine stopped: {e}; this worker's in-flight jobs stay pending for another") from e


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the end-to-end demo."""
    from spool.demo import run_demo

    return run_demo(args)


def add_commands(sub, engine_flags: bool = True) -> None:
    """Register worker and demo on the `spool` subparsers (engine_flags=False: skip importing torch)."""
    from worker.settings import WorkerSettings

    w = sub.add_parser("worker", help="run a GPU/CPU worker that drains the jobs streams",
                       description="Load a model and serve the deployment's jobs streams until SIGTERM (warm stop: "
                                   "finish in-flight jobs within --grace-period-s; a second signal stops at once). "
                                   "Every flag also reads SPOOL_<FLAG>.")
    if engine_flags:
        from engine.config import EngineConfig  # imports torch: only when the worker verb is asked for

        add_dataclass_flags(w, EngineConfig, title="engine")
        add_dataclass_flags(w, WorkerSettings, title="worker")
    w.set_defaults(func=cmd_worker)

    d = sub.add_parser("demo", help="end-to-end demo: embedded Redis, tiny model, worker, jobs, live tokens",
                       description="Start (or reuse) the embedded Redis, build a tiny random-init model on first "
                                   "use, run a worker subprocess on it and send it a few dozen jobs. The embedded "
                                   "Redis keeps running afterwards (stop it with `spool redis stop`).")
    d.add_argument("--jobs", type=int, default=36, help="number of jobs to enqueue (default 36)")
    d.add_argument("--model", default=None,
                   help="model directory (default: a tiny model built on first use in the state dir)")
    d.add_argument("--device", default="auto", help="cpu | cuda | auto (default auto)")
    d.add_argument("--redis-url", default=None, help="use this Redis instead of the embedded one")
    d.set_defaults(func=cmd_demo)
