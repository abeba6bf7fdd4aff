"""Overlap scheduling (serving.lookahead): every result equals the plain engine's, whatever the next call asks."""
import pytest
from tiny_models import PROMPTS
from transformers import AutoTokenizer

from cosine.engine.checkpoint import load_causal_lm
from cosine.engine.engine import Admission, CausalLMEngine, StepRequest, StepResult
from cosine.engine.sampling import SamplingParams
from cosine.serving.lookahead import LookaheadEngine
from cosine.speculation.tree import DraftTree

SEEDED = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=7)


def serve(engine, prompts, params) -> list[list[int]]:
    """Three sequences decoded plainly, several tokens per call, in calls a `cosine` process makes: the next call
    as expected, one that leaves a sequence out (it comes back a call later), one with fewer steps (a request's
    last), one verifying a draft, and a release mid-way. Returns each sequence's tokens."""
    ids = [11, 12, 13]
    outputs = {i: engine.step([StepRequest(i, p, admission=Admission(40, params))])[0].tokens
               for i, p in zip(ids, prompts)}

    def call(steps):
        results = engine.step(steps)
        for step, result in zip(steps, results):
            assert isinstance(result, StepResult), result
            if not step.release:
                outputs[step.sequence_id] += result.tokens

    def plain(i, extra=3):
        return StepRequest(i, outputs[i][-1:], extra_tokens=extra)

    call([plain(i) for i in ids])
    call([plain(i) for i in ids])  # as expected
    call([plain(11), plain(12)])  # 13 left out ...
    call([plain(i) for i in ids])  # ... and back
    call([plain(11, extra=1), plain(12), plain(13)])  # fewer steps than looked ahead
    draft = DraftTree.chain(outputs[12][-2:])  # a verification: not what was looked ahead
    call([plain(11), StepRequest(12, outputs[12][-1:], draft=draft), plain(13)])
    call([plain(11), StepRequest(13, release=True)])
    call([plain(11), plain(12)])
    call([plain(11), plain(12)])
    return [outputs[i] for i in ids]


@pytest.mark.parametrize("params", [SamplingParams(), SEEDED], ids=["greedy", "seeded"])
def test_looked_ahead_results_equal_the_engine_alone(llama, params):
    model = load_causal_lm(llama)
    prompts = [AutoTokenizer.from_pretrained(llama).encode(p) for p in PROMPTS[:3]]
    plain_outputs = serve(CausalLMEngine(model, 8192), prompts, params)
    lookahead = LookaheadEngine(CausalLMEngine(model, 8192))
    try:
        outputs = serve(lookahead, prompts, params)
    finally:
        lookahead.close()
    assert outputs == plain_outputs
    # the expected calls took what was computed ahead; the others undid it
    assert lookahead.used >= 10 and lookahead.undone >= 3
    assert lookahead.busy_seconds > 0


def test_a_look_ahead_of_a_released_sequence_is_dropped(llama):
    engine = LookaheadEngine(CausalLMEngine(load_causal_lm(llama), 4096))
    try:
        first = engine.step([StepRequest(1, [5, 6, 7], admission=Admission(20, SamplingParams()))])[0]
        engine.step([StepRequest(1, first.tokens[-1:], extra_tokens=2)])
        engine.step([StepRequest(1, release=True)])
        engine.step([])  # nothing left to look ahead: the engine is idle
        assert engine.engine.active_sequences == 0 and engine.engine.kv.reserved_tokens == 0
        assert engine.computing is None and not engine.ahead
    finally:
        engine.close()


def test_a_request_s_last_call_is_looked_ahead_with_its_remaining_tokens_and_nothing_after(llama):
    """max_new_tokens 7, four tokens per call as the `cosine` process asks: after the first call two tokens are left,
    and the request's last call asks for exactly those (a one-step call)."""
    engine = LookaheadEngine(CausalLMEngine(load_causal_lm(llama), 4096))
    try:
        tokens = engine.step([StepRequest(1, [5, 6, 7], admission=Admission(7, SamplingParams()))])[0].tokens
        tokens += engine.step([StepRequest(1, tokens[-1:], extra_tokens=3)])[0].tokens
        tokens += engine.step([StepRequest(1, tokens[-1:], extra_tokens=7 - len(tokens) - 1)])[0].tokens
        assert len(tokens) == 7 and engine.used == 1 and engine.undone == 0
        assert engine.computing is None and not engine.ahead  # nothing left to emit: nothing looked ahead
    finally:
        engine.close()


@pytest.mark.parametrize("limit", [1, 0])
def test_calls_decoding_more_sequences_than_the_limit_are_not_looked_ahead(llama, limit):
    """A CPU target's limit (1), and a drafter's (0: it never looks ahead, only times its steps)."""
    engine = LookaheadEngine(CausalLMEngine(load_causal_lm(llama), 4096), max_sequences=limit)
    try:
        first = engine.step([StepRequest(i, [5, 6, 7], admission=Admission(20, SamplingParams())) for i in (1, 2)])
        engine.step([StepRequest(i, r.tokens[-1:], extra_tokens=2) for i, r in zip((1, 2), first)])
        assert engine.computing is None and not engine.ahead
        engine.step([StepRequest(1, release=True)])
        engine.step([StepRequest(2, [9], extra_tokens=2)])
        assert list(engine.ahead) == ([2] if limit else [])
        assert engine.busy_seconds > 0
    finally:
        engine.close()
