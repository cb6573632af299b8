"""`spool worker --gpus`: one worker process per GPU (or per group of tensor_parallel_size GPUs), supervised.

The supervisor never imports torch and never touches CUDA. It finds the GPUs through CUDA_VISIBLE_DEVICES or
`nvidia-smi -L` and starts each worker process as today's single-process worker (`python -m spool worker`)
with CUDA_VISIBLE_DEVICES set to its group, `--device cuda`, and a name of its own (`<base>-gpu<N>`), so each
is its own consumer with its own heartbeat. A worker process that dies is started again under the same name
(it takes its own pending jobs back at start-up; other workers reclaim them after claim_idle_ms meanwhile)
after a capped exponential backoff; one that keeps dying right after its start is given up.

Signals fan out with the single-process contract: the first SIGTERM or SIGINT is forwarded as SIGTERM (warm
stop: each finishes its in-flight jobs within its grace period), a second one as SIGTERM again (cold stop:
each hands its jobs back at once), a third SIGKILLs them. The worker processes run in their own session, so
a Ctrl-C at the terminal reaches them only through the supervisor; if the supervisor itself is SIGKILLed,
Linux sends them SIGTERM (spool.worker.placement.follow_supervisor).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import IO

from spool.protocol.env import ENV_FAKE_GPUS, ENV_GPU_GROUP, ENV_GPUS, ENV_SUPERVISOR, env_text
from spool.protocol.keys import validate_id

log = logging.getLogger("spool.worker.supervisor")
EXIT_USAGE = 2  # spool.cli.common.EXIT_USAGE: a worker that exits 2 was misconfigured; restarting cannot help


class GpuSpecError(ValueError):
    """A --gpus value that cannot be served on this host."""


# -- which GPUs ----------------------------------------------------------------------------------------
@dataclass(slots=True)
class FoundGpus:
    """The GPUs this host shows: CUDA_VISIBLE_DEVICES entries (None: unknown), where from, and test mode."""

    ids: list[str] | None
    source: str
    fake: bool = False


def parse_gpu_spec(text: str) -> str | list[int]:
    """'all', or the GPU numbers of '0,1,3' (argparse type of --gpus): ValueError on anything else."""
    spec = text.strip()
    if spec == "all":
        return "all"
    items = [item.strip() for item in spec.split(",")]
    if not spec or not all(item.isdigit() for item in items):
        raise ValueError(f"expected all or GPU numbers such as 0,1,3; got {text!r}")
    numbers = [int(item) for item in items]
    repeated = sorted({n for n in numbers if numbers.count(n) > 1})
    if repeated:
        raise ValueError(f"GPU {repeated[0]} is listed twice in {text!r}")
    return numbers


def parse_cuda_visible(text: str) -> list[str]:
    """The entries of CUDA_VISIBLE_DEVICES ('' or '-1': none); as in CUDA, an empty or negative entry ends it."""
    out: list[str] = []
    for item in text.split(","):
        item = item.strip()
        if not item or item.startswith("-"):
            break
        out.append(item)
    return out


def nvidia_smi_gpus(timeout_s: float = 30.0) -> list[str] | None:
    """The GPU numbers `nvidia-smi -L` lists ('0', '1', ...); None when nvidia-smi is missing or fails."""
    try:
        done = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=timeout_s,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    count = sum(1 for line in done.stdout.splitlines() if line.startswith("GPU "))
    return [str(i) for i in range(count)]


def discover_gpus(env: Mapping[str, str] | None = None,
                  list_gpus: Callable[[], list[str] | None] = nvidia_smi_gpus) -> FoundGpus:
    """The GPUs a worker may use: SPOOL_FAKE_GPUS (tests), else CUDA_VISIBLE_DEVICES, else `nvidia-smi -L`."""
    env = os.environ if env is None else env
    fake = env_text(ENV_FAKE_GPUS, env=env)
    if fake is not None:
        try:
            count = int(fake)
        except ValueError:
            raise GpuSpecError(f"{ENV_FAKE_GPUS} must be a number of GPUs, got {fake!r}") from None
        return FoundGpus([str(i) for i in range(count)], ENV_FAKE_GPUS, fake=True)
    if "CUDA_VISIBLE_DEVICES" in env:
        return FoundGpus(parse_cuda_visible(env["CUDA_VISIBLE_DEVICES"]), "CUDA_VISIBLE_DEVICES")
    return FoundGpus(list_gpus(), "nvidia-smi -L")


def select_gpus(spec: str | list[int], found: FoundGpus) -> list[str]:
    """The CUDA_VISIBLE_DEVICES entries that `spec` (parse_gpu_spec's) names; numbers count visible GPUs."""
    if spec == "all":
        if not found.ids:
            why = "nvidia-smi is missing or failed" if found.ids is None else f"{found.source} shows none"
            raise GpuSpecError(f"--gpus all: no GPU found on this host ({why})")
        return list(found.ids)
    assert isinstance(spec, list)
    if found.ids is None:  # nvidia-smi unavailable: trust the numbers (a wrong one fails in its worker)
        return [str(n) for n in spec]
    missing = [n for n in spec if n >= len(found.ids)]
    if missing:
        shows = f"GPUs 0-{len(found.ids) - 1}" if found.ids else "no GPU"
        raise GpuSpecError(f"--gpus: there is no GPU {missing[0]}; {found.source} shows {shows}")
    return [found.ids[n] for n in spec]


def group_gpus(gpus: list[str], tensor_parallel_size: int = 1) -> list[list[str]]:
    """Consecutive groups of tensor_parallel_size GPUs, one worker process each."""
    if tensor_parallel_size < 1:
        raise GpuSpecError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
    if not gpus or len(gpus) % tensor_parallel_size:
        raise GpuSpecError(f"--gpus names {len(gpus)} GPUs, which do not split into groups of "
                           f"tensor_parallel_size {tensor_parallel_size}")
    return [gpus[i:i + tensor_parallel_size] for i in range(0, len(gpus), tensor_parallel_size)]


# -- the worker processes ------------------------------------------------------------------------------
@dataclass(slots=True)
class ChildSpec:
    """One worker process: its name, the GPUs it drives, its command line and environment."""

    name: str
    gpus: list[str]
    argv: list[str]
    env: dict[str, str]


def supervisor_id() -> str:
    """host:pid of this process, as the worker processes' heartbeats name their supervisor."""
    return f"{socket.gethostname()}:{os.getpid()}"


def child_specs(groups: list[list[str]], argv: list[str], base_name: str, *, fake: bool = False,
                metrics_port: int | None = None, env: Mapping[str, str] | None = None) -> list[ChildSpec]:
    """One ChildSpec per GPU group: `argv` plus its --name, --device (and --metrics-port: port + its index)."""
    env = dict(os.environ if env is None else env)
    for name in (ENV_GPUS, ENV_FAKE_GPUS):  # a worker process must not start a supervisor of its own
        env.pop(name, None)
    env[ENV_SUPERVISOR] = supervisor_id()
    specs = []
    for index, group in enumerate(groups):
        # Named by nvidia-smi's numbers when CUDA_VISIBLE_DEVICES holds numbers (not UUIDs).
        label = "-".join(group) if all(g.isdigit() for g in group) else str(index)
        name = f"{base_name}-gpu{label}"
        try:
            validate_id(name, "worker name")
        except ValueError as e:
            raise GpuSpecError(f"{e} (from --name {base_name!r}: use a shorter name)") from None
        child_argv = [*argv, "--name", name, "--device", "cpu" if fake else "cuda"]
        if metrics_port is not None:  # each process serves its own port: the first gets the given one
            child_argv += ["--metrics-port", str(metrics_port + index if metrics_port else 0)]
        child_env = dict(env, **{ENV_GPU_GROUP: ",".join(group)})
        if not fake:
            child_env["CUDA_VISIBLE_DEVICES"] = ",".join(group)
        specs.append(ChildSpec(name, list(group), child_argv, child_env))
    return specs


@dataclass(slots=True)
class RestartPolicy:
    """When a worker process that died is started again, and when it is given up."""

    initial_backoff_s: float = 1.0
    max_backoff_s: float = 60.0
    healthy_after_s: float = 300.0  # dying later than this after its start: restarted as if for the first time
    max_quick_failures: int = 5  # this many deaths in a row, each within healthy_after_s: give up on it

    def backoff_s(self, quick_failures: int) -> float:
        """Seconds to wait before the next start, doubling with each quick death in a row."""
        return min(self.max_backoff_s, self.initial_backoff_s * 2 ** max(0, quick_failures - 1))


RUNNING, WAITING, DONE, FAILED = "running", "waiting", "done", "failed"


@dataclass(slots=True)
class Child:
    """The state of one supervised worker process."""

    spec: ChildSpec
    proc: subprocess.Popen | None = None
    state: str = WAITING  # running | waiting (to be started) | done (exited 0 or stopped) | failed (given up)
    started_at: float = 0.0
    restart_at: float = 0.0
    starts: int = 0
    quick_failures: int = 0  # deaths in a row, each soon after its start
    last_exit: int | None = None
    relays: list[threading.Thread] = field(default_factory=list)

    @property
    def label(self) -> str:
        """'worker NAME (GPU 3)', for log lines."""
        return f"worker {self.spec.name} (GPU {','.join(self.spec.gpus)})"


def describe_exit(code: int | None) -> str:
    """'exited with code 3' or 'was killed by SIGKILL'."""
    if code is not None and code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class Supervisor:
    """Starts the worker processes, restarts those that die, and fans stop signals out to them."""

    def __init__(self, specs: list[ChildSpec], policy: RestartPolicy | None = None, stop_timeout_s: float = 90.0,
                 log_format: str = "text", poll_s: float = 0.1, output: IO[str] | None = None):
        self.children = [Child(spec) for spec in specs]
        self.policy = policy or RestartPolicy()
        self.stop_timeout_s = stop_timeout_s  # after a warm stop, SIGKILL what still runs (a hung device)
        self.log_format = log_format
        self.poll_s = poll_s
        self.output = output if output is not None else sys.stderr
        self._output_lock = threading.Lock()
        self.signals = 0  # stop signals received (set by the handler, acted on by the loop)
        self._forwarded = 0
        self.stopping = False

    # -- lifecycle ------------------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT: warm stop of every worker process; again: cold stop; a third time: SIGKILL."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, *_: object) -> None:
        self.signals += 1

    def run(self) -> int:
        """Supervise until stopped or until no worker process is left; returns the exit code (0, 1 or 2)."""
        log.info("supervisor %s: %d worker processes: %s", supervisor_id(), len(self.children),
                 ", ".join(f"{c.spec.name} on GPU {','.join(c.spec.gpus)}" for c in self.children))
        stop_deadline: float | None = None
        killed = False
        while True:
            self._forward_signals()
            now = time.monotonic()
            for child in self.children:
                if child.state == RUNNING and child.proc is not None and child.proc.poll() is not None:
                    self._exited(child, now)
                elif child.state == WAITING and not self.stopping and now >= child.restart_at:
                    self._start(child)
            running = [c for c in self.children if c.state == RUNNING]
            if self.stopping:
                stop_deadline = stop_deadline or now + self.stop_timeout_s
                if not running:
                    break
                if now > stop_deadline and not killed:
                    log.error("%d worker processes still running %.0fs after the stop: killing them (their jobs "
                              "are reclaimed by other workers)", len(running), self.stop_timeout_s)
                    self._send(running, signal.SIGKILL)
                    killed = True
            elif not running and not any(c.state == WAITING for c in self.children):
                break
            time.sleep(self.poll_s)
        for child in self.children:
            for relay in child.relays:
                relay.join(timeout=2.0)
        return self.exit_code()

    def exit_code(self) -> int:
        """0 unless a worker process was given up: then 2 if every such one had a usage error, else 1."""
        failed = [c for c in self.children if c.state == FAILED]
        if not failed:
            return 0
        return EXIT_USAGE if all(c.last_exit == EXIT_USAGE for c in failed) else 1

    # -- starting and restarting ----------------------------------------------------------------------
    def _start(self, child: Child) -> None:
        try:
            # Own session: a Ctrl-C at the terminal reaches the workers only through us, counted once.
            child.proc = subprocess.Popen(child.spec.argv, env=child.spec.env, stdin=subprocess.DEVNULL,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as e:
            log.error("%s could not start: %s; giving up on it", child.label, e)
            child.state, child.last_exit = FAILED, None
            return
        child.state, child.started_at = RUNNING, time.monotonic()
        child.starts += 1
        relay = threading.Thread(target=self._relay, args=(child.proc.stdout, child.spec.name),
                                 name=f"relay-{child.spec.name}", daemon=True)
        relay.start()
        child.relays = [r for r in child.relays if r.is_alive()] + [relay]
        verb = "started" if child.starts == 1 else f"restarted (start {child.starts})"
        log.info("%s %s: pid %d", child.label, verb, child.proc.pid)

    def _exited(self, child: Child, now: float) -> None:
        assert child.proc is not None
        code = child.proc.returncode
        child.last_exit, ran = code, now - child.started_at
        if self.stopping:
            child.state = DONE
            log.info("%s stopped (%s)", child.label, describe_exit(code))
        elif code == 0:  # it ended on purpose (--max-jobs, or a stop signal sent to it alone)
            child.state = DONE
            log.info("%s exited cleanly after %.0fs; not restarted", child.label, ran)
        elif code == EXIT_USAGE:
            child.state = FAILED
            log.error("%s exited with a usage error (code 2, see its log above); not restarted", child.label)
        else:
            child.quick_failures = child.quick_failures + 1 if ran < self.policy.healthy_after_s else 0
            if child.quick_failures >= self.policy.max_quick_failures:
                child.state = FAILED
                log.error("%s %s, its %d death in a row within %.0fs of its start; giving up on it (its jobs are "
                          "reclaimed by the other workers)", child.label, describe_exit(code), child.quick_failures,
                          self.policy.healthy_after_s)
                return
            delay = self.policy.backoff_s(child.quick_failures)
            child.state, child.restart_at = WAITING, now + delay
            again = f" ({child.quick_failures} deaths in a row soon after start)" if child.quick_failures > 1 else ""
            log.warning("%s %s after %.1fs%s; restarting it in %.1fs", child.label, describe_exit(code), ran, again,
                        delay)

    # -- signals --------------------------------------------------------------------------------------
    def _forward_signals(self) -> None:
        while self._forwarded < self.signals:
            self._forwarded += 1
            running = [c for c in self.children if c.state == RUNNING]
            if self._forwarded == 1:
                self.stopping = True
                for child in self.children:
                    if child.state == WAITING:  # a pending restart is cancelled
                        child.state = DONE
                log.info("stop requested: warm stop of %d worker processes (each finishes its in-flight jobs "
                         "within its grace period); signal again to stop them at once", len(running))
                self._send(running, signal.SIGTERM)
            elif self._forwarded == 2:
                log.warning("second stop signal: cold stop of %d worker processes (their unfinished jobs stay "
                            "pending for other workers); a third signal kills them", len(running))
                self._send(running, signal.SIGTERM)
            else:
                log.warning("third stop signal: killing %d worker processes", len(running))
                self._send(running, signal.SIGKILL)

    @staticmethod
    def _send(children: list[Child], sig: signal.Signals) -> None:
        for child in children:
            if child.proc is not None and child.proc.poll() is None:
                try:
                    child.proc.send_signal(sig)
                except ProcessLookupError:
                    pass

    # -- logs -----------------------------------------------------------------------------------------
    def _relay(self, stream: IO[bytes], name: str) -> None:
        """Copy a worker process's log lines to ours, each tagged with its name (a JSON line gets a field)."""
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace").rstrip("\n")
            try:
                with self._output_lock:
                    print(self._tag(line, name), file=self.output, flush=True)
            except (OSError, ValueError):  # our stderr is gone: keep draining, or the worker blocks on a full pipe
                pass
        stream.close()

    def _tag(self, line: str, name: str) -> str:
        if self.log_format == "json" and line.startswith("{"):
            try:
                doc = json.loads(line)
            except ValueError:
                doc = None
            if isinstance(doc, dict):
                return json.dumps({"worker": name, **doc})
        return f"[{name}] {line}"

