"""A recurring failure logged once per streak: when it starts (with its reason), when it ends.

Serving paths retry on every poll or request; a failure that lasts logs once, not per retry, and
a silent retry loop is never the answer.
"""

from __future__ import annotations

import logging


class Streak:
    def __init__(self, log: logging.Logger, what: str) -> None:
        self.log, self.what = log, what
        self.failures = 0  # in the current streak

    def failed(self, err: BaseException, then: str) -> None:
        """``err`` happened doing ``what``; ``then`` says what the caller does instead."""
        self.failures += 1
        if self.failures == 1:
            self.log.warning("%s failed (%s: %s); %s", self.what, type(err).__name__, err, then)

    def ok(self) -> None:
        if self.failures:
            self.log.warning("%s works again after %d failures", self.what, self.failures)
            self.failures = 0
