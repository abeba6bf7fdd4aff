"""Proposers: who drafts the token tree for a request's next round.

A proposer works against drafter engines through a small async interface (BLS in Triton, direct in tests) and never
sees target logits; it learns only which of its nodes were accepted."""
from __future__ import annotations

import asyncio
import dataclasses
import enum
import itertools
import logging
import time
import zlib
from dataclasses import dataclass
from typing import Protocol

from ..engine.engine import RoundOutcome
from ..engine.sampling import SamplingParams, SparseDistributions
from .control import AcceptanceTracker, LoadMonitor, SpeculationController, expected_tokens
from .fusion import Candidate, TreeBuilder, merge_chains
from .router import Route
from .tree import DraftTree

log = logging.getLogger(__name__)


class DrafterEngine(Protocol):
    async def step(self, sequence_id: int, input_ids: list[int], draft=None, *, request=None,
                   keep_length: int | None = None, extra_tokens: int = 0, candidates: int = 0,
                   score_input: bool = False, draft_q=None, return_q: bool = False, sent=None):
        """Returns an engine StepResult (tokens, probs, top_ids, top_probs, input_logprob, q); resolves the future
        `sent`, if any, once the call carrying the step has gone out."""

    async def release(self, sequence_id: int) -> None: ...

    @property
    def available(self) -> bool:
        """False while the engine is down: new requests leave it out."""


class RouterClient(Protocol):
    async def classify(self, prompt_ids: list[int], drafters: list[str], max_drafters: int) -> Route | None:
        """A route among the candidate drafters from the prompt's tokens alone, or None: they must score it."""

    async def route(self, prompt_logprobs: dict[str, float], max_drafters: int, prompt_ids: list[int]) -> Route:
        """prompt_logprobs: the request's candidate drafters (by name, any subset and order); prompt_ids: what they
        scored."""

    async def feedback(self, context: str, matches: dict[str, float], trials: dict[str, float]) -> None:
        """Per drafter name: how often its top token was the target's, at how many verified positions."""


class DraftOrigin(str, enum.Enum):
    """How a round's draft was made (the `origin` label of cosine_drafts_total)."""
    ALONE = "alone"  # one drafter's call in this round
    AHEAD = "ahead"  # one drafter's call made while the previous round verified (pipelined drafting)
    FUSED = "fused"  # several drafters' chains, fused step by step by confidence
    MERGED = "merged"  # several drafters' chains, each drafted alone, merged into a tree (specinfer)
    TARGET = "target"  # one drafter's chain, drafted by the target's copy of it in the target's rounds


@dataclass(frozen=True)
class Draft:
    tree: DraftTree
    sources: tuple[str, ...]  # per node: the drafter that proposed it
    # one row per node: the distribution it was sampled from; None: the nodes are deterministic functions of the
    # context (greedy drafting, argmax fusion, merged chains), which acceptance treats as q one-hot
    q: SparseDistributions | None = None
    origin: DraftOrigin = DraftOrigin.ALONE
    # a draft made ahead for this round assumed a context that did not happen (a pipelining miss) and was dropped
    dropped_ahead: bool = False


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def kept_prefix(cached: list[int], context: list[int]) -> int:
    """How many of a drafter's cached tokens a step drafting after `context` keeps: those it shares with the context,
    but never the context's last token, which is always fed (its logits are what the next token comes from)."""
    return min(common_prefix_length(cached, context), len(context) - 1)


def drafter_params(params: SamplingParams, label: str) -> SamplingParams:
    """A request's sampling parameters as one of its drafters, named by `label`, samples with them: same shape, its
    own random stream. Sharing a stream with the target would correlate the draft with the target's acceptance draws,
    and with another drafter of the request replay draws the output already depends on: both bias it."""
    if params.seed is None:
        return params
    return dataclasses.replace(params, seed=(params.seed * 1_000_003 + zlib.crc32(label.encode())) % 2**63)


def drafter_request(request, drafter_name: str):
    """The request as a drafter sees it (drafter_params)."""
    return dataclasses.replace(request, params=drafter_params(request.params, drafter_name))


class DrafterSession:
    """One drafter's side of one request: admission on first use, then rollback to what the target verified."""

    def __init__(self, name: str, engine: DrafterEngine, sequence_id: int, request):
        self.name, self.engine, self.sequence_id = name, engine, sequence_id
        self.request = drafter_request(request, name)
        self.cached: list[int] | None = None  # tokens whose K/V the drafter holds; None before admission
        self.failed = False
        self.samples = not request.params.greedy  # its tokens are draws from q: the engine returns q with them

    def joins_late(self, remaining: int) -> None:
        """The drafter first sees the request when it has `remaining` tokens left to generate (a late start): what
        the drafter reserves KV cache for, and its end-token ban counted from there."""
        generated = self.request.max_tokens - remaining
        self.request = dataclasses.replace(self.request, max_tokens=remaining,
                                           min_length=max(self.request.min_length - generated, 0))

    async def draft(self, context: list[int], count: int, candidates: int = 0, score_input: bool = False):
        """The drafter's next `count` tokens after `context` (a StepResult)."""
        if self.cached is None:
            keep, request = None, self.request
            new = context
        else:
            keep, request = kept_prefix(self.cached, context), None
            new = context[keep:]
        result = await self.engine.step(self.sequence_id, new, request=request, keep_length=keep,
                                        extra_tokens=count - 1, candidates=candidates, score_input=score_input,
                                        return_q=self.samples)
        # the engine computed K/V for everything it was fed: the context and all drafted tokens but the last
        self.cached = list(context) + result.tokens[:-1]
        return result

    async def try_draft(self, *args, **kwargs):
        """draft(), or None once this drafter has failed: a failing drafter costs speed, never the request."""
        if self.failed:
            return None
        try:
            return await self.draft(*args, **kwargs)
        except Exception as error:
            log.warning("drafter %s failed; going on without it: %s", self.name, error)
            self.failed = True
            return None

    async def close(self) -> None:
        if self.cached is not None:
            self.cached = None
            try:
                await self.engine.release(self.sequence_id)
            except Exception as error:  # the engine reclaims idle sequences anyway
                log.warning("drafter %s: release failed: %s", self.name, error)


class Proposer:
    """Base: no start-up work, no learning, releases its drafters at the end."""

    sessions: list[DrafterSession] = []
    adaptive = False  # drafts only while the deployment's SpeculationWindows allow it

    @property
    def speculation_windows(self) -> tuple[str, ...] | None:
        """Whose speculation windows the request follows: its candidate drafters (sorted names), None if none."""
        return None

    @property
    def drafter_names(self) -> list[str]:
        return [session.name for session in self.sessions if not session.failed]

    async def start(self, prompt_ids: list[int]) -> None:
        pass

    def observe(self, draft: Draft, accepted: list[int], emitted: list[int]) -> None:
        pass

    def draft_ahead(self, draft: Draft, context: list[int], budget: int) -> None:
        """Called while the target verifies this round's draft (see FusionProposer)."""

    async def lone_drafter(self, context: list[int], budget: int, among: tuple[str, ...]) -> tuple[str, int] | None:
        """(the drafter, k) when this round would draft a chain with one drafter alone, one of `among`, for
        the target to run such rounds itself (serving.rounds), k 0 where the round decodes plainly instead; None:
        propose() decides this round."""
        return None

    def observe_rounds(self, rounds: list[RoundOutcome]) -> None:
        """What the target's rounds drafted and accepted (after lone_drafter)."""

    async def close(self) -> None:
        await asyncio.gather(*(session.close() for session in self.sessions))


class ChainProposer(Proposer):
    """vanilla: one drafter, a chain of fixed length k."""

    def __init__(self, session: DrafterSession, k: int):
        self.sessions, self.k = [session], k

    async def lone_drafter(self, context: list[int], budget: int, among: tuple[str, ...]) -> tuple[str, int] | None:
        session = self.sessions[0]
        if session.failed or session.name not in among:
            return None
        return session.name, max(min(self.k, budget), 0)

    async def propose(self, context: list[int], budget: int) -> Draft | None:
        k = min(self.k, budget)
        result = await self.sessions[0].try_draft(context, k) if k > 0 else None
        return result and Draft(DraftTree.chain(result.tokens), (self.sessions[0].name,) * k, result.q)


class MergedChainsProposer(Proposer):
    """specinfer: every drafter drafts a chain of fixed length k on its own; the chains merge into one tree."""

    def __init__(self, sessions: list[DrafterSession], k: int):
        self.sessions, self.k = sessions, k

    async def propose(self, context: list[int], budget: int) -> Draft | None:
        k = min(self.k, budget)
        if k <= 0:
            return None
        results = await asyncio.gather(*(session.try_draft(context, k) for session in self.sessions))
        chains = {s.name: r.tokens for s, r in zip(self.sessions, results) if r is not None}
        if not chains:
            return None
        tree, sources = merge_chains(chains)
        return Draft(tree, sources, origin=DraftOrigin.MERGED)


class FusionProposer(Proposer):
    """cosine: routed drafters fused step by step by confidence, draft length set by the controller."""

    def __init__(self, sessions: list[DrafterSession], router: RouterClient, monitor: LoadMonitor, k_max: int,
                 max_drafters: int = 2, busy_load: int = 2, max_siblings: int = 1, exploring_rounds: int = 2,
                 adaptive: bool = True, pipelined: bool = True, classify: bool = True):
        """classify: the router may route from the prompt's tokens (false: every drafter scores it, the ablation)."""
        self.all_sessions, self.sessions = sessions, []
        self.router, self.monitor = router, monitor
        self.controller = SpeculationController(k_max, adaptive)
        self.max_drafters, self.max_siblings = max_drafters, max_siblings
        # Above this many active requests the deployment is busy. A cooperating drafter's call takes processor time
        # from the target that every request's verification waits for; sibling
        # branches add verifier tokens, nearly free while a verification pass is latency-bound, not once it is
        # compute-bound. So when busy: one drafter, chains.
        self.busy_load = busy_load
        # A cooperating explorer drafts the request's first rounds beside the first choice: enough for the router
        # to compare them on the same positions; a second drafter costs processor time, so not for longer.
        self.exploring_rounds = exploring_rounds
        self.fused_rounds = 0
        self.started = False  # the drafters scored the context and the router chose
        self.route: Route | None = None
        self.top_tokens: list[dict[str, int]] = []  # per depth of the last draft: drafter -> its top token
        self.pipelined, self.classify = pipelined, classify
        # pipelined drafting: (the context it assumed, the drafting call) of a draft made while the target verified
        self.ahead: tuple[list[int], asyncio.Task] | None = None
        self.releasing: asyncio.Future | None = None  # the drafters not chosen, releasing their caches
        self.matches = {session.name: 0.0 for session in sessions}
        self.trials = {session.name: 0.0 for session in sessions}

    @property
    def adaptive(self) -> bool:
        return self.controller.adaptive

    @property
    def speculation_windows(self) -> tuple[str, ...] | None:
        return tuple(sorted(session.name for session in self.all_sessions)) if self.adaptive else None

    async def start(self, prompt_ids: list[int]) -> None:
        """Called once the target has admitted the request (its prompt prefilled), so that the drafters prefill
        while its first token is streamed. Under load (more than busy_load requests active) it leaves that to the
        request's first round that may speculate: there the drafters' prefill takes processor time from the target
        rather than overlapping it, and a request arriving in an exploring window would prefill every drafter and
        then decode plainly to its end if the windows forbid speculation before its first round."""
        if self.adaptive and (not self.monitor.speculation_allowed(self.speculation_windows) or self._busy()):
            return
        await self._start(prompt_ids)

    async def _start(self, context: list[int], remaining: int | None = None) -> None:
        """The router picks who cooperates: from the context's tokens alone once its classifier is trusted (the
        chosen drafters prefill in their first round), else after every drafter prefilled the context (the prompt,
        or on a late start what the request has so far, with `remaining` tokens left to generate) and scored it;
        then the rest are freed."""
        self.started = True
        if remaining is not None:
            for session in self.all_sessions:
                session.joins_late(remaining)
        max_drafters = 1 if self._busy() else self.max_drafters
        if self.classify:
            try:
                self.route = await self.router.classify(context, [s.name for s in self.all_sessions], max_drafters)
            except Exception as error:
                log.warning("router failed to classify the prompt; the drafters score it: %s", error)
        if self.route is not None:
            self._choose(self.route.ranking[:self.route.cooperate])
            return
        results = await asyncio.gather(*(s.try_draft(context, 1, score_input=True) for s in self.all_sessions))
        logprobs = {s.name: r.input_logprob for s, r in zip(self.all_sessions, results) if r is not None}
        if not logprobs:
            return
        try:
            self.route = await self.router.route(logprobs, max_drafters, context)
            chosen = self.route.ranking[:self.route.cooperate]
        except Exception as error:
            log.warning("router failed; using the most likely drafter: %s", error)
            chosen = [max(logprobs, key=logprobs.get)]
        self._choose(chosen)
        # the others free their caches in the background: the first round need not wait for their answers (5 ms)
        self.releasing = asyncio.ensure_future(asyncio.gather(*(s.close() for s in self.all_sessions
                                                                if s.name not in chosen)))

    def _choose(self, chosen: list[str]) -> None:
        if self.route is not None:
            self.controller.acceptance = AcceptanceTracker.starting_at(self.route.acceptance)
        self.sessions = [s for s in self.all_sessions if s.name in chosen]
        self.sessions.sort(key=lambda s: chosen.index(s.name))

    def _busy(self) -> bool:
        return self.monitor.active_requests > self.busy_load

    def _siblings(self) -> int:
        """Runner-ups per depth the next draft may hang. Sampled drafts are chains: a runner-up is picked knowing the
        sampled winner, so it would not be an independent draw from any q, and lossless multi-draft acceptance needs
        independent draws."""
        return 0 if self._busy() or self.all_sessions[0].samples else self.max_siblings

    async def _may_draft(self, context: list[int], budget: int) -> bool:
        """Whether this round may draft (the windows allow it), the router having chosen by then."""
        if self.adaptive and not self.monitor.speculation_allowed(self.speculation_windows):
            return False
        if not self.started:  # the context so far: the request starts drafting late
            await self._start(context, remaining=budget + 1)  # budget: tokens left besides this round's own
        return True

    async def propose(self, context: list[int], budget: int) -> Draft | None:
        self.top_tokens = []
        if not await self._may_draft(context, budget):
            return None
        samples = self.all_sessions[0].samples
        siblings = self._siblings()
        load = self.monitor.active_requests
        if len(self.sessions) > 1 and (self.fused_rounds >= self.exploring_rounds
                                       or not self._fused_drafting_pays(load)):
            explorers, self.sessions = self.sessions[1:], self.sessions[:1]
            await asyncio.gather(*(session.close() for session in explorers))
        drafted_ahead, dropped_ahead = await self._drafted_ahead(context)  # first: a session takes one call at a time
        active = [s for s in self.sessions if not s.failed]
        costs = self.monitor.costs(fused=len(active) > 1)
        k = min(self.controller.draft_length(costs, load), budget)
        if k <= 0 or not active:
            return None
        started = time.monotonic()
        builder = TreeBuilder(siblings, min_sibling_value=self._sibling_price(costs, load, k))
        q_rows = []
        if drafted_ahead is not None and len(active) == 1:
            origin = DraftOrigin.AHEAD
            self._fuse([(active[0], drafted_ahead)], 1, k, builder, q_rows)  # position 0 was the assumed token
        else:
            origin = DraftOrigin.FUSED if len(active) > 1 else DraftOrigin.ALONE
            self.fused_rounds += origin == DraftOrigin.FUSED
            chains = await asyncio.gather(*(s.try_draft(context, k, candidates=1 + builder.max_siblings)
                                             for s in active))
            self._fuse(list(zip(active, chains)), 0, k, builder, q_rows)
            self.monitor.observe_draft(len(self.top_tokens), time.monotonic() - started, fused=len(active) > 1)
        if not builder.tokens:
            return None
        # every node a draw from its q, or the draft counts as deterministic (exact either way, see acceptance)
        q = SparseDistributions.cat(q_rows) if samples and sum(map(len, q_rows)) == len(builder.tokens) else None
        return Draft(builder.tree(), tuple(builder.sources), q, origin, dropped_ahead)

    async def lone_drafter(self, context: list[int], budget: int, among: tuple[str, ...]) -> tuple[str, int] | None:
        """As propose decides a round that drafts alone: the windows allow speculation, the router chose, the
        exploring rounds are over (an explorer drafts beside the first choice here). A draft made ahead here is
        dropped: the target drafts the next rounds itself."""
        if not await self._may_draft(context, budget):
            return None
        active = [session for session in self.sessions if not session.failed]
        if len(active) != 1 or active[0].name not in among:
            return None
        await self._drafted_ahead(context)
        return active[0].name, max(min(self.controller.draft_length(self.monitor.costs(),
                                                                    self.monitor.active_requests), budget), 0)

    def observe_rounds(self, rounds: list[RoundOutcome]) -> None:
        """Each round as observe() takes one: the controller's acceptance, and for the router the drafter's top
        token against what the target emitted, at every position the target settled."""
        drafter = self.sessions[0].name
        for outcome in rounds:
            self.controller.observe(len(outcome.draft), outcome.accepted)
            self.monitor.observe_acceptance(len(outcome.draft), outcome.accepted)
            self.trials[drafter] += outcome.settled
            self.matches[drafter] += outcome.matched

    def _fused_drafting_pays(self, load: float) -> bool:
        """Whether drafting fused (every cooperating drafter at once, sharing the processors) is measured to pay at
        all. Where it does not, exploring would only mean plain decoding until the next probe: the first choice drafts
        alone instead (before fused drafting was measured, as lone drafting does)."""
        costs = self.monitor.costs(fused=True)
        return costs is None or costs.best_draft_length(self.controller.acceptance.rate, load,
                                                        self.controller.k_max) > 0

    def _sibling_price(self, costs, load: float, k: int) -> float:
        """The probability of being accepted a sibling needs to pay for its verifier token: one more token in
        every pass of this load costs verify_per_token * load seconds; an accepted sibling saves a token's worth
        of round time. Nothing measured yet: any sibling with a chance."""
        if costs is None:
            return 0.0
        rate = self.controller.acceptance.rate
        seconds_per_token = costs.round_time(k, load) / expected_tokens(rate, k)
        return costs.verify_per_token * load / seconds_per_token

    def _fuse(self, chains: list[tuple[DrafterSession, object]], first: int, k: int, builder: TreeBuilder,
              q_rows: list) -> None:
        """Drafters' chains fused step by step by confidence into the tree, positions first to first + k of each
        drafter's call (a StepResult; None: it failed). At each depth the drafters whose own chain is the fused draft
        so far propose: the most confident leads and its token extends the draft (greedy: its top token; sampling:
        its own draw, so a draw from that drafter's q: which drafter leads depends on this depth's context and on
        earlier depths' draws, never on this depth's); the others' candidates may hang as siblings. A drafter whose
        token lost stops proposing: its later tokens followed its own. (Exchanging the winner after every position
        instead costs a call to every drafter per drafted position.)"""
        followers = [(session, result) for session, result in chains if result is not None]
        leaders = []  # per depth, the result whose token it took
        for depth in range(first, first + k):
            followers = [(session, result) for session, result in followers if depth < len(result.tokens)]
            if not followers:
                break
            candidates = [Candidate(token, prob, session.name) for session, result in followers
                          for token, prob in zip(result.top_ids[depth], result.top_probs[depth])]
            self.top_tokens.append({session.name: result.top_ids[depth][0] for session, result in followers})
            leader, drawn = max(followers, key=lambda follower: follower[1].top_probs[depth][0])
            token = drawn.tokens[depth]
            builder.add_step(candidates, winner=next(
                (c for c in candidates if c.token == token and c.drafter == leader.name),
                Candidate(token, drawn.probs[depth], leader.name)))
            leaders.append(drawn)
            followers = [(session, result) for session, result in followers if result.tokens[depth] == token]
        depth = first
        for _, run in itertools.groupby(leaders, key=id):  # q rows: a slice per run of one drafter's positions
            drawn, *rest = run
            if drawn.q is not None:
                q_rows.append(drawn.q[depth:depth + 1 + len(rest)])
            depth += 1 + len(rest)

    def draft_ahead(self, draft: Draft, context: list[int], budget: int) -> None:
        """Pipelined drafting, called while the target verifies `draft`: the lone drafter drafts the next
        round as if the target accepts the draft's whole main chain and then emits the drafter's own next token
        (position 0 of this call); the next round uses it only if that is what happened. Only while the
        deployment is not busy: the drafter then runs on a core the verifier leaves idle, and a wasted draft costs
        nobody. Exact either way: a draft only ever proposes (under sampling, its tokens are draws from q given the
        context that did happen, and its draws are independent of the target's)."""
        active = [session for session in self.sessions if not session.failed]
        chain = draft.tree.main_chain()
        budget -= len(chain) + 1  # what is left after a fully accepted round
        if not (self.pipelined and len(active) == 1 and budget > 0 and not self._busy()):
            return
        assumed = context + chain
        task = asyncio.ensure_future(active[0].try_draft(assumed, 1 + min(len(chain), budget),
                                                         candidates=1 + self._siblings()))
        self.ahead = (assumed, task)

    async def _drafted_ahead(self, context: list[int]) -> tuple[object | None, bool]:
        """(the pipelined draft, a drafter call's result with position 0 the assumed token, if it assumed this
        context; whether one was made and dropped because it assumed another)."""
        if self.ahead is None:
            return None, False
        (assumed, task), self.ahead = self.ahead, None
        result = await task
        if result is None or context != assumed + result.tokens[:1]:
            return None, result is not None
        return result, False

    def observe(self, draft: Draft, accepted: list[int], emitted: list[int]) -> None:
        self.controller.observe(len(self.top_tokens), len(accepted))
        self.monitor.observe_acceptance(len(self.top_tokens), len(accepted))
        # each drafter's top token at every position the target settled, for the router
        for depth, tops in enumerate(self.top_tokens[:len(emitted)]):
            for drafter, token in tops.items():
                self.trials[drafter] += 1
                self.matches[drafter] += token == emitted[depth]

    async def close(self) -> None:
        if self.ahead is not None:  # its call must end before the sessions release their caches
            await asyncio.gather(self.ahead[1], return_exceptions=True)
        if self.releasing is not None:
            await self.releasing
        tried = [name for name, trials in self.trials.items() if trials]
        if self.route is not None and tried:
            try:
                await self.router.feedback(self.route.context, {n: self.matches[n] for n in tried},
                                           {n: self.trials[n] for n in tried})
            except Exception as error:
                log.warning("router feedback failed: %s", error)
        await asyncio.gather(*(session.close() for session in self.all_sessions))
