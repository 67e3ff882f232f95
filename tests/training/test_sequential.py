"""The mSPRT: false decisions bounded under frequent looks, right direction under an effect,
the vectorised path equal to the scalar statistic, and the state's JSON round trip."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from training.sequential import (
    SequentialConfig,
    SequentialState,
    decision_of,
    log_lr,
    log_lr_path,
)


def _first_decisions(p: float, cfg: SequentialConfig, trials: int, n: int, seed: int) -> list[str]:
    """Each trial: n decisive impressions (b wins with probability p), looked at after every
    one; the first decision, or "continue"."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(trials):
        won = rng.random(n) < p
        path = log_lr_path(won, cfg)
        crossed = np.flatnonzero(path >= cfg.threshold)
        if crossed.size == 0:
            out.append("continue")
            continue
        t = int(crossed[0])
        wins = int(won[: t + 1].sum())
        out.append("b_better" if 2 * wins > t + 1 else "b_worse")
    return out


def test_false_decisions_stay_under_alpha_with_a_look_after_every_impression() -> None:
    cfg = SequentialConfig(alpha=0.05)
    decisions = _first_decisions(0.5, cfg, trials=2000, n=5000, seed=0)
    rate = sum(d != "continue" for d in decisions) / len(decisions)
    # Ville's bound is alpha; the 2000 trials' binomial spread is ~0.005 at that rate.
    assert rate <= cfg.alpha + 0.01


def test_a_tighter_alpha_and_other_prior_scales_keep_their_bound() -> None:
    for cfg in (SequentialConfig(alpha=0.01), SequentialConfig(alpha=0.05, prior_sd=0.02)):
        decisions = _first_decisions(0.5, cfg, trials=1000, n=5000, seed=1)
        assert sum(d != "continue" for d in decisions) / len(decisions) <= cfg.alpha + 0.015


def test_a_clear_effect_is_decided_in_its_direction() -> None:
    cfg = SequentialConfig()
    better = _first_decisions(0.6, cfg, trials=200, n=3000, seed=2)
    worse = _first_decisions(0.4, cfg, trials=200, n=3000, seed=3)
    assert better.count("b_better") >= 0.97 * len(better)
    assert worse.count("b_worse") >= 0.97 * len(worse)


def test_path_equals_scalar_statistic_from_any_start() -> None:
    cfg = SequentialConfig(prior_sd=0.07)
    rng = np.random.default_rng(4)
    won = rng.random(300) < 0.55
    path = log_lr_path(won, cfg, wins=7, losses=4)
    w, lost = 7, 4
    for t, x in enumerate(won):
        w, lost = w + int(x), lost + int(not x)
        assert path[t] == pytest.approx(log_lr(w, lost, cfg), abs=1e-9)
    assert log_lr(0, 0, cfg) == pytest.approx(0.0)


def test_state_records_sticky_decisions_and_round_trips_through_json() -> None:
    cfg = SequentialConfig()
    state = SequentialState()
    for _ in range(3):
        state = state.record("tie", cfg)
    while state.decision == "continue":
        state = state.record("b", cfg)
    assert state.decision == "b_better"
    assert state.decided_at == state.impressions == state.wins + 3
    assert state.log_lr >= cfg.threshold
    at = state.decided_at
    for _ in range(50):
        state = state.record("a", cfg)
    assert state.decision == "b_better" and state.decided_at == at  # sticky
    assert state.losses == 50
    again = SequentialState.model_validate_json(state.model_dump_json())
    assert again == state


def test_batched_looks_agree_with_the_counts() -> None:
    cfg = SequentialConfig()
    state = SequentialState().record_counts(50, 10, 100, cfg)
    assert state.decision == decision_of(50, 10, cfg) == "b_better"
    assert SequentialState().record_counts(10, 50, 0, cfg).decision == "b_worse"
    assert SequentialState().record_counts(5, 5, 1000, cfg).decision == "continue"


def test_bad_inputs_are_refused() -> None:
    cfg = SequentialConfig()
    with pytest.raises(ValueError):
        SequentialState().record("c", cfg)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        SequentialState().record_counts(-1, 0, 0, cfg)
    with pytest.raises(ValidationError):
        SequentialConfig(alpha=0.0)
    with pytest.raises(ValidationError):
        SequentialConfig(prior_sd=0.5)
    with pytest.raises(ValidationError):
        SequentialConfig(unknown=1)  # type: ignore[call-arg]
