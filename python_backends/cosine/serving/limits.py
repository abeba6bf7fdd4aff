"""Overload protection for one deployment. A request enters the `cosine` model only while the deployment can take it;
until then it waits in Triton's queue in front of the model, which refuses requests beyond its size with HTTP 503 /
gRPC UNAVAILABLE before any model sees them (a model's own errors reach an HTTP client as 400 on /generate, see
the status-code table in docs/operations.md). An accepted request runs to its end or fails with a clear error, never
silently truncated."""
from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Limits:
    # requests the `cosine` model serves at once, generating or waiting for the target's KV cache
    max_inflight_requests: int = 256
    # prompt + max_tokens, summed over the requests waiting for the target's KV cache: no new request enters the
    # model while this many wait (a soft limit: the request that crosses it is served)
    max_queued_tokens: int = 262144
    # requests Triton holds in front of the model while it cannot take more; beyond: 503 "Exceeds maximum queue size"
    max_queued_requests: int = 1024
    # how long a request may wait in Triton's queue, and again for the target's KV cache, before it fails
    queue_timeout_s: float = 60.0


class AdmissionGate:
    """Counts the requests inside the model and the tokens waiting for KV cache. `enter` blocks the calling thread
    (the Python backend's execute thread) until both are under their limits, so that the backlog stays in Triton's
    queue, where its size and timeout apply."""

    def __init__(self, limits: Limits, on_change: Callable[[int], None] = lambda in_flight: None):
        """on_change: told the number of requests inside after every change of it (a gauge)."""
        self.limits, self.on_change = limits, on_change
        self.in_flight = 0
        self.queued_tokens = 0
        self._changed = threading.Condition()  # reentrant: _update runs under it too
        self._waiting: set[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = set()  # enter_later's, woken by _update

    def _room(self) -> int:
        """How many requests may enter now."""
        if self.queued_tokens >= self.limits.max_queued_tokens:
            return 0
        return max(self.limits.max_inflight_requests - self.in_flight, 0)

    def enter(self, requests: int = 1) -> int:
        """Waits until at least one request fits; lets in as many of `requests` as fit and returns how many."""
        with self._changed:
            self._changed.wait_for(self._room)
            admitted = min(requests, self._room())
            self._update(in_flight=admitted)
            return admitted

    async def enter_later(self) -> bool:
        """For a request handed over in a batch beyond the limits: waits without holding the thread, woken by every
        change of the counts (made on any thread), up to queue_timeout_s; False if it timed out."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.queue_timeout_s
        while True:
            waiter = (loop, loop.create_future())
            with self._changed:
                if self._room():
                    self._update(in_flight=1)
                    return True
                self._waiting.add(waiter)
            try:
                await asyncio.wait_for(waiter[1], max(deadline - loop.time(), 0.0))
            except asyncio.TimeoutError:
                return False
            finally:
                with self._changed:
                    self._waiting.discard(waiter)

    def leave(self) -> None:
        self._update(in_flight=-1)

    def queue_tokens(self, tokens: int) -> None:
        """tokens > 0: a request starts waiting for KV cache; < 0: it stops."""
        self._update(queued_tokens=tokens)

    def _update(self, in_flight: int = 0, queued_tokens: int = 0) -> None:
        with self._changed:
            self.in_flight += in_flight
            self.queued_tokens += queued_tokens
            self._changed.notify_all()
            for loop, changed in self._waiting:
                loop.call_soon_threadsafe(lambda f=changed: f.done() or f.set_result(None))
            if in_flight:
                self.on_change(self.in_flight)
