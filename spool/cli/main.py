"""`spool`: the command tree and its entry point (`spool ...` and `python -m spool ...` are the same)."""
from __future__ import annotations

import argparse
import logging
import sys


def build_parser(worker_flags: bool = True) -> argparse.ArgumentParser:
    """The whole `spool` command tree; worker_flags=False skips the engine's flags (and importing torch)."""
    from spool.cli import admin, batch, jobs, worker

    parser = argparse.ArgumentParser(prog="spool", description="Queue-fed LLM batch inference on Redis streams.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    worker.add_commands(sub, engine_flags=worker_flags)
    jobs.add_commands(sub)
    admin.add_commands(sub)
    batch.add_commands(sub)
    return parser


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
