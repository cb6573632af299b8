"""Producer-side `spool` verbs: enqueue, tail, result, status, dead."""
from __future__ import annotations

import argparse
import sys

import orjson

SAMPLING_FLAGS = {
    "max_tokens": int, "temperature": float, "top_p": float, "top_k": int, "min_p": float, "seed": int,
    "presence_penalty": float, "frequency_penalty": float, "repetition_penalty": float, "logprobs": int,
    "n": int, "min_tokens": int,
}


def _common(p: argparse.ArgumentParser) -> None:
    import os

    p.add_argument("--redis-url", default=os.environ.get("SPOOL_REDIS_URL"),
                   help="Redis URL [SPOOL_REDIS_URL; default: the embedded local server]")
    p.add_argument("--prefix", default=os.environ.get("SPOOL_PREFIX", "spool:"), help="key prefix [SPOOL_PREFIX]")


def _client(args):
    from producer.client import Client

    return Client(args.redis_url, prefix=args.prefix)


def _print_json(obj) -> None:
    sys.stdout.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2).decode() + "\n")


def _follow(client, rid: str, timeout: float | None) -> int:
    """Print a token stream's text as it arrives; exit status 0 when the job completed."""
    status = "unknown"
    for ev in client.stream(rid, timeout=timeout):
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
    client = _client(args)
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
    rid = client.enqueue(prompt, id=args.id, stream=args.stream, priority=args.priority, **kw)
    if args.stream:
        return _follow(client, rid, args.timeout)
    if args.wait:
        res = client.result(rid, timeout=args.timeout)
        _print_json(res.model_dump(mode="json"))
        return 0 if res.status == "completed" else 1
    print(rid)
    return 0


def cmd_tail(args) -> int:
    """Follow a request's token stream like tail -f; exit at done."""
    return _follow(_client(args), args.id, args.timeout)


def cmd_result(args) -> int:
    """Print a request's result JSON (waiting up to --timeout)."""
    res = _client(args).result(args.id, timeout=args.timeout)
    _print_json(res.model_dump(mode="json"))
    return 0 if res.status == "completed" else 1


def cmd_status(args) -> int:
    """One request's status, or the deployment's: streams, pending per consumer, live workers and their load."""
    client = _client(args)
    if args.id:
        print(client.status(args.id))
        return 0
    r, keys = client.redis, client.keys
    out: dict = {"streams": {}, "workers": {}}
    for stream in keys.all_jobs:
        info = {"length": r.xlen(stream), "pending": {}}
        try:
            summary = r.xpending(stream, keys.group)
            info["pending"] = {c["name"].decode(): c["pending"] for c in summary.get("consumers", [])}
        except Exception:  # the group does not exist until a worker starts
            pass
        out["streams"][stream] = info
    for name in sorted(m.decode() for m in r.smembers(keys.workers)):
        h = r.hgetall(keys.worker(name))
        if h:
            out["workers"][name] = {k.decode(): orjson.loads(v) for k, v in h.items()}
    out["dead_letters"] = r.xlen(keys.dead)
    _print_json(out)
    return 0


def cmd_dead(args) -> int:
    """List dead-lettered jobs, or requeue one by its dead-letter entry id."""
    from producer.dead import DeadLetterError, list_dead, retry_dead

    client = _client(args)
    if args.action == "list":
        for row in list_dead(client.redis, client.keys, count=args.count):
            _print_json(row)
        return 0
    try:
        new_entry, stream = retry_dead(client.redis, client.keys, args.dead_id, client.ctx.defaults)
    except (DeadLetterError, ValueError) as e:
        print(e, file=sys.stderr)
        return 1
    print(f"requeued as {new_entry} on {stream}")
    return 0


def add_commands(sub) -> None:
    """Register the producer verbs on the `spool` subparsers."""
    e = sub.add_parser("enqueue", help="enqueue a job (prompt as argument or from stdin)")
    _common(e)
    e.add_argument("prompt", nargs="?", help="prompt text (default: read stdin)")
    e.add_argument("--messages", help="chat messages as a JSON list instead of a prompt")
    e.add_argument("--id", help="request id (default: generated)")
    e.add_argument("--priority", default="interactive", choices=["interactive", "bulk"])
    for name, tp in SAMPLING_FLAGS.items():
        e.add_argument("--" + name.replace("_", "-"), dest=name, type=tp)
    e.add_argument("--stop", action="append", help="stop string (repeatable)")
    e.add_argument("--ignore-eos", action="store_true")
    e.add_argument("--wait", action="store_true", help="wait for and print the result")
    e.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    e.add_argument("--timeout", type=float, default=None, help="seconds to wait with --wait/--stream")
    e.set_defaults(func=cmd_enqueue)

    t = sub.add_parser("tail", help="follow a request's token stream until done")
    _common(t)
    t.add_argument("id")
    t.add_argument("--timeout", type=float, default=None)
    t.set_defaults(func=cmd_tail)

    r = sub.add_parser("result", help="print a request's result JSON")
    _common(r)
    r.add_argument("id")
    r.add_argument("--timeout", type=float, default=0.0, help="seconds to wait for it (default: don't wait)")
    r.set_defaults(func=cmd_result)

    s = sub.add_parser("status", help="a request's status, or the deployment's (streams, pending, workers)")
    _common(s)
    s.add_argument("id", nargs="?")
    s.set_defaults(func=cmd_status)

    d = sub.add_parser("dead", help="inspect and retry dead-lettered jobs")
    dsub = d.add_subparsers(dest="action", required=True)
    dl = dsub.add_parser("list", help="list dead letters")
    dl.add_argument("--count", type=int, default=100)
    dr = dsub.add_parser("retry", help="requeue a dead letter by its entry id")
    dr.add_argument("dead_id")
    for x in (dl, dr):
        _common(x)
    d.set_defaults(func=cmd_dead)
    __import__("producer.batch_cli", fromlist=["_"]).add_batch_commands(sub)  # the `batch` verbs
