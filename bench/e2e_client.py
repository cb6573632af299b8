"""bench/e2e.py's clients, in a process of their own: wait for every bulk result, send and tail interactive probes.

A user's client is not in the worker's process. Run as threads of the worker's process (as bench/e2e.py did
before), their result parsing competed with the worker for the GIL, most of all while hundreds of results
land at the end of a run: on the CPU simulation (bench/e2e.py --sim) ~0.1-0.3 s of device idle that a real
deployment does not have. Timing is unchanged: the run ends when this process holds every bulk result.

Protocol (one JSON object per line): stdin gets the settings, then "go" when the worker starts; stdout says
{"ready": true} once connected, {"bulk_done_at": perf_counter} once every bulk result is in, then
{"probes": [ids], "client_ttft_ms": [...]} once every probe has streamed its first token (or timed out).
time.perf_counter is CLOCK_MONOTONIC on Linux: the same clock as the worker's process.
"""
from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from spool.producer.client import Client  # noqa: E402


def _say(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main() -> int:
    cfg = json.loads(sys.stdin.readline())
    url, tag, probe_every_ms, vocab = cfg["url"], cfg["tag"], cfg["probe_every_ms"], cfg["vocab"]
    client, probe_client = Client(url), Client(url)
    client.redis.ping()
    _say({"ready": True})
    if sys.stdin.readline().strip() != "go":
        return 1
    stop = threading.Event()
    probes: list[str] = []
    client_ttft: list[float] = []
    tails: list[threading.Thread] = []

    def tail(rid: str, sent: float) -> None:
        for event in probe_client.stream(rid, timeout=600):
            if event.token_ids:
                client_ttft.append((time.perf_counter() - sent) * 1000)
                return

    def probe_loop() -> None:
        k = 0
        while probe_every_ms > 0 and not stop.wait(probe_every_ms / 1000):
            ids = [100 + (7 * k + j) % (vocab - 200) for j in range(64)]
            sent = time.perf_counter()
            rid = probe_client.enqueue(prompt_token_ids=ids, max_tokens=16, temperature=0, ignore_eos=True,
                                       stream=True, id=f"{tag}-probe-{k}")
            probes.append(rid)
            t = threading.Thread(target=tail, args=(rid, sent), daemon=True)
            t.start()
            tails.append(t)
            k += 1

    pt = threading.Thread(target=probe_loop, daemon=True)
    pt.start()
    for rid in cfg["ids"]:
        client.result(rid, timeout=3600)
    _say({"bulk_done_at": time.perf_counter()})
    stop.set()
    pt.join()
    for t in tails:
        t.join(timeout=120)
    _say({"probes": probes, "client_ttft_ms": client_ttft})
    return 0


if __name__ == "__main__":
    sys.exit(main())
