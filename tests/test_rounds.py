"""Speculation rounds in the target's process (serving.rounds): the target's greedy tokens, or its distribution when
sampling, whatever the drafter."""
import dataclasses

import pytest
import torch

from cosine.engine.checkpoint import load_causal_lm
from cosine.engine.engine import Admission, CausalLMEngine, Rounds, StepError, StepRequest
from cosine.engine.sampling import SamplingParams
from cosine.serving.rounds import RoundsEngine
from cosine_client import gpu_check
from cosine_client.references import engine_generate


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("rounds")
    return (gpu_check.random_checkpoint(root / "target", **gpu_check.TINY),
            gpu_check.random_checkpoint(root / "other", seed=1, **gpu_check.TINY))


@pytest.fixture(scope="module")
def sharper(checkpoints, tmp_path_factory):
    """The target with its output head scaled by 4: the same top tokens, more peaked (a q that differs from p on p's
    support, where an unrelated drafter's hardly meets it)."""
    model = load_causal_lm(checkpoints[0])
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)
    path = tmp_path_factory.mktemp("rounds") / "sharper"
    model.save_pretrained(path, safe_serialization=True)
    return path


def engine(path) -> CausalLMEngine:
    return CausalLMEngine(load_causal_lm(path), kv_cache_tokens=1024)


def serve(rounds_engine: RoundsEngine, prompt: list[int], new_tokens: int, drafter: int, k: int, count: int,
          params: SamplingParams = SamplingParams()):
    """A request as the `cosine` process would make it with every call asking for rounds: (tokens, rounds)."""
    out = rounds_engine.step([StepRequest(7, prompt, admission=Admission(new_tokens, params))])[0].tokens
    rounds = []
    while len(out) < new_tokens:
        result = rounds_engine.step([StepRequest(7, out[-1:], rounds=Rounds(drafter, k, count))])[0]
        assert not isinstance(result, Exception), result
        out += result.tokens
        rounds += result.rounds
    rounds_engine.step([StepRequest(7, release=True)])
    return out, rounds


def test_rounds_emit_the_targets_greedy_tokens_and_a_drafter_equal_to_it_is_accepted_whole(checkpoints):
    target, other = checkpoints
    prompt, new_tokens, k = list(range(3, 20)), 40, 4
    (greedy,), _ = engine_generate(engine(target), [prompt], new_tokens)
    rounds_engine = RoundsEngine(engine(target), [engine(other), engine(target)], max_sequences=0)
    unlike, unlike_rounds = serve(rounds_engine, prompt, new_tokens, drafter=0, k=k, count=3)
    like, like_rounds = serve(rounds_engine, prompt, new_tokens, drafter=1, k=k, count=3)
    assert unlike == like == greedy
    # the drafter's cache follows the context from round to round and from call to call
    assert all(accepted == len(draft) for draft, accepted, _ in like_rounds)
    assert sum(accepted for _, accepted, _ in unlike_rounds) < sum(accepted for _, accepted, _ in like_rounds)
    assert all(matched == accepted for _, accepted, matched in like_rounds + unlike_rounds)  # greedy: top tokens
    assert not rounds_engine.contexts and not rounds_engine.drafted  # released


def test_sampled_rounds_accept_a_drafter_equal_to_the_target_by_its_q_and_match_its_top_tokens(checkpoints):
    """drafter == target at temperature 1: min(1, p/q) = 1, so every draft token is accepted, but only if the target
    accepts with the q the copy drew from (as a deterministic draft, about 1 in 100 would be: p(x) on 512 tokens).
    What the router learns is not that: at the positions each round settled, how often the drafter's top token (the
    target's own argmax here) is the emitted token."""
    target, _ = checkpoints
    rounds_engine = RoundsEngine(engine(target), [engine(target)], max_sequences=0)
    prompt = list(range(3, 20))
    out, rounds = serve(rounds_engine, prompt, 60, drafter=0, k=4, count=3,
                        params=SamplingParams(temperature=1.0, seed=5))
    assert len(out) == 60
    drafted, accepted = sum(len(draft) for draft, _, _ in rounds), sum(accepted for _, accepted, _ in rounds)
    assert drafted >= 40 and accepted / drafted >= 0.95
    with torch.no_grad():  # the target's argmax for each emitted token, given what came before it
        argmax = load_causal_lm(target)(torch.tensor([prompt + out])).logits[0, len(prompt) - 1:-1].argmax(-1)
    matches, position = 0, 1  # out[0] came with the admission; then the rounds, one after another
    for draft, round_accepted, _ in rounds:
        settled = min(len(draft), round_accepted + 1)
        matches += int((argmax[position:position + settled] == torch.tensor(out[position:position + settled])).sum())
        position += round_accepted + 1
    assert sum(matched for _, _, matched in rounds) == matches < accepted


def first_round_tokens(rounds_engine: RoundsEngine, prompt: list[int], params: SamplingParams, samples: int):
    """[samples, 2]: the admission's sampled token and the first token of one round after it, per sequence."""
    pairs = []
    for sequence_id in range(samples):
        params = dataclasses.replace(params, seed=sequence_id)
        first = rounds_engine.step([StepRequest(sequence_id, prompt, admission=Admission(8, params))])[0].tokens[0]
        result = rounds_engine.step([StepRequest(sequence_id, [first], rounds=Rounds(0, 2, 1))])[0]
        pairs.append((first, result.tokens[0]))
        rounds_engine.step([StepRequest(sequence_id, release=True)])
    return torch.tensor(pairs)


def test_sampled_rounds_keep_the_targets_distribution(checkpoints, sharper):
    """The token after the admission's, against the target's own distribution there (top_k 3 at temperature 0.8),
    with a drafter whose q differs from p on p's support: the total variation of the observed pairs from
    (observed first token) x (the target's next-token distribution) stays within sampling noise (about 0.02 for 3,000
    pairs); it fails when the target accepts with the q of another position (a draft's rows shifted by one: 0.31)
    and when the drafter copy draws from the target's own random stream (0.15)."""
    target, _ = checkpoints
    params, prompt, samples = SamplingParams(temperature=0.8, top_k=3), list(range(3, 20)), 3000
    rounds_engine = RoundsEngine(engine(target), [engine(sharper)], max_sequences=0)
    pairs = first_round_tokens(rounds_engine, prompt, params, samples)
    firsts, counts = pairs[:, 0].unique(return_counts=True)
    with torch.no_grad():
        logits = load_causal_lm(target)(torch.hstack([torch.tensor([prompt] * len(firsts)), firsts[:, None]])).logits
    top = (logits[:, -1] / params.temperature).topk(params.top_k)
    expected = torch.zeros_like(logits[:, -1]).scatter_(1, top.indices, top.values.softmax(-1)) * counts[:, None]
    observed = torch.zeros_like(expected).index_put_(
        ((pairs[:, :1] == firsts).int().argmax(1), pairs[:, 1]), torch.ones(samples), accumulate=True)
    distance = 0.5 * float((observed - expected).abs().sum()) / samples
    assert distance < 0.04


def test_rounds_refuse_an_unknown_drafter(checkpoints):
    target, _ = checkpoints
    rounds_engine = RoundsEngine(engine(target), [engine(target)], max_sequences=0)
    greedy = rounds_engine.step([StepRequest(2, [3, 4, 5], admission=Admission(8, SamplingParams()))])[0].tokens
    refused = rounds_engine.step([StepRequest(2, greedy[-1:], rounds=Rounds(1, 2, 1))])[0]
    assert isinstance(refused, StepError) and "rounds_drafter" in str(refused)


def test_rounds_after_a_looked_ahead_plain_step_draft_by_what_the_sequence_has_left(checkpoints):
    """A plain step of the sequence was looked ahead (serving.lookahead) when a call asks for rounds: the rounds
    undo it before sizing their drafts, else they see 4 tokens fewer left and draft shorter."""
    target, _ = checkpoints
    rounds_engine = RoundsEngine(engine(target), [engine(target)])  # looks ahead
    out = rounds_engine.step([StepRequest(1, [3, 4, 5], admission=Admission(12, SamplingParams()))])[0].tokens
    out += rounds_engine.step([StepRequest(1, out[-1:], extra_tokens=3)])[0].tokens  # 7 tokens left
    rounds_engine.wait_ahead()  # the look-ahead of 4 more has landed, as it has when the next call arrives
    result = rounds_engine.step([StepRequest(1, out[-1:], rounds=Rounds(0, 6, 1))])[0]
    assert [len(draft) for draft, _, _ in result.rounds] == [6] and len(result.tokens) == 7
    rounds_engine.close()
