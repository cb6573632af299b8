"""Batches created over HTTP, run by spool.producer.batch's resumable BatchRunner in threads of the server process.

Why threads here and not rq: a batch then needs nothing but the gateway (no rq worker to deploy beside it,
sharing its filesystem), and durability comes from what the runner already has. The runner holds the
batch's lock while it runs and can resume any batch from its files; every gateway re-checks the batches it
knows of (`{prefix}gateway:batches:active`) every few seconds and resumes any that has no live runner (a
gateway that died or restarted). So with several gateways on one files directory, a batch outlives the
process that started it. Its outputs are written straight into the files directory and published as
files (purpose "batch_output") once the batch is final.
"""
from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
from typing import Any

import orjson

from spool.gateway.filestore import FileStore
from spool.gateway.metrics import Metrics
from spool.gateway.settings import GatewaySettings
from spool.producer import Client
from spool.producer.batch import BatchBusy, BatchInvalid, BatchMismatch, BatchRunner, RunOptions
from spool.producer.batch.files import OutputError
from spool.producer.batch.state import STATUSES, TERMINAL, BatchInfo, BatchStore, pid_alive, validate_batch_id
from spool.protocol.commands import as_str

log = logging.getLogger("spool.gateway")
ADOPT_S = 5.0  # how often batches without a live runner are looked for
HIDDEN = ("input_file", "output_file", "error_file", "runner", "rq_job_id", "input_sha256", "heartbeat")


def output_id(batch_id: str) -> str:
    """The file id of a batch's output (its completed requests)."""
    return f"file-{batch_id}-output"


def error_id(batch_id: str) -> str:
    """The file id of a batch's error file (requests that did not complete)."""
    return f"file-{batch_id}-errors"


class BatchManager:
    """Creates, runs, resumes, lists and cancels the gateway's batches; blocking (call from threads)."""

    def __init__(self, settings: GatewaySettings, files: FileStore, metrics: Metrics):
        self.settings, self.files, self.metrics = settings, files, metrics
        self.client = Client(settings.redis_url, prefix=settings.prefix)
        self.store = BatchStore(self.client.redis, self.client.keys)
        self.index_key = f"{settings.prefix}gateway:batches"  # sorted set: the gateway's batches by creation
        self.active_key = f"{settings.prefix}gateway:batches:active"  # set: those not final yet
        self._runners: dict[str, BatchRunner | None] = {}  # None: the thread is starting
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._adopter: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the thread that resumes batches nobody runs."""
        self._adopter = threading.Thread(target=self._adopt_loop, name="spool-batch-adopter", daemon=True)
        self._adopter.start()

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop every runner (its batch stays resumable) and wait for the threads."""
        self._stop.set()
        with self._lock:
            for runner in self._runners.values():
                if runner is not None:
                    runner.stop_requested = True
            threads = list(self._threads)
        end = time.monotonic() + timeout_s
        for t in threads + ([self._adopter] if self._adopter else []):
            t.join(max(0.0, end - time.monotonic()))
        self.client.close()

    # -- verbs ------------------------------------------------------------------------------------
    def create(self, input_file_id: str, endpoint: str, metadata: dict | None, priority: str) -> dict:
        """Create a batch in status validating and start running it; returns its batch object."""
        bid = "batch_" + uuid.uuid4().hex
        self.store.create(bid, origin="gateway", input_file_id=input_file_id, requested_endpoint=endpoint,
                          endpoint=endpoint, completion_window="24h", priority=priority,
                          metadata=orjson.dumps(metadata).decode() if metadata else "")
        pipe = self.client.redis.pipeline(transaction=False)  # idempotent writes of two slots (Redis Cluster)
        pipe.zadd(self.index_key, {bid: time.time()})
        pipe.sadd(self.active_key, bid)
        pipe.execute()
        self.launch(bid)
        return self.info(bid)  # type: ignore[return-value]

    def info(self, batch_id: str) -> dict | None:
        """The OpenAI batch object of one of the gateway's batches (file ids, not paths), or None."""
        info = self.store.get(batch_id) if _valid(batch_id) else None
        if info is None or info.fields.get("origin") != "gateway":
            return None
        if info.status in TERMINAL:
            self._publish(info)  # idempotent: heals a gateway that died between the end and the publishing
        return self._shape(info)

    def list(self, after: str | None, limit: int) -> tuple[list[dict], bool]:
        """Batch objects, newest first, after the batch `after`; and whether more follow."""
        r, start = self.client.redis, 0
        if after is not None:
            rank = r.zrevrank(self.index_key, after)
            if rank is None:
                return [], False
            start = rank + 1
        ids = [as_str(x) for x in r.zrevrange(self.index_key, start, start + limit)]
        items = [b for b in (self.info(i) for i in ids[:limit]) if b is not None]
        return items, len(ids) > limit

    def cancel(self, batch_id: str) -> dict | None:
        """Cancel a batch (its runner, wherever it is, winds down within a second); its batch object."""
        if self.info(batch_id) is None:
            return None
        if self.store.cancel(batch_id, self.client.ctx.defaults) == "cancelled":
            self._finished(batch_id)
        return self.info(batch_id)

    def running_with_input(self, file_id: str) -> str | None:
        """A batch, not final yet, whose input is `file_id`."""
        for bid in (as_str(x) for x in self.client.redis.smembers(self.active_key)):
            info = self.store.get(bid) if _valid(bid) else None
            if info is not None and info.status not in TERMINAL and info.fields.get("input_file_id") == file_id:
                return bid
        return None

    # -- running ----------------------------------------------------------------------------------
    def launch(self, batch_id: str) -> None:
        """Run the batch in a thread of this process, unless one already does."""
        with self._lock:
            if batch_id in self._runners or self._stop.is_set():
                return
            self._runners[batch_id] = None
            t = threading.Thread(target=self._run, args=(batch_id,), name=f"spool-{batch_id}", daemon=True)
            self._threads = [x for x in self._threads if x.is_alive()] + [t]
        t.start()

    def _run(self, bid: str) -> None:
        client = Client(self.settings.redis_url, prefix=self.settings.prefix)
        try:
            info = self.store.get(bid)
            if info is None or info.status in TERMINAL:
                self._finished(bid)
                return
            f = info.fields
            if self.files.get(f.get("input_file_id", "")) is None:
                # Not in our files directory: a gateway with another --files-dir shares this Redis. Leave the
                # batch to the gateways that have its files (never fail it from here).
                log.warning("batch %s: its input %s is not in %s; leaving it to a gateway that has it", bid,
                            f.get("input_file_id"), self.files.dir)
                return
            options = RunOptions(progress="none", priority=f.get("priority") or "bulk",
                                 max_in_flight=self.settings.batch_max_in_flight)
            runner = BatchRunner(client, self.files.data_path(f["input_file_id"]),
                                 self.files.data_path(output_id(bid)), self.files.data_path(error_id(bid)), bid,
                                 options)
            with self._lock:
                self._runners[bid] = runner
                if self._stop.is_set():
                    runner.stop_requested = True
            self.metrics.batches_running.inc()
            try:
                runner.run()
            except BatchBusy:
                return  # another gateway runs it
            except BatchInvalid:
                pass  # failed as a whole, its errors recorded by the runner (as OpenAI does)
            except (BatchMismatch, OutputError, OSError) as e:  # e.g. its input file was removed
                log.warning("batch %s failed: %s", bid, e)
                self.store.update(bid, last_error=str(e))
                self.store.transition(bid, "failed", frm=tuple(s for s in STATUSES if s not in TERMINAL))
            finally:
                self.metrics.batches_running.dec()
            final = self.store.get(bid)
            if final is not None and final.status in TERMINAL:
                self._finished(bid)
        except Exception as e:  # Redis away for long, or a bug: left for the next adoption to resume
            log.exception("batch %s stopped; it will be resumed", bid)
            try:
                self.store.update(bid, last_error=f"{type(e).__name__}: {e}")
            except Exception as again:  # noqa: BLE001 - Redis is still away: the log line above says it all
                log.debug("could not record the error of batch %s: %s", bid, again)
        finally:
            with self._lock:
                self._runners.pop(bid, None)
            client.close()

    def _adopt_loop(self) -> None:
        while True:  # at once (batches a previous run of this gateway left), then every ADOPT_S
            try:
                self.adopt()
            except Exception as e:  # noqa: BLE001 - Redis away: try again next round
                log.warning("cannot look for batches to resume: %s", e)
            if self._stop.wait(ADOPT_S):
                return

    def adopt(self) -> list[str]:
        """Start a runner for every active batch that has none (anywhere); returns the ids started."""
        started = []
        for bid in (as_str(x) for x in self.client.redis.smembers(self.active_key)):
            with self._lock:
                if bid in self._runners:
                    continue
            info = self.store.get(bid) if _valid(bid) else None
            if info is None or info.status in TERMINAL:
                self._finished(bid)
            elif self._orphaned(bid) and self.files.get(info.fields.get("input_file_id", "")) is not None:
                started.append(bid)
                self.launch(bid)
        return started

    def _orphaned(self, bid: str) -> bool:
        """No live runner: no lock, or one held by a dead process of this host (the runner takes that over at
        once; another host's lock lapses within its TTL, 15 s)."""
        holder = self.client.redis.get(self.store.lock_key(bid))
        if holder is None:
            return True
        host, _, rest = as_str(holder).partition(":")
        pid = rest.partition(":")[0]
        return host == socket.gethostname() and pid.isdigit() and not pid_alive(int(pid))

    def _finished(self, bid: str) -> None:
        info = self.store.get(bid) if _valid(bid) else None
        if info is not None:
            self._publish(info)
        self.client.redis.srem(self.active_key, bid)

    def _publish(self, info: BatchInfo) -> None:
        """Make a final batch's outputs files of the store (the error file only when it holds something)."""
        out, err = self.files.data_path(output_id(info.id)), self.files.data_path(error_id(info.id))
        if out.exists():
            self.files.register(output_id(info.id), f"{info.id}_output.jsonl", "batch_output")
        if err.exists() and err.stat().st_size > 0:
            self.files.register(error_id(info.id), f"{info.id}_errors.jsonl", "batch_output")

    def _shape(self, info: BatchInfo) -> dict[str, Any]:
        f, d = info.fields, info.to_dict()
        for k in HIDDEN:  # server paths and host names are nobody's business over HTTP
            d.pop(k, None)
        final = info.status in TERMINAL
        d.update(endpoint=f.get("requested_endpoint") or d["endpoint"], input_file_id=f.get("input_file_id", ""),
                 completion_window=f.get("completion_window") or "24h",
                 metadata=orjson.loads(f["metadata"]) if f.get("metadata") else None,
                 output_file_id=output_id(info.id) if final and self.files.get(output_id(info.id)) else None,
                 error_file_id=error_id(info.id) if final and self.files.get(error_id(info.id)) else None)
        return d


def _valid(batch_id: str) -> bool:
    try:
        validate_batch_id(batch_id)
    except ValueError:
        return False
    return True

    return True

