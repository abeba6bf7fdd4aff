"""The transport under the request coroutines: calls of one tick travel as one engine call, flattened by the wire
codec, and come back to the right caller; a failing sequence fails alone."""
import asyncio

import pytest
from tiny_models import PROMPTS

from cosine.engine.checkpoint import load_causal_lm
from cosine.engine.engine import CausalLMEngine
from cosine.serving import wire
from cosine.serving.batching import CoalescingEngine
from cosine.serving.errors import ServingError
from cosine.serving.request import GenerationRequest
from cosine.speculation.tree import DraftTree


class InProcessEngine:
    """Transport to a real engine in this process, through the wire codec both ways; records call sizes."""

    def __init__(self, engine):
        self.engine, self.calls = engine, []

    async def __call__(self, arrays):
        steps = wire.unpack_steps(arrays)
        self.calls.append(len(steps))
        return wire.pack_results(self.engine.step(steps))


@pytest.fixture
def engine(llama):
    return CausalLMEngine(load_causal_lm(llama), kv_cache_tokens=8192)


def test_calls_of_one_tick_go_as_one_engine_call(engine, llama):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama)
    transport = InProcessEngine(engine)
    coalesced = CoalescingEngine("target", transport)
    prompts = [tokenizer.encode(p) for p in PROMPTS]

    async def generate(sequence_id, prompt, tokens=8):
        out = (await coalesced.step(sequence_id, prompt, request=GenerationRequest("x", max_tokens=tokens))).tokens
        while len(out) < tokens:
            out += (await coalesced.step(sequence_id, out[-1:])).tokens
        await coalesced.release(sequence_id)
        return out

    async def main():
        together = await asyncio.gather(*(generate(i, p) for i, p in enumerate(prompts)))
        calls_together = list(transport.calls)
        alone = [await generate(100 + i, p) for i, p in enumerate(prompts)]
        return together, calls_together, alone
    together, calls, alone = asyncio.run(main())
    assert together == alone
    assert calls == [len(prompts)] * 9  # prefill, 7 decode steps, release: every call carries every sequence
    assert engine.active_sequences == 0


def test_a_bad_sequence_fails_alone_and_names_its_input(engine):
    coalesced = CoalescingEngine("target", InProcessEngine(engine))
    request = GenerationRequest("x", max_tokens=4)

    async def main():
        return await asyncio.gather(
            coalesced.step(1, [5, 6], request=request),
            coalesced.step(2, [5], DraftTree((1, 2), (-1, 5)), request=request),  # parent 5 does not exist
            coalesced.step(3, [5, 6], request=GenerationRequest("x", max_tokens=10**6)),
            return_exceptions=True)
    ok, bad_tree, too_long = asyncio.run(main())
    assert len(ok.tokens) == 1
    assert isinstance(bad_tree, ServingError) and bad_tree.kind == ServingError.INVALID
    assert "draft_parents" in str(bad_tree) and str(bad_tree).startswith("target: ")
    assert isinstance(too_long, ServingError) and "max_new_tokens" in str(too_long)


def test_a_failed_call_fails_every_sequence_in_it():
    async def broken(arrays):
        raise ServingError("target: stub crashed", ServingError.UNAVAILABLE)
    coalesced = CoalescingEngine("target", broken)

    async def main():
        return await asyncio.gather(*(coalesced.step(i, [1]) for i in range(3)), return_exceptions=True)
    assert all(isinstance(r, ServingError) and "stub crashed" in str(r) for r in asyncio.run(main()))


def test_malformed_arrays_are_refused_naming_the_input():
    arrays = wire.pack_steps([])
    arrays["input_lengths"] = wire.pack_steps([])["input_lengths"]
    arrays["sequence_id"] = arrays["sequence_id"][:0]
    arrays["input_ids"] = arrays["input_ids"].tolist() + [3]
    with pytest.raises(ValueError, match="input_ids"):
        wire.unpack_steps(arrays)
