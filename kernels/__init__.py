"""spool's compute kernels: Triton kernels, each beside its PyTorch reference (kernels.reference)."""
from kernels.ops import Ops, get_ops

__all__ = ["Ops", "get_ops"]
