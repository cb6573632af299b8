"""Live token events of running jobs: deltas as the engine produces them, and restart markers."""
from __future__ import annotations

from protocol import Defaults, Keys, TokenEvent
from protocol.scripts import APPEND, flat_fields
from worker.inflight import InFlight
from worker.outbox import Outbox


class TokenStreamWriter:
    """Queues token-stream writes on the Outbox; they leave with the step's other writes.

    Each event carries its run and position (protocol.scripts.APPEND), so a transaction sent twice appends
    nothing new, and a run that lost the job to another worker writes nothing into the other run's stream.
    """

    def __init__(self, outbox: Outbox, keys: Keys, defaults: Defaults):
        self.outbox, self.keys, self.defaults = outbox, keys, defaults

    def delta(self, inf: InFlight, event: TokenEvent) -> None:
        """A live token delta: droppable, shed first when Redis stays away (the final write replays it)."""
        self._append(inf, event, takeover=False, droppable=True)

    def restart(self, inf: InFlight, reason: str) -> None:
        """Tell tailers to drop partial output; this run takes the stream over (unless the job is final)."""
        self._append(inf, TokenEvent.restart(reason), takeover=True, droppable=False)

    def _append(self, inf: InFlight, event: TokenEvent, takeover: bool, droppable: bool) -> None:
        d = self.defaults
        self.outbox.add_script(
            APPEND, [self.keys.result(inf.id), self.keys.tokens(inf.id)],
            [inf.run, inf.next_seq(), d.tokens_maxlen, d.tokens_ttl_s, int(takeover), *flat_fields(event.to_fields())],
            droppable=droppable, on_shed=inf.mark_stream_gap if droppable else None)
