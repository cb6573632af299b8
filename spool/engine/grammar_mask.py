"""GrammarMasks: the host side of a step's grammar bitmask, filled into one reused buffer, in the background.

A step's grammar rows need their bitmask filled on the host before their sampling is queued. With async
scheduling's split launch (spool/engine/async_step.py) the fill can only start once the previous step's tokens are
accepted, and it is on the critical path: the device computes the forward pass meanwhile, then waits for the
sampling. So LLMEngine starts the fill (start()) right after the accept and detokenizes the previous step
while xgrammar fills on its own threads (it releases the GIL); the sampler then takes the finished bitmask.

The buffer is allocated once per size (pinned on CUDA, so its copy to the device is the only copy) and each
fill writes every word of its rows, so nothing is cleared per step. It is reused only after its last copy to
the device has completed (a CUDA event; on the CPU the sampler reads it before launch() returns).
"""
from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from spool.engine.token_bitmask import RowGrammar, bitmask_words, fill_rows


class MaskFill:
    """A bitmask filled (or being filled) for `grammars`, in order; wait() blocks until it is done."""

    def __init__(self, grammars: list[RowGrammar], bitmask: torch.Tensor, future: Future | None):
        self.grammars = grammars
        self.bitmask = bitmask  # CPU int32 [G, W], a view of the shared buffer
        self._future = future

    def wait(self) -> None:
        """Block until the fill is done (re-raises its error)."""
        if self._future is not None:
            future, self._future = self._future, None
            future.result()

    def matches(self, grammars: list[RowGrammar]) -> bool:
        """True if this fill is for exactly these rows (the same objects, in the same order)."""
        mine = self.grammars
        return len(mine) == len(grammars) and all(a is b for a, b in zip(mine, grammars))


class GrammarMasks:
    """One reusable host bitmask buffer for a sampler, and the thread that fills it in the background."""

    def __init__(self, vocab_size: int, device: torch.device):
        self.vocab_size = vocab_size
        self.words = bitmask_words(vocab_size)
        self.pin = device.type == "cuda"
        self._buffer: torch.Tensor | None = None  # [capacity, W] int32
        self._copied: torch.cuda.Event | None = None  # recorded after the buffer's last copy to the device
        self._current: MaskFill | None = None  # the latest fill; the buffer is its until the next one starts
        self._thread: ThreadPoolExecutor | None = None
        self.num_refills = 0  # take() calls whose rows did not match the started fill (a bug if ever > 0)

    def start(self, grammars: list[RowGrammar]) -> MaskFill:
        """Begin filling the rows' bitmask in the background; take() it when sampling those rows."""
        bitmask = self._claim(len(grammars))
        if self._thread is None:
            self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-mask")
        entered = threading.Event()

        def fill() -> None:
            entered.set()
            fill_rows(grammars, bitmask)

        future = self._thread.submit(fill)
        # Hand the GIL over until the fill is inside xgrammar (which releases it): otherwise the fill thread
        # cannot even start before this thread blocks, and the detokenization that follows holds the GIL for
        # milliseconds (measured: the fill then began only after 8 ms of Python work, with this: after 0.03 ms).
        entered.wait()
        self._current = MaskFill(grammars, bitmask, future)
        return self._current

    def take(self, grammars: list[RowGrammar], started: MaskFill | None = None) -> torch.Tensor:
        """CPU int32 [G, W]: the rows' bitmask, from the fill `started` for them, else filled now."""
        if started is not None and started is self._current and started.matches(grammars):
            started.wait()
            return started.bitmask
        if started is not None:
            self.num_refills += 1
        bitmask = self._claim(len(grammars))
        fill_rows(grammars, bitmask)
        self._current = MaskFill(grammars, bitmask, None)
        return bitmask

    def copied(self) -> None:
        """The bitmask just taken has been queued for its copy to the device: refill only after that copy."""
        if self.pin:
            self._copied = torch.cuda.Event()
            self._copied.record()

    def _claim(self, rows: int) -> torch.Tensor:
        """The buffer's first `rows` rows, once no earlier fill or copy still uses them."""
        if self._current is not None:
            try:
                self._current.wait()  # a fill nobody took (its step failed) must not write under the next one
            except Exception:  # noqa: BLE001 - that fill's error was its own step's, which already failed
                pass
        if self._copied is not None:
            self._copied.synchronize()  # long done in a split launch: the previous step's tokens were awaited
            self._copied = None
        if self._buffer is None or self._buffer.shape[0] < rows:
            self._buffer = torch.empty((max(rows, 1), self.words), dtype=torch.int32, pin_memory=self.pin)
        return self._buffer[:rows]
