"""`spool enqueue | tail | result`: send one job and follow it."""
from __future__ import annotations

import sys

import orjson

from protocol import PRIORITIES
from spool.cli.common import add_redis_flags, client, print_json

SAMPLING_FLAGS = {
    "max_tokens": int, "temperature": float, "top_p": float, "top_k": int, "min_p": float, "seed": int,
    "presence_penalty": float, "frequency_penalty": float, "repetition_penalty": float, "logprobs": int,
    "n": int, "min_tokens": int,
}


def _follow(producer, rid: str, timeout: float | None) -> int:
    """Print a token stream's text as it arrives; exit status 0 when the job completed."""
    status = "unknown"
    for ev in producer.stream(rid, timeout=timeout):
        if ev.type == "restart":
            sys.stdout.write("\n[restarted: a worker re-runs this job]\n")
        elif ev.type == "delta":
            sys.stdout.write(ev.text)
        elif ev.type == "done":
            status = ev.status or "unknown"
            sys.stdout.write(f"\n[{status}, finish_reason={ev.finish_reason}]\n")
        sys.stdout.flush()
    return 0 if status == "completed" else 1


def cmd_enqueue(args) -> int:
    """Enqueue one job (prompt from the argument or stdin) and optionally wait or stream."""
    producer = client(args)
    kw = {k: getattr(args, k) for k in SAMPLING_FLAGS if getattr(args, k) is not None}
    if args.stop:
        kw["stop"] = args.stop
    if args.ignore_eos:
        kw["ignore_eos"] = True
    if args.messages:
        kw["messages"] = orjson.loads(args.messages)
        prompt = None
    else:
        prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    from protocol import JobError

    try:
        rid = producer.enqueue(prompt, id=args.id, stream=args.stream, priority=args.priority, **kw)
    except JobError as e:  # invalid, or duplicate_id: the user's mistake, one line
        print(f"spool enqueue: {e.code}: {e.message}", file=sys.stderr)
        return 1
    if args.stream:
        return _follow(producer, rid, args.timeout)
    if args.wait:
        res = producer.result(rid, timeout=args.timeout)
        print_json(res.model_dump(mode="json"))
        return 0 if res.status == "completed" else 1
    print(rid)
    return 0


def cmd_tail(args) -> int:
    """Follow a request's token stream like tail -f; exit at done."""
    return _follow(client(args), args.id, args.timeout)


def cmd_result(args) -> int:
    """Print a request's result JSON (waiting up to --timeout)."""
    res = client(args).result(args.id, timeout=args.timeout)
    print_json(res.model_dump(mode="json"))
    return 0 if res.status == "completed" else 1


def add_commands(sub) -> None:
    """Register enqueue, tail and result on the `spool` subparsers."""
    e = sub.add_parser("enqueue", help="enqueue a job (prompt as argument or from stdin)")
    add_redis_flags(e)
    e.add_argument("prompt", nargs="?", help="prompt text (default: read stdin)")
    e.add_argument("--messages", help="chat messages as a JSON list instead of a prompt")
    e.add_argument("--id", help="request id (default: generated)")
    e.add_argument("--priority", default="interactive", choices=PRIORITIES)
    for name, tp in SAMPLING_FLAGS.items():
        e.add_argument("--" + name.replace("_", "-"), dest=name, type=tp)
    e.add_argument("--stop", action="append", help="stop string (repeatable)")
    e.add_argument("--ignore-eos", action="store_true")
    e.add_argument("--wait", action="store_true", help="wait for and print the result")
    e.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    e.add_argument("--timeout", type=float, default=None, help="seconds to wait with --wait/--stream")
    e.set_defaults(func=cmd_enqueue)

    t = sub.add_parser("tail", help="follow a request's token stream until done")
    add_redis_flags(t)
    t.add_argument("id")
    t.add_argument("--timeout", type=float, default=None)
    t.set_defaults(func=cmd_tail)

    r = sub.add_parser("result", help="print a request's result JSON")
    add_redis_flags(r)
    r.add_argument("id")
    r.add_argument("--timeout", type=float, default=0.0, help="seconds to wait for it (default: don't wait)")
    r.set_defaults(func=cmd_result)
