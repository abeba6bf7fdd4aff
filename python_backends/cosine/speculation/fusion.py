"""Building token trees from several drafters.

Confidence fusion (CoSine): at each drafting step every cooperating drafter proposes its top candidates with their
probabilities for the next position; the most confident token extends the draft and is fed to all drafters; the
other candidates become sibling leaves at that depth. SpecInfer merging: independent chains merged as a trie."""
from __future__ import annotations

from dataclasses import dataclass

from .tree import DraftTree


@dataclass(frozen=True)
class Candidate:
    token: int
    prob: float
    drafter: str


@dataclass
class TreeBuilder:
    """Accumulates a fused tree: a main chain of winners with runner-up siblings hanging off it.

    A runner-up becomes a sibling only if worth its verifier token: its chance of being the target's token, the
    chance of reaching its depth (the winners' confidences so far) times its own confidence, must reach
    `min_sibling_value` (the price of a verifier token, from the cost model); a zero-confidence token never does."""
    max_siblings: int = 2  # runner-ups kept per depth
    min_sibling_value: float = 0.0
    tokens: list = None
    parents: list = None
    sources: list = None
    tip: int = -1  # the last winner's node (-1: the root)
    reach: float = 1.0  # the chance that verification reaches the next depth

    def __post_init__(self):
        self.tokens, self.parents, self.sources = [], [], []

    def add_step(self, candidates: list[Candidate], winner: Candidate | None = None) -> Candidate:
        """Adds one depth from all drafters' candidates; returns the winner (to feed every drafter): the most
        confident candidate, unless the caller already fixed it (a lone drafter's own sampled continuation)."""
        best: dict[int, Candidate] = {}
        for candidate in candidates:  # a token proposed by several drafters keeps its highest confidence
            if candidate.token not in best or candidate.prob > best[candidate.token].prob:
                best[candidate.token] = candidate
        ranked = sorted(best.values(), key=lambda c: (-c.prob, c.token))
        winner = winner or ranked[0]
        runner_ups = [c for c in ranked if c.token != winner.token and c.prob > 0
                      and self.reach * c.prob >= self.min_sibling_value][:self.max_siblings]
        self.reach *= best[winner.token].prob if winner.token in best else winner.prob
        parent = self.tip
        for candidate in [winner, *runner_ups]:
            self.tokens.append(candidate.token)
            self.parents.append(parent)
            self.sources.append(candidate.drafter)
        self.tip = len(self.tokens) - 1 - len(runner_ups)
        return winner

    def tree(self) -> DraftTree:
        return DraftTree(tuple(self.tokens), tuple(self.parents))


def merge_chains(chains: dict[str, list[int]]) -> tuple[DraftTree, tuple[str, ...]]:
    """SpecInfer-style: several drafters' chains merged into one trie (shared prefixes verified once).

    Returns the tree and, per node, the first drafter that proposed it."""
    tokens, parents, sources = [], [], []
    index: dict[tuple[int, int], int] = {}  # (parent node, token) -> node
    for drafter, chain in chains.items():
        parent = -1
        for token in chain:
            key = (parent, token)
            if key not in index:
                index[key] = len(tokens)
                tokens.append(token)
                parents.append(parent)
                sources.append(drafter)
            parent = index[key]
    return DraftTree(tuple(tokens), tuple(parents)), tuple(sources)
