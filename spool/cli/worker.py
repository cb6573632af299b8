"""`spool worker | demo`: serve the jobs streams with an engine, or show the whole product on one machine."""
from __future__ import annotations

import argparse
import os
import signal
import sys

from spool.protocol.env import ENV_GPUS, ENV_REDIS_URL, env_text
from spool.cli.common import EXIT_USAGE, CliError
from spool.cli.flags import add_dataclass_flags, dataclass_flags, dataclass_from_args


def cuda_index(device: str) -> int | None:
    """N of a 'cuda:N' device, None for any other ('cuda', 'auto', 'cpu')."""
    kind, _, index = device.strip().partition(":")
    return int(index) if kind == "cuda" and index.isdigit() else None


def _select_cuda_device(device: str) -> None:
    """--device cuda:N: make GPU N the current device, where Triton kernels and CUDA graphs run (they use the
    current device, not the tensors')."""
    index = cuda_index(device)
    if index is None:
        return
    import torch

    if not torch.cuda.is_available():
        return  # the engine says so in its own words
    if index >= torch.cuda.device_count():
        raise CliError(f"--device {device}: torch sees {torch.cuda.device_count()} GPU(s)", EXIT_USAGE)
    torch.cuda.set_device(index)


def cmd_worker(args: argparse.Namespace) -> int:
    """Load the model, connect to Redis and serve until stopped (with --gpus: supervise one process per GPU)."""
    if getattr(args, "gpus", None) is not None:
        return cmd_supervise(args)
    from spool.engine import LLMEngine, TensorParallelError
    from spool.engine.config import ConfigError, EngineConfig
    from spool.producer.ops import resolve_url
    from spool.protocol.connection import connect
    from spool.worker.joblog import configure_logging
    from spool.worker.loop import Worker
    from spool.worker.metrics import MetricsServerError
    from spool.worker.placement import follow_supervisor
    from spool.worker.settings import WorkerSettings

    settings = dataclass_from_args(WorkerSettings, args)
    try:
        configure_logging(settings.log_format)
        settings.validate()
    except ValueError as e:  # SPOOL_LOG_FORMAT=xml (a flag value is checked by argparse already), a bad number
        raise CliError(str(e), EXIT_USAGE) from None
    # Stopped while still loading the model: nothing is in flight yet, so leave at once and cleanly.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    follow_supervisor()  # started by `--gpus`: stop when the supervisor dies
    config = dataclass_from_args(EngineConfig, args)
    _select_cuda_device(config.device)
    try:
        engine = LLMEngine(config)
    except ConfigError as e:  # a missing model directory, an unsupported setting: the operator's to fix
        raise CliError(f"cannot start the engine: {e}", EXIT_USAGE) from e
    except TensorParallelError as e:  # a rank process failed while loading (out of memory, a bad shard)
        raise CliError(f"cannot start the engine: {e}") from e
    except (OSError, ValueError) as e:  # unreadable weights or tokenizer files
        raise CliError(f"cannot load the model from {args.model!r}: {e}", EXIT_USAGE) from e
    settings.redis_url = resolve_url(settings.redis_url)  # the embedded server's URL too, for the logs
    try:
        # Fail fast: the worker's own loop backs off (logging each retry), so the engine keeps stepping while
        # Redis is away.
        client = connect(settings.redis_url, fail_fast=True, client_name=f"spool-worker-{settings.name}",
                         socket_timeout=settings.block_ms / 1000 + settings.redis_timeout_s)  # past its blocking reads
        worker = Worker(engine, client, settings)
    except ValueError as e:  # a Redis URL with an unknown scheme, a worker name outside the id charset
        raise CliError(str(e), EXIT_USAGE) from e
    worker.install_signal_handlers()
    try:
        return worker.run()
    except MetricsServerError as e:  # the port is taken: another worker on this host needs its own
        raise CliError(str(e), EXIT_USAGE) from e
    except TensorParallelError as e:  # a rank died while idle (in a step, the loop exits with the same code)
        from spool.worker.step_errors import EXIT_DEVICE_ERROR

        raise CliError(f"the engine stopped: {e}; this worker's in-flight jobs stay pending for another",
                       EXIT_DEVICE_ERROR) from e


def cmd_supervise(args: argparse.Namespace) -> int:
    """`spool worker --gpus`: one worker process per GPU group, restarted when it dies, stopped with us."""
    from spool.engine.config import EngineConfig
    from spool.producer.ops import resolve_url
    from spool.worker import supervisor
    from spool.worker.joblog import configure_logging
    from spool.worker.settings import WorkerSettings

    settings = dataclass_from_args(WorkerSettings, args)
    config = dataclass_from_args(EngineConfig, args)
    try:
        configure_logging(settings.log_format)
        settings.validate()
    except ValueError as e:
        raise CliError(str(e), EXIT_USAGE) from None
    try:
        found = supervisor.discover_gpus()
        if not found.fake and config.device not in ("auto", "cuda"):
            raise supervisor.GpuSpecError(f"--gpus gives each worker process its own GPU (--device cuda); "
                                          f"drop --device {config.device}")
        gpus = supervisor.select_gpus(args.gpus, found)
        groups = supervisor.group_gpus(gpus, getattr(config, "tensor_parallel_size", 1))
        # Resolved once here, so the worker processes do not race to start one embedded Redis each; passed in
        # their environment, not on their command line, where `ps` would show its password.
        env = dict(os.environ, **{ENV_REDIS_URL: resolve_url(settings.redis_url)})
        argv = [sys.executable, "-m", "spool", "worker", *(["-v"] if getattr(args, "verbose", False) else []),
                *dataclass_flags(EngineConfig, args, skip=("device",)),
                *dataclass_flags(WorkerSettings, args, skip=("redis_url", "name", "metrics_port"))]
        specs = supervisor.child_specs(groups, argv, settings.name, fake=found.fake,
                                       metrics_port=settings.metrics_port, env=env)
    except supervisor.GpuSpecError as e:
        raise CliError(str(e), EXIT_USAGE) from None
    # Long enough for each process's grace period, a model still loading, and the last writes to Redis.
    sup = supervisor.Supervisor(specs, stop_timeout_s=settings.grace_period_s + 60.0, log_format=settings.log_format)
    sup.install_signal_handlers()
    return sup.run()


def gpu_spec(text: str):
    """argparse type of --gpus (and SPOOL_GPUS): 'all' or GPU numbers such as 0,1,3."""
    from spool.worker.supervisor import parse_gpu_spec

    try:
        return parse_gpu_spec(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the end-to-end demo."""
    from spool.demo import run_demo

    return run_demo(args)


def add_commands(sub, engine_flags: bool = True) -> None:
    """Register worker and demo on the `spool` subparsers (engine_flags=False: skip importing torch)."""
    from spool.worker.settings import WorkerSettings

    w = sub.add_parser("worker", help="run a GPU/CPU worker that drains the jobs streams",
                       description="Load a model and serve the deployment's jobs streams until SIGTERM (warm stop: "
                                   "finish in-flight jobs within --grace-period-s; a second signal stops at once). "
                                   "--gpus runs one such process per GPU under a supervisor that restarts them and "
                                   "passes signals on. Every flag also reads SPOOL_<FLAG>.")
    if engine_flags:
        from spool.engine.config import EngineConfig  # imports torch: only when the worker verb is asked for

        add_dataclass_flags(w, EngineConfig, title="engine")
        add_dataclass_flags(w, WorkerSettings, title="worker")
        g = w.add_argument_group("several GPUs")
        g.add_argument("--gpus", type=gpu_spec, default=env_text(ENV_GPUS), metavar="all|0,1,3",
                       help="one worker process per GPU (per tensor_parallel_size GPUs), named NAME-gpuN, "
                            "restarted when it dies, stopped with this one; numbers count the GPUs "
                            f"CUDA_VISIBLE_DEVICES shows [{ENV_GPUS}; default: one process on --device]")
    w.set_defaults(func=cmd_worker)

    d = sub.add_parser("demo", help="end-to-end demo: embedded Redis, tiny model, worker, jobs, live tokens",
                       description="Start (or reuse) the embedded Redis, build a tiny random-init model on first "
                                   "use, run a worker subprocess on it and send it a few dozen jobs. The embedded "
                                   "Redis keeps running afterwards (stop it with `spool redis stop`).")
    d.add_argument("--jobs", type=int, default=36, help="number of jobs to enqueue (default 36)")
    d.add_argument("--model", default=None,
                   help="model directory (default: a tiny model built on first use in the state dir)")
    d.add_argument("--device", default="auto", help="cpu | cuda | auto (default auto)")
    d.add_argument("--redis-url", default=None, help="use this Redis instead of the embedded one")
    d.set_defaults(func=cmd_demo)
