"""Launch-size arithmetic for the kernels' Python wrappers, in plain Python.

triton.next_power_of_2 and triton.cdiv are constexpr functions: every call from Python goes through
ConstexprFunction.__call__, which unwraps each argument first (2.6 us per call on the CPU, 0.07 us here). An
eager decoder layer made ~11 such calls: ~28 of the ~220 us its wrappers cost on the host (bench/eager_host.py).
These give the same results for the ints the wrappers pass.
"""
from __future__ import annotations


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n (0 for n <= 0, as triton.next_power_of_2 gives for 0)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for b > 0."""
    return -(-a // b)
