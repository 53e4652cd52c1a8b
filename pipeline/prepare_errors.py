"""The prepare stage's two failures: a dataset it cannot use, and one row it drops."""

from __future__ import annotations


class PrepareError(RuntimeError):
    """The stage cannot produce a usable dataset; the message says what to change."""



class BadRow(ValueError):
    """One row is unusable; `reason` is the key it is counted under in data_report.json."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason

