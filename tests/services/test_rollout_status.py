"""What `streamtune rollout status` says of live trials, from the registry's rollout state."""

from __future__ import annotations

import time

from services.cli_loop import live_lines
from serving.config import RolloutConfig
from training.registry import LiveTrial, RolloutState
from training.sequential import SequentialConfig, SequentialState


def test_status_names_the_trial_its_pooled_lineage_the_test_and_a_pause() -> None:
    cfg = RolloutConfig(live="guard")
    test = SequentialState().record_counts(40, 20, 300, SequentialConfig())
    trial = LiveTrial(id="abc", mode="guard", a=3, b=9, b_versions=[7, 8, 9], share=0.2,
                      test=test, a_clicks=25, b_clicks=47)  # fmt: skip
    state = RolloutState(serving=9, baseline=3, trial=trial, paused_until=time.time() + 600,
                         paused_reason="the baseline v3 won")  # fmt: skip
    text = "\n".join(live_lines(state, cfg))
    assert "live evaluation: guard" in text and "baseline (last live-verified): v3" in text
    assert "promotions paused for" in text and "the baseline v3 won" in text
    assert "a = v3, b = v9 (lineage pooled: v7, v8, v9)" in text
    assert "360 impressions: b won 40, a won 20, 300 ties; clicks credited: b 47, a 25" in text
    assert f"of {cfg.live_test.threshold:.2f} to decide" in text


def test_status_without_a_trial_says_so_and_an_expired_pause_is_not_shown() -> None:
    state = RolloutState(serving=2, paused_until=time.time() - 1, paused_reason="old")
    lines = live_lines(state, RolloutConfig())
    assert lines == ["live evaluation: off", "  no live trial running"]


def test_a_long_pooled_lineage_is_named_by_its_ends_and_count() -> None:
    """Rounds every second pool hundreds of versions into one trial: the line stays one line."""
    trial = LiveTrial(id="t", mode="guard", a=1, b=300, b_versions=list(range(2, 301)), share=0.2)
    text = "\n".join(live_lines(RolloutState(serving=300, baseline=1, trial=trial),
                                RolloutConfig(live="guard")))  # fmt: skip
    assert "lineage pooled: v2, v3, ..., v300 (299 versions)" in text
    assert "v150" not in text
