"""spool's compute kernels: Triton kernels, each beside its PyTorch reference (spool.kernels.reference)."""
from spool.kernels.ops import Ops, get_ops

__all__ = ["Ops", "get_ops"]
