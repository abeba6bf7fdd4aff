"""Speculation rounds in the target's process, as TensorRT-LLM's draft-target model runs both models in one engine:
a target that holds copies of the deployment's small drafters runs a step that asks for `Rounds` whole (its drafter
drafts a chain from the context so far, greedy or sampled as the sequence is, the target verifies it, and again), so
that a request pays the hop between the `cosine` process and the target once per call rather than once per round.

Why: at concurrency 1 on 2 CPU cores a speculating round served over BLS took 13.7 ms where the same round of the
engines in one process took about 9.4 (docs/history.md, sessions 29 and 31): the call's trip out and back, the
stream and the event loop. The `cosine` process still routes, picks the drafter and k, and learns from each round's
outcome (engine.RoundOutcome: drafted, accepted, top tokens matched). A sampled round's q stays here: the drafter
copy returns it with its draws and the target's acceptance takes it (min(1, p/q), the residual on rejection) in the
same process, so no distribution crosses a process for these rounds."""
from __future__ import annotations

import time

from ..engine.engine import Admission, CausalLMEngine, RoundOutcome, StepError, StepRequest, StepResult
from ..engine.sampling import SamplingParams
from ..speculation.proposers import common_prefix_length, drafter_params, kept_prefix
from ..speculation.tree import DraftTree
from .lookahead import LookaheadEngine


class RoundsEngine(LookaheadEngine):
    """LookaheadEngine's `step`, where a step may ask for Rounds (StepRequest.rounds): run after the call's other
    steps, one sequence at a time. Knows each sequence's tokens (its prompt and what it emitted) for its drafters."""

    def __init__(self, engine: CausalLMEngine, drafters: list[CausalLMEngine], max_sequences: int | None = None):
        super().__init__(engine, max_sequences)
        self.drafters = drafters
        self.contexts: dict[int, list[int]] = {}  # sequence id -> its prompt and every token it emitted
        self.drafted: dict[tuple[int, int], list[int]] = {}  # (drafter, sequence) -> tokens the drafter holds K/V of

    def step(self, requests: list[StepRequest]) -> list[StepResult | Exception]:
        others = [index for index, request in enumerate(requests) if request.rounds is None]
        results: list = [None] * len(requests)
        for index, result in zip(others, super().step([requests[index] for index in others]) if others else ()):
            results[index] = result
        for index, request in enumerate(requests):
            if request.rounds is not None:
                try:
                    results[index] = self._rounds(request)
                except StepError as error:
                    results[index] = error
        for request, result in zip(requests, results):
            self._follow(request, result)
        return results

    def _follow(self, request: StepRequest, result) -> None:
        """Keeps each sequence's tokens: the admitted prompt, then every emitted token; forgets released ones."""
        sequence_id = request.sequence_id
        if request.release or isinstance(result, Exception) and request.admission is not None:
            self._forget(sequence_id)
        elif isinstance(result, StepResult):
            if request.admission is not None:
                self._forget_reclaimed()
                self.contexts[sequence_id] = list(request.input_ids)
            if sequence_id in self.contexts:
                self.contexts[sequence_id] += result.tokens

    def _forget(self, sequence_id: int) -> None:
        self.contexts.pop(sequence_id, None)
        for index, drafter in enumerate(self.drafters):
            if self.drafted.pop((index, sequence_id), None) is not None:
                drafter.release(sequence_id)

    def _forget_reclaimed(self) -> None:
        """Sequences the engine reclaimed as idle never come back: their tokens go too."""
        for sequence_id in [s for s in self.contexts if s not in self.engine.sequences]:
            self._forget(sequence_id)

    def _rounds(self, request: StepRequest) -> StepResult:
        rounds, sequence_id = request.rounds, request.sequence_id
        if not 0 <= rounds.drafter < len(self.drafters):
            raise StepError(f"rounds_drafter must be in [0, {len(self.drafters)}), got {rounds.drafter}")
        self.undo_ahead(sequence_id)  # the rounds size their drafts by what the sequence has left
        sequence = self.engine.sequences.get(sequence_id)
        if sequence is None or sequence_id not in self.contexts:
            raise StepError(f"sequence {sequence_id} is not active (finished, released or reclaimed)")
        context = self.contexts[sequence_id]
        if context[-len(request.input_ids):] != request.input_ids:
            raise StepError(f"rounds: input_ids {request.input_ids} are not sequence {sequence_id}'s last tokens")
        emitted: list[int] = []
        done = StepResult([], [], [], [])
        for _ in range(rounds.count):
            k = min(rounds.draft_tokens, self.engine.tokens_left(sequence_id) - 1)
            chain, tops, q = (self._draft(rounds.drafter, sequence_id, sequence.params, context + emitted, k)
                              if k > 0 else ([], [], None))
            result = super().step([StepRequest(sequence_id, (context + emitted)[-1:], DraftTree.chain(chain),
                                               draft_q=q)])[0]
            if isinstance(result, Exception):
                if not emitted:
                    raise StepError(str(result))
                break
            if chain:  # else a plain step: no round to learn from
                done.rounds.append(RoundOutcome(chain, common_prefix_length(chain, result.tokens),
                                                sum(top == token for top, token in zip(tops, result.tokens))))
            for mine, theirs in ((done.tokens, result.tokens), (done.probs, result.probs),
                                 (done.top_ids, result.top_ids), (done.top_probs, result.top_probs)):
                mine += theirs
            emitted += result.tokens
            if not chain or self.engine.tokens_left(sequence_id) <= 0:
                break
        return done

    def _draft(self, drafter: int, sequence_id: int, params: SamplingParams, context: list[int], k: int):
        """The drafter's chain of k tokens after `context` (admitted on first use, else rolled back to what it
        shares with the context), sampled as the sequence samples, its top token at each position, and the q each
        token was drawn from (None when greedy); ([], [], None) if the drafter fails: the round then verifies no
        draft."""
        engine, key, samples = self.drafters[drafter], (drafter, sequence_id), not params.greedy
        cached = self.drafted.get(key)
        keep = None if cached is None else kept_prefix(cached, context)
        own = drafter_params(params, f"round drafter {drafter}") if samples else SamplingParams()
        admission = None if cached is not None else Admission(self.engine.tokens_left(sequence_id) + 1, own)
        # a greedy draft's tokens are its top tokens: only a sampled one asks for them
        step = StepRequest(sequence_id, context[keep or 0:], admission=admission, keep_length=keep, extra_tokens=k - 1,
                           candidates=int(samples), return_q=samples)
        started = time.perf_counter()
        result = engine.step([step])[0]
        self.busy_seconds += time.perf_counter() - started
        if isinstance(result, Exception):
            if self.drafted.pop(key, None) is not None:
                engine.release(sequence_id)
            return [], [], None
        self.drafted[key] = context + result.tokens[:-1]
        return result.tokens, [top[0] for top in result.top_ids] if samples else result.tokens, result.q
