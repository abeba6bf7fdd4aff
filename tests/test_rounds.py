"""Speculation rounds in the target's process (serving.rounds): the target's greedy tokens, whatever the drafter."""
import pytest

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


def engine(path) -> CausalLMEngine:
    return CausalLMEngine(load_causal_lm(path), kv_cache_tokens=1024)


def serve(rounds_engine: RoundsEngine, prompt: list[int], new_tokens: int, drafter: int, k: int, count: int):
    """A request as the `cosine` process would make it with every call asking for rounds: (tokens, rounds)."""
    out = rounds_engine.step([StepRequest(7, prompt, admission=Admission(new_tokens, SamplingParams()))])[0].tokens
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
    assert all(accepted == len(draft) for draft, accepted in like_rounds)
    assert sum(accepted for _, accepted in unlike_rounds) < sum(accepted for _, accepted in like_rounds)
    assert not rounds_engine.contexts and not rounds_engine.drafted  # released


def test_rounds_refuse_a_sampled_sequence_and_an_unknown_drafter(checkpoints):
    target, _ = checkpoints
    rounds_engine = RoundsEngine(engine(target), [engine(target)], max_sequences=0)
    sampled = SamplingParams(temperature=0.8, top_p=0.95, seed=1)
    out = rounds_engine.step([StepRequest(1, [3, 4, 5], admission=Admission(8, sampled))])[0].tokens
    greedy = rounds_engine.step([StepRequest(2, [3, 4, 5], admission=Admission(8, SamplingParams()))])[0].tokens
    refused = rounds_engine.step([StepRequest(1, out[-1:], rounds=Rounds(0, 2, 1)),
                                  StepRequest(2, greedy[-1:], rounds=Rounds(1, 2, 1))])
    assert isinstance(refused[0], StepError) and "greedy" in str(refused[0])
    assert isinstance(refused[1], StepError) and "rounds_drafter" in str(refused[1])
