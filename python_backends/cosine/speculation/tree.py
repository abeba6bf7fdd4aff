"""Token trees: a draft is a list of nodes in topological order, each with a token and a parent index.

Parent -1 means the node grows from the root, the last committed token. A chain is parents [-1, 0, 1, ...]."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DraftTree:
    tokens: tuple[int, ...] = ()
    parents: tuple[int, ...] = ()

    @staticmethod
    def chain(tokens) -> "DraftTree":
        tokens = tuple(int(t) for t in tokens)
        return DraftTree(tokens, tuple(range(-1, len(tokens) - 1)))

    def __len__(self) -> int:
        return len(self.tokens)

    def validate(self) -> None:
        """Raises ValueError naming draft_ids / draft_parents."""
        if len(self.tokens) != len(self.parents):
            raise ValueError(f"draft_parents has {len(self.parents)} entries but draft_ids has {len(self.tokens)}")
        seen = set()
        for node, parent in enumerate(self.parents):
            if not -1 <= parent < node:
                raise ValueError(f"draft_parents[{node}] = {parent}: a parent must be -1 or an earlier node")
            if (parent, self.tokens[node]) in seen:
                raise ValueError(f"draft_ids[{node}] repeats a sibling's token {self.tokens[node]}")
            seen.add((parent, self.tokens[node]))

    def accepted_path(self, emitted: list[int]) -> list[int]:
        """The nodes a verification accepted, given the tokens it emitted (siblings have distinct tokens)."""
        path, node = [], -1
        for token in emitted:
            match = [child for child in self.children(node) if self.tokens[child] == token]
            if not match:
                break
            node = match[0]
            path.append(node)
        return path

    def main_chain(self) -> list[int]:
        """Tokens along each node's first child from the root: a fused draft's winners (TreeBuilder adds a depth's
        winner before its runner-ups), a chain's tokens."""
        chain, node = [], -1
        while children := self.children(node):
            node = children[0]
            chain.append(self.tokens[node])
        return chain

    def children(self, node: int) -> list[int]:
        return [child for child, parent in enumerate(self.parents) if parent == node]

    def depths(self) -> list[int]:
        depths = []
        for parent in self.parents:
            depths.append(1 if parent < 0 else depths[parent] + 1)
        return depths

    def ancestor_mask(self) -> torch.Tensor:
        """[n, n] bool: node i may attend to node j iff j is i or an ancestor of i."""
        n = len(self.tokens)
        mask = torch.eye(n, dtype=torch.bool)
        for node, parent in enumerate(self.parents):
            if parent >= 0:
                mask[node] |= mask[parent]
        return mask
