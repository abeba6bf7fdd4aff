"""Drafter health: a circuit breaker around an engine's calls (local BLS or remote gRPC alike).

A call that fails or outlasts the timeout opens the circuit: the engine is down, its calls are refused at once and
routing leaves it out, so no request waits on it again. After `probe_after_s` one call is let through as a probe
(half-open): its success closes the circuit, its failure opens it again for twice as long (at most
`max_probe_after_s`). Only whole-call failures count: a sequence the engine refuses (its KV cache is full) is that
request's business, not the engine's health."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable

from .errors import ServingError

log = logging.getLogger(__name__)


class CircuitBreaker:
    def __init__(self, name: str, timeout_s: float, probe_after_s: float, max_probe_after_s: float = 10.0,
                 on_change: Callable[[bool], None] = lambda up: None, on_failure: Callable[[], None] = lambda: None,
                 clock=time.monotonic):
        self.name, self.timeout_s = name, timeout_s
        self.probe_after_s, self.max_probe_after_s = probe_after_s, max_probe_after_s
        self.on_change, self.on_failure, self.clock = on_change, on_failure, clock
        self.opened_at: float | None = None  # None: closed (the engine is up)
        self.wait_s = probe_after_s  # from opened_at to the next probe
        self.probing = False

    @property
    def up(self) -> bool:
        return self.opened_at is None

    def admits(self) -> bool:
        """Whether a call may go now: the engine is up, or a probe is due (and none is out)."""
        return self.up or (not self.probing and self.clock() >= self.opened_at + self.wait_s)

    async def call(self, send: Callable[[], Awaitable]):
        """send() under the timeout; refused at once while the circuit is open."""
        if not self.admits():
            raise ServingError(f"{self.name} is down (its calls failed); probed again in "
                               f"{self.opened_at + self.wait_s - self.clock():.1f} s", ServingError.UNAVAILABLE)
        probe = not self.up
        if probe:  # admits() let it through: no other probe is out
            self.probing = True
        try:
            result = await asyncio.wait_for(send(), self.timeout_s)
        except Exception as error:
            if isinstance(error, asyncio.TimeoutError):
                error = ServingError(f"{self.name}: no answer within {self.timeout_s:g} s", ServingError.UNAVAILABLE)
            self._failed(error, probe)
            raise error from None
        finally:
            if probe:
                self.probing = False
        if probe:  # a call sent before the circuit opened proves nothing: only a probe closes it
            self.opened_at, self.wait_s = None, self.probe_after_s
            log.warning("%s is back up", self.name)
            self.on_change(True)
        return result

    def _failed(self, error: Exception, probe: bool) -> None:
        self.on_failure()
        if self.up:
            self.opened_at = self.clock()
            log.warning("%s is down, routed around; probing in %.1f s: %s", self.name, self.wait_s, error)
            self.on_change(False)
        elif probe:
            self.opened_at, self.wait_s = self.clock(), min(2 * self.wait_s, self.max_probe_after_s)


class BreakerGuarded:
    """An engine client whose calls go through its circuit breaker (none: always available, as for the target)."""
    breaker: CircuitBreaker | None = None

    @property
    def available(self) -> bool:
        """Whether requests may plan to use this engine (its circuit is closed, or a probe is due)."""
        return self.breaker is None or self.breaker.admits()

    async def _guarded(self, send: Callable[[], Awaitable]):
        return await (self.breaker.call(send) if self.breaker else send())
