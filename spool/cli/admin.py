"""`spool status | dead`: the deployment's state and its dead letters (logic in producer.admin)."""
from __future__ import annotations

import sys

from spool.cli.common import add_redis_flags, client, print_json


def cmd_status(args) -> int:
    """One request's status, or the deployment's: streams, pending per consumer, live workers and their load."""
    from producer.admin import deployment_status

    producer = client(args)
    if args.id:
        print(producer.status(args.id))
        return 0
    print_json(deployment_status(producer.redis, producer.keys))
    return 0


def cmd_dead(args) -> int:
    """List dead-lettered jobs, or requeue one by its dead-letter entry id."""
    from producer.admin import DeadLetterError, list_dead, retry_dead

    producer = client(args)
    if args.action == "list":
        for row in list_dead(producer.redis, producer.keys, count=args.count):
            print_json(row)
        return 0
    try:
        new_entry, stream = retry_dead(producer.redis, producer.keys, args.dead_id, producer.ctx.defaults)
    except (DeadLetterError, ValueError) as e:
        print(e, file=sys.stderr)
        return 1
    print(f"requeued as {new_entry} on {stream}")
    return 0


def add_commands(sub) -> None:
    """Register status and dead on the `spool` subparsers."""
    s = sub.add_parser("status", help="a request's status, or the deployment's (streams, pending, workers)")
    add_redis_flags(s)
    s.add_argument("id", nargs="?")
    s.set_defaults(func=cmd_status)

    d = sub.add_parser("dead", help="inspect and retry dead-lettered jobs")
    dsub = d.add_subparsers(dest="action", required=True)
    dl = dsub.add_parser("list", help="list dead letters")
    dl.add_argument("--count", type=int, default=100)
    dr = dsub.add_parser("retry", help="requeue a dead letter by its entry id")
    dr.add_argument("dead_id")
    for x in (dl, dr):
        add_redis_flags(x)
    d.set_defaults(func=cmd_dead)
