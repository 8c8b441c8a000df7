"""Skipped optimizer updates, counted on the device so that a healthy step never waits for it."""

from __future__ import annotations

import torch


class SkipCounter:
    """Updates attempted, skipped and applied.

    Contract:
    - ``record(bad)`` once per attempted update; ``bad`` is a 0-dim bool tensor on the training device,
      True when the update was not applied (a non-finite gradient, decided on the device where the
      optimizer can take it there). It never reads the device.
    - ``skip(cause)`` records an update the host already knows was dropped (``"oom"``).
    - ``read()`` is the one host sync: call it at log, validation and save points and after a known
      skip. It returns how many updates were skipped since the previous read; until then the caller
      counts them as applied (the step counter and the schedule move on every attempt).
    - ``attempted``, ``skipped`` and ``applied`` count from the run's start (``applied`` is exact
      right after a read); ``consecutive`` is the current run of skipped updates, ``cause`` the
      reason of the latest one (``"nonfinite"`` or ``"oom"``).
    """

    def __init__(self, device: torch.device, applied: int = 0, skipped: int = 0, consecutive: int = 0):
        self.skipped = skipped
        self.attempted = applied + skipped
        self.consecutive = consecutive
        self.cause = ""
        self.known = False  # the latest attempt was a skip the host knows of
        self._new = torch.zeros((), dtype=torch.int64, device=device)
        self._run = torch.full((), consecutive, dtype=torch.int64, device=device)

    @property
    def applied(self) -> int:
        return self.attempted - self.skipped

    def record(self, bad: torch.Tensor) -> None:
        self.attempted += 1
        self.known = False
        self._new += bad
        self._run = (self._run + 1) * bad

    def skip(self, cause: str) -> None:
        self.record(torch.ones((), dtype=torch.bool, device=self._new.device))
        self.known, self.cause = True, cause

    def read(self) -> int:
        new, self.consecutive = torch.stack([self._new, self._run]).tolist()
        self._new.zero_()
        self.skipped += new
        if new and not self.known:  # decided on the device
            self.cause = "nonfinite"
        return new
