"""What every verb that talks to a deployment shares: the --redis-url/--prefix flags, the client, JSON output."""
from __future__ import annotations

import argparse
import sys
from typing import Any

import orjson

from protocol.defaults import DEFAULT_PREFIX
from protocol.env import ENV_PREFIX_KEY, ENV_REDIS_URL, env_text


def add_redis_flags(parser: argparse.ArgumentParser) -> None:
    """--redis-url and --prefix, defaulting to SPOOL_REDIS_URL and SPOOL_PREFIX."""
    parser.add_argument("--redis-url", default=env_text(ENV_REDIS_URL),
                        help=f"Redis URL [{ENV_REDIS_URL}; default: the embedded local server]")
    parser.add_argument("--prefix", default=env_text(ENV_PREFIX_KEY, DEFAULT_PREFIX),
                        help=f"key prefix [{ENV_PREFIX_KEY}; default: {DEFAULT_PREFIX}]")


def client(args: argparse.Namespace):
    """A producer Client for the deployment the flags name."""
    from producer.client import Client

    return Client(args.redis_url, prefix=args.prefix)


def print_json(obj: Any) -> None:
    """Print `obj` as indented JSON on stdout."""
    sys.stdout.write(orjson.dumps(obj, option=orjson.OPT_INDENT_2).decode() + "\n")
