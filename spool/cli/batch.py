"""`spool batch ...`: run, submit, schedule, status, cancel and list OpenAI-format bulk batches."""
from __future__ import annotations

import argparse
import signal
import sys
import time
from datetime import datetime
from pathlib import Path

from spool.cli.common import EXIT_FAILED, EXIT_USAGE, CliError, add_redis_flags, client, note_if_no_worker, print_json

# Documented in docs/BATCH.md: 2 a file with invalid lines, 3 another runner holds the batch, 130 interrupted.
EXIT_INVALID, EXIT_BUSY, EXIT_INTERRUPTED = 2, 3, 130
LIST_COLUMNS = ("ID", "STATUS", "DONE", "FAILED", "TOTAL", "CREATED", "OUTPUT")


def _files(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="OpenAI Batch input file (JSONL)")
    p.add_argument("-o", "--output", required=True, help="output file (JSONL, appended; resumable)")
    p.add_argument("--errors", help="file for failed lines (default: the output file)")
    p.add_argument("--max-in-flight", type=int, default=256, help="jobs enqueued and not yet written (default 256)")
    p.add_argument("--skip-invalid", action="store_true",
                   help="run the valid lines and write invalid ones as errors (default: refuse the whole file)")
    p.add_argument("--default-max-tokens", type=int, help="max_tokens for lines that give none (default 16)")


def _opts(args, **extra) -> dict:
    kw = {"max_in_flight": args.max_in_flight, "skip_invalid": args.skip_invalid,
          "default_max_tokens": args.default_max_tokens, **extra}
    if kw["max_in_flight"] < 1:
        raise CliError("--max-in-flight must be >= 1", EXIT_USAGE)
    return kw


def _readable(path: str) -> None:
    """Refuse a missing input file before anything is created in Redis (no batch stuck in `validating`)."""
    p = Path(path)
    if not p.is_file():
        raise CliError(f"input file {path!r} {'is not a file' if p.exists() else 'does not exist'}", EXIT_USAGE)


def cmd_run(args) -> int:
    """Run (or resume) a batch in this process, with progress on stderr."""
    from spool.producer.batch import BatchBusy, BatchInvalid, BatchMismatch, BatchRunner, options
    from spool.producer.batch.files import OutputError

    _readable(args.input)
    opts = options(**_opts(args, progress=args.progress, progress_interval_s=args.progress_interval))
    runner = BatchRunner(client(args), args.input, args.output, args.errors, args.id, opts)

    def stop(*_):
        if runner.stop_requested:
            raise KeyboardInterrupt
        runner.stop_requested = True  # first Ctrl-C: stop cleanly and stay resumable; second: abort now

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    note_if_no_worker(runner.client, args, "the batch")
    try:
        info = runner.run()
    except BatchInvalid as e:
        for err in e.errors:
            print(f"{args.input}:{err['line']}: {err['code']}: {err['message']}", file=sys.stderr)
        more = e.count - len(e.errors)
        print(f"{e.count} invalid line(s){f' ({more} not shown)' if more > 0 else ''}; nothing was enqueued "
              f"(batch {e.batch_id} failed). Fix them, or pass --skip-invalid.", file=sys.stderr)
        return EXIT_INVALID
    except (BatchBusy, BatchMismatch, OutputError) as e:
        print(f"spool batch {args.batch_command}: {e}", file=sys.stderr)
        return EXIT_BUSY
    print_json(info.to_dict())
    if runner.interrupted:
        return EXIT_INTERRUPTED
    return 0 if info.status == "completed" else 1


def cmd_submit(args) -> int:
    """Enqueue a batch as an rq job (now, --at TIME or --in SECONDS)."""
    from spool.producer import batch

    _readable(args.input)
    try:
        at = datetime.fromisoformat(args.at).astimezone() if args.at else None
    except ValueError as e:
        raise CliError(f"--at: {e} (use ISO 8601, e.g. 2026-12-01T02:00)", EXIT_USAGE) from None
    bid, job_id = batch.submit(args.input, args.output, args.errors, batch_id=args.id, at=at, delay_s=args.in_s,
                               queue=args.queue, job_timeout=args.job_timeout, client=client(args),
                               redis_url=args.redis_url, prefix=args.prefix, **_opts(args))
    print_json({"batch_id": bid, "rq_job_id": job_id, "queue": args.queue,
            "at": at.isoformat() if at else None, "in_s": args.in_s})
    return 0


def cmd_schedule(args) -> int:
    """Create or replace a cron schedule that runs the batch through rq."""
    from spool.producer import batch

    try:
        entry = batch.schedule(args.name, args.input, args.output, args.errors, cron=args.cron, tz=args.tz,
                               run_now=args.now, queue=args.queue, job_timeout=args.job_timeout,
                               client=client(args), redis_url=args.redis_url, prefix=args.prefix, **_opts(args))
    except ValueError as e:
        print(f"spool batch {args.batch_command}: {e}", file=sys.stderr)
        return EXIT_INVALID
    print_json({k: entry[k] for k in ("name", "cron", "tz", "queue", "next_run", "next_job_id")})
    return 0


def cmd_unschedule(args) -> int:
    """Remove a cron schedule."""
    from spool.producer import batch

    found = batch.unschedule(args.name, client=client(args))
    print("removed" if found else f"no schedule named {args.name!r}")
    return 0 if found else 1


def cmd_upgrade_jobs(args) -> int:
    """Rewrite rq jobs queued by spool < 0.2 to the current function paths."""
    from spool.producer import batch

    ids = batch.upgrade_jobs(queue=args.queue, client=client(args))
    print(f"{len(ids)} rq job(s) of queue {args.queue!r} now name spool.producer.batch.schedule"
          + (f": {', '.join(ids)}" if ids else ""))
    return 0


def cmd_schedules(args) -> int:
    """List cron schedules."""
    from spool.producer import batch

    print_json([{k: e.get(k) for k in ("name", "cron", "tz", "queue", "next_run", "last_batch_id")}
            for e in batch.schedules(client=client(args))])
    return 0


def cmd_status(args) -> int:
    """Print one batch's state as JSON."""
    from spool.producer import batch

    try:
        info = batch.status(args.id, client=client(args))
    except ValueError as e:  # not a valid batch id
        raise CliError(str(e), EXIT_USAGE) from None
    if info is None:
        raise CliError(f"no batch {args.id!r}", EXIT_FAILED)
    print_json(info.to_dict())
    return 0


def cmd_cancel(args) -> int:
    """Cancel a batch (its runner stops and writes what finished)."""
    from spool.producer import batch

    try:
        print(batch.cancel(args.id, client=client(args)))
    except KeyError as e:
        raise CliError(str(e.args[0]), EXIT_FAILED) from None
    except ValueError as e:  # not a valid batch id
        raise CliError(str(e), EXIT_USAGE) from None
    return 0


def _created(info) -> str:
    at = info.fields.get("created_at")
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(float(at))) if at else "-"


def cmd_list(args) -> int:
    """List batches, newest first: a table with a header, or JSON."""
    from spool.producer import batch

    infos = batch.list_batches(args.limit, client=client(args))
    if args.json:
        print_json([info.to_dict() for info in infos])
        return 0
    rows = [LIST_COLUMNS]
    for info in infos:
        c = info.to_dict()["request_counts"]
        rows.append((info.id, info.status, str(c["completed"]), str(c["failed"]), str(c["total"]), _created(info),
                     info.fields.get("output_file", "") or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(LIST_COLUMNS) - 1)]
    for row in rows:
        sys.stdout.write("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] + "\n")
    return 0


def add_commands(sub) -> None:
    """Register `spool batch ...` on the `spool` subparsers."""
    b = sub.add_parser("batch", help="OpenAI-format bulk batches: run, submit/schedule with rq, status, cancel")
    bs = b.add_subparsers(dest="batch_command", required=True, metavar="ACTION")

    r = bs.add_parser("run", help="run (or resume) a batch file here, with progress")
    _files(r)
    r.add_argument("--id", help="batch id (default: the one in OUT if resuming, else a new one)")
    r.add_argument("--progress", default="auto", choices=["auto", "bar", "plain", "none"],
                   help="auto: a bar on a terminal, plain lines otherwise")
    r.add_argument("--progress-interval", type=float, default=10.0,
                   help="seconds between plain progress lines (default 10)")
    r.set_defaults(func=cmd_run)

    s = bs.add_parser("submit", help="enqueue a batch as an rq job (run by `rq worker --with-scheduler ...`)")
    _files(s)
    s.add_argument("--id", help="batch id (default: a new one)")
    when = s.add_mutually_exclusive_group()
    when.add_argument("--at", help="start time, ISO 8601 (e.g. 2025-01-31T02:00; local time without offset)")
    when.add_argument("--in", dest="in_s", type=float, help="start after this many seconds")

    c = bs.add_parser("schedule", help="run a batch on a cron schedule through rq (nightly runs)")
    _files(c)
    c.add_argument("--cron", required=True, help='cron expression, e.g. "0 2 * * *" (02:00 every day)')
    c.add_argument("--name", default="nightly", help="schedule name; batches are NAME-YYYYmmdd-HHMM")
    c.add_argument("--tz", help="time zone of the cron expression (default: local time)")
    c.add_argument("--now", action="store_true", help="also run once right away")
    for x in (s, c):
        x.add_argument("--queue", default="spool-batch", help="rq queue (default spool-batch)")
        x.add_argument("--job-timeout", type=int, default=86_400, help="rq job timeout in seconds")
    s.set_defaults(func=cmd_submit)
    c.set_defaults(func=cmd_schedule)

    u = bs.add_parser("unschedule", help="remove a cron schedule")
    u.add_argument("name", help="the schedule's name")
    u.set_defaults(func=cmd_unschedule)
    ls = bs.add_parser("schedules", help="list cron schedules")
    ls.set_defaults(func=cmd_schedules)
    up = bs.add_parser("upgrade-jobs", help="after upgrading from spool < 0.2: point the rq jobs it queued (cron "
                                            "occurrences too) at the new module paths")
    up.add_argument("--queue", default="spool-batch", help="rq queue (default spool-batch)")
    up.set_defaults(func=cmd_upgrade_jobs)

    st = bs.add_parser("status", help="a batch's state (JSON)")
    st.add_argument("id", help="batch id")
    st.set_defaults(func=cmd_status)
    ca = bs.add_parser("cancel", help="cancel a batch")
    ca.add_argument("id", help="batch id")
    ca.set_defaults(func=cmd_cancel)
    li = bs.add_parser("list", help="list batches, newest first (a table; --json for JSON)")
    li.add_argument("--limit", type=int, default=50, help="most batches to list (default 50)")
    li.add_argument("--json", action="store_true", help="print the batches as a JSON list")
    li.set_defaults(func=cmd_list)
    for x in (r, s, c, u, ls, up, st, ca, li):
        add_redis_flags(x)

