"""`spool enqueue | tail | result | cancel`: send one job, follow it, read its result, cancel jobs.

stdout carries the job's text (or JSON with --json); notes, failure reasons and errors go to stderr, so
`spool enqueue "..." --wait > out.txt` holds only the text.
"""
from __future__ import annotations

import argparse
import sys

import orjson

from spool.protocol import PRIORITIES
from spool.cli.common import (
    DEFAULT_WAIT_S, EXIT_FAILED, EXIT_OK, EXIT_QUEUED, EXIT_RUNNING, EXIT_TIMEOUT, EXIT_USAGE, CliError,
    add_redis_flags, client, describe_redis, finite, note_if_no_worker, print_json, request_id, say, seconds,
)

SAMPLING_FLAGS = {  # name: (type, help)
    "max_tokens": (int, "most tokens to generate (default 16)"),
    "min_tokens": (int, "generate at least this many tokens before EOS or a stop may end it"),
    "temperature": (float, "sampling temperature; 0 is greedy (default 1.0)"),
    "top_p": (float, "nucleus sampling: smallest token set with this much probability (default 1.0)"),
    "top_k": (int, "sample from the k most likely tokens; 0 or -1 disables it"),
    "min_p": (float, "drop tokens less likely than this fraction of the most likely one"),
    "seed": (int, "per-request seed: the same seed gives the same output"),
    "presence_penalty": (float, "penalize tokens already generated (-2..2)"),
    "frequency_penalty": (float, "penalize tokens by how often they were generated (-2..2)"),
    "repetition_penalty": (float, "penalize tokens of the prompt and output (>1 discourages repeats)"),
    "logprobs": (int, "return the top-N logprobs of each generated token (0..20)"),
    "n": (int, "completions for the prompt (default 1)"),
}
FINAL = ("completed", "failed", "cancelled", "expired")
NOT_FINAL_EXIT = {"queued": EXIT_QUEUED, "running": EXIT_RUNNING}


def _unknown(args: argparse.Namespace, rid: str) -> CliError:
    return CliError(f"no job {rid!r} on {describe_redis(args)} (never enqueued there, or its result expired)",
                    EXIT_FAILED)


def _timed_out(producer, args: argparse.Namespace, rid: str) -> CliError:
    state = producer.status(rid)
    return CliError(f"job {rid} is still {state} after {args.timeout:g}s (--timeout); `spool result {rid} --wait` "
                    f"keeps waiting, `spool cancel {rid}` drops it", EXIT_TIMEOUT)


def print_result(res, as_json: bool, text_printed: bool = False) -> int:
    """Print a final result (its text, or the whole document); the reason of a failure on stderr; exit code."""
    if as_json:
        print_json(res.model_dump(mode="json"))
    elif not text_printed and (res.text or res.status == "completed" or len(res.choices) > 1):
        if len(res.choices) > 1:
            for choice in res.choices:
                sys.stdout.write(f"[{choice.index}] {choice.text}\n")
        else:
            sys.stdout.write(res.text + ("" if res.text.endswith("\n") else "\n"))
    sys.stdout.flush()
    if res.status == "completed":
        return EXIT_OK
    error, reason = res.error, ""
    if error is not None:  # `cancelled: cancelled by request` says it once
        reason = f": {error.message}" if error.code == res.status else f": {error.code}: {error.message}"
    say(f"job {res.id} {res.status}{reason}")
    return EXIT_FAILED


def follow(producer, rid: str, args: argparse.Namespace) -> int:
    """Print choice 0's tokens as they arrive, then the end: the failure reason, or for a job that did not
    stream, its final text (its stream holds only `done`)."""
    streamed = False
    try:
        for ev in producer.stream(rid, timeout=finite(args.timeout)):
            if ev.type == "restart":
                sys.stdout.write("\n")
                say("[restarted: a worker re-runs this job; output starts over]")
            elif ev.type == "delta" and ev.index == 0:
                streamed = streamed or bool(ev.text)
                sys.stdout.write(ev.text)
                sys.stdout.flush()
    except TimeoutError:
        sys.stdout.write("\n" if streamed else "")
        raise _timed_out(producer, args, rid) from None
    if streamed:
        sys.stdout.write("\n")
    res = producer.result(rid, timeout=10.0)  # written together with `done`: already there
    return print_result(res, as_json=False, text_printed=streamed)


def cmd_enqueue(args: argparse.Namespace) -> int:
    """Enqueue one job (prompt from the argument or stdin) and optionally wait or stream."""
    if args.json and not args.wait:
        raise CliError("--json goes with --wait (it prints the whole result document)", EXIT_USAGE)
    kw = {k: getattr(args, k) for k in SAMPLING_FLAGS if getattr(args, k) is not None}
    if args.stop:
        kw["stop"] = args.stop
    if args.ignore_eos:
        kw["ignore_eos"] = True
    prompt = None
    if args.messages:
        try:
            kw["messages"] = orjson.loads(args.messages)
        except orjson.JSONDecodeError as e:
            raise CliError(f"--messages is not JSON: {e}", EXIT_USAGE) from None
    elif args.prompt is not None:
        prompt = args.prompt
    elif sys.stdin.isatty():  # reading a terminal would wait for Ctrl-D with no word: refuse instead
        raise CliError("no prompt: give it as an argument, or pipe it on stdin", EXIT_USAGE)
    else:
        prompt = sys.stdin.read()
    producer = client(args)
    rid = producer.enqueue(prompt, id=args.id, stream=args.stream, priority=args.priority, **kw)
    if not (args.stream or args.wait):
        print(rid)
        return EXIT_OK
    note_if_no_worker(producer, args, f"job {rid}")
    if args.stream:
        return follow(producer, rid, args)
    return _wait_and_print(producer, rid, args)


def _wait_and_print(producer, rid: str, args: argparse.Namespace) -> int:
    try:
        res = producer.result(rid, timeout=finite(args.timeout))
    except TimeoutError:
        raise _timed_out(producer, args, rid) from None
    return print_result(res, args.json)


def cmd_tail(args: argparse.Namespace) -> int:
    """Follow a request's token stream like tail -f; exit at done."""
    producer = client(args)
    state = producer.status(args.id)
    if state == "unknown":
        raise _unknown(args, args.id)
    if state not in FINAL:
        note_if_no_worker(producer, args, f"job {args.id} ({state})")
    return follow(producer, args.id, args)


def cmd_result(args: argparse.Namespace) -> int:
    """Print a request's result, or its state (queued, running, unknown); --wait blocks for it."""
    producer = client(args)
    state = producer.status(args.id)
    if state == "unknown":
        print("unknown")
        raise _unknown(args, args.id)
    if state in FINAL:
        return print_result(producer.result(args.id, timeout=10.0), args.json)
    if not args.wait:
        print(state)
        return NOT_FINAL_EXIT.get(state, EXIT_RUNNING)
    note_if_no_worker(producer, args, f"job {args.id} ({state})")
    return _wait_and_print(producer, args.id, args)


def cmd_cancel(args: argparse.Namespace) -> int:
    """Cancel queued or running jobs; a finished one is left as it is."""
    producer = client(args)
    code = EXIT_OK
    for rid in args.ids:
        state = producer.status(rid)
        if state == "unknown":
            say(_unknown(args, rid).message)
            code = EXIT_FAILED
        elif state in FINAL:
            print(f"{rid}: already {state}")
        else:
            producer.cancel(rid)
            print(f"{rid}: cancel requested (was {state})")
    return code


def _timeout_flag(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--timeout", type=seconds, default=DEFAULT_WAIT_S, metavar="SECONDS",
                   help=f"{what} at most this long, then exit 3 (default {DEFAULT_WAIT_S:g}; inf: no limit)")


def add_commands(sub) -> None:
    """Register enqueue, tail, result and cancel on the `spool` subparsers."""
    e = sub.add_parser("enqueue", help="enqueue a job (prompt as argument or from stdin)",
                       description="Validate and enqueue one job; print its id, or with --wait its text, or with "
                                   "--stream its tokens as they arrive.")
    e.add_argument("prompt", nargs="?", help="prompt text (default: read stdin)")
    e.add_argument("--messages", metavar="JSON",
                   help='chat messages as a JSON list instead of a prompt, e.g. \'[{"role":"user","content":"Hi"}]\'')
    e.add_argument("--id", help="request id (default: a new uuid4 hex)")
    e.add_argument("--priority", default="interactive", choices=PRIORITIES,
                   help="interactive jobs are served before bulk ones (default interactive)")
    for name, (tp, help_) in SAMPLING_FLAGS.items():
        e.add_argument("--" + name.replace("_", "-"), dest=name, type=tp, help=help_)
    e.add_argument("--stop", action="append", metavar="TEXT", help="stop string (repeatable)")
    e.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")
    e.add_argument("--durable", action="store_true",
                   help="return only once a replica has the job (WAIT 1); else fail with not_replicated")
    how = e.add_mutually_exclusive_group()
    how.add_argument("--wait", action="store_true", help="wait for the job and print its text")
    how.add_argument("--stream", action="store_true", help="print the tokens as they arrive")
    e.add_argument("--json", action="store_true", help="with --wait: print the whole result document (JSON)")
    _timeout_flag(e, "with --wait or --stream: wait")
    add_redis_flags(e)
    e.set_defaults(func=cmd_enqueue)

    t = sub.add_parser("tail", help="follow a request's token stream until done",
                       description="Print a job's tokens as they arrive, then how it ended; a job that did not "
                                   "stream prints its final text.")
    t.add_argument("id", type=request_id, help="request id")
    _timeout_flag(t, "follow")
    add_redis_flags(t)
    t.set_defaults(func=cmd_tail)

    r = sub.add_parser("result", help="print a request's result, or queued / running / unknown",
                       description="A final job prints its text (--json: the result document); exit 0 if it "
                                   "completed, 1 if not. Otherwise prints its state: exit 5 queued, 6 running, "
                                   "1 unknown; --wait blocks until it is final.")
    r.add_argument("id", type=request_id, help="request id")
    r.add_argument("--wait", action="store_true", help="block until the result is there")
    r.add_argument("--json", action="store_true", help="print the whole result document (JSON)")
    _timeout_flag(r, "with --wait: wait")
    add_redis_flags(r)
    r.set_defaults(func=cmd_result)

    c = sub.add_parser("cancel", help="cancel queued or running jobs",
                       description="A queued job never starts; a running one stops at the next step and its "
                                   "result says cancelled (with the text so far). Exit 1 if an id is unknown.")
    c.add_argument("ids", nargs="+", metavar="ID", type=request_id, help="request ids")
    add_redis_flags(c)
    c.set_defaults(func=cmd_cancel)
