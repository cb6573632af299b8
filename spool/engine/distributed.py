"""Tensor-parallel process groups and the collectives model code calls, every one bounded by a timeout.

Each rank process holds one `TPGroup`. `SINGLE` (world size 1) is what a one-device engine uses: every
helper returns its input at once, so tensor parallelism costs a single-device engine nothing (not even a
branch inside a CUDA graph, which records only the kernels). With more ranks, two groups:

- `group`, the data plane: the all-reduces of row-parallel layers and the vocab-parallel embedding, and the
  logits gather. NCCL on CUDA (captured into CUDA graphs like any kernel), gloo on the CPU.
- `cpu_group`, the control plane: the step inputs rank 0 broadcasts as one int32 host tensor. Always gloo,
  so host data never round-trips through a GPU (vLLM keeps the same pair).

Both groups carry the engine's collective timeout: a rank that hangs surfaces as an error on the others
(gloo raises; NCCL's own watchdog aborts its communicator) instead of a hang.
"""
from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# Longest any collective (or the start-up rendezvous) may wait for the other ranks. Generous, because the
# first forward of each shape may JIT-compile Triton kernels on one rank while the others wait in an
# all-reduce; a rank that dies is noticed at once by other means (tp_executor.py's watchdog, closed sockets).
COLLECTIVE_TIMEOUT_S = 300.0
LOCALHOST = "127.0.0.1"


class TensorParallelError(RuntimeError):
    """A tensor-parallel rank died, hung past the timeout or failed: the engine cannot continue."""


@dataclass(slots=True)
class TPGroup:
    """This process's place among the tensor-parallel ranks, and the collectives between them."""

    rank: int = 0
    world_size: int = 1
    backend: str = "none"  # "nccl" | "gloo" | "none" (one rank)
    group: dist.ProcessGroup | None = None  # data plane: all-reduce, gather
    cpu_group: dist.ProcessGroup | None = None  # control plane: step inputs (host tensors)
    timeout_s: float = COLLECTIVE_TIMEOUT_S
    owned: list = field(default_factory=list)  # what destroy() tears down

    @property
    def is_first(self) -> bool:
        """True on rank 0 (the one that schedules and samples)."""
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the ranks, in place; returns x."""
        if self.world_size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor | None:
        """Rank 0: every rank's x [..., n] concatenated along the last dim [..., world_size * n]; others: None."""
        if self.world_size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)] if self.is_first else None
        dist.gather(x, parts, dst=0, group=self.group)
        return torch.cat(parts, dim=-1) if self.is_first else None

    def all_reduce_min(self, value: int) -> int:
        """The smallest of every rank's value (for a KV cache size all ranks can hold)."""
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.cpu_group)
        return int(t.item())

    def broadcast_host(self, t: torch.Tensor) -> torch.Tensor:
        """Rank 0's host tensor t, in place on every rank (same shape and dtype everywhere)."""
        if self.world_size > 1:
            dist.broadcast(t, src=0, group=self.cpu_group)
        return t


SINGLE = TPGroup()


def open_store(world_size: int, timeout_s: float) -> dist.TCPStore:
    """Rank 0's rendezvous store on a free loopback port (the OS picks it: no race for MASTER_PORT)."""
    return dist.TCPStore(LOCALHOST, 0, world_size, is_master=True, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=timeout_s))


def init_group(rank: int, world_size: int, store_port: int, device: torch.device, timeout_s: float,
               store: dist.TCPStore | None = None) -> TPGroup:
    """Join the ranks: NCCL (data) + gloo (control) on CUDA, gloo for both on the CPU."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if store is None:
        store = dist.TCPStore(LOCALHOST, store_port, world_size, is_master=False, timeout=timeout)
    if dist.is_initialized():
        raise TensorParallelError("this process already belongs to a torch.distributed group: one tensor-parallel "
                                  "engine per process (call LLMEngine.shutdown() on the previous one)")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", store=store, rank=rank, world_size=world_size, timeout=timeout,
                                device_id=device)
        cpu_group = dist.new_group(backend="gloo", timeout=timeout)
    else:
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=timeout)
        cpu_group = dist.group.WORLD
    return TPGroup(rank, world_size, backend, dist.group.WORLD, cpu_group, timeout_s, [store])


def abort_group(tp: TPGroup) -> None:
    """Abort every group so that a collective blocked on a dead rank returns (NCCL; gloo raises by itself)."""
    if tp.backend != "nccl" or not dist.is_initialized():
        return
    try:
        dist.distributed_c10d._abort_process_group(tp.group)
    except Exception as e:  # best effort: NCCL's own timeout still ends the wait
        log.warning("could not abort the NCCL group: %s", e)


def destroy_group(tp: TPGroup) -> None:
    """Leave the process group (idempotent); a later engine in this process may start its own."""
    if tp.world_size > 1 and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception as e:  # a broken group (a rank died): nothing more to release
            log.debug("destroy_process_group: %s", e)
    # Release the groups now, on this thread: a broken gloo group left to interpreter teardown aborts the process.
    tp.group = tp.cpu_group = None
    tp.owned.clear()
