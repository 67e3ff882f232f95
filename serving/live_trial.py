"""The rollout controller's live trials (``rollout.live``): start them, count them, act on them.

A trial interleaves two versions on a share of ``/recommend`` answers (``serving.live_answer``);
the history shards settle each interleaved impression into a win for a, for b or a tie
(``serving.clicks``); here the controller adds the shards' new outcomes to the trial's
sequential test (``training.sequential``) and acts once it decides:

* ``guard``: team a is the baseline, the last live-verified version; team b the serving
  champion, pooled across the champions that follow each other. b worse: roll back to the
  baseline, pause promotions for ``pause_s`` and record why. b better, or ``live_max_impressions``
  without a decision, once the baseline is ``baseline_age_s`` old: the serving version is
  verified and becomes the baseline.
* ``canary``: team a is the serving version; team b the new champion, which is not rolled out.
  b better: roll it out. b worse: discard it (the champion goes back to a). A newer champion
  meanwhile joins team b, its impressions pooled with its predecessors'.

The trial lives in the registry's rollout state (``LiveTrial``), so a restarted controller goes
on with it, and the replicas read it there with the serving version.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import TYPE_CHECKING, Any, Literal

from serving.clicks import TALLY
from training.registry import LiveTrial
from training.sequential import SequentialConfig

if TYPE_CHECKING:
    from serving.rollout import RolloutController, RolloutEvent

log = logging.getLogger(__name__)


def new_trial(
    ctl: RolloutController, mode: Literal["guard", "canary"], a: int, b: int
) -> LiveTrial:
    trial = LiveTrial(
        id=uuid.uuid4().hex[:12], mode=mode, a=a, b=b, b_versions=[b], share=ctl.cfg.live_share
    )
    log.info("live trial %s (%s): v%d (a) against v%d (b)", trial.id, mode, a, b)
    return trial


def join_lineage(trial: LiveTrial, version: int) -> None:
    """A newer version of team b's lineage takes b's place; its impressions pool with the rest."""
    if version != trial.b and version not in trial.b_versions:
        trial.b = version
        trial.b_versions.append(version)


def count(ctl: RolloutController, trial: LiveTrial) -> bool:
    """Add the shards' newly settled impressions to the test; True if anything was added."""
    import ray

    per_shard: dict[str, list[int]] = ray.get(ctl.context.trial_counts.remote(trial.id))
    return add_counts(trial, per_shard, ctl.cfg.live_test)


def add_counts(trial: LiveTrial, per_shard: dict[str, list[int]], cfg: SequentialConfig) -> bool:
    """Each shard's running tally (``serving.clicks.TALLY``) minus what was counted from it
    before: the outcomes into the test, the clicks into the trial's credited clicks. True if
    anything was added."""
    new = [0] * len(TALLY)
    for shard, got in per_shard.items():
        # a shard or a record from before credited clicks were counted has the outcomes only
        totals, before = _full(got), _full(trial.counted.get(shard, []))
        # a restarted shard counts from zero again: all it has now is new
        restarted = any(t < b for t, b in zip(totals, before, strict=True))
        delta = totals if restarted else [t - b for t, b in zip(totals, before, strict=True)]
        new = [n + d for n, d in zip(new, delta, strict=True)]
        trial.counted[shard] = totals
    if not any(new):
        return False
    add = dict(zip(TALLY, new, strict=True))
    trial.test = trial.test.record_counts(add["b_won"], add["a_won"], add["ties"], cfg)
    trial.a_clicks += add["a_clicks"]
    trial.b_clicks += add["b_clicks"]
    return True


def _full(tally: list[int]) -> list[int]:
    return [*tally, *[0] * (len(TALLY) - len(tally))]


def tally(trial: LiveTrial) -> dict[str, Any]:
    """A decision's figures, recorded with it in the decision log."""
    t = trial.test
    return {"trial": trial.id, "a": trial.a, "b_versions": trial.b_versions,
            "impressions": t.impressions, "decided_at": t.decided_at, "b_won": t.wins,
            "a_won": t.losses, "ties": t.ties, "b_clicks": trial.b_clicks,
            "a_clicks": trial.a_clicks, "log_lr": round(t.log_lr, 3)}  # fmt: skip


def lineage(versions: list[int], shown: int = 4) -> str:
    """Team b's pooled versions in words: each of a few, else the first, the last and how many
    (with rounds every second a trial pools hundreds)."""
    if len(versions) <= shown:
        return ", ".join(f"v{v}" for v in versions)
    return f"v{versions[0]}, v{versions[1]}, ..., v{versions[-1]} ({len(versions)} versions)"


def figures(trial: LiveTrial) -> str:
    t = trial.test
    return (
        f"{t.impressions} impressions: b won {t.wins}, a won {t.losses}, {t.ties} ties "
        f"(clicks credited: b {trial.b_clicks}, a {trial.a_clicks}); log LR {t.log_lr:.2f}; "
        f"a = v{trial.a}, b = the lineage {lineage(trial.b_versions)} (pooled)"
    )


def step(ctl: RolloutController, champion: int | None) -> tuple[bool, RolloutEvent | None]:
    """One look at the live trial. Returns (handled, event): ``handled`` means the controller
    must not roll the champion out on its own this step (canary keeps it on trial)."""
    if ctl.current is None:
        return False, None
    if ctl.cfg.live == "canary":
        return _canary(ctl, champion)
    return False, _guard(ctl)


def _canary(ctl: RolloutController, champion: int | None) -> tuple[bool, RolloutEvent | None]:
    from serving.rollout import RolloutEvent

    trial, current = ctl.trial, ctl.current
    assert current is not None
    if trial is None or trial.mode != "canary":
        if (champion is None or champion == current or ctl.manual_rollback(champion)
                or ctl.manually_promoted(champion)):  # fmt: skip
            return False, None
        ctl.trial = new_trial(ctl, "canary", current, champion)
        ctl.save_and_announce()
        return True, ctl.emit(RolloutEvent("trial", champion, figures(ctl.trial), 0.0))
    if champion == trial.a or trial.a != current:  # rolled back or moved by hand: trial over
        ctl.end_trial()
        return False, None
    if champion is not None and champion > trial.b:
        join_lineage(trial, champion)
        ctl.save_and_announce()
    if not count(ctl, trial):
        return True, None
    decision = trial.test.decision
    if decision == "continue":
        ctl.save()
        return True, None
    why = f"live trial {trial.id}: {decision.replace('_', ' ')} ({figures(trial)})"
    ctl.registry.record(trial.b, f"live-{decision}", why, **tally(trial))
    ctl.end_trial()
    if decision == "b_better":
        return True, ctl.switch(trial.b, "rollout", why)
    ctl.registry.mark_rolled_back(trial.b, why, to=trial.a)
    return True, ctl.emit(RolloutEvent("discard", trial.b, why, 0.0))


def _guard(ctl: RolloutController) -> RolloutEvent | None:
    now, current = time.time(), ctl.current
    assert current is not None
    if ctl.baseline is None:
        ctl.baseline, ctl.baseline_since = current, now
        ctl.save()
    trial = ctl.trial
    if trial is not None and (trial.mode != "guard" or trial.a != ctl.baseline):
        ctl.end_trial()
        trial = None
    if current == ctl.baseline:
        if trial is not None:
            ctl.end_trial()
        return None
    if trial is None:
        ctl.trial = trial = new_trial(ctl, "guard", ctl.baseline, current)
        ctl.save_and_announce()
    join_lineage(trial, current)
    if not count(ctl, trial):
        return None
    old_enough = now - (ctl.baseline_since or now) >= ctl.cfg.baseline_age_s
    if trial.test.decision == "b_worse":
        return _guard_rollback(ctl, trial)
    if old_enough and (trial.test.decision == "b_better"
                       or trial.test.impressions >= ctl.cfg.live_max_impressions):  # fmt: skip
        why = f"live-verified by trial {trial.id} ({figures(trial)})"
        ctl.registry.record(current, "live-verified", why, **tally(trial))
        log.info("v%d %s", current, why)
        ctl.baseline, ctl.baseline_since = current, now
        ctl.end_trial()
        return None
    ctl.save()
    return None


def _guard_rollback(ctl: RolloutController, trial: LiveTrial) -> RolloutEvent:
    why = f"live trial {trial.id}: the baseline v{trial.a} won ({figures(trial)})"
    champion = ctl.registry.champion()
    # the champion may already be a newer version of the lineage than the one serving
    bad = champion if champion is not None and champion > trial.a else trial.b
    ctl.registry.record(bad, "live-b_worse", why, **tally(trial))
    ctl.registry.mark_rolled_back(bad, why, to=trial.a)
    ctl.paused_until, ctl.paused_reason = time.time() + ctl.cfg.pause_s, why
    ctl.end_trial()
    return ctl.switch(trial.a, "rollback", why)


def status(trial: LiveTrial | None) -> dict[str, Any] | None:
    if trial is None:
        return None
    return {
        "id": trial.id,
        "mode": trial.mode,
        "a": trial.a,
        "b": trial.b,
        "b_versions": trial.b_versions,
        "share": trial.share,
        "started_at": trial.started_at,
        **trial.test.model_dump(),
        "impressions": trial.test.impressions,
        "a_clicks": trial.a_clicks,
        "b_clicks": trial.b_clicks,
    }
