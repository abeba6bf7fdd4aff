"""Proposers: who drafts the token tree for a request's next round.

A proposer works against drafter engines through a small async interface (BLS in Triton, direct in tests) and never
sees target logits; it learns only which of its nodes were accepted."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

from .tree import DraftTree

log = logging.getLogger(__name__)


class DrafterEngine(Protocol):
    async def step(self, sequence_id: int, input_ids: list[int], *, request=None, keep_length: int | None = None,
                   extra_tokens: int = 0, candidates: int = 0):
        """Returns an engine StepResult (tokens, probs, top_ids, top_probs)."""

    async def release(self, sequence_id: int) -> None: ...


@dataclass(frozen=True)
class Draft:
    tree: DraftTree
    sources: tuple[str, ...]  # per node: the drafter that proposed it


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class DrafterSession:
    """One drafter's side of one request: admission on first use, then rollback to what the target verified."""

    def __init__(self, name: str, engine: DrafterEngine, sequence_id: int, request):
        self.name, self.engine, self.sequence_id, self.request = name, engine, sequence_id, request
        self.cached: list[int] | None = None  # tokens whose K/V the drafter holds; None before admission
        self.failed = False

    async def draft(self, context: list[int], count: int, candidates: int = 0):
        """The drafter's next `count` tokens after `context` (a StepResult)."""
        if self.cached is None:
            keep, request = None, self.request
            new = context
        else:
            keep, request = common_prefix_length(self.cached, context), None
            new = context[keep:]
        result = await self.engine.step(self.sequence_id, new, request=request, keep_length=keep,
                                        extra_tokens=count - 1, candidates=candidates)
        # the engine computed K/V for everything it was fed: the context and all drafted tokens but the last
        self.cached = list(context) + result.tokens[:-1]
        return result

    async def close(self) -> None:
        if self.cached is not None:
            await self.engine.release(self.sequence_id)


class ChainProposer:
    """Vanilla speculative decoding: one drafter, a chain of fixed length k."""

    def __init__(self, session: DrafterSession, k: int):
        self.session, self.k = session, k

    async def propose(self, context: list[int], budget: int) -> Draft | None:
        k = min(self.k, budget)
        if k <= 0 or self.session.failed:
            return None
        try:
            result = await self.session.draft(context, k)
        except Exception as error:  # a failing drafter costs speed, never the request
            log.warning("drafter %s failed, decoding without it: %s", self.session.name, error)
            self.session.failed = True
            return None
        return Draft(DraftTree.chain(result.tokens), (self.session.name,) * k)

    def observe(self, draft: Draft, accepted: list[int]) -> None:
        pass

    async def close(self) -> None:
        await self.session.close()
