"""The acceptance rule keeps the target's distribution exactly; a wrong rule is caught by the same test."""
import pytest
import torch

from cosine.engine.sampling import SamplingParams, probabilities
from cosine.speculation.acceptance import accept
from cosine.speculation.tree import DraftTree

VOCAB = 6
SAMPLES = 20000


def emitted_first_token_frequencies(rule, target_probs, tree, seed=0):
    generator = torch.Generator().manual_seed(seed)
    counts = torch.zeros(VOCAB)
    for _ in range(SAMPLES):
        tokens, _ = rule(target_probs, tree, generator)
        counts[tokens[0]] += 1
    return counts / SAMPLES


def wrong_rule(target_probs, tree, generator):
    """Accepts any drafted child the target gives non-zero probability: biased toward the draft."""
    node = -1
    for child in tree.children(node):
        if target_probs[0, tree.tokens[child]] > 0:
            return [tree.tokens[child]], [child]
    return [int(torch.multinomial(target_probs[0], 1, generator=generator))], []


def total_variation(p, q):
    return 0.5 * (p - q).abs().sum().item()


# Sampling noise of a 6-way empirical distribution over 20k samples has TV ~0.01; 0.03 leaves a wide margin.
TOLERANCE = 0.03


@pytest.fixture
def target_probs():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 0.3]] * 4)
    return probabilities(logits, SamplingParams(temperature=1.0))


@pytest.mark.parametrize("tree", [DraftTree.chain([3, 1, 2]), DraftTree((4, 1, 0), (-1, -1, -1)),
                                  DraftTree((1, 0, 5), (-1, 0, -1))])
def test_emitted_tokens_follow_the_target_distribution(target_probs, tree):
    freq = emitted_first_token_frequencies(accept, target_probs, tree)
    assert total_variation(freq, target_probs[0]) < TOLERANCE


def test_a_wrong_rule_fails_the_same_check(target_probs):
    freq = emitted_first_token_frequencies(wrong_rule, target_probs, DraftTree.chain([3, 1]))
    assert total_variation(freq, target_probs[0]) > TOLERANCE


def test_second_position_follows_the_target_given_the_first(target_probs):
    """Along an accepted draft token, the next emitted token is distributed as the target's next distribution."""
    second = probabilities(torch.tensor([[0.0, 0.0, 3.0, 1.0, 0.0, 0.0]]), SamplingParams(temperature=1.0))[0]
    probs = torch.stack([target_probs[0], second, target_probs[0]])
    tree = DraftTree.chain([0, 2])
    generator = torch.Generator().manual_seed(1)
    counts, firsts = torch.zeros(VOCAB), 0
    for _ in range(SAMPLES):
        tokens, _ = accept(probs, tree, generator)
        if tokens[0] == 0 and len(tokens) > 1:
            counts[tokens[1]] += 1
            firsts += 1
    assert total_variation(counts / firsts, second) < TOLERANCE


def test_greedy_accepts_exactly_the_argmax_path():
    rows = [[0.0, 5.0, 1.0], [9.0, 0.0, 0.0], [4.0, 0.0, 1.0], [0.0, 0.0, 9.0]]  # root, then after nodes 0, 1, 2
    probs = probabilities(torch.tensor(rows), SamplingParams())
    tokens, path = accept(probs, DraftTree((2, 1, 0), (-1, -1, 1)), torch.Generator())
    assert tokens == [1, 0, 2] and path == [1, 2]
