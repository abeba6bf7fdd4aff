"""The batched acceptance rule keeps the target's distribution exactly; broken variants fail the same checks.

Each check runs SAMPLES copies of one draft as one batch: the rule is tensor operations over the batch."""
import pytest
import torch

from cosine.engine.sampling import sample
from cosine.speculation.acceptance import FlatDrafts, accept
from cosine.speculation.tree import DraftTree

VOCAB = 6
SAMPLES = 20000
# Sampling noise of a 6-way empirical distribution over 20k samples has TV ~0.01; 0.03 leaves a wide margin.
TOLERANCE = 0.03
P_ROOT = torch.softmax(torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 0.3]), -1)
P_SECOND = torch.softmax(torch.tensor([0.0, 0.0, 3.0, 1.0, 0.0, 0.0]), -1)


def run(tree: DraftTree, rows: torch.Tensor, seed: int = 0, greedy: bool = False):
    """accept() over SAMPLES copies of `tree`; rows: [1 + len(tree), vocab] target distributions (root first)."""
    generator = torch.Generator().manual_seed(seed)
    drafts = FlatDrafts.from_trees([tree] * SAMPLES, "cpu")
    probs = rows.repeat(SAMPLES, 1)
    argmax = probs.argmax(-1)
    sampled = torch.full((len(probs),), not greedy)
    verdict = accept(drafts, argmax, sampled, None if greedy else probs,
                     torch.rand(SAMPLES * len(tree), generator=generator), torch.rand(len(probs), generator=generator))
    return verdict, drafts


def first_tokens(verdict, drafts, tree):
    """The first emitted token of every copy: its accepted depth-1 node's token, else the bonus."""
    first = verdict.bonus.clone()
    accepted_first = verdict.accepted & (drafts.depth == 1)
    first[drafts.sequence[accepted_first]] = drafts.tokens[accepted_first]
    return first


def frequencies(tokens):
    return torch.bincount(tokens, minlength=VOCAB).float() / len(tokens)


def total_variation(p, q):
    return 0.5 * (p - q).abs().sum().item()


TREES = [DraftTree.chain([3, 1, 2]), DraftTree((4, 1, 0), (-1, -1, -1)), DraftTree((1, 0, 5), (-1, 0, -1))]


@pytest.mark.parametrize("tree", TREES)
def test_emitted_tokens_follow_the_target_distribution(tree):
    rows = P_ROOT.repeat(1 + len(tree), 1)
    verdict, drafts = run(tree, rows)
    assert total_variation(frequencies(first_tokens(verdict, drafts, tree)), P_ROOT) < TOLERANCE


@pytest.mark.parametrize("tree", TREES)
def test_a_rule_that_drops_the_residual_fails_the_same_check(tree):
    """Broken variant: after rejecting every child, sample the bonus from p itself instead of the residual."""
    rows = P_ROOT.repeat(1 + len(tree), 1)
    verdict, drafts = run(tree, rows)
    rejected = verdict.accepted_count == 0
    generator = torch.Generator().manual_seed(7)
    from_p = sample(P_ROOT.repeat(SAMPLES, 1), torch.rand(SAMPLES, generator=generator))
    broken = first_tokens(verdict, drafts, tree)
    broken[rejected] = from_p[rejected]
    assert total_variation(frequencies(broken), P_ROOT) > TOLERANCE


def test_second_position_follows_the_target_given_the_first():
    """Along an accepted draft token, the next emitted token is distributed as the target's next distribution."""
    tree = DraftTree.chain([0, 2])
    verdict, drafts = run(tree, torch.stack([P_ROOT, P_SECOND, P_ROOT]), seed=1)
    first_accepted = verdict.accepted.view(SAMPLES, 2)[:, 0]
    second_accepted = verdict.accepted.view(SAMPLES, 2)[:, 1]
    second = torch.where(second_accepted, torch.tensor(2), verdict.bonus)[first_accepted]
    assert total_variation(frequencies(second), P_SECOND) < TOLERANCE


def test_greedy_accepts_exactly_the_argmax_path():
    rows = torch.tensor([[0.0, 5.0, 1.0], [9.0, 0.0, 0.0], [4.0, 0.0, 1.0], [0.0, 0.0, 9.0]])  # root, nodes 0, 1, 2
    tree = DraftTree((2, 1, 0), (-1, -1, 1))
    drafts = FlatDrafts.from_trees([tree, DraftTree.chain([1, 2])], "cpu")
    rows = torch.cat([rows, torch.tensor([[0.0, 5.0, 1.0], [0.0, 0.0, 1.0], [3.0, 0.0, 0.0]])])
    verdict = accept(drafts, rows.argmax(-1), torch.zeros(len(rows), dtype=torch.bool), None,
                     torch.zeros(5), torch.zeros(len(rows)))
    # sequence 0: node 1 (token 1), then node 2 (token 0), then the argmax after node 2; sequence 1: 1, 2, then 0
    assert verdict.accepted.tolist() == [False, True, True, True, True]
    assert verdict.accepted_count.tolist() == [2, 2] and verdict.bonus.tolist() == [2, 0]


# ---- drafts sampled from a known q ------------------------------------------------------------------------------
Q_A = torch.softmax(torch.tensor([0.0, 2.0, 0.0, 1.5, 0.0, -1.0]), -1)  # far from P_ROOT
Q_B = torch.softmax(torch.tensor([1.0, 0.0, 2.0, 0.0, 0.0, 0.0]), -1)


def sampled_drafts(q_per_child: list[torch.Tensor], seed: int = 3):
    """SAMPLES copies of a root with one child per q (siblings when several), each child's token drawn from its q;
    returns the trees and their node q rows."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.stack([torch.multinomial(q, SAMPLES, replacement=True, generator=generator)
                          for q in q_per_child], 1)
    trees = [DraftTree(tuple(row), (-1,) * len(q_per_child)) for row in tokens.tolist()]
    return trees, torch.stack(q_per_child).repeat(SAMPLES, 1)


def run_with_q(trees, node_q, p_rows, seed=0):
    generator = torch.Generator().manual_seed(seed)
    drafts = FlatDrafts.from_trees(trees, "cpu")
    probs = p_rows.repeat(SAMPLES, 1)
    nodes = drafts.tokens.numel()
    verdict = accept(drafts, probs.argmax(-1), torch.ones(len(probs), dtype=torch.bool), probs,
                     torch.rand(nodes, generator=generator), torch.rand(len(probs), generator=generator),
                     node_q, torch.ones(nodes, dtype=torch.bool))
    return verdict, drafts


@pytest.mark.parametrize("qs", [[Q_A], [Q_A, Q_B]], ids=["chain", "tree"])
def test_drafts_with_their_q_keep_the_target_distribution(qs):
    trees, node_q = sampled_drafts(qs)
    verdict, drafts = run_with_q(trees, node_q, P_ROOT.repeat(1 + len(qs), 1))
    assert total_variation(frequencies(first_tokens(verdict, drafts, None)), P_ROOT) < TOLERANCE


def test_a_drafter_equal_to_the_target_is_almost_always_accepted():
    for qs in ([P_ROOT], [P_ROOT, P_ROOT]):
        trees, node_q = sampled_drafts(qs)
        verdict, _ = run_with_q(trees, node_q, P_ROOT.repeat(1 + len(qs), 1))
        assert verdict.accepted_count.float().mean() >= 0.95  # min(1, p/q) = 1: every first child accepted


def one_child_rule(x, q, p, generator, ratio_uses_q=True, residual_uses_q=True):
    """A vectorised one-child rule with switchable parts, for the broken variants below."""
    p_x, q_x = p[x], q[x]
    ratio = torch.clamp(p_x / q_x, max=1.0) if ratio_uses_q else p_x
    accepted = torch.rand(len(x), generator=generator) < ratio
    residual = (p - q).clamp(min=0) if residual_uses_q else p
    fallback = torch.multinomial(residual / residual.sum(), len(x), replacement=True, generator=generator)
    return torch.where(accepted, x, fallback)


@pytest.mark.parametrize("broken", [dict(residual_uses_q=False), dict(ratio_uses_q=False)],
                         ids=["drops the residual", "accepts with p(x), not min(1, p/q)"])
def test_broken_rules_with_q_fail_the_same_check(broken):
    generator = torch.Generator().manual_seed(11)
    x = torch.multinomial(Q_A, SAMPLES, replacement=True, generator=generator)
    right = one_child_rule(x, Q_A, P_ROOT, generator)
    assert total_variation(frequencies(right), P_ROOT) < TOLERANCE  # the switchable rule itself is right
    wrong = one_child_rule(x, Q_A, P_ROOT, generator, **broken)
    assert total_variation(frequencies(wrong), P_ROOT) > TOLERANCE
