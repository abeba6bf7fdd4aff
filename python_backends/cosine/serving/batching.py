"""One call per engine per tick: the transport under the per-request coroutines.

Request coroutines call `step` as if each had the engine to itself. Calls made in the same event-loop tick (the
verification scheduler releases a batch in one tick; requests that leave one pass draft together in the next) go
out as ONE engine call carrying every sequence, flattened by `wire`. Triton's dynamic batcher then merges calls
that arrive from other `cosine` instances while the engine is busy. An engine in the `cosine` process itself (a
drafter placed there) coalesces the same way and steps without the wire."""
from __future__ import annotations

import asyncio
import functools
import os
from collections import Counter
from typing import Awaitable, Callable

import numpy as np

from ..contract import DEPLOYMENT_SECRET, DEPLOYMENT_SECRET_ENV
from ..engine.engine import Admission, StepRequest, StepResult
from ..speculation.scheduler import VerificationScheduler
from ..speculation.tree import DraftTree
from . import wire
from .errors import ServingError
from .health import BreakerGuarded, CircuitBreaker
from .lookahead import LookaheadEngine
from .trust import secret_array

# sends packed steps to an engine model and returns its packed results
Transport = Callable[[dict[str, np.ndarray]], Awaitable[dict[str, np.ndarray]]]


class EngineCalls(BreakerGuarded):
    """An engine's `step` and `release` for the request coroutines: the calls of one event-loop tick go to the engine
    as one (`_call`, by where the engine is)."""

    def __init__(self, name: str, breaker: CircuitBreaker | None = None):
        """breaker: the engine's health (drafters); its calls go through it."""
        self.name, self.breaker = name, breaker
        self.pending: list[tuple[StepRequest, asyncio.Future, asyncio.Future | None]] = []  # step, result, sent
        self.in_flight: set[asyncio.Task] = set()  # the loop keeps only weak references to tasks

    async def step(self, sequence_id, input_ids, draft=None, *, request=None, keep_length=None, extra_tokens=0,
                   candidates=0, score_input=False, draft_q=None, return_q=False, rounds=None,
                   sent=None) -> StepResult:
        admission = None
        if request is not None:
            admission = Admission(request.max_tokens, request.params.seeded(),
                                  request.end_id if request.min_length else None, request.min_length)
        step = StepRequest(sequence_id, list(input_ids), draft or DraftTree(), admission, keep_length, extra_tokens,
                           candidates, score_input, draft_q=draft_q, return_q=return_q, rounds=rounds)
        return await self._submit(step, sent)

    async def release(self, sequence_id) -> None:
        await self._submit(StepRequest(sequence_id, release=True))

    async def _submit(self, step: StepRequest, sent: asyncio.Future | None = None) -> StepResult:
        future = asyncio.get_running_loop().create_future()
        self.pending.append((step, future, sent))
        if len(self.pending) == 1:
            asyncio.get_running_loop().call_soon(self._flush)
        result = await future
        if isinstance(result, Exception):
            raise result
        return result

    def _flush(self) -> None:
        batch, self.pending = self.pending, []
        task = asyncio.ensure_future(self._send(batch))
        self.in_flight.add(task)
        task.add_done_callback(self.in_flight.discard)

    async def _send(self, batch: list[tuple[StepRequest, asyncio.Future, asyncio.Future | None]]) -> None:
        steps = [step for step, *_ in batch]
        for *_, sent in batch:  # waiters run after this turn, in which the call goes out (unless a breaker guards it)
            if sent is not None and not sent.done():
                sent.set_result(None)
        try:
            results = await self._guarded(functools.partial(self._call, steps))
        except Exception as error:  # the whole call failed: every sequence in it fails with the same error
            results = [error] * len(batch)
        except asyncio.CancelledError:  # a caller must never wait on a call that will not answer
            for _, future, _ in batch:
                if not future.done():
                    future.set_result(ServingError(f"{self.name}: call cancelled", ServingError.UNAVAILABLE))
            raise
        for (_, future, _), result in zip(batch, results):
            if not future.done():
                future.set_result(result)

    async def _call(self, steps: list[StepRequest]) -> list[StepResult | ServingError]:
        """One call carrying every step; a result or an error per step."""
        raise NotImplementedError


class CoalescingEngine(EngineCalls):
    """An engine model, in this server (BLS) or on another node (gRPC): steps travel flattened by `wire`."""

    def __init__(self, name: str, transport: Transport, breaker: CircuitBreaker | None = None):
        super().__init__(name, breaker)
        self.transport = transport
        # every call carries the deployment's secret (see trust); without one the engines refuse the calls
        self.secret = secret_array(os.environ.get(DEPLOYMENT_SECRET_ENV, ""))

    async def _call(self, steps: list[StepRequest]) -> list[StepResult | ServingError]:
        arrays = dict(wire.pack_steps(steps), **{DEPLOYMENT_SECRET: self.secret})
        return wire.unpack_results(await self.transport(arrays), steps, self.name)


class InProcessEngine(EngineCalls):
    """An engine in this process: a tick's calls coalesce as for any engine and go to it as one step, with no wire
    and no hop, run on the event loop itself. A small drafter's step is mostly Python, which a worker thread would
    run under the same GIL, adding only hand-overs: on 2 cores (demo zoo, alternated servers, two runs) cosine made
    8-10% more tokens/s at c1 greedy, 5-14% sampled and 6-20% at c8 stepping inline than on a worker thread. So the
    loop waits out each step: for small drafters only, and a step that hangs hangs the `cosine` model (its breaker's
    timeout cannot fire while the loop is held)."""

    def __init__(self, name: str, engine: LookaheadEngine, breaker: CircuitBreaker | None = None,
                 on_step: Callable[[list[StepRequest]], None] = lambda steps: None):
        """on_step: called after each step (the engine's metrics)."""
        super().__init__(name, breaker)
        self.engine, self.on_step = engine, on_step

    async def _call(self, steps: list[StepRequest]) -> list[StepResult | ServingError]:
        try:
            results = self.engine.step(steps)
        except Exception as error:  # the whole step failed, as an engine model's call can: named, for its breaker
            raise ServingError(f"{self.name}: {error}") from error
        self.on_step(steps)
        return [result if isinstance(result, StepResult) else ServingError(f"{self.name}: {result}",
                                                                            wire.error_kind(result))
                for result in results]


class ReplicatedEngine:
    """Data parallelism over replicas of one engine (each its own model, process and KV cache), as vLLM's data-
    parallel engine cores: a sequence is admitted on the replica holding the fewest sequences and stays there, since
    its KV cache lives there. Each replica's calls coalesce on their own, and each replica has its own verification
    scheduler, so the replicas step side by side: one scheduler for them all held one pass in flight across them,
    so that each waited out the other's (at c32 on 2 cores a replica idled 13 ms between passes of 42)."""

    def __init__(self, replicas: list[EngineCalls]):
        self.replicas = replicas
        self.home: dict[int, int] = {}  # sequence id -> the index of the replica holding its KV cache
        self.schedulers = [VerificationScheduler(active_requests=functools.partial(self.sequences_on, index))
                           for index in range(len(replicas))]

    def sequences_on(self, index: int) -> int:
        """The sequences the replica at this index holds: what its scheduler gathers for a pass."""
        return sum(home == index for home in self.home.values())

    def alone(self, sequence_id: int) -> bool:
        """Whether the sequence is the only one its replica holds."""
        return self.sequences_on(self.home[sequence_id]) == 1

    def slot(self, sequence_id: int, tokens: int, value: float):
        """A verification slot on the sequence's replica (see VerificationScheduler.slot)."""
        return self.schedulers[self.home[sequence_id]].slot(sequence_id, tokens, value)

    def finished(self, sequence_id: int) -> None:
        """The sequence asks for no more passes (its request has its last tokens): its replica's scheduler stops
        waiting for it before its release."""
        index = self.home.get(sequence_id)
        if index is not None:
            self.schedulers[index].forget(sequence_id)

    async def step(self, sequence_id, input_ids, draft=None, *, request=None, **kwargs) -> StepResult:
        if request is None:
            return await self.replicas[self.home[sequence_id]].step(sequence_id, input_ids, draft, **kwargs)
        load = Counter(self.home.values())
        # admission: the least loaded replica first; one that refuses (KV cache full, process died) passes it on
        for index in sorted(range(len(self.replicas)), key=lambda index: load[index]):
            self.home[sequence_id] = index  # before the call: admissions of the same tick count it
            try:
                return await self.replicas[index].step(sequence_id, input_ids, draft, request=request, **kwargs)
            except ServingError as error:
                del self.home[sequence_id]
                if error.kind == ServingError.INVALID:  # the request's own fault: every replica would refuse it
                    raise
                refusal = error
        raise refusal

    async def release(self, sequence_id) -> None:
        index = self.home.pop(sequence_id, None)
        if index is not None:
            self.schedulers[index].forget(sequence_id)
            await self.replicas[index].release(sequence_id)
