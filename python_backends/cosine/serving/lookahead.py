"""Overlap scheduling for plain decoding, as SGLang's overlap scheduler and vLLM's async scheduling hide the host's
turn between steps: after answering a call, the target goes on to compute, for every sequence it just decoded
plainly, the call that sequence's request most likely makes next (its last token in, as many steps again), while the
answer travels to the `cosine` process and the next call comes back. A call that asks exactly that takes the result
at once; any other step of that sequence first undoes it (cached length and random state), so every result is what
the engine would have computed without looking ahead.

On this project's 2-core CPU a target replica serving one plain-decoding request sat idle 12% of the time between
its calls; looking ahead made plain decoding 22% faster there, and 8% slower at concurrency 32, where it takes the
processor the hop needs (see triton/engine_model.py, which limits it accordingly)."""
from __future__ import annotations

import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from ..engine.engine import CausalLMEngine, StepRequest, StepResult


@dataclass
class _Ahead:
    step: StepRequest  # the call expected next for the sequence
    snapshot: tuple  # the sequence before it (CausalLMEngine.snapshot)
    result: StepResult | Exception | None = None  # None while computing


def _plain(step: StepRequest) -> bool:
    """A plain-decoding step: tokens appended to an admitted sequence, no draft, nothing else asked."""
    return not (step.release or step.draft or step.admission or step.score_input or step.draft_q is not None
                or step.keep_length is not None)


def _expected_next(step: StepRequest, result: StepResult | Exception, tokens_left: int) -> StepRequest | None:
    """The step a plain-decoding sequence's request makes next: its last token in, as many steps again, fewer
    where its max_new_tokens end sooner (none where they have ended)."""
    if not _plain(step) or not isinstance(result, StepResult) or tokens_left <= 0:
        return None
    return StepRequest(step.sequence_id, result.tokens[-1:], extra_tokens=min(step.extra_tokens, tokens_left - 1),
                       candidates=step.candidates, return_q=step.return_q)


def _same(expected: StepRequest, step: StepRequest) -> bool:
    return _plain(step) and (step.input_ids, step.extra_tokens, step.candidates, step.return_q) == (
        expected.input_ids, expected.extra_tokens, expected.candidates, expected.return_q)


# How long the look-ahead thread may hold the GIL while the thread answering calls waits for it: Python's default,
# 5 ms, could delay every call's hand-over by about the hop this hides (measured apart at c1, alternated servers:
# 85.3 and 74.0 tokens/s against 72.2 and 75.8 with the default; within this machine's noise)
SWITCH_INTERVAL_S = 0.0005


class LookaheadEngine:
    """CausalLMEngine's `step`, with plain-decoding calls looked ahead on a worker thread (one engine step at a
    time: a call first waits for the look-ahead step in progress)."""

    def __init__(self, engine: CausalLMEngine, max_sequences: int | None = None):
        """max_sequences: calls decoding more sequences plainly than this are not looked ahead (None: any; 0: none,
        the engine only times its steps)."""
        self.engine, self.max_sequences = engine, max_sequences
        if max_sequences != 0:
            sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))  # process-wide: the engine's
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="lookahead")
        self.computing: tuple[Future, list[StepRequest]] | None = None  # a look-ahead step and what it computes
        self.ahead: dict[int, _Ahead] = {}  # sequence id -> its look-ahead step
        self.busy_seconds = 0.0  # in engine steps, looked ahead or not
        self.used = self.undone = 0  # looked-ahead sequence steps a call took, and those undone instead

    def step(self, requests: list[StepRequest]) -> list[StepResult | Exception]:
        self.wait_ahead()
        unique = len({request.sequence_id for request in requests}) == len(requests)  # else the engine refuses
        results: list = [None] * len(requests)
        for index, request in enumerate(requests):
            ahead = self.ahead.pop(request.sequence_id, None)
            if ahead is None:
                continue
            if unique and isinstance(ahead.result, StepResult) and _same(ahead.step, request):
                results[index] = ahead.result
                self.used += 1
            else:
                self._undo(ahead)
        todo = [index for index, result in enumerate(results) if result is None]
        for index, result in zip(todo, self._timed_step([requests[index] for index in todo])):
            results[index] = result
        self._look_ahead(requests, results)
        return results

    def undo_ahead(self, sequence_id: int) -> None:
        """Puts the sequence back as it was before its look-ahead (if any): for a caller that reads its state before
        stepping it otherwise."""
        self.wait_ahead()
        ahead = self.ahead.pop(sequence_id, None)
        if ahead is not None:
            self._undo(ahead)

    def _undo(self, ahead: _Ahead) -> None:
        self.engine.restore(ahead.snapshot)
        self.undone += 1

    def close(self) -> None:
        self.wait_ahead()
        self.worker.shutdown()

    def _look_ahead(self, requests: list[StepRequest], results: list[StepResult | Exception]) -> None:
        """Starts computing the expected next call of every sequence these requests decoded plainly."""
        if self.max_sequences == 0:  # drafters, a target without look-ahead: nothing to compute per call
            return
        live = [(request, result) for request, result in zip(requests, results)
                if request.sequence_id in self.engine.sequences]
        steps = [step for step in (_expected_next(request, result, self.engine.tokens_left(request.sequence_id))
                                   for request, result in live) if step is not None]
        if not steps or self.max_sequences is not None and len(steps) > self.max_sequences:
            return
        for step in steps:
            self.ahead[step.sequence_id] = _Ahead(step, self.engine.snapshot(step.sequence_id))
        self.computing = self.worker.submit(self._timed_step, steps), steps

    def wait_ahead(self) -> None:
        """Waits for the look-ahead step in progress and files its results (a failed step is undone)."""
        if self.computing is None:
            return
        (computing, steps), self.computing = self.computing, None
        try:
            results = computing.result()
        except Exception as error:  # noqa: BLE001  the calls that wanted these steps will compute them again
            results = [error] * len(steps)
        for step, result in zip(steps, results):
            self.ahead[step.sequence_id].result = result

    def _timed_step(self, steps: list[StepRequest]) -> list[StepResult | Exception]:
        started = time.perf_counter()
        try:
            return self.engine.step(steps)
        finally:
            self.busy_seconds += time.perf_counter() - started
