"""`spool`: the command line. worker and demo live here; the producer verbs come from producer.cli."""
from __future__ import annotations

import argparse
import logging
import signal
import sys

from worker.flags import add_dataclass_flags, dataclass_from_args


def _cmd_worker(args: argparse.Namespace) -> int:
    from engine import LLMEngine
    from engine.config import EngineConfig
    from producer.connection import connect
    from worker.loop import Worker
    from worker.settings import WorkerSettings

    settings = dataclass_from_args(WorkerSettings, args)
    # Stopped while still loading the model: nothing is in flight yet, so leave at once and cleanly.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    engine = LLMEngine(dataclass_from_args(EngineConfig, args))
    # Fail fast: the worker's own loop backs off, so the engine keeps stepping while Redis is away.
    client = connect(settings.redis_url, fail_fast=True, client_name=f"spool-worker-{settings.name}",
                     socket_timeout=settings.block_ms / 1000 + 10.0)  # longer than its blocking reads
    worker = Worker(engine, client, settings)
    worker.install_signal_handlers()
    return worker.run()


def _cmd_demo(args: argparse.Namespace) -> int:
    from worker.demo import run_demo

    return run_demo(args)


def build_parser(worker_flags: bool = True) -> argparse.ArgumentParser:
    """The whole `spool` command tree; worker_flags=False skips the engine's flags (and importing torch)."""
    from producer import cli as producer_cli
    from worker.settings import WorkerSettings

    p = argparse.ArgumentParser(prog="spool", description="Queue-fed LLM batch inference on Redis streams.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    w = sub.add_parser("worker", help="run a GPU/CPU worker that drains the jobs streams")
    if worker_flags:
        from engine.config import EngineConfig  # imports torch: only when the worker verb is asked for

        add_dataclass_flags(w, EngineConfig)
        add_dataclass_flags(w, WorkerSettings)
    w.set_defaults(func=_cmd_worker)

    d = sub.add_parser("demo", help="end-to-end demo: embedded Redis, tiny model, worker, jobs, live tokens")
    d.add_argument("--jobs", type=int, default=36, help="number of jobs to enqueue")
    d.add_argument("--model", default=None, help="model directory (default: a tiny model built on first use)")
    d.add_argument("--device", default="auto")
    d.add_argument("--redis-url", default=None, help="use this Redis instead of the embedded one")
    d.set_defaults(func=_cmd_demo)

    producer_cli.add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `spool` console script."""
    argv = sys.argv[1:] if argv is None else argv
    # Producer verbs (enqueue, tail, batch, ...) must stay light: only `worker` needs the engine's flags.
    args = build_parser(worker_flags="worker" in argv).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
