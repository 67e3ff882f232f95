"""Event sources for replay: MovieLens-100K as shipped, a generic CSV, a drifting synthetic stream.

Every source yields ``Event``s in timestamp order with deterministic event ids, so replaying the
same data twice produces the same ids and exactly-once can be checked id by id.
"""

from __future__ import annotations

import csv
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from streams.events import Event, EventType

DEFAULT_ML100K = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "ml-100k"


def movielens_100k(path: Path = DEFAULT_ML100K, with_titles: bool = True) -> list[Event]:
    """MovieLens-100K ratings (u.data) as rating events with titles (u.item), in ts order."""
    data = path / "u.data"
    if not data.exists():
        raise FileNotFoundError(
            f"{data} not found: pass the folder holding MovieLens-100K's u.data and u.item "
            "(the shared copy lives in ../shared/data/ml-100k)"
        )
    titles: dict[str, str] = {}
    if with_titles and (path / "u.item").exists():
        # u.item is Latin-1 encoded and '|'-separated: id|title|release|...
        for line in (path / "u.item").read_text(encoding="latin-1").splitlines():
            parts = line.split("|")
            if len(parts) > 1:
                titles[parts[0]] = parts[1]
    rows = []
    for line in data.read_text().splitlines():
        user, item, rating, ts = line.split("\t")
        rows.append((int(ts), int(user), int(item), float(rating)))
    rows.sort()
    return [
        Event(
            event_id=f"ml100k-{u}-{i}-{ts}",
            user_id=str(u),
            item_id=str(i),
            event_type=EventType.RATING,
            value=r,
            ts=ts * 1000,
            item_text=titles.get(str(i)),
        )
        for ts, u, i, r in rows
    ]


def generic_csv(path: Path) -> list[Event]:
    """A ``user,item,ts[,rating]`` CSV (header optional; ts in seconds or milliseconds)."""
    if not path.exists():
        raise FileNotFoundError(f"{path} not found")
    out: list[tuple[int, int, Event]] = []
    with path.open(newline="") as fh:
        for n, row in enumerate(csv.reader(fh)):
            if not row or (n == 0 and not row[2].strip().lstrip("-").isdigit()):
                continue  # blank line or header
            if len(row) < 3:
                raise ValueError(f"{path}:{n + 1}: expected user,item,ts[,rating], got {row!r}")
            ts = int(row[2])
            ts_ms = ts * 1000 if ts < 100_000_000_000 else ts  # seconds before year 5138
            rating = float(row[3]) if len(row) > 3 and row[3] != "" else None
            event = Event(
                event_id=f"csv-{path.stem}-{n}",
                user_id=row[0],
                item_id=row[1],
                event_type=EventType.RATING if rating is not None else EventType.CLICK,
                value=rating if rating is not None else 1.0,
                ts=ts_ms,
            )
            out.append((ts_ms, n, event))
    out.sort(key=lambda t: (t[0], t[1]))
    return [e for _, _, e in out]


@dataclass(frozen=True)
class DriftSpec:
    """A synthetic stream whose users' interests shift and whose catalog keeps growing."""

    users: int = 200
    topics: int = 8
    items_per_topic: int = 40
    events: int = 20_000
    new_item_every: int = 200
    drift_every: int = 5_000
    start_ts_ms: int = 1_700_000_000_000
    step_ms: int = 1_000
    seed: int = 0


def synthetic_drift(spec: DriftSpec = DriftSpec()) -> Iterator[Event]:
    """Users walk item chains inside their current topic; every ``drift_every`` events each
    user's topic shifts, and every ``new_item_every`` events a brand-new item joins a topic.

    The chains make the next item predictable from the last ones (what a sequential model can
    learn); the drift and the new items are what a model that never updates gets wrong.
    """
    rng = random.Random(spec.seed)
    catalog: list[list[str]] = [
        [f"t{t}-i{i}" for i in range(spec.items_per_topic)] for t in range(spec.topics)
    ]
    interest = [rng.randrange(spec.topics) for _ in range(spec.users)]
    position = [0] * spec.users
    kinds = [EventType.VIEW] * 6 + [EventType.CLICK] * 3 + [EventType.CART, EventType.PURCHASE]
    for n in range(spec.events):
        if n and n % spec.drift_every == 0:
            interest = [(t + 1 + rng.randrange(2)) % spec.topics for t in interest]
        if n and n % spec.new_item_every == 0:
            t = rng.randrange(spec.topics)
            catalog[t].append(f"t{t}-new{n}")
        u = rng.randrange(spec.users)
        items = catalog[interest[u]]
        # Mostly the next item in the chain; sometimes a jump (and new items get traffic).
        r = rng.random()
        if r < 0.75:
            position[u] = (position[u] + 1) % len(items)
        elif r < 0.9:
            position[u] = len(items) - 1 - rng.randrange(min(3, len(items)))
        else:
            position[u] = rng.randrange(len(items))
        item = items[position[u]]
        kind = rng.choice(kinds)
        yield Event(
            event_id=f"syn-{spec.seed}-{n}",
            user_id=f"u{u}",
            item_id=item,
            event_type=kind,
            value=1.0,
            ts=spec.start_ts_ms + n * spec.step_ms,
            item_text=f"topic {item.split('-')[0]} item {item}",
        )
