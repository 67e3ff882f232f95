"""When a training run's epoch ends with a checkpoint (``training.worker._Cadence``)."""

from __future__ import annotations

from training.worker import _Cadence


def test_a_run_per_round_checkpoints_every_epoch_its_last_included() -> None:
    cadence = _Cadence(every_epoch=True)
    assert [cadence.due(e, 3, 0.01, 2.0) for e in range(3)] == [True, True, True]


def test_a_long_lived_run_skips_short_rounds_and_every_rounds_last_epoch() -> None:
    cadence = _Cadence(every_epoch=False)
    # Twenty one-epoch rounds of 0.5 s: no checkpoint, their result goes to the feeder.
    assert not any(cadence.due(0, 1, 0.5, 2.0) for _ in range(20))
    # The seconds add up across rounds, so the next multi-epoch round checkpoints at its first
    # epoch's end, but never at its last.
    assert cadence.due(0, 3, 0.5, 2.0)
    cadence.done()
    assert not cadence.due(1, 3, 0.5, 2.0)
    assert not cadence.due(2, 3, 5.0, 2.0)


def test_a_long_round_checkpoints_once_enough_training_has_passed() -> None:
    cadence = _Cadence(every_epoch=False)
    marks = []
    for epoch in range(10):
        due = cadence.due(epoch, 10, 0.8, 2.0)
        marks.append(due)
        if due:
            cadence.done()
    assert marks == [False, False, True, False, False, True, False, False, True, False]


def test_zero_seconds_checkpoints_every_epoch_but_the_last() -> None:
    cadence = _Cadence(every_epoch=False)
    assert [cadence.due(e, 4, 0.01, 0.0) for e in range(4)] == [True, True, True, False]
