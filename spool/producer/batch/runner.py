"""The batch run loop: validate the whole input first, then stream it through spool with a bounded window.

Memory stays flat in the number of lines: the input is read twice, streaming, and the per-line sets (custom_ids
seen while validating, custom_ids already written when resuming) are temporary Redis sets of 8-byte hashes,
filled and queried in pipelined chunks; only invalid line numbers are kept in the process. Request ids are
derived from (batch id, custom_id), so a resumed run re-attaches to jobs a previous run enqueued instead of
enqueuing them again; the output files, not Redis, say which lines are written.
"""
from __future__ import annotations

import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path


from spool.producer.batch.format import LineError, Request, cid_key, parse_line
from spool.producer.batch.responses import error_record, output_record
from spool.producer.batch.files import (
    LineWriter, OutputError, RequestCounts, Written, detect_batch_id, iter_lines, scan_outputs,
)
from spool.producer.batch.progress import Progress
from spool.producer.batch.state import TMP_TTL_S, BatchInfo, BatchStore, validate_batch_id
from spool.producer.batch.validate import BatchBusy, BatchInvalid, BatchMismatch, validate
from spool.producer.client import Client
from spool.protocol import BATCH_PRIORITY, Result
from spool.protocol.commands import (
    DUPLICATE_ID, Cmd, as_str, cancel_cmds, cmd, duplicate_id_message, enqueue_flow, execute, run_flow,
)
from spool.protocol.connection import TRANSIENT_ERRORS, is_cluster

SWEEP_S = 5.0  # also GET every in-flight result this often, in case a done wake-up was missed or trimmed


@dataclass(slots=True)
class RunOptions:
    """How a batch runs; every field is a `spool batch run` flag."""

    max_in_flight: int = 256  # jobs enqueued and not yet written; the rest of the file waits on disk
    skip_invalid: bool = False  # run the valid lines and write the invalid ones as errors, instead of failing
    default_max_tokens: int | None = None  # for lines without max_tokens (else the rest of the context)
    progress: str = "auto"  # auto | bar | plain | none
    progress_interval_s: float = 10.0  # between plain progress lines
    fsync_every: int = 100
    cancel_grace_s: float = 10.0  # after a cancel, wait this long for in-flight jobs to report
    heartbeat_s: float = 1.0  # state counts, lock refresh and cancel check
    max_errors_kept: int = 100  # validation errors kept for the report (all are counted)
    priority: str = BATCH_PRIORITY  # the jobs stream the batch's requests go on (bulk: interactive traffic first)


@dataclass(slots=True)
class _Flight:
    req: Request
    last: bytes = b"0-0"  # last token stream entry seen


class BatchRunner:
    """Runs one batch to a final status (or until stop_requested); safe to re-run on the same files to resume."""

    def __init__(self, client: Client, input_path: str | os.PathLike[str], output_path: str | os.PathLike[str],
                 errors_path: str | os.PathLike[str] | None = None, batch_id: str | None = None,
                 options: RunOptions | None = None, progress: Progress | None = None):
        self.client, self.redis, self.ctx = client, client.redis, client.ctx
        self.keys, self.store = client.keys, BatchStore(client.redis, client.keys)
        self.input, self.out = Path(input_path), Path(output_path)
        self.err = Path(errors_path) if errors_path else self.out
        self.options = options or RunOptions()
        self.progress = progress or Progress(self.options.progress, self.options.progress_interval_s)
        self.batch_id = batch_id
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.stop_requested = False  # set by a signal handler: stop now and leave the batch resumable
        self.interrupted = False
        self.cancelling = False
        self.has_written = False  # the output files already hold request lines: filter them out on submit
        self.inflight: dict[str, _Flight] = {}
        self.counts = RequestCounts()
        self._writers: list[LineWriter] = []  # opened once the run starts; until then counts are not ours
        self._next_beat = self._next_sweep = 0.0

    # -- entry ------------------------------------------------------------------------------------
    def run(self) -> BatchInfo:
        """Validate, run and finalize (or resume) the batch; returns its final state."""
        bid = self.batch_id or detect_batch_id([self.out, self.err]) or "batch_" + uuid.uuid4().hex[:16]
        self.batch_id = validate_batch_id(bid)
        self.store.create(bid)
        if not self.store.acquire(bid, self.owner) and not self.store.take_over_dead(bid, self.owner):
            raise BatchBusy(f"batch {bid} is being run by another process (its lock is held)")
        try:
            return self._run(bid)
        finally:
            for w in self._writers:
                w.close()
            self.store.release(bid, self.owner)

    def _run(self, bid: str) -> BatchInfo:
        info = self.store.get(bid)
        assert info is not None
        if info.status in ("completed", "cancelled"):
            self.progress.message(f"batch {bid} is already {info.status}")
            return info
        if info.status == "cancelling":
            return self._finish_cancel(bid)
        self.store.update(bid, input_file=self.input.resolve(), output_file=self.out.resolve(),
                          error_file=self.err.resolve())
        resumed = "in_progress_at" in info.fields
        self.store.transition(bid, "validating", frm=("validating", "in_progress", "finalizing", "failed"))
        self.progress.message(f"batch {bid}: validating {self.input}")
        def keepalive() -> None:
            if not self.store.refresh(bid, self.owner):
                raise BatchBusy(f"batch {bid}: lost the runner lock while validating")

        valid, invalid, errors, sha, endpoint = validate(self.store, self.ctx, self.input, bid,
                                                         self.options.default_max_tokens, self.options.max_errors_kept,
                                                         keepalive)
        if resumed and info.fields.get("input_sha256") not in (None, sha):
            self.store.update(bid, status=info.status)  # refused: leave the batch as it was
            raise BatchMismatch(f"batch {bid} was started from another input file (sha256 differs)")
        self.counts.total, self.counts.invalid = valid + len(invalid), len(invalid)
        self.store.update(bid, total=self.counts.total, invalid=self.counts.invalid, input_sha256=sha,
                          errors={"object": "list", "data": errors[:20]}, runner=self.owner, endpoint=endpoint)
        if invalid and not self.options.skip_invalid:
            self.store.transition(bid, "failed", frm=("validating",))
            raise BatchInvalid(bid, errors, len(invalid))
        wkey = self.store.written_key(bid)
        self.redis.delete(wkey)
        w = scan_outputs([self.out, self.err], bid, lambda ks: self._exec(
            [cmd("sadd", wkey, *ks), cmd("expire", wkey, TMP_TTL_S)], False))
        self.counts.completed, self.counts.failed, self.counts.tokens = w.completed, w.failed, w.tokens
        self.has_written = w.written > 0
        if self.store.transition(bid, "in_progress", frm=("validating",)) == "cancelling":
            return self._finish_cancel(bid)
        done = w.completed + w.failed
        self.progress.message(f"batch {bid}: {self.counts.total} lines, {valid} valid"
                              + (f", resuming with {done} already written" if done else ""))
        self._open_writers()
        self._pump(bid, invalid, w)
        self._beat(bid, force=True)
        self.progress.update(self.counts.completed, self.counts.failed, self.counts.total, self.counts.tokens, force=True)
        if self.cancelling:
            return self._finish_cancel(bid)
        if self.stop_requested:
            self.interrupted = True
            self.progress.message(f"batch {bid} interrupted: run the same command again to resume it")
            return self.store.get(bid)  # type: ignore[return-value]
        return self._finalize(bid)

    # -- pass 2: the run --------------------------------------------------------------------------
    def _pump(self, bid: str, invalid: set[int], w: Written) -> None:
        pending: list[Request] = []
        for n, raw in iter_lines(self.input):
            if self._should_stop(bid):
                break
            if n in invalid:
                if n not in w.rejected_lines:
                    self._write_rejected(bid, n, raw)
                continue
            try:
                req = parse_line(self.ctx, raw, n, bid, self.options.default_max_tokens)
            except LineError:
                raise BatchMismatch(f"{self.input} changed while the batch ran (line {n})") from None
            pending.append(req)
            window = len(pending) + len(self.inflight)
            if len(pending) >= min(64, self.options.max_in_flight) or window >= self.options.max_in_flight:
                self._submit(pending)
                pending = []
            while len(self.inflight) >= self.options.max_in_flight and not self._should_stop(bid):
                self._wait(bid)
        if pending and not self._should_stop(bid):
            self._submit(pending)
        while self.inflight and not self._should_stop(bid):
            self._wait(bid)

    def _should_stop(self, bid: str) -> bool:
        self._beat(bid)
        return self.stop_requested or self.cancelling

    def _submit(self, reqs: list[Request]) -> None:
        k = self.keys
        # Status before result, in order on the request's node (one slot): a job finishing in between shows
        # its result, so it is not mistaken for one that was never enqueued. No MULTI: on a cluster the
        # requests' keys live in many slots.
        cmds = [c for q in reqs for c in (cmd("get", k.status(q.rid)), cmd("get", k.result(q.rid)))]
        if self.has_written:
            cmds.append(cmd("smismember", self.store.written_key(self.batch_id), [cid_key(q.custom_id) for q in reqs]))
        vals = self._retry(lambda: self._exec(cmds, False))
        written = vals[-1] if self.has_written else [0] * len(reqs)
        fresh = []
        for i, q in enumerate(reqs):
            status, raw_result = vals[2 * i], vals[2 * i + 1]
            if written[i]:
                continue  # a previous run wrote this line
            if raw_result is not None:
                self._write_result(q, Result.from_json(raw_result))
                continue
            self.inflight[q.rid] = _Flight(q)
            if status is None or as_str(status) == "enqueuing":  # enqueuing: claimed, but maybe never XADDed
                fresh.append(q)
        if fresh:
            self._enqueue(fresh)

    def _enqueue(self, reqs: list[Request]) -> None:
        k, d = self.keys, self.ctx.defaults
        prior = [cmd("sadd", self.store.inflight_key(self.batch_id), *(q.rid for q in reqs))]
        jobs = [(q.rid, k.job_stream(q.rid, self.options.priority), q.raw) for q in reqs]
        # As Client.enqueue does. Idempotent (SADD, and the enqueue script by the document's digest): resending
        # after a lost reply adds nothing, so a failed enqueue is simply sent again.
        replies = self._retry(lambda: run_flow(self.redis, enqueue_flow(k, d, jobs, prior=prior)))
        for q, reply in zip(reqs, replies):
            if reply == DUPLICATE_ID:  # e.g. resumed with another --default-max-tokens: the documents differ
                self._write_result(self.inflight.pop(q.rid).req,
                                   Result.failed(q.rid, "duplicate_id", duplicate_id_message(q.rid)))

    def _wait(self, bid: str) -> None:
        """Block until some in-flight job finishes (its done entry wakes us), then write what is final."""
        k = self.keys
        tkey = {k.tokens(rid): rid for rid in self.inflight}
        block = max(1, int(min(self.ctx.defaults.block_ms, self.options.heartbeat_s * 1000)))
        if is_cluster(self.redis):
            # One XREAD cannot wait on streams of many hash slots: poll the results instead, twice a second.
            time.sleep(min(block, 500) / 1000)
            self._collect(list(self.inflight))
            return
        reply = self._retry(lambda: self.redis.xread({t: self.inflight[rid].last for t, rid in tkey.items()},
                                                 count=64, block=block))
        ready = []
        for key, entries in _xread_streams(reply):
            rid = tkey.get(as_str(key))
            if rid is not None and entries:
                self.inflight[rid].last = entries[-1][0]
                ready.append(rid)
        now = time.monotonic()
        if now >= self._next_sweep:
            ready, self._next_sweep = list(self.inflight), now + SWEEP_S
        if ready:
            self._collect(ready)

    def _collect(self, rids: list[str]) -> None:
        vals = self._retry(lambda: self._exec([cmd("get", self.keys.result(rid)) for rid in rids], False))
        finished = []
        for rid, raw in zip(rids, vals):
            if raw is not None:
                self._write_result(self.inflight.pop(rid).req, Result.from_json(raw))
                finished.append(rid)
        if finished:
            self._retry(lambda: self.redis.srem(self.store.inflight_key(self.batch_id), *finished))

    # -- writing ----------------------------------------------------------------------------------
    def _open_writers(self) -> None:
        out = LineWriter(self.out, self.options.fsync_every)
        err = out if self.err.resolve() == self.out.resolve() else LineWriter(self.err, self.options.fsync_every)
        self.out_w, self.err_w = out, err
        self._writers = [out] if err is out else [out, err]

    def _write_result(self, req: Request, res: Result) -> None:
        rec = output_record(req, res)
        if rec["error"] is None:
            self.out_w.write(rec)
            self.counts.completed += 1
            self.counts.tokens += res.usage.completion_tokens
        else:
            self.err_w.write(rec)
            self.counts.failed += 1
        self.progress.update(self.counts.completed, self.counts.failed, self.counts.total, self.counts.tokens)

    def _write_rejected(self, bid: str, n: int, raw: bytes) -> None:
        try:
            req = parse_line(self.ctx, raw, n, bid, self.options.default_max_tokens)
            rec = error_record(bid, n, req.custom_id, "duplicate_custom_id",
                               f"custom_id {req.custom_id!r} is used by an earlier line")
        except LineError as e:
            rec = error_record(bid, n, e.custom_id, e.code, e.message)
        self.err_w.write(rec)
        self.counts.failed += 1

    # -- state, cancel, finish --------------------------------------------------------------------
    def _beat(self, bid: str, force: bool = False) -> None:
        now = time.monotonic()
        if now < self._next_beat and not force:
            return
        self._next_beat = now + self.options.heartbeat_s
        key = self.store.key(bid)
        _, status, lost = self._retry(lambda: self._exec([
            cmd("hset", key, mapping={"completed": self.counts.completed, "failed": self.counts.failed,
                                     "tokens": self.counts.tokens, "heartbeat": repr(time.time())}),
            cmd("hget", key, "status"),
            cmd("get", self.store.lock_key(bid))], False))
        if lost not in (self.owner, self.owner.encode()):
            raise BatchBusy(f"batch {bid}: lost the runner lock (stalled longer than its TTL?)")
        self.store.refresh(bid, self.owner)
        if status in (b"cancelling", "cancelling") and not self.cancelling:
            self.cancelling = True
            self.progress.message(f"batch {bid}: cancel requested; stopping")

    def _finish_cancel(self, bid: str) -> BatchInfo:
        """Cancel every in-flight job, keep what finishes within the grace period, then status cancelled."""
        rids = set(self.inflight) | {as_str(x) for x in self.redis.smembers(self.store.inflight_key(bid))}
        cmds = [c for rid in rids for c in cancel_cmds(self.keys, self.ctx.defaults, rid)]
        if cmds:
            self._exec(cmds, False)
        end = time.monotonic() + self.options.cancel_grace_s
        while self.inflight and time.monotonic() < end and not self.stop_requested:
            self._next_sweep = 0.0 if time.monotonic() + 0.5 > end else self._next_sweep
            self._wait(bid)
        for rid, fl in list(self.inflight.items()):
            self._write_result(fl.req, Result.failed(rid, "batch_cancelled", "the batch was cancelled",
                                                     status="cancelled"))
            del self.inflight[rid]
        self.redis.delete(self.store.inflight_key(bid), self.store.written_key(bid))
        if self._writers:
            self._beat(bid, force=True)
        self.store.transition(bid, "cancelled", frm=("cancelling",))
        self.progress.message(f"batch {bid} cancelled: {self.counts.completed} completed, {self.counts.failed} failed")
        return self.store.get(bid)  # type: ignore[return-value]

    def _finalize(self, bid: str) -> BatchInfo:
        if self.store.transition(bid, "finalizing", frm=("in_progress",)) == "cancelling":
            return self._finish_cancel(bid)
        for w in self._writers:
            w.sync()
        self.redis.delete(self.store.inflight_key(bid), self.store.written_key(bid))
        self._beat(bid, force=True)
        if self.store.transition(bid, "completed", frm=("finalizing",)) == "cancelling":
            return self._finish_cancel(bid)
        self.progress.message(f"batch {bid} completed: {self.counts.completed} completed, {self.counts.failed} failed "
                              f"-> {self.out}" + (f", errors -> {self.err}" if self.err != self.out else ""))
        return self.store.get(bid)  # type: ignore[return-value]

    # -- redis ------------------------------------------------------------------------------------
    def _exec(self, cmds: list[Cmd], transaction: bool) -> list:
        return execute(self.redis, cmds, transaction)

    def _retry(self, fn, budget_s: float = 60.0):
        """Run an idempotent Redis call, riding out a restart of the server for up to `budget_s`."""
        end, delay = time.monotonic() + budget_s, 0.2
        while True:
            try:
                return fn()
            except TRANSIENT_ERRORS:
                if time.monotonic() > end or self.stop_requested:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 5.0)


def _xread_streams(reply) -> list:
    """[(key, entries)] from an XREAD reply in RESP2 (list) or RESP3 (dict) form."""
    if not reply:
        return []
    if isinstance(reply, dict):
        return [(key, v[0] if v and isinstance(v[0], list) else v) for key, v in reply.items()]
    return [(key, entries) for key, entries in reply]


__all__ = ["BatchBusy", "BatchInvalid", "BatchMismatch", "BatchRunner", "OutputError", "RunOptions", "Written"]
