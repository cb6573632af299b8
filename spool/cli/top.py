"""`spool top`: a live terminal view of a deployment (rich, imported only here): its workers, the backlog per
jobs stream and the running batches, refreshed in place until q or Ctrl-C; `--once` prints one frame."""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import select
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from spool.cli.common import EXIT_OK, add_redis_flags, client, describe_redis, seconds

ACTIVE_BATCH = ("validating", "in_progress", "finalizing", "cancelling")


def snapshot(producer) -> dict[str, Any]:
    """What one frame shows, read from Redis: workers' heartbeats, streams, dead letters, active batches."""
    from spool.producer import batch
    from spool.producer.admin import deployment_status

    status = deployment_status(producer.redis, producer.keys)
    status["batches"] = [b for b in batch.list_batches(50, client=producer) if b.status in ACTIVE_BATCH]
    return status


def _eta(info, now: float) -> str:
    total = info.count("total")
    done = info.count("completed") + info.count("failed")
    started = float(info.fields.get("in_progress_at") or info.fields.get("created_at") or now)
    if not total or done >= total:
        return "-"
    if done == 0 or now <= started:
        return "?"
    left = (total - done) / (done / (now - started))
    return time.strftime("%H:%M:%S", time.gmtime(left)) if left < 86_400 else f"{left / 3600:.0f}h"


def _device(hb: dict[str, Any]) -> str:
    """'GPU 3' for a `--gpus` worker process on CUDA (its own device is always cuda:0), else the device."""
    device, gpus = str(hb.get("device", "?")), hb.get("gpus")
    if gpus is None:
        return device
    return f"GPU {gpus}" if device.startswith("cuda") else f"{device} (GPU {gpus})"


def _natural(name: str) -> list[Any]:
    """host-gpu2 before host-gpu10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def render(snap: dict[str, Any], where: str, now: float | None = None):
    """One frame as a rich renderable."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    now = time.time() if now is None else now
    workers = snap["workers"]
    head = Text.assemble(("spool top", "bold"), f"  {where}  ", time.strftime("%H:%M:%S", time.localtime(now)),
                         f"  workers: {len(workers)}  dead letters: {snap['dead_letters']}")
    wt = Table(title="workers", title_justify="left", expand=False)
    for col in ("WORKER", "MODEL", "DEVICE", "RUNNING", "WAITING", "KV", "TOK/S", "DONE", "SEEN"):
        wt.add_column(col, justify="right" if col in ("RUNNING", "WAITING", "KV", "TOK/S", "DONE", "SEEN") else "left")
    for name, hb in sorted(workers.items(), key=lambda item: _natural(item[0])):
        wt.add_row(name, Path(str(hb.get("model", "?"))).name, _device(hb),
                   str(hb.get("running", hb.get("in_flight", "?"))), str(hb.get("waiting", "?")),
                   f"{100 * float(hb.get('kv_usage', 0)):.0f}%", f"{float(hb.get('tokens_per_s', 0)):.0f}",
                   str(hb.get("jobs_done", "?")), f"{max(0.0, now - float(hb.get('last_seen', now))):.0f}s ago")
    if not workers:
        wt.add_row("(no live worker)", "", "", "", "", "", "", "", "")
    st = Table(title="queue", title_justify="left")
    for col in ("STREAM", "BACKLOG", "IN FLIGHT"):
        st.add_column(col, justify="left" if col == "STREAM" else "right")
    for stream, info in snap["streams"].items():
        st.add_row(stream, str(info.get("backlog", info["length"])), str(sum(info["pending"].values())))
    bt = Table(title="batches", title_justify="left")
    for col in ("BATCH", "STATUS", "PROGRESS", "TOKENS", "ETA"):
        bt.add_column(col, justify="left" if col in ("BATCH", "STATUS") else "right")
    for info in snap["batches"]:
        total, done = info.count("total"), info.count("completed") + info.count("failed")
        pct = f" ({100 * done / total:.0f}%)" if total else ""
        bt.add_row(info.id, info.status, f"{done}/{total}{pct}", str(info.count("tokens")), _eta(info, now))
    if not snap["batches"]:
        bt.add_row("(none running)", "", "", "", "")
    return Group(head, wt, st, bt)


@contextlib.contextmanager
def _keypresses() -> Iterator[Any]:
    """A function(timeout) -> key pressed or None; the terminal in cbreak mode meanwhile (no echo, no Enter)."""
    if not sys.stdin.isatty():
        yield lambda timeout: time.sleep(timeout)
        return
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)

    def read(timeout: float) -> str | None:
        ready, _, _ = select.select([fd], [], [], timeout)
        return os.read(fd, 1).decode(errors="replace") if ready else None

    try:
        yield read
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _console():
    from rich.console import Console

    # Not a terminal (--once into a file or a test): wide enough that ids and model names are not cut.
    return Console(width=None if sys.stdout.isatty() else 160, highlight=False)


def cmd_top(args: argparse.Namespace) -> int:
    """Show the deployment live (or one frame with --once)."""
    producer = client(args)
    where = describe_redis(args)
    console = _console()
    if args.once:
        console.print(render(snapshot(producer), where))
        return EXIT_OK
    from rich.live import Live

    try:
        with Live(render(snapshot(producer), where), console=console, auto_refresh=False, screen=False) as live, \
                _keypresses() as key:
            while key(args.interval) not in ("q", "Q"):
                live.update(render(snapshot(producer), where), refresh=True)
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def add_commands(sub) -> None:
    """Register top on the `spool` subparsers."""
    t = sub.add_parser("top", help="live view of the deployment: workers, backlog, batches (q quits)",
                       description="Workers (model, device, running/waiting sequences, KV cache use, tokens/s), "
                                   "the backlog of each jobs stream and the running batches with progress and ETA, "
                                   "refreshed in place. q or Ctrl-C quits.")
    t.add_argument("--once", action="store_true", help="print one frame and exit (no terminal needed)")
    t.add_argument("--interval", type=seconds, default=1.0, metavar="SECONDS",
                   help="seconds between refreshes (default 1)")
    add_redis_flags(t)
    t.set_defaults(func=cmd_top)
