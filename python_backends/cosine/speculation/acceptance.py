"""Which drafted tokens the target keeps, over a whole batch: greedy and sampling, chains and trees.

Terms (defined once). A *row* is a position whose next-token distribution the target computed: each sequence's root
(its last input token) and every draft node. Draft trees of all sequences are flattened into *nodes*; a node's
*parent row* holds the distribution p its token is checked against, its own row the distribution after it. A node's
*q* is the distribution its token was drawn from; a node without q is taken as deterministic (q one-hot at it).

Rule for trees, and for greedy rows (multi-draft speculative sampling: SpecInfer, Miao et al. 2024, Alg. 2; for one
child it is Leviathan et al. 2023 / Chen et al. 2023):
  at a row with target distribution p, try its children in sibling order: accept child x with probability
  min(1, p(x) / q(x)); on rejection p := normalise(max(p - q, 0)) (with q one-hot: p(x) := 0). The walk moves to
  an accepted child's row; at the first row where every child was rejected (or that has none) it emits a token
  sampled from what is left of p, then stops.
Why it is exact: for a child x ~ q drawn independently of the target's uniforms, P(emit y) = min(q(y), p(y)) +
  (1 - sum_z min(q(z), p(z))) * max(p(y) - q(y), 0) / sum_z max(p(z) - q(z), 0) = p(y); the residual is the target
  distribution conditioned on that rejection, so the argument repeats for the next sibling and, along an accepted
  token, for the next row. A deterministic child (q one-hot) is the same rule with q(x) = 1, and is exact for any
  token chosen independently of those uniforms. Greedy rows (p one-hot at the argmax) accept the child equal to the
  argmax and emit the argmax: no probabilities needed.

Rule for the chain drafts of sampling sequences (block verification: Sun et al. 2024, "Block Verification
Accelerates Speculative Decoding", Alg. 2), which keeps the same distribution and accepts at least as many tokens
in expectation (proved there: the optimal verifier of one drafted block). For the chain x_1..x_n, with p_i and q_i
the target's and the draft's distributions after x_1..x_(i-1) (p_(n+1) after the whole chain):
  weight w_0 = 1, w_i = min(1, w_(i-1) * p_i(x_i) / q_i(x_i));
  residual mass r_i = sum_x max(w_i * p_(i+1)(x) - q_(i+1)(x), 0) and h_i = r_i / (r_i + 1 - w_i) for i < n, h_n = w_n;
  keep x_1..x_t for the largest t with eta_t < h_t (t = 0 when none; eta_i is node i's uniform), then emit a token
  from normalise(max(w_t * p_(t+1) - q_(t+1), 0)), or from p_(n+1) when t = n.
  Unlike the token-wise rule, a later position can keep a draft that an earlier position alone would have cut: the
  weight carries how much target mass the kept prefix has to spare. Where r_i and 1 - w_i are both 0 the residual is
  empty and the walk never stops there (h_i = 0). tests/test_acceptance.py checks the joint distribution it
  emits, and its stopping probabilities and residuals chain by chain against the rule written out.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..engine.sampling import sample
from .tree import DraftTree


@dataclass
class FlatDrafts:
    """The draft trees of a batch, flattened (all tensors on one device, int64 unless said)."""
    tokens: torch.Tensor  # [nodes] drafted token ids
    parent_node: torch.Tensor  # [nodes] flat index of the parent node, -1 for a child of the root
    parent_row: torch.Tensor  # [nodes] the parent's row (the sequence's root row for a child of the root)
    node_row: torch.Tensor  # [nodes] the node's own row
    sequence: torch.Tensor  # [nodes] index of the node's sequence
    depth: torch.Tensor  # [nodes] 1 for children of the root
    by_rank: list[torch.Tensor]  # by_rank[r]: the nodes that are their parent's r-th child (r-th to be tried)
    root_row: torch.Tensor  # [sequences] each sequence's root row
    max_depth: int

    @classmethod
    def from_trees(cls, trees: list[DraftTree], device) -> "FlatDrafts":
        """Rows laid out sequence after sequence: its root, then its nodes in order."""
        tokens, parent_node, parent_row, node_row, sequence, depth, rank, root_row = ([] for _ in range(8))
        row = 0
        for b, tree in enumerate(trees):
            root_row.append(row)
            base, siblings = len(tokens), {}
            for node, (parent, node_depth) in enumerate(zip(tree.parents, tree.depths())):
                tokens.append(tree.tokens[node])
                parent_node.append(base + parent if parent >= 0 else -1)
                parent_row.append(row + 1 + parent)  # parent -1: the root row
                node_row.append(row + 1 + node)
                sequence.append(b)
                depth.append(node_depth)
                rank.append(siblings.get(parent, 0))
                siblings[parent] = rank[-1] + 1
            row += 1 + len(tree)
        tensor = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
        by_rank = [tensor([n for n, r in enumerate(rank) if r == k]) for k in range(max(rank, default=-1) + 1)]
        return cls(tensor(tokens), tensor(parent_node), tensor(parent_row), tensor(node_row), tensor(sequence),
                   tensor(depth), by_rank, tensor(root_row), max(depth, default=0))


@dataclass
class Verdict:
    accepted: torch.Tensor  # [nodes] bool: on the accepted path
    accepted_count: torch.Tensor  # [sequences] accepted draft tokens
    tip_row: torch.Tensor  # [sequences] the row the walk ended at: it emits the bonus token
    bonus: torch.Tensor  # [sequences] that token
    bonus_prob: torch.Tensor  # [sequences] its probability under the distribution it was drawn from
    node_prob: torch.Tensor  # [nodes] each node's token probability under its parent row's target distribution
    bonus_distribution: torch.Tensor | None  # [sequences, vocab] what the bonus was drawn from (None: all greedy)


def accept(drafts: FlatDrafts, argmax: torch.Tensor, sampled: torch.Tensor, probs: torch.Tensor | None,
           node_uniforms: torch.Tensor, row_uniforms: torch.Tensor, node_q: torch.Tensor | None = None,
           has_q: torch.Tensor | None = None) -> Verdict:
    """argmax: [rows] greedy choice per row. sampled: [rows] bool, rows of sampling requests. probs: [rows, vocab]
    sampling distributions (None when no row samples; greedy rows' entries are ignored). node_uniforms: [nodes],
    row_uniforms: [rows] in [0, 1) from each request's own generator (greedy: zeros). node_q: [nodes, vocab] the
    distribution each node was drawn from, where has_q [nodes] says it has one (None: every node deterministic)."""
    nodes, sequences = drafts.tokens.numel(), drafts.root_row.numel()
    device = argmax.device
    residual = probs.clone() if probs is not None else None
    decided = torch.zeros(argmax.numel(), dtype=torch.bool, device=device)  # a child of this row was accepted
    taken = torch.zeros(nodes, dtype=torch.bool, device=device)
    node_prob = torch.ones(nodes, device=device)
    drawn_from = None  # [nodes, vocab] each node's q, one-hot at a deterministic node's token
    if residual is not None and nodes:
        node_prob = torch.where(sampled[drafts.parent_row], probs[drafts.parent_row, drafts.tokens], node_prob)
        drawn_from = F.one_hot(drafts.tokens, probs.shape[-1]).to(probs.dtype)
        if node_q is not None:
            drawn_from = torch.where(has_q[:, None], node_q.to(probs.dtype), drawn_from)
    for rank_nodes in drafts.by_rank:
        row, token = drafts.parent_row[rank_nodes], drafts.tokens[rank_nodes]
        ratio = (token == argmax[row]).float()
        if residual is not None:
            p = residual[row] / residual[row].sum(-1, keepdim=True)
            q = drawn_from[rank_nodes]
            q_x = q.gather(1, token[:, None])[:, 0].clamp(min=torch.finfo(q.dtype).tiny)
            ratio = torch.where(sampled[row], (p.gather(1, token[:, None])[:, 0] / q_x).clamp(max=1.0), ratio)
        take = ~decided[row] & (node_uniforms[rank_nodes] < ratio)
        taken[rank_nodes] = take
        decided[row] |= take
        if residual is not None:  # rows whose child was rejected keep the residual max(p - q, 0)
            residual[row] = torch.where(take[:, None], residual[row], (p - q).clamp(min=0.0))
    # on the path: taken, and so is every ancestor
    accepted = taken
    has_parent = drafts.parent_node >= 0
    for _ in range(drafts.max_depth - 1):
        accepted = taken & torch.where(has_parent, accepted[drafts.parent_node.clamp(min=0)], True)
    block = None
    if residual is not None and nodes:
        block = _block_verification(drafts, sampled, probs, drawn_from, node_uniforms)
        accepted = torch.where(block.chain[drafts.sequence], block.accepted, accepted)
    # the tip: the deepest accepted node of each sequence, encoded so that one segment max finds it
    key = torch.where(accepted, drafts.depth * (nodes + 1) + torch.arange(1, nodes + 1, device=device), 0)
    best = torch.zeros(sequences, dtype=torch.long, device=device).scatter_reduce(0, drafts.sequence, key, "amax")
    tip_node = best % (nodes + 1) - 1
    tip_row = torch.where(tip_node >= 0, drafts.node_row[tip_node.clamp(min=0)] if nodes else 0, drafts.root_row)
    left = None if residual is None else residual[tip_row]
    if block is not None:
        left = torch.where(block.chain[:, None], block.residual(tip_node, tip_row), left)
    bonus, bonus_prob, left = emit(argmax[tip_row], sampled[tip_row], left, row_uniforms[tip_row])
    return Verdict(accepted, best // (nodes + 1), tip_row, bonus, bonus_prob, node_prob, left)


@dataclass
class _BlockVerdict:
    """Block verification of the batch's sampled chains (see the module docstring)."""
    chain: torch.Tensor  # [sequences] bool: the sequence samples and its draft is a non-empty chain
    accepted: torch.Tensor  # [nodes] bool: kept (meaningful for chain sequences' nodes only)
    weight: torch.Tensor  # [nodes] w_i of each node
    next_q: torch.Tensor  # [nodes + sequences, vocab] q of the node after each node, then after each root
    probs: torch.Tensor  # [rows, vocab] target distributions
    last: torch.Tensor  # [nodes] bool: the chain's last node

    def residual(self, tip_node: torch.Tensor, tip_row: torch.Tensor) -> torch.Tensor:
        """[sequences, vocab] what the bonus is drawn from (unnormalised): max(w_t * p_(t+1) - q_(t+1), 0), or
        p_(n+1) after the whole chain. tip_node: [sequences] the last kept node, -1 for the root."""
        sequences = tip_row.numel()
        at_root = tip_node < 0
        node = tip_node.clamp(min=0)
        weight = torch.where(at_root, 1.0, self.weight[node])
        after = torch.where(at_root, self.weight.numel() + torch.arange(sequences, device=tip_row.device), node)
        p = self.probs[tip_row]
        spare = (weight[:, None] * p - self.next_q[after]).clamp(min=0.0)
        return torch.where((~at_root & self.last[node])[:, None], p, spare)


def _stop_probability(weight: torch.Tensor, spare: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """[nodes] h_i from w_i, r_i and whether the node is its chain's last."""
    denominator = spare + 1.0 - weight
    return torch.where(last, weight, torch.where(denominator > 0, spare / denominator.clamp(min=1e-30), 0.0))


def _block_verification(drafts: FlatDrafts, sampled: torch.Tensor, probs: torch.Tensor, q: torch.Tensor,
                        node_uniforms: torch.Tensor) -> _BlockVerdict:
    """sampled: [rows]; probs: [rows, vocab]; q: [nodes, vocab] each node's q; node_uniforms: [nodes] eta."""
    nodes, sequences = drafts.tokens.numel(), drafts.root_row.numel()
    device = probs.device
    in_tree = torch.zeros(sequences, dtype=torch.bool, device=device)  # has a node with a sibling
    for rank_nodes in drafts.by_rank[1:]:
        in_tree[drafts.sequence[rank_nodes]] = True
    has_nodes = torch.bincount(drafts.sequence, minlength=sequences) > 0
    chain = has_nodes & ~in_tree & sampled[drafts.root_row]
    x = drafts.tokens[:, None]
    ratio = probs[drafts.parent_row].gather(1, x)[:, 0] / q.gather(1, x)[:, 0].clamp(min=torch.finfo(q.dtype).tiny)
    has_parent = drafts.parent_node >= 0
    parent = drafts.parent_node.clamp(min=0)
    weight = ratio.clamp(max=1.0)
    for _ in range(drafts.max_depth - 1):  # one more depth exact per pass
        weight = (torch.where(has_parent, weight[parent], 1.0) * ratio).clamp(max=1.0)
    # the node after each node (chains: its only child), then after each root: its first node
    after = torch.full((nodes + sequences,), -1, dtype=torch.long, device=device)
    after.scatter_(0, torch.where(has_parent, parent, nodes + drafts.sequence), torch.arange(nodes, device=device))
    next_q = torch.where((after >= 0)[:, None], q[after.clamp(min=0)], 0.0)
    last = after[:nodes] < 0
    spare = (weight[:, None] * probs[drafts.node_row] - next_q[:nodes]).clamp(min=0.0).sum(-1)
    passes = node_uniforms < _stop_probability(weight, spare, last)  # eta_i < h_i
    kept = torch.zeros(sequences, dtype=torch.long, device=device).scatter_reduce(
        0, drafts.sequence, torch.where(passes, drafts.depth, 0), "amax")
    return _BlockVerdict(chain, drafts.depth <= kept[drafts.sequence], weight, next_q, probs, last)


def emit(argmax: torch.Tensor, sampled: torch.Tensor, probs: torch.Tensor | None,
         uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The token each row emits from what is left of its distribution: greedy rows their argmax, sampling rows a draw.
    argmax: [rows]; sampled: [rows] bool; probs: [rows, vocab] unnormalised (None: no row samples); uniforms: [rows].
    Returns the tokens [rows], each one's probability under the distribution it came from [rows] (greedy: 1), and
    those distributions normalised [rows, vocab] (None when probs is)."""
    if probs is None:
        return argmax, torch.ones(argmax.shape, device=argmax.device), None
    left = probs / probs.sum(-1, keepdim=True)
    drawn = sample(left, uniforms)
    return (torch.where(sampled, drawn, argmax), torch.where(sampled, left.gather(1, drawn[:, None])[:, 0], 1.0),
            left)
