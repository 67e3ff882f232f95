"""The demo's live trials: simulated users who ask and click, and what the trials made of it.

A live trial (``rollout.live``) is decided by clicks on interleaved answers, so a demo without
clicks would show trials that never move. Here the replayed stream stands in for the users: the
one whose event is published next asks (a logged request, just before its event), and clicks what
the click model (``services.click_model``, printed by the demo) says: a shown item the user
really interacts with within their next ``window`` events of the replay, at a position they
examine. The clicks go to the events topic as click events ``delay_s`` after the answer, where
the history shards credit the version that contributed each item, as a real user's would.

What this adds to the stream: click events on items the user's own later events touch anyway,
a few per hundred replayed events; the loop trains on them like any event (so the updated
versions see a little of a user's near future a few seconds early, which the static v1 never
does: the demo report says so).

``live_record`` gathers, for the report, every live trial the rollout controller ran: the ones it
decided (its decision log) and the one running at the end (the rollout state), with their counts.
"""

from __future__ import annotations

import time
import uuid
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from services.click_model import ClickModel
from streams.events import Event, EventType

if TYPE_CHECKING:
    from kafka import KafkaProducer

    from streams.config import KafkaConfig
    from training.registry import LiveTrial, Registry


class DemoClicks:
    """Requests and clicks taken from the replayed ``events`` (in publish order)."""

    def __init__(
        self,
        events: Sequence[Event],
        model: ClickModel,
        kafka: KafkaConfig,
        topic: str,
        delay_s: float = 1.0,
        seed: int = 0,
    ) -> None:
        self.model, self.kafka, self.topic, self.delay_s = model, kafka, topic, delay_s
        self._users = [e.user_id for e in events]
        places: dict[str, list[int]] = {}
        for i, e in enumerate(events):
            places.setdefault(e.user_id, []).append(i)
        self._places = {u: np.asarray(p, dtype=np.int64) for u, p in places.items()}
        self._items = [e.item_id for e in events]
        self._rng = np.random.default_rng(seed)
        self._due: deque[tuple[float, list[Event]]] = deque()  # clicks made, when they are sent
        self._producer: KafkaProducer | None = None
        self.answers = self.clicked = self.sent = 0

    def asker(self, published: int) -> str:
        """The user whose event is published next (the last event's once all are)."""
        return self._users[min(published, len(self._users) - 1)]

    def future(self, user: str, published: int) -> list[str]:
        """The user's items from the next published event on, the first ``window`` of them."""
        at = self._places.get(user)
        if at is None:
            return []
        start = int(np.searchsorted(at, published))
        return [self._items[i] for i in at[start : start + self.model.window].tolist()]

    def answered(self, user: str, shown: list[str], published: int) -> None:
        """An answer ``user`` got while ``published`` events were out: its clicks, to be sent."""
        self.answers += 1
        clicked = self.model.clicks(shown, self.future(user, published), self._rng)
        if not clicked:
            return
        now = int(time.time() * 1000)
        made = [
            Event(event_id=uuid.uuid4().hex, user_id=user, item_id=shown[p],
                  event_type=EventType.CLICK, ts=now)
            for p in clicked
        ]  # fmt: skip
        self.clicked += len(made)
        self._due.append((time.monotonic() + self.delay_s, made))

    def send_due(self, flush_all: bool = False) -> None:
        """Publish the clicks whose delay has passed (every one with ``flush_all``)."""
        from streams.producer import make_producer, replay

        batch: list[Event] = []
        while self._due and (flush_all or self._due[0][0] <= time.monotonic()):
            batch.extend(self._due.popleft()[1])
        if not batch:
            return
        if self._producer is None:
            self._producer = make_producer(self.kafka)
        self.sent += replay(batch, self.kafka, self.topic, producer=self._producer)

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close(timeout=10)
            self._producer = None


def live_record(
    registry: Registry, mode: str, clicks: DemoClicks | None, trial: LiveTrial | None
) -> dict[str, Any]:
    """The live trials of the run, for ``demo.json``: each decision with its figures, the trial
    still running (``trial``, from the rollout state), and what the simulated users did."""
    from serving.live_trial import status

    decided = [d.model_dump() for d in registry.decision_log() if d.decision.startswith("live-")]
    return {
        "mode": mode,
        "click_model": clicks.model.model_dump() if clicks else None,
        "answers": clicks.answers if clicks else None,
        "clicks_made": clicks.clicked if clicks else None,
        "clicks_sent": clicks.sent if clicks else None,
        "decisions": decided,
        "running": status(trial),
    }
