"""Which drafted tokens the target keeps: one rule for greedy and sampling, for chains and trees."""
from __future__ import annotations

import torch

from .tree import DraftTree


def accept(target_probs: torch.Tensor, tree: DraftTree, generator: torch.Generator) -> tuple[list[int], list[int]]:
    """Returns (emitted tokens, accepted node indices); emitted = accepted tokens + one token of the target's own.

    target_probs[0] is the target's distribution after the root, target_probs[1 + j] after draft node j.
    Acceptance rule (recursive rejection sampling, drafts taken as deterministic: q = one-hot):
      at a node with target distribution p, try its children in order: accept child x with probability p(x);
      on rejection remove x from p and renormalise; if every child is rejected, sample the token from what is left.
    The emitted tokens are distributed exactly as the target's own; greedy (one-hot p) accepts x iff x is argmax.
    """
    node, tokens, path = -1, [], []
    while True:
        p = target_probs[node + 1].double().clone()
        for child in tree.children(node):
            x = tree.tokens[child]
            if torch.rand((), generator=generator, dtype=torch.float64) < p[x] / p.sum():
                tokens.append(x)
                path.append(child)
                node = child
                break
            p[x] = 0.0
        else:
            tokens.append(int(torch.multinomial(p / p.sum(), 1, generator=generator)))
            return tokens, path
