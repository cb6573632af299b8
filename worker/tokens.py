"""Live token events of running jobs: deltas as the engine produces them, and restart markers."""
from __future__ import annotations

from protocol import Defaults, Keys, TokenEvent
from protocol.scripts import append_unless_final_cmd, flat_fields
from worker.outbox import Outbox


class TokenStreamWriter:
    """Queues token-stream writes on the Outbox; they leave with the step's other writes."""

    def __init__(self, outbox: Outbox, keys: Keys, defaults: Defaults):
        self.outbox, self.keys, self.defaults = outbox, keys, defaults

    def delta(self, rid: str, event: TokenEvent) -> None:
        """A live token delta: droppable, shed first when Redis stays away."""
        key = self.keys.tokens(rid)
        self.outbox.add("XADD", key, "MAXLEN", "~", self.defaults.tokens_maxlen, "*",
                        *flat_fields(event.to_fields()), droppable=True)
        self.outbox.add("EXPIRE", key, self.defaults.tokens_ttl_s, droppable=True)

    def restart(self, rid: str, reason: str) -> None:
        """Tell tailers to drop partial output; skipped inside Redis once the request is final."""
        d = self.defaults
        self.outbox.add(*append_unless_final_cmd(self.keys.result(rid), self.keys.tokens(rid), d.tokens_maxlen,
                                                 d.tokens_ttl_s, TokenEvent.restart(reason).to_fields()))
