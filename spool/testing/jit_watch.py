"""Which Triton kernels compiled inside a region: a benchmark's clock must not hold a kernel's JIT compile.

    with jit_compiles() as compiled:
        llm.generate(...)
    compiled  # ["_paged_attn_kernel", ...]: one name per specialization compiled (or loaded from Triton's
              # disk cache) while the block ran

Triton compiles a @triton.jit kernel once per specialization key: its constexprs, and for each integer argument
not in do_not_specialize whether it is 1 or a multiple of 16. An argument that changes from step to step (a
block table's width) can so compile a new variant in the middle of a run. Uses triton.knobs'
jit_cache_hook, which fires on every miss of a kernel's in-memory cache; the CPU interpreter compiles nothing,
so there the list stays empty.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def jit_compiles() -> Iterator[list[str]]:
    """Yield a list that collects the name of each Triton kernel specialization compiled inside the block."""
    names: list[str] = []
    try:
        from triton import knobs
    except ImportError:  # a Triton without knobs (< 3.4) cannot report compiles
        yield names
        return
    previous = knobs.runtime.jit_cache_hook

    def hook(*, fn, **kwargs):
        names.append(fn.name)
        return previous(fn=fn, **kwargs) if previous is not None else None

    knobs.runtime.jit_cache_hook = hook
    try:
        yield names
    finally:
        knobs.runtime.jit_cache_hook = previous
