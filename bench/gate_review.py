"""Were a run's gate decisions right? Each version against the champion it was gated against.

    python -m bench.gate_review [--run state/demo/<run>]

For every version after the first: the gate's questions on its own round, recomputed from the
buffer exactly as the round built them (its events, the history index of the version before it,
as many held-out events per user as its gate took), and the same kind of questions one round
later (the events of the next version's round, which neither model trained on). On both, the
candidate and its champion answer the same questions: NDCG@10 (what the gate tests), HR@50 and
the median rank, with the paired z of each difference (clustered by user). A candidate that the
gate rejected but that wins on the next round's questions was a false rejection.

The reference is the champion, measured on the same questions in the same run.
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from streams.buffer import EventBuffer
from streams.config import BufferConfig
from training.data import Holdout, round_examples, user_sequences
from training.histories import UserHistories
from training.metrics import clustered_se, holdout_ranks
from training.ranking import question_ndcg
from training.registry import LoadedVersion, Registry


def questions(reg: Registry, buf: EventBuffer, v: int, lv: LoadedVersion) -> Holdout:
    """The held-out questions of version ``v``'s round (``lv``: a version whose vocab covers it)."""
    base = v - 1
    new = buf.read(after=reg.meta(base)["watermark"], upto=reg.meta(v)["watermark"])
    users = sorted(set(new.column("user_id").to_pylist()))
    max_len = lv.model.cfg.max_len
    hist = UserHistories.load(reg.path(base), users, max_len)
    per_user = int(reg.meta(v).get("gate_config", {}).get("holdout_events", 1))
    seqs = user_sequences(new, lv.vocab)
    return round_examples(hist.recent, seqs, max_len, per_user, seen=hist.seen)[1]


def paired(cand: LoadedVersion, champ: LoadedVersion, hold: Holdout) -> dict[str, float]:
    rc, rb = holdout_ranks(champ.model, hold), holdout_ranks(cand.model, hold)
    out: dict[str, float] = {"questions": float(len(hold))}
    for name, a, b in [
        ("ndcg10", question_ndcg(rc), question_ndcg(rb)),
        ("hr50", (rc < 50).astype(float), (rb < 50).astype(float)),
    ]:
        d = b - a
        se = clustered_se(d, hold.users)
        out[f"champ_{name}"], out[f"cand_{name}"] = float(a.mean()), float(b.mean())
        out[f"z_{name}"] = float(d.mean() / se) if se > 0 else 0.0
    out["champ_median_rank"], out["cand_median_rank"] = float(np.median(rc)), float(np.median(rb))
    return out


def review(run: Path) -> list[dict[str, Any]]:
    reg = Registry(run / "registry")
    buf = EventBuffer(BufferConfig(path=run / "buffer"))
    versions = reg.versions()
    load = functools.cache(reg.load)  # a version is a candidate, a champion and a next vocab
    rows: list[dict[str, Any]] = []
    for v in versions:
        meta = reg.meta(v)
        champ_v = meta.get("parent")
        if champ_v is None or v - 1 not in versions:
            continue
        cand, champ = load(v), load(champ_v)
        row: dict[str, Any] = {"version": v, "champion": champ_v, "decision": meta["decision"]}
        row["own"] = paired(cand, champ, questions(reg, buf, v, cand))
        if v + 1 in versions:
            later = load(v + 1)  # its vocab covers the next round's items
            row["next"] = paired(cand, champ, questions(reg, buf, v + 1, later))
        rows.append(row)
    return rows


def _cell(m: dict[str, float] | None, name: str) -> str:
    if m is None:
        return "-"
    return f"{m[f'cand_{name}']:.4f} vs {m[f'champ_{name}']:.4f} (z {m[f'z_{name}']:+.1f})"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--run", type=Path, default=None, help="a run dir (default: latest demo run)")
    args = ap.parse_args(argv)
    run = args.run or sorted(Path("state/demo").iterdir())[-1]
    rows = review(run)
    table = Table(title=f"gate review of {run}: candidate vs the champion it was gated against")
    for col in ["version", "decision", "own NDCG@10", "own HR@50", "next NDCG@10", "next HR@50"]:
        table.add_column(col)
    for r in rows:
        own, nxt = r["own"], r.get("next")
        table.add_row(f"v{r['version']} vs v{r['champion']}", r["decision"],
                      _cell(own, "ndcg10"), _cell(own, "hr50"),
                      _cell(nxt, "ndcg10"), _cell(nxt, "hr50"))  # fmt: skip
    Console().print(table)
    wins = [r for r in rows if "next" in r and r["next"]["z_ndcg10"] > 0]
    false_rejects = [r["version"] for r in wins if r["decision"] == "reject"]
    print(json.dumps({"bench": "gate_review", "run": str(run), "versions": rows,
                      "rejected_but_better_next": false_rejects}))  # fmt: skip


if __name__ == "__main__":
    main()
