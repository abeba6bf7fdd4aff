"""Verification batch scheduling: which requests' trees go into the next target pass.

A gate of our own rather than Triton's batcher alone, because Triton's batcher counts requests while verification
cost follows tokens (a tree may be 1 or 30 of them). One batch is in flight at a time; when it returns, the next is
formed from the waiting requests by a weighted latency/throughput score under a cap on tokens, and a request that
waited longer than `max_wait_s` goes first whatever its score, so nobody starves. A batch is formed once every
active request waits, or `gather_window_s` after the first arrival, so requests returning from the previous batch
travel together; the calls released together go to the target as one (`serving.batching`). Each target replica has
its own (`serving.batching.ReplicatedEngine`), so replicas step side by side."""
from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass


@dataclass(eq=False)  # entries are distinct even when their numbers are equal
class _Waiting:
    arrival: float
    tokens: int
    value: float  # expected tokens gained per verified token (throughput)
    ticket: asyncio.Future


class VerificationScheduler:
    def __init__(self, token_cap: int = 256, latency_weight: float = 1.0, max_wait_s: float = 0.5,
                 gather_window_s: float = 0.002, active_requests=lambda: 1, clock=time.monotonic):
        self.token_cap, self.latency_weight, self.max_wait_s = token_cap, latency_weight, max_wait_s
        self.gather_window_s, self.active_requests = gather_window_s, active_requests
        self.clock = clock
        self.waiting: list[_Waiting] = []
        self.in_flight = 0
        self._gathering = None  # the timer that ends the current gather window

    def priority(self, entry: _Waiting, now: float) -> tuple:
        waited = now - entry.arrival
        starving = waited >= self.max_wait_s
        return (not starving, -(entry.value + self.latency_weight * waited))

    def next_batch(self) -> list[_Waiting]:
        """Picks the next batch from the waiting requests (and removes it from them)."""
        now = self.clock()
        ranked = sorted(self.waiting, key=lambda e: self.priority(e, now))
        batch, tokens = [], 0
        for entry in ranked:
            if batch and tokens + entry.tokens > self.token_cap:
                continue
            batch.append(entry)
            tokens += entry.tokens
        for entry in batch:
            self.waiting.remove(entry)
        return batch

    def _release(self, window_over: bool = False) -> None:
        if self.in_flight or not self.waiting:
            return
        if not window_over and len(self.waiting) < self.active_requests():
            if self._gathering is None:
                self._gathering = asyncio.get_running_loop().call_later(self.gather_window_s, self._release, True)
            return
        if self._gathering is not None:
            self._gathering.cancel()
            self._gathering = None
        batch = self.next_batch()
        self.in_flight = len(batch)
        for entry in batch:
            entry.ticket.set_result(None)

    @asynccontextmanager
    async def slot(self, tokens: int, value: float = 0.0):
        """Holds the caller until its verification may go out; the body is the verification call."""
        entry = _Waiting(self.clock(), tokens, value, asyncio.get_running_loop().create_future())
        self.waiting.append(entry)
        self._release()
        try:
            await entry.ticket
        except asyncio.CancelledError:
            if entry in self.waiting:
                self.waiting.remove(entry)
            else:
                self._finish()
            raise
        try:
            yield
        finally:
            self._finish()

    def _finish(self) -> None:
        self.in_flight -= 1
        self._release()
