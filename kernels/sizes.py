"""Launch-size arithmetic for the kernels' Python wrappers, in plain Python.

triton.next_power_of_2 and triton.cdiv are constexpr functions: every call from Python goes through
ConstexprFunction.__call__, which unwraps each argument first (~3 us of host time on the CPU). An eager
decoder layer made ~11 such calls, one of the larger items of its host time (bench: the wrappers with their
launches stubbed out). These give the same results for the ints the wrappers pass.
"""
from __future__ import annotations


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n (0 for n <= 0, as triton.next_power_of_2 gives for 0)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for b > 0."""
    return -(-a // b)
