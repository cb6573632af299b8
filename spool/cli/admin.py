"""`spool status | dead | redis`: the deployment's state, its dead letters, the embedded Redis (logic in producer)."""
from __future__ import annotations

import argparse

from spool.cli.common import EXIT_FAILED, EXIT_OK, CliError, add_redis_flags, client, print_json, request_id


def cmd_status(args: argparse.Namespace) -> int:
    """One request's status, or the deployment's: streams, backlog, pending per consumer, live workers."""
    from spool.producer.admin import deployment_status

    producer = client(args)
    if args.id:
        state = producer.status(args.id)
        print(state)
        return EXIT_FAILED if state == "unknown" else EXIT_OK
    print_json(deployment_status(producer.redis, producer.keys))
    return EXIT_OK


def cmd_dead(args: argparse.Namespace) -> int:
    """List dead-lettered jobs, or requeue one by its dead-letter entry id."""
    from spool.producer.admin import DeadLetterError, list_dead, retry_dead

    producer = client(args)
    if args.action == "list":
        for row in list_dead(producer.redis, producer.keys, count=args.count):
            print_json(row)
        return EXIT_OK
    try:
        new_entry, stream = retry_dead(producer.redis, producer.keys, args.dead_id, producer.ctx.defaults)
    except (DeadLetterError, ValueError) as e:
        raise CliError(str(e), EXIT_FAILED) from None
    print(f"requeued as {new_entry} on {stream}")
    return EXIT_OK


def cmd_redis(args: argparse.Namespace) -> int:
    """The embedded local Redis (the one used without --redis-url): where it is, whether it runs; stop it."""
    import redis

    from spool.producer.embedded import SOCKET, state_dir_path, stop_local_redis

    state_dir = state_dir_path()
    sock = state_dir / SOCKET
    if args.action == "stop":
        stopped = stop_local_redis(state_dir)
        print(f"stopped the embedded Redis in {state_dir}" if stopped else f"no embedded Redis running in {state_dir}")
        return EXIT_OK
    probe = redis.Redis(unix_socket_path=str(sock), socket_timeout=2, socket_connect_timeout=2, retry=None)
    try:
        running = sock.exists() and bool(probe.ping())
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        running = False
    finally:
        probe.close()
    print(f"unix://{sock} ({'running' if running else 'not running'}); data in {state_dir}")
    return EXIT_OK if running else EXIT_FAILED


def add_commands(sub) -> None:
    """Register status, dead and redis on the `spool` subparsers."""
    s = sub.add_parser("status", help="a request's status, or the deployment's (streams, backlog, workers)",
                       description="With an id: completed | failed | cancelled | expired | queued | running | "
                                   "unknown (exit 1). Without: the deployment as JSON.")
    s.add_argument("id", nargs="?", type=request_id, help="request id (default: the whole deployment)")
    add_redis_flags(s)
    s.set_defaults(func=cmd_status)

    d = sub.add_parser("dead", help="inspect and retry dead-lettered jobs")
    dsub = d.add_subparsers(dest="action", required=True, metavar="ACTION")
    dl = dsub.add_parser("list", help="list dead letters, oldest first (JSON, one object each)")
    dl.add_argument("--count", type=int, default=100, help="most dead letters to list (default 100)")
    dr = dsub.add_parser("retry", help="requeue a dead letter's job on its original stream")
    dr.add_argument("dead_id", help="the dead letter's entry id (dead_id in `spool dead list`)")
    for x in (dl, dr):
        add_redis_flags(x)
    d.set_defaults(func=cmd_dead)

    r = sub.add_parser("redis", help="the embedded local Redis: status, stop",
                       description="Without --redis-url or SPOOL_REDIS_URL, spool starts a private redis-server on "
                                   "a unix socket in SPOOL_STATE_DIR (~/.local/state/spool) and leaves it running. "
                                   "`status` says where it is (exit 1 if not running); `stop` shuts it down (its "
                                   "AOF keeps the queue; the next spool command starts it again).")
    r.add_argument("action", choices=("status", "stop"), help="status | stop")
    r.set_defaults(func=cmd_redis)
