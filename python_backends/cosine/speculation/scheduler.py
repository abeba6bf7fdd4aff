"""Verification batch scheduling: which requests' trees go into the next target pass.

A gate of our own rather than Triton's batcher alone, because Triton's batcher counts requests while verification
cost follows tokens (a tree may be 1 or 30 of them). One batch is in flight at a time; when it returns, the next is
formed from the waiting requests by a weighted latency/throughput score under a cap on tokens, and a request that
waited longer than `max_wait_s` goes first whatever its score, so nobody starves. A batch is formed once every
active request waits, or when the gather window ends, so requests returning from the previous batch travel together;
the calls released together go to the target as one (`serving.batching`). The window is `gather_window_s`, and as
long as the last pass took while a sequence that left that pass is still out (drafting its next round): released
without it, it would pass alone later, and the replica's passes would split into groups that alternate for good
(fixed-k-8 cosine at c8 on the demo zoo: 1.9 sequences a pass of 3.8, 98% of releases at the 2-ms window's end;
waiting for the sequences out, 2.9 a pass and 1.28x the tokens/s, docs/history.md, session 36).
Each target replica has its own (`serving.batching.ReplicatedEngine`), so replicas step side by side."""
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
        self.returning: set = set()  # sequences out of a pass that will ask for another (not finished)
        self.last_pass_s = 0.0  # the last batch's time, from its release to its last slot's end
        self._released_at = 0.0
        self._gather_started: float | None = None  # when the current gather began (loop time)
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

    def _release(self) -> None:
        if self.in_flight or not self.waiting:
            return
        now = asyncio.get_running_loop().time()
        if self._gather_started is None:
            self._gather_started = now
        if len(self.waiting) < self.active_requests():
            window = max(self.gather_window_s, self.last_pass_s) if self.returning else self.gather_window_s
            remaining = self._gather_started + window - now
            if remaining > 0:  # the window may have shrunk since the timer was set: set again
                if self._gathering is not None:
                    self._gathering.cancel()
                self._gathering = asyncio.get_running_loop().call_later(remaining, self._window_over)
                return
        if self._gathering is not None:
            self._gathering.cancel()
            self._gathering = None
        self._gather_started = None
        batch = self.next_batch()
        self.in_flight, self._released_at = len(batch), now
        for entry in batch:
            entry.ticket.set_result(None)

    def _window_over(self) -> None:
        self._gathering = None
        self._release()

    def forget(self, sequence_id) -> None:
        """The sequence asks for no more passes (finished or released): the next pass does not wait for it."""
        self.returning.discard(sequence_id)
        self._release()

    @asynccontextmanager
    async def slot(self, sequence_id, tokens: int, value: float = 0.0):
        """Holds the caller until its verification may go out; the body is the verification call."""
        self.returning.discard(sequence_id)
        entry = _Waiting(self.clock(), tokens, value, asyncio.get_running_loop().create_future())
        self.waiting.append(entry)
        self._release()
        try:
            await entry.ticket
        except asyncio.CancelledError:
            if entry in self.waiting:
                self.waiting.remove(entry)
            else:
                self._finish(sequence_id)
            raise
        try:
            yield
        finally:
            self._finish(sequence_id)

    def _finish(self, sequence_id) -> None:
        self.in_flight -= 1
        self.returning.add(sequence_id)
        if not self.in_flight:
            self.last_pass_s = asyncio.get_running_loop().time() - self._released_at
        self._release()
