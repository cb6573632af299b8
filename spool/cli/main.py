"""`spool`: the command tree and its entry point (`spool ...` and `python -m spool ...` are the same).

Every expected failure ends as one line on stderr and a documented exit code (spool.cli.common: 0 ok, 1 job
failed or not found, 2 usage, 3 timeout, 4 Redis unreachable, 5/6 queued/running for `result`); `-v` adds
the traceback. Anything else is a bug and keeps Python's traceback.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

from spool.cli.common import EXIT_FAILED, EXIT_REDIS, EXIT_TIMEOUT, EXIT_USAGE, CliError, describe_redis

EXIT_INTERRUPTED = 130


class SpoolParser(argparse.ArgumentParser):
    """No abbreviations: `--max-token 5` is an error, never silently `--max-tokens 5`."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


class CommandParser(SpoolParser):
    """A verb's parser: its own -v, and a flag it does not know is reported with the verb's own usage."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # SUPPRESS: absent here, the top-level `spool -v VERB` value is kept.
        self.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                          help="debug logging, and tracebacks for errors")

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras


def build_parser(worker_flags: bool = True) -> argparse.ArgumentParser:
    """The whole `spool` command tree; worker_flags=False skips the engine's flags (and importing torch)."""
    from spool.cli import admin, batch, jobs, top, worker

    parser = SpoolParser(prog="spool", description="Queue-fed LLM batch inference on Redis streams.",
                         epilog="exit codes: 0 ok, 1 job failed or not found, 2 usage, 3 timeout, "
                                "4 Redis unreachable (docs/OPERATIONS.md)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, and tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=CommandParser)
    worker.add_commands(sub, engine_flags=worker_flags)
    jobs.add_commands(sub)
    admin.add_commands(sub)
    batch.add_commands(sub)
    top.add_commands(sub)
    __import__("spool.cli.serve", fromlist=["add_commands"]).add_commands(sub)  # spool serve (spool/gateway/)
    return parser


def _classify(error: BaseException, args: argparse.Namespace) -> tuple[int, str] | None:
    """(exit code, one line) for an expected failure; None for a bug."""
    import redis

    from spool.protocol import JobError

    if isinstance(error, CliError):
        return error.code, error.message
    if isinstance(error, JobError):  # refused before anything was sent: the request itself is wrong
        return EXIT_USAGE, f"{error.code}: {error.message}"
    if isinstance(error, (redis.AuthenticationError, redis.exceptions.AuthorizationError)):
        return EXIT_REDIS, f"Redis at {describe_redis(args)} refused our credentials: {error}"
    if isinstance(error, (redis.ConnectionError, redis.TimeoutError)):
        return EXIT_REDIS, f"lost Redis at {describe_redis(args)} (gave up after retrying): {error}"
    if isinstance(error, redis.exceptions.OutOfMemoryError):  # producer.RedisFullError: maxmemory, noeviction
        return EXIT_REDIS, f"Redis at {describe_redis(args)}: {_full_message(error)}"
    if isinstance(error, redis.ResponseError):
        return EXIT_FAILED, f"Redis at {describe_redis(args)} refused a command: {error}"
    if isinstance(error, TimeoutError):
        return EXIT_TIMEOUT, str(error)
    if isinstance(error, OSError) and error.filename is not None:  # a file the user named
        return EXIT_USAGE, f"{error.filename}: {error.strerror or error}"
    return None


def _full_message(error: BaseException) -> str:
    from spool.producer.errors import RedisFullError

    return str(error if isinstance(error, RedisFullError) else RedisFullError.from_error(error))


def _quiet_broken_pipe() -> int:
    # The reader went away (`spool batch list | head`): stop quietly, and keep Python from complaining
    # again when it flushes stdout at exit.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `spool` console script."""
    argv = sys.argv[1:] if argv is None else argv
    # Producer verbs (enqueue, tail, batch, ...) must stay light: only `worker` needs the engine's flags.
    args = build_parser(worker_flags="worker" in argv).parse_args(argv)
    verbose = bool(getattr(args, "verbose", False))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except Exception as error:
        known = _classify(error, args)
        if known is None:
            raise  # a bug: its traceback is what a report needs
        code, message = known
        if verbose:
            traceback.print_exc()
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            _quiet_broken_pipe()
        print(f"{_command_name(args)}: {message}", file=sys.stderr)
        return code


def _command_name(args: argparse.Namespace) -> str:
    """`spool batch run`, `spool dead retry`, `spool enqueue`: how the person typed the verb."""
    action = {"batch": "batch_command", "dead": "action"}.get(args.command)  # verbs with sub-verbs
    return " ".join(["spool", args.command] + ([getattr(args, action)] if action else []))


if __name__ == "__main__":
    sys.exit(main())
