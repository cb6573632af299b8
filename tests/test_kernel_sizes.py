"""spool/kernels/sizes.py gives what triton.next_power_of_2 and triton.cdiv give, without their per-call cost."""
from __future__ import annotations

import triton

from spool.kernels.sizes import cdiv, next_power_of_2


def test_same_as_triton():
    assert all(next_power_of_2(n) == triton.next_power_of_2(n) for n in range(0, 70_000))
    assert next_power_of_2(2**40 + 1) == triton.next_power_of_2(2**40 + 1) == 2**41
    assert all(cdiv(a, b) == triton.cdiv(a, b) for a in range(0, 500) for b in range(1, 70))
