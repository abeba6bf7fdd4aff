"""Drafter health without Triton: the circuit breaker's states, a down drafter refused at once and left out of new
requests' plans, and probed back."""
import asyncio

import pytest

from cosine.engine.engine import StepResult
from cosine.serving import wire
from cosine.serving.batching import CoalescingEngine, InProcessEngine
from cosine.serving.errors import ServingError
from cosine.serving.generation import Deployment, speculation_plan
from cosine.serving.health import CircuitBreaker
from cosine.serving.request import GenerationRequest


FAILURE = "engine failed"


class Clock:
    now = 100.0

    def __call__(self):
        return self.now


class FlakyTransport:
    """An engine transport that fails, hangs or answers (every sequence an empty result), and counts its calls."""

    def __init__(self):
        self.mode, self.calls = "ok", 0

    async def __call__(self, arrays):
        self.calls += 1
        if self.mode == "fail":
            raise ServingError(FAILURE, ServingError.UNAVAILABLE)
        if self.mode == "hang":
            await asyncio.sleep(3600)
        return wire.pack_results([StepResult([], [], [], [])] * len(wire.unpack_steps(arrays)))


class FlakyInProcessEngine:
    """An engine in this process (LookaheadEngine's interface) whose step fails as a whole or answers."""

    def __init__(self):
        self.mode, self.calls = "ok", 0

    def step(self, steps):
        self.calls += 1
        if self.mode == "fail":
            raise RuntimeError(FAILURE)  # as torch raises
        return [StepResult([], [], [], [])] * len(steps)


def drafter(clock, timeout_s=5.0, in_process=False):
    changes = []
    breaker = CircuitBreaker("drafter_x", timeout_s=timeout_s, probe_after_s=1.0, max_probe_after_s=3.0,
                             on_change=changes.append, clock=clock)
    if in_process:
        engine = FlakyInProcessEngine()
        return InProcessEngine("drafter_x", engine, breaker), engine, changes
    transport = FlakyTransport()
    return CoalescingEngine("drafter_x", transport, breaker), transport, changes


async def step(engine):
    return await engine.step(1, [5, 6])


@pytest.mark.parametrize("in_process", [False, True])
def test_a_failed_call_takes_the_drafter_down_and_a_probe_brings_it_back(in_process):
    clock = Clock()
    engine, transport, changes = drafter(clock, in_process=in_process)

    async def main():
        await step(engine)
        transport.mode = "fail"
        with pytest.raises(ServingError, match=FAILURE):
            await step(engine)
        assert changes == [False] and not engine.available
        with pytest.raises(ServingError, match="down"):  # refused at once: the transport is not called
            await step(engine)
        assert transport.calls == 2
        clock.now += 1.0  # a probe is due: one call goes; it fails, so the next probe waits twice as long
        assert engine.available
        with pytest.raises(ServingError, match=FAILURE):
            await step(engine)
        clock.now += 1.5
        assert not engine.available
        clock.now += 0.5
        transport.mode = "ok"
        await step(engine)  # the probe succeeds: up again
        assert changes == [False, True] and engine.available
        transport.mode = "fail"  # and a later failure waits the first interval again, not the doubled one
        with pytest.raises(ServingError):
            await step(engine)
        clock.now += 1.0
        assert engine.available
    asyncio.run(main())
    assert transport.calls == 5


def test_a_call_that_outlasts_the_timeout_fails_and_only_one_probe_goes_at_a_time():
    clock = Clock()
    engine, transport, changes = drafter(clock, timeout_s=0.05)

    async def main():
        transport.mode = "hang"
        with pytest.raises(ServingError, match="no answer within"):
            await step(engine)
        assert changes == [False]
        clock.now += 1.0
        probe = asyncio.ensure_future(step(engine))
        while transport.calls < 2:  # until the probe is out
            await asyncio.sleep(0)
        assert not engine.available  # while it hangs, nobody else is let through
        with pytest.raises(ServingError, match="down"):
            await step(engine)
        with pytest.raises(ServingError, match="no answer within"):
            await probe
    asyncio.run(main())
    assert transport.calls == 2


def test_a_call_sent_before_the_drafter_went_down_does_not_bring_it_back():
    clock = Clock()
    engine, transport, changes = drafter(clock)

    async def main():
        sent, answer = asyncio.Event(), asyncio.Event()

        async def slow(arrays):
            sent.set()
            await answer.wait()
            return await transport(arrays)
        engine.transport = slow
        early = asyncio.ensure_future(step(engine))  # out before the failure, answered after it
        await sent.wait()
        engine.transport, transport.mode = transport, "fail"
        with pytest.raises(ServingError):
            await step(engine)
        transport.mode = "ok"
        answer.set()
        await early
        assert changes == [False] and not engine.available
    asyncio.run(main())


def test_new_requests_plan_without_a_drafter_that_is_down():
    clock = Clock()
    down, transport, _ = drafter(clock)
    up, _, _ = drafter(clock)
    deployment = Deployment(target=up, tokenizer=None, max_context=128, end_id=None,
                            drafters={"general": down, "code": up}, general_drafter="general", router=object())

    async def take_down():
        transport.mode = "fail"
        with pytest.raises(ServingError):
            await step(down)
    assert speculation_plan(GenerationRequest("x", max_tokens=8, speculation_mode="cosine"), deployment)[2] == \
        ("general", "code")
    asyncio.run(take_down())
    for mode, drafters in (("vanilla", ()), ("specinfer", ("code",)), ("cosine", ("code",))):
        assert speculation_plan(GenerationRequest("x", max_tokens=8, speculation_mode=mode), deployment)[2] == \
            drafters, mode
    with pytest.raises(ServingError, match="unknown drafter"):  # a drafter that is down is still known
        speculation_plan(GenerationRequest("x", max_tokens=8, speculation_mode="cosine", drafters=("nope",)),
                         deployment)


def test_a_call_cancelled_under_the_engine_fails_its_callers_rather_than_leaving_them_waiting():
    async def cancelled(arrays):
        raise asyncio.CancelledError  # e.g. a connection closed while the call was out

    async def main():
        with pytest.raises(ServingError, match="cancelled"):
            await asyncio.wait_for(step(CoalescingEngine("drafter_x", cancelled)), 5)
    asyncio.run(main())
