"""Soak: jobs flow for a set time while workers are SIGKILLed, Redis restarts, freezes (SIGSTOP), runs out of
memory and drops connections; then audit that every job ended exactly once.

  python bench/soak.py --duration 120 --workers 3 --kill-every 8 --restart-redis-every 25 --json soak.json

Everything is local and private: its own redis-server (AOF, appendfsync always) on a free 127.0.0.1 port in a
temporary directory, its own tiny random-init model, N `spool worker` subprocesses on the CPU. A producer
enqueues a steady stream of jobs (some streaming, some cancelled, some hostile ones from
spool/testing/hostile_corpus.py) while a chaos loop SIGKILLs random workers (restarting them, under the same name or
a new one) and restarts Redis (gracefully or with SIGKILL). Then it waits for quiescence and audits: every
accepted id has a result and exactly one `done`, hostile jobs failed with their expected codes, every
id-less hostile entry is in the dead letters, nothing is pending. Exit status 0 when nothing was lost or
duplicated and no worker died on its own. On top, spool/testing/history.py checks the exactly-once
invariants of docs/PROTOCOL.md on every regular job: one final result, nothing after `done`, no two runs
mixed, each streamed job's stream equal to its result, no healthy job condemned as poison. Bounded: it
stops by itself after --duration + --quiesce-timeout.
"""
from __future__ import annotations

import argparse
import json
import random
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis  # noqa: E402

from spool.producer import Client  # noqa: E402
from spool.protocol.keys import Keys  # noqa: E402
from spool.testing.chaos import WorkerProcess, audit  # noqa: E402
from spool.testing.history import History, check  # noqa: E402
from spool.testing.redis_server import RedisServer  # noqa: E402
from spool.worker.leases import is_nogroup  # noqa: E402
from spool.testing.hostile_corpus import corpus  # noqa: E402

KEYS = Keys()
RETRYABLE = (redis.ConnectionError, redis.TimeoutError)


def _retryable(e: Exception) -> bool:
    # A Redis out of memory (the --oom-every chaos) refuses writes for a while: the producer waits it out.
    return isinstance(e, RETRYABLE) or (isinstance(e, redis.ResponseError) and "maxmemory" in str(e))


@dataclass
class Tally:
    """What the producer and the chaos loop did."""

    accepted: list[str] = field(default_factory=list)  # ids whose enqueue returned
    hostile: dict[str, str] = field(default_factory=dict)  # id -> expected error code
    dead_entries: dict[str, str] = field(default_factory=dict)  # entry id -> expected reason code
    bad_inputs: int = 0
    cancels: int = 0
    enqueue_retries: int = 0
    workers_killed: int = 0
    worker_crashes: int = 0  # died without being killed: must stay 0
    redis_restarts: int = 0
    redis_crashes: int = 0
    redis_freezes: int = 0
    redis_ooms: int = 0
    client_kills: int = 0
    events: list[str] = field(default_factory=list)
    history: History = field(default_factory=History)


def _retry(fn, tally: Tally, stop_at: float):
    """Call fn until it succeeds: Redis may be restarting (the client already retries for ~15 s)."""
    while True:
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - only the retryable ones are swallowed
            if not _retryable(e):
                raise
            tally.enqueue_retries += 1
            if time.monotonic() > stop_at:
                raise
            time.sleep(0.2)


def produce(url: str, tally: Tally, stop: threading.Event, args, rng: random.Random, hard_stop: float) -> None:
    """Enqueue jobs at --rate per second until stopped; hostile ones and cancels sprinkled in."""
    client = Client(url)
    hostile, n, round_ = [], 0, 0
    period = 1.0 / args.rate
    next_at = time.monotonic()
    while not stop.is_set():
        next_at += period
        n += 1
        rid = f"soak-{args.seed}-{n}"
        job = {"id": rid, "prompt": f"soak job {n}", "max_tokens": rng.randint(4, args.max_tokens),
               "ignore_eos": rng.random() < 0.5, "stream": rng.random() < 0.3, "seed": n,
               "temperature": rng.choice([0.0, 0.7, 1.0])}
        _retry(lambda: client.enqueue_many([job]), tally, hard_stop)
        tally.accepted.append(rid)
        tally.history.acknowledged(rid, streamed=job["stream"])
        if rng.random() < args.cancel_fraction:
            _retry(lambda: client.cancel(rid), tally, hard_stop)
            tally.cancels += 1
        if rng.random() < args.hostile_fraction:
            if not hostile:
                round_ += 1
                hostile = corpus(tag=f"s{args.seed}r{round_}-")
                rng.shuffle(hostile)
            case = hostile.pop()
            entry = _retry(lambda: client.redis.xadd(KEYS.jobs(), case.fields), tally, hard_stop).decode()
            tally.bad_inputs += case.code is not None
            if case.dead:
                tally.dead_entries[entry] = case.code
            else:
                tally.accepted.append(case.id or entry)
                if case.code is not None:
                    tally.hostile[case.id or entry] = case.code
        time.sleep(max(0.0, next_at - time.monotonic()))


def chaos(server: RedisServer, workers: list[WorkerProcess], spawn, tally: Tally, stop: threading.Event, args,
          rng: random.Random) -> None:
    """SIGKILL a random worker every ~kill_every s, restart Redis every ~restart_redis_every s, freeze it,
    run it out of memory and drop every client connection at their own mean intervals."""
    now = time.monotonic()
    next_kill = now + rng.uniform(0.5, 1.5) * args.kill_every
    next_redis = now + rng.uniform(0.5, 1.5) * args.restart_redis_every
    timers = {name: now + rng.uniform(0.5, 1.5) * every for name, every in
              (("freeze", args.freeze_redis_every), ("oom", args.oom_every), ("client_kill", args.client_kill_every))
              if every > 0}
    while not stop.wait(0.1):
        for i, w in enumerate(workers):
            if not w.alive:  # nobody killed it: a crash
                tally.worker_crashes += 1
                tally.events.append(f"{time.monotonic() - now:.1f}s worker {w.name} died on its own")
                workers[i] = spawn(w.name)
        t = time.monotonic()
        if args.kill_every > 0 and t >= next_kill:
            next_kill = t + rng.uniform(0.5, 1.5) * args.kill_every
            i = rng.randrange(len(workers))
            victim = workers[i]
            victim.kill()
            tally.workers_killed += 1
            # Same name: it takes its own pending jobs back at start-up; new name: others reclaim them.
            name = victim.name if rng.random() < 0.5 else f"{victim.name.split('.')[0]}.{tally.workers_killed}"
            workers[i] = spawn(name)
            tally.events.append(f"{t - now:.1f}s SIGKILL {victim.name}, restarted as {name}")
        if args.restart_redis_every > 0 and t >= next_redis:
            next_redis = t + rng.uniform(0.5, 1.5) * args.restart_redis_every
            crash = rng.random() < 0.5
            server.kill() if crash else server.stop()
            time.sleep(rng.uniform(0.2, 2.0))  # down for a while: workers keep generating
            server.start()
            tally.redis_restarts += 1
            tally.redis_crashes += crash
            tally.events.append(f"{t - now:.1f}s redis {'SIGKILL' if crash else 'SIGTERM'} + restart")
        for name, due in list(timers.items()):
            if t >= due:
                every = {"freeze": args.freeze_redis_every, "oom": args.oom_every,
                         "client_kill": args.client_kill_every}[name]
                timers[name] = t + rng.uniform(0.5, 1.5) * every
                _fault(name, server, tally, rng, t - now)


def _fault(name: str, server: RedisServer, tally: Tally, rng: random.Random, at: float) -> None:
    """One of the milder faults: a frozen Redis, a Redis out of memory, or every connection dropped."""
    try:
        if name == "freeze" and server.proc is not None:
            pause = rng.uniform(0.5, 3.0)
            server.proc.send_signal(signal.SIGSTOP)
            time.sleep(pause)
            server.proc.send_signal(signal.SIGCONT)
            tally.redis_freezes += 1
            tally.events.append(f"{at:.1f}s redis SIGSTOP for {pause:.1f}s")
        elif name == "oom":
            admin = server.client()
            admin.config_set("maxmemory-policy", "noeviction")
            admin.config_set("maxmemory", 1)
            time.sleep(rng.uniform(0.5, 2.0))
            admin.config_set("maxmemory", 0)
            tally.redis_ooms += 1
            tally.events.append(f"{at:.1f}s redis out of memory for a while")
        elif name == "client_kill":
            tally.client_kills += int(server.client().execute_command("CLIENT", "KILL", "TYPE", "normal",
                                                                      "SKIPME", "yes"))
    except RETRYABLE:
        pass  # Redis was restarting: skip this one


def quiesce(r: redis.Redis, tally: Tally, timeout: float) -> float:
    """Wait until every accepted job has a result, every dead letter is in and nothing is pending."""
    t0 = time.monotonic()
    ids = list(tally.accepted)
    while time.monotonic() - t0 < timeout:
        try:
            missing = sum(1 for rid, ok in zip(ids, _exists(r, ids)) if not ok)
            dead = {f[b"entry_id"].decode() for _, f in r.xrange(KEYS.dead)}
            pending = sum(r.xpending(s, KEYS.group)["pending"] for s in KEYS.all_jobs)
            if not missing and set(tally.dead_entries) <= dead and not pending:
                return time.monotonic() - t0
        except RETRYABLE:
            pass
        except redis.ResponseError as e:
            # No consumer group yet: no worker has got through its start-up (chaos kills them, and a short soak
            # on a slow machine can end before one does). Not quiet; the audit still finds anything lost.
            if not is_nogroup(e):
                raise
        time.sleep(0.5)
    return -1.0


def _exists(r: redis.Redis, ids: list[str]) -> list[int]:
    out = []
    for i in range(0, len(ids), 1000):
        pipe = r.pipeline(transaction=False)
        for rid in ids[i:i + 1000]:
            pipe.exists(KEYS.result(rid))
        out += pipe.execute()
    return out


def report(r: redis.Redis, tally: Tally, wall: float, quiet_s: float, args) -> dict:
    """The audit, as a dict of figures."""
    a = audit(r, KEYS, tally.accepted)
    wrong_codes = {rid: (want, a.codes.get(rid)) for rid, want in tally.hostile.items() if a.codes.get(rid) != want}
    dead = {f[b"entry_id"].decode(): f[b"reason"].decode() for _, f in r.xrange(KEYS.dead)}
    dead_missing = [e for e in tally.dead_entries if e not in dead]
    dead_wrong = [e for e, code in tally.dead_entries.items() if e in dead and not dead[e].startswith(code + ":")]
    out = {
        "duration_s": args.duration, "wall_s": round(wall, 1), "quiesce_s": round(quiet_s, 1),
        "workers": args.workers, "seed": args.seed,
        "jobs_run": len(tally.accepted), "bad_inputs_tried": tally.bad_inputs,
        "dead_letters_expected": len(tally.dead_entries), "cancels_sent": tally.cancels,
        "workers_killed": tally.workers_killed, "worker_crashes": tally.worker_crashes,
        "redis_restarts": tally.redis_restarts, "redis_crashes": tally.redis_crashes,
        "producer_retries": tally.enqueue_retries,
        "jobs_lost": len(a.lost), "duplicate_final_results": len(a.duplicates), "missing_done": len(a.no_done),
        "duplicate_runs_suppressed": int(r.hget(KEYS.stats, "duplicate_finals") or 0),
        "restart_events": a.restarts, "statuses": a.statuses,
        "hostile_wrong_code": len(wrong_codes), "dead_letters_missing": len(dead_missing),
        "dead_letters_wrong_reason": len(dead_wrong),
        "examples": {**a.summary()["examples"], "wrong_codes": dict(list(wrong_codes.items())[:5])},
        "events": tally.events,
    }
    problems = check(tally.history, r, KEYS)
    out["history_problems"] = len(problems)
    out["examples"]["history"] = problems[:5]
    out["redis_freezes"], out["redis_ooms"], out["client_kills"] = (tally.redis_freezes, tally.redis_ooms,
                                                                    tally.client_kills)
    out["ok"] = not (a.lost or a.duplicates or a.no_done or wrong_codes or dead_missing or dead_wrong
                     or tally.worker_crashes or quiet_s < 0 or problems)
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the soak; exit 0 when the audit is clean."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=120.0, help="seconds of load and chaos")
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--kill-every", type=float, default=8.0, help="mean seconds between worker SIGKILLs (0: never)")
    p.add_argument("--restart-redis-every", type=float, default=25.0, help="mean seconds between Redis restarts")
    p.add_argument("--freeze-redis-every", type=float, default=30.0, help="mean seconds between SIGSTOPs of Redis")
    p.add_argument("--oom-every", type=float, default=40.0, help="mean seconds between Redis out-of-memory spells")
    p.add_argument("--client-kill-every", type=float, default=5.0, help="mean seconds between CLIENT KILLs (0: never)")
    p.add_argument("--rate", type=float, default=25.0, help="jobs enqueued per second")
    p.add_argument("--max-tokens", type=int, default=120)
    p.add_argument("--hostile-fraction", type=float, default=0.1, help="share of jobs followed by a hostile entry")
    p.add_argument("--cancel-fraction", type=float, default=0.02)
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--hidden-size", type=int, default=128, help="tiny model width (slower: more work in flight)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--claim-idle-ms", type=int, default=1000)
    p.add_argument("--quiesce-timeout", type=float, default=180.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, AOF)")
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="spool-soak-"))
    from spool.testing.tiny_model import build_tiny_model

    model = build_tiny_model(tmp / "model", hidden_size=args.hidden_size, num_layers=args.layers)
    server = RedisServer(tmp / "redis", appendonly=True, appendfsync="always").start()
    print(f"soak: redis {server.url}, model {model}, logs {tmp}", file=sys.stderr)

    def spawn(name: str) -> WorkerProcess:
        return WorkerProcess(model, server.url, name, tmp, claim_idle_ms=args.claim_idle_ms,
                             max_num_seqs=args.max_num_seqs).start()

    workers = [spawn(f"w{i}") for i in range(args.workers)]
    tally, stop = Tally(), threading.Event()
    t0 = time.monotonic()
    hard_stop = t0 + args.duration + args.quiesce_timeout
    threads = [threading.Thread(target=produce, args=(server.url, tally, stop, args, random.Random(args.seed + 1),
                                                      hard_stop), daemon=True),
               threading.Thread(target=chaos, args=(server, workers, spawn, tally, stop, args, rng), daemon=True)]
    for t in threads:
        t.start()
    try:
        stop.wait(args.duration)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    if not server.running:
        server.start()
    r = server.client()
    quiet_s = quiesce(r, tally, max(10.0, hard_stop - time.monotonic()))
    exit_codes = [w.stop() for w in workers]  # graceful SIGTERM: each must exit 0
    out = report(r, tally, time.monotonic() - t0, quiet_s, args)
    out["unclean_exits"] = sum(code != 0 for code in exit_codes)
    out["ok"] = out["ok"] and not out["unclean_exits"]
    server.stop()
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    if not args.keep and out["ok"]:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
