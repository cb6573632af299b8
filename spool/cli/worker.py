"""`spool worker | demo`: serve the jobs streams with an engine, or show the whole product on one machine."""
from __future__ import annotations

import argparse
import signal
import sys

from spool.cli.flags import add_dataclass_flags, dataclass_from_args


def cmd_worker(args: argparse.Namespace) -> int:
    """Load the model, connect to Redis and serve until stopped."""
    from engine import LLMEngine
    from engine.config import EngineConfig
    from producer.ops import resolve_url
    from protocol.connection import connect
    from worker.loop import Worker
    from worker.settings import WorkerSettings

    settings = dataclass_from_args(WorkerSettings, args)
    # Stopped while still loading the model: nothing is in flight yet, so leave at once and cleanly.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    engine = LLMEngine(dataclass_from_args(EngineConfig, args))
    # Fail fast: the worker's own loop backs off, so the engine keeps stepping while Redis is away.
    client = connect(resolve_url(settings.redis_url), fail_fast=True, client_name=f"spool-worker-{settings.name}",
                     socket_timeout=settings.block_ms / 1000 + 10.0)  # longer than its blocking reads
    worker = Worker(engine, client, settings)
    worker.install_signal_handlers()
    return worker.run()


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the end-to-end demo."""
    from spool.demo import run_demo

    return run_demo(args)


def add_commands(sub, engine_flags: bool = True) -> None:
    """Register worker and demo on the `spool` subparsers (engine_flags=False: skip importing torch)."""
    from worker.settings import WorkerSettings

    w = sub.add_parser("worker", help="run a GPU/CPU worker that drains the jobs streams")
    if engine_flags:
        from engine.config import EngineConfig  # imports torch: only when the worker verb is asked for

        add_dataclass_flags(w, EngineConfig)
        add_dataclass_flags(w, WorkerSettings)
    w.set_defaults(func=cmd_worker)

    d = sub.add_parser("demo", help="end-to-end demo: embedded Redis, tiny model, worker, jobs, live tokens")
    d.add_argument("--jobs", type=int, default=36, help="number of jobs to enqueue")
    d.add_argument("--model", default=None, help="model directory (default: a tiny model built on first use)")
    d.add_argument("--device", default="auto", help="cpu | cuda | auto")
    d.add_argument("--redis-url", default=None, help="use this Redis instead of the embedded one")
    d.set_defaults(func=cmd_demo)
