"""The generation loop of one request, written against small async interfaces (BLS in Triton, direct in tests).

Each round a proposer may draft a token tree; the target appends the pending token, verifies the tree and emits
the accepted tokens plus one of its own. Text is detokenized incrementally and released in chunks that never split
a UTF-8 character or show part of a stop string."""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from ..contract import SPECULATION_MODES
from ..speculation.control import ADAPTIVE_DRAFT_TOKENS, FIXED_DRAFT_TOKENS, LoadMonitor
from ..engine.engine import Rounds
from ..speculation.proposers import (ChainProposer, Draft, DrafterEngine, DrafterSession, DraftOrigin, FusionProposer,
                                     MergedChainsProposer, RouterClient)
from ..speculation.tree import DraftTree
from .batching import ReplicatedEngine
from .errors import InvalidRequest, ServingError
from .limits import AdmissionGate, Limits
from .request import GenerationRequest
from .text import DetokenizerOffsets, StopStrings, decode_increment

log = logging.getLogger(__name__)


@dataclass
class RoundReport:
    """What one round of a speculative mode drafted (None: it decoded plainly) and what the target kept."""
    mode: str
    draft: Draft | None
    accepted: list[int]  # accepted node indices, root to leaf


@dataclass
class Deployment:
    """What the loop needs to know about the deployment it runs in."""
    # the same engine interface, the target verifying instead of drafting; each replica schedules its passes
    target: ReplicatedEngine | DrafterEngine
    # a transformers tokenizer of the target's: text is encoded and detokenized in this process, no model call
    tokenizer: object
    max_context: int
    end_id: int | None
    drafters: dict[str, DrafterEngine] = field(default_factory=dict)
    general_drafter: str | None = None
    router: RouterClient | None = None
    default_mode: str = "autoregressive"
    default_draft_tokens: int = FIXED_DRAFT_TOKENS
    adaptive_draft_tokens: int = ADAPTIVE_DRAFT_TOKENS
    # target steps per plain-decoding call, and for a request alone on its target replica at light load
    # (alone_at_light_load; the spec sets both and says why)
    plain_decode_steps: int = 1
    plain_decode_steps_alone: int = 1
    # speculation rounds per call that a request alone on its target replica asks the target to run with its own
    # copies of these drafters (serving.rounds; the spec's target_rounds); a call names the drafter by its index
    target_rounds: int = 0
    round_drafters: tuple[str, ...] = ()
    max_draft_tokens: int = 64
    max_cooperating_drafters: int = 2
    gate: AdmissionGate = field(default_factory=lambda: AdmissionGate(Limits()))  # the adapter lets requests in
    monitor: LoadMonitor = field(default_factory=LoadMonitor)
    on_round: Callable[[RoundReport], None] = lambda report: None
    on_admitted: Callable[[float], None] = lambda queued_s: None  # seconds a request waited for KV cache

    def __post_init__(self):
        if not isinstance(self.target, ReplicatedEngine):  # one engine: its one replica, with its scheduler
            self.target = ReplicatedEngine([self.target])

    def alone_at_light_load(self, sequence_id: int) -> bool:
        """Whether the request's plain-decoding calls may run plain_decode_steps_alone steps without delaying anyone:
        it is alone on its target replica and every active request can have a replica to itself (being alone is not
        enough: the spec's plain_decode_steps_alone says what that cost at c4). The load is read first: under load it
        settles the question without a scan of the replicas' sequences."""
        return self.monitor.active_requests <= len(self.target.replicas) and self.target.alone(sequence_id)


@dataclass
class Stats:
    rounds: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    drafters: list[str] = field(default_factory=list)  # the drafters used, best first


@dataclass
class Chunk:
    text: str
    token_ids: list[int]
    finished: bool
    stats: Stats = field(default_factory=Stats)


def new_sequence_id() -> int:
    return uuid.uuid4().int >> 65  # 63 random bits: unique across the deployment's lifetime in practice


def speculation_plan(request: GenerationRequest, deployment: Deployment) -> tuple[str, int, tuple[str, ...]]:
    """(mode, draft tokens, drafters) for a request; errors name the offending input. Drafters that are down are
    left out (none left: the request decodes plainly)."""
    mode, k, drafters = _requested_plan(request, deployment)
    return mode, k, tuple(name for name in drafters if deployment.drafters[name].available)


def _requested_plan(request: GenerationRequest, deployment: Deployment) -> tuple[str, int, tuple[str, ...]]:
    mode = request.speculation_mode or deployment.default_mode
    if mode not in SPECULATION_MODES:
        raise InvalidRequest("speculation_mode", f"must be one of {', '.join(SPECULATION_MODES)}, got {mode!r}")
    default_k = deployment.adaptive_draft_tokens if mode == "cosine" else deployment.default_draft_tokens
    k = min(default_k, deployment.max_draft_tokens) if request.num_draft_tokens is None else request.num_draft_tokens
    if not 1 <= k <= deployment.max_draft_tokens:
        raise InvalidRequest("num_draft_tokens", f"must be in [1, {deployment.max_draft_tokens}], got {k}")
    unknown = [name for name in request.drafters if name not in deployment.drafters]
    if unknown:
        raise InvalidRequest("drafters", f"unknown drafter {unknown[0]!r}; this deployment has "
                                         f"{', '.join(deployment.drafters) or 'none'}")
    if mode == "autoregressive":
        return mode, 0, ()
    if not deployment.drafters:
        raise InvalidRequest("speculation_mode", f"{mode!r} needs drafters; this deployment has none")
    if mode == "vanilla":
        return mode, k, request.drafters[:1] or (deployment.general_drafter or next(iter(deployment.drafters)),)
    if mode == "cosine" and deployment.router is None:
        raise InvalidRequest("speculation_mode", "'cosine' needs the router model, which this deployment lacks")
    return mode, k, request.drafters or tuple(deployment.drafters)


def _proposer(plan, deployment: Deployment, sequence_id: int, request: GenerationRequest):
    mode, k, drafters = plan
    if not drafters:
        return None
    sessions = [DrafterSession(name, deployment.drafters[name], sequence_id, request) for name in drafters]
    if mode == "vanilla":
        return ChainProposer(sessions[0], k)
    if mode == "specinfer":
        return MergedChainsProposer(sessions, k)
    if mode == "cosine":
        return FusionProposer(sessions, deployment.router, deployment.monitor, k_max=k,
                              max_drafters=request.max_drafters or deployment.max_cooperating_drafters,
                              adaptive=request.adaptive_draft_length, pipelined=request.pipelined_drafting,
                              classify=request.classify_prompt)
    return None


async def _admit(deployment: Deployment, sequence_id: int, prompt_ids: list[int], request: GenerationRequest):
    """First step of a sequence; waits while the engine's KV cache is full (admission control), at most the
    deployment's queue timeout."""
    timeout_s = deployment.gate.limits.queue_timeout_s
    tokens = len(prompt_ids) + request.max_tokens
    started = time.monotonic()
    queued, delay = False, 0.01
    try:
        while True:
            try:
                result = await deployment.target.step(sequence_id, prompt_ids, request=request)
                deployment.on_admitted(time.monotonic() - started if queued else 0.0)
                return result
            except ServingError as error:
                if error.kind != ServingError.UNAVAILABLE:
                    raise
                waited = time.monotonic() - started
                if waited + delay > timeout_s:
                    raise ServingError(f"waited {waited:.1f} s for the target's KV cache (queue_timeout_s = "
                                       f"{timeout_s:g}); last refusal: {error}", ServingError.UNAVAILABLE) from None
            if not queued:
                deployment.gate.queue_tokens(tokens)
                queued = True
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)
    finally:
        if queued:
            deployment.gate.queue_tokens(-tokens)


async def _round(deployment: Deployment, mode: str, proposer, drafting_started: asyncio.Future | None,
                 sequence_id: int, context: list[int], budget: int, stats: Stats,
                 last_call_ended: float, sent: asyncio.Future) -> tuple[list[int], float]:
    """One round: draft (if speculating), wait for a verification slot, verify; returns the emitted tokens and when
    the target's call ended; the target resolves `sent` once that call has gone out. The monitor costs a round's
    call with the time since the request's previous call ended (the chunk sent, the loop's turn, and what the target
    computes ahead then), as plain decoding and speculation both pay it: counted for neither, plain decoding looked
    25-30% cheaper than it is, its calls finding much of their work done ahead (measured at c1: 1.88 ms a token
    fitted, 2.5-2.6 ms a token from call to call)."""
    between_calls = time.monotonic() - last_call_ended  # before the wait for the drafters' start: no round's cost
    if drafting_started is not None:
        await drafting_started
    rounds = await _target_rounds(deployment, proposer, sequence_id, context, budget)
    if rounds is not None and rounds.draft_tokens:
        return await _run_target_rounds(deployment, mode, proposer, sequence_id, context, rounds, stats, sent)
    draft = None
    if proposer is not None and rounds is None:  # else the controller chose plain decoding for this round
        draft = await proposer.propose(context, budget)
        stats.drafters = proposer.drafter_names  # a request may start drafting late (SpeculationWindows)
        if draft is not None:
            proposer.draft_ahead(draft, context, budget)
    tree = draft.tree if draft else None
    size = 1 + (len(tree) if tree else 0)
    expected_tokens = 1 + stats.accepted_tokens / max(1, stats.rounds - 1)  # this request's running mean
    monitor = deployment.monitor
    async with deployment.target.slot(sequence_id, size, expected_tokens / size):
        started = time.monotonic()
        # a round without a draft runs several steps per call (never past the request's budget), whether the
        # mode is plain or a speculative mode's controller chose plain decoding (or no drafter answered): a
        # speculative mode falling back to plain decoding must be as fast as plain decoding, per-call cost included
        extra = 0
        if not tree:
            steps = (deployment.plain_decode_steps_alone if deployment.alone_at_light_load(sequence_id)
                     else deployment.plain_decode_steps)
            extra = min(steps - 1, budget)
        emitted = (await deployment.target.step(sequence_id, context[-1:], draft=tree, extra_tokens=extra,
                                                draft_q=draft.q if draft else None, sent=sent)).tokens
        ended = time.monotonic()
        spent = between_calls + ended - started
        if extra:
            monitor.observe_plain(spent / (1 + extra))
        else:  # the verification cost model is of one pass holding every active request's tree
            monitor.observe_verify(monitor.active_requests, monitor.active_requests * size, spent)
    if proposer is not None:
        accepted = tree.accepted_path(emitted) if tree else []
        if draft is not None:
            stats.draft_tokens += len(tree)
            stats.accepted_tokens += len(accepted)
            proposer.observe(draft, accepted, emitted)
        deployment.on_round(RoundReport(mode, draft, accepted))
    return emitted, ended


async def _target_rounds(deployment: Deployment, proposer, sequence_id: int, context: list[int],
                         budget: int) -> Rounds | None:
    """Rounds for the target to run in its process (serving.rounds), where the deployment has them, the request is
    alone on its replica (under load rounds from many requests batch in one pass instead) and this round would draft
    a chain with one drafter the target holds; with draft_tokens 0 where the controller chose plain decoding
    for it. None: the proposer drafts this round here.
    Alone at any load, unlike plain decoding's long calls (Deployment.alone_at_light_load): at c3 on 2 replicas one
    request is alone most of the time, and its rounds here made fixed-k cosine 12-29% faster than with the load
    condition, at c4 -2% to +6% (docs/history.md, session 34)."""
    if not (deployment.target_rounds and deployment.round_drafters and proposer is not None
            and deployment.target.alone(sequence_id)):
        return None
    lone = await proposer.lone_drafter(context, budget, deployment.round_drafters)
    if lone is None:
        return None
    drafter, k = lone
    return Rounds(deployment.round_drafters.index(drafter), k, deployment.target_rounds)


async def _run_target_rounds(deployment: Deployment, mode: str, proposer, sequence_id: int, context: list[int],
                             rounds: Rounds, stats: Stats, sent: asyncio.Future) -> tuple[list[int], float]:
    """One call of target rounds, reported round by round as the rounds made here are."""
    async with deployment.target.slot(sequence_id, 1 + rounds.draft_tokens, 1.0):  # alone: nothing to rank
        result = await deployment.target.step(sequence_id, context[-1:], rounds=rounds, sent=sent)
    ended = time.monotonic()
    proposer.observe_rounds(result.rounds)
    stats.rounds += max(len(result.rounds) - 1, 0)  # generate counts the call as one
    drafter = deployment.round_drafters[rounds.drafter]
    for draft, accepted, _ in result.rounds:
        stats.draft_tokens += len(draft)
        stats.accepted_tokens += accepted
        deployment.on_round(RoundReport(mode, Draft(DraftTree.chain(draft), (drafter,) * len(draft),
                                                    origin=DraftOrigin.TARGET), list(range(accepted))))
    stats.drafters = proposer.drafter_names
    return result.tokens, ended


async def generate(request: GenerationRequest, deployment: Deployment) -> AsyncIterator[Chunk]:
    """Yields one Chunk per round (text may be empty); the last has finished=True. Closing it releases the KV
    caches of the target and of every drafter used.

    The next round (drafting + verification) runs while this round's tokens are detokenized; when a stop string ends
    the output, that round's tokens are dropped. A chunk is yielded once the next round's target call has gone out,
    so that its consumer's send (in Triton a round trip to the server, holding the GIL) does not delay that call
    (sent first, and with one scheduler for both target replicas, each replica idled 13 ms between calls of 42 at
    c32 on 2 cores). The first chunk (time to first token) does not wait, as its round first waits for the drafters'
    prefill and the router: held, time to first token at c1 rose from 20-21 to 27-30 ms for `cosine`."""
    plan = speculation_plan(request, deployment)
    prompt_ids = deployment.tokenizer.encode(request.prompt)
    if len(prompt_ids) + request.max_tokens > deployment.max_context:
        raise InvalidRequest("max_tokens", f"the prompt is {len(prompt_ids)} tokens; with max_tokens "
                                           f"{request.max_tokens} it exceeds the model's context of "
                                           f"{deployment.max_context} tokens")
    end_id = deployment.end_id if request.end_id is None else request.end_id
    request = dataclasses.replace(request, end_id=end_id)  # engines enforce min_length against it
    stops = StopStrings(request.stop_words)
    offsets = DetokenizerOffsets()
    generated: list[int] = []
    text, shown = "", 0
    prefix = "" if request.exclude_input_in_output else request.prompt
    stats = Stats()
    sequence_id = new_sequence_id()
    proposer = _proposer(plan, deployment, sequence_id, request)
    windows = proposer.speculation_windows if proposer is not None else None
    deployment.monitor.request_started(windows)
    next_round = drafting_started = None
    try:
        emitted = (await _admit(deployment, sequence_id, prompt_ids, request)).tokens
        call_ended = time.monotonic()
        # the drafters prefill and the router chooses once the target has prefilled, while the first token is
        # streamed: started alongside the target's prefill, they took processor time from it (on 2 cores, TTFT at c1
        # 77 ms against 45 for plain decoding), and the first round waited for that prefill anyway
        drafting_started = asyncio.ensure_future(proposer.start(prompt_ids)) if proposer else None
        while True:
            stats.rounds += 1
            new_ids, finished = [], False
            for token in emitted:
                if token == end_id:
                    finished = True
                    break
                new_ids.append(token)
                if len(generated) + len(new_ids) == request.max_tokens:
                    finished = True
                    break
            generated += new_ids
            deployment.monitor.observe_tokens(len(new_ids))
            if not finished:
                sent = asyncio.get_running_loop().create_future()
                next_round = asyncio.ensure_future(_round(deployment, plan[0], proposer, drafting_started,
                                                          sequence_id, prompt_ids + generated,
                                                          request.max_tokens - len(generated) - 1, stats,
                                                          call_ended, sent))
                # a round that ends without a call (it failed) ends the wait for it
                next_round.add_done_callback(lambda _, sent=sent: sent.done() or sent.set_result(None))
            window, read_offset = offsets.window(generated)
            delta, advanced = decode_increment(deployment.tokenizer, window, read_offset, finished)
            if advanced:
                offsets.advance(len(generated))
            text += delta
            releasable, stopped = stops.releasable(text, finished)
            finished = finished or stopped
            if finished:  # its replica's next pass need not wait for it while the last chunk goes out
                deployment.target.finished(sequence_id)
            if not finished and stats.rounds > 1:  # the first chunk does not wait (see above)
                await sent
            yield Chunk(prefix + text[shown:releasable], new_ids, finished, stats)
            prefix, shown = "", releasable
            if finished:
                return
            (emitted, call_ended), next_round = await next_round, None
    finally:
        if next_round is not None:  # a stop string or a failure ended the request mid-round
            await asyncio.gather(next_round, return_exceptions=True)
        if drafting_started is not None:  # the drafters' caches are released once their prefill is done
            await asyncio.gather(drafting_started, return_exceptions=True)
        deployment.monitor.request_finished(windows)
        try:
            await deployment.target.release(sequence_id)
        except ServingError as error:  # a dead engine holds nothing; a live one reclaims it after its idle timeout
            log.warning("target: release failed: %s", error)
        if proposer is not None:
            await proposer.close()
