"""The transport under the request coroutines: calls of one tick travel as one engine call, flattened by the wire
codec, and come back to the right caller; a failing sequence fails alone."""
import asyncio

import numpy as np
import pytest
import torch
from tiny_models import PROMPTS

from cosine.engine.checkpoint import load_causal_lm
from cosine.engine.engine import CausalLMEngine, RoundOutcome, Rounds, StepRequest, StepResult
from cosine.engine.sampling import SparseDistributions
from cosine.serving import wire
from cosine.serving.batching import CoalescingEngine, InProcessEngine, ReplicatedEngine
from cosine.serving.errors import ServingError
from cosine.serving.generation import Deployment
from cosine.serving.generation import generate as generate_text
from cosine.serving.lookahead import LookaheadEngine
from cosine.serving.request import GenerationRequest
from cosine.speculation.tree import DraftTree


class WireLoopback:
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


async def generate(engine, sequence_id, prompt, tokens):
    """Greedy decoding of one sequence through an engine interface, one step per token."""
    out = (await engine.step(sequence_id, prompt, request=GenerationRequest("x", max_tokens=tokens))).tokens
    while len(out) < tokens:
        out += (await engine.step(sequence_id, out[-1:])).tokens
    await engine.release(sequence_id)
    return out


def over_the_wire(engine):
    """An engine model's client (a Triton model in this server or another), with its calls' sizes."""
    transport = WireLoopback(engine)
    return CoalescingEngine("target", transport), transport.calls


def in_this_process(engine):
    """An engine in the `cosine` process (a drafter placed there), with its steps' sizes."""
    calls = []
    return InProcessEngine("target", LookaheadEngine(engine, max_sequences=0),
                           on_step=lambda steps: calls.append(len(steps))), calls


@pytest.mark.parametrize("client", [over_the_wire, in_this_process])
def test_calls_of_one_tick_go_as_one_engine_call(engine, llama, client):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama)
    coalesced, calls = client(engine)
    prompts = [tokenizer.encode(p) for p in PROMPTS]

    async def main():
        together = await asyncio.gather(*(generate(coalesced, i, p, 8) for i, p in enumerate(prompts)))
        calls_together = list(calls)
        alone = [await generate(coalesced, 100 + i, p, 8) for i, p in enumerate(prompts)]
        return together, calls_together, alone
    together, calls, alone = asyncio.run(main())
    assert together == alone
    assert calls == [len(prompts)] * 9  # prefill, 7 decode steps, release: every call carries every sequence
    assert engine.active_sequences == 0


def test_replicas_each_step_their_own_sequences_and_outputs_equal_one_engine(llama):
    """Data parallelism: sequences spread over the replicas by load, every step of a sequence goes to the replica
    that admitted it (its KV cache is there), and the output equals one engine's."""
    from transformers import AutoTokenizer

    prompts = [AutoTokenizer.from_pretrained(llama).encode(p) for p in PROMPTS]
    transports = [WireLoopback(CausalLMEngine(load_causal_lm(llama), kv_cache_tokens=8192)) for _ in range(2)]
    replicated = ReplicatedEngine([CoalescingEngine(f"target_{i}", transport)
                                   for i, transport in enumerate(transports)])
    single = CoalescingEngine("target", WireLoopback(CausalLMEngine(load_causal_lm(llama), kv_cache_tokens=8192)))

    async def main():
        return (await asyncio.gather(*(generate(replicated, i, p, 6) for i, p in enumerate(prompts))),
                await asyncio.gather(*(generate(single, i, p, 6) for i, p in enumerate(prompts))))
    spread, one = asyncio.run(main())
    assert spread == one
    # a sequence that ever went to the wrong replica fails there ("not active"): the calls show the split
    assert [max(transport.calls) for transport in transports] == [(len(prompts) + 1) // 2, len(prompts) // 2]
    assert all(transport.engine.active_sequences == 0 for transport in transports) and not replicated.home


class LoggedLoopback(WireLoopback):
    """A WireLoopback that logs each call's start to a shared list; every call after the first (the prefill) takes
    delay_s."""

    def __init__(self, engine, name, log, delay_s=0.0):
        super().__init__(engine)
        self.name, self.log, self.delay_s = name, log, delay_s

    async def __call__(self, arrays):
        self.log.append(self.name)
        if self.calls:
            await asyncio.sleep(self.delay_s)
        return await super().__call__(arrays)


def plain_decoding(deployment, tokens, log=None):
    """A plain-decoding request through the generation loop; its chunks' arrivals logged as "chunk"."""
    async def consume():
        async for _ in generate_text(GenerationRequest("x y", max_tokens=tokens, speculation_mode="autoregressive"),
                                     deployment):
            if log is not None:
                log.append("chunk")
    return consume()


def test_a_chunk_is_handed_on_once_the_next_rounds_call_has_gone_out(llama):
    """The consumer's send (in Triton a round trip to the server, holding the GIL) must not delay the next round's
    call: each chunk but the first (the time to first token) and the last comes after the call of the round that
    follows it."""
    from transformers import AutoTokenizer
    log = []
    target = CoalescingEngine("target", LoggedLoopback(CausalLMEngine(load_causal_lm(llama), 8192), "call", log))
    deployment = Deployment(target=target, tokenizer=AutoTokenizer.from_pretrained(llama), max_context=128,
                            end_id=None)
    asyncio.run(plain_decoding(deployment, 6, log))
    # the prefill's call and its chunk; the first round's call; each later round's call, then the chunk before it;
    # the last chunk; the release
    assert log == ["call", "chunk", "call"] + ["call", "chunk"] * 4 + ["chunk", "call"]


def test_a_replica_steps_again_without_waiting_for_the_other_replicas_pass(llama):
    """Each replica's verification scheduler gathers its own sequences: a fast replica's rounds do not wait for a
    slow replica's passes (one scheduler for both held one pass in flight across them, in lockstep)."""
    from transformers import AutoTokenizer
    log = []
    replicas = [CoalescingEngine(name, LoggedLoopback(CausalLMEngine(load_causal_lm(llama), 8192), name, log, delay))
                for name, delay in (("fast", 0.0), ("slow", 0.05))]
    deployment = Deployment(target=ReplicatedEngine(replicas), tokenizer=AutoTokenizer.from_pretrained(llama),
                            max_context=128, end_id=None)

    async def both():
        await asyncio.gather(plain_decoding(deployment, 6), plain_decoding(deployment, 6))
    asyncio.run(both())
    # each: the prefill, 5 rounds, the release; the fast request is done before the slow one's second round
    assert log.count("fast") == log.count("slow") == 7
    slow_second_round = [i for i, name in enumerate(log) if name == "slow"][2]
    assert log[:slow_second_round].count("fast") == 7, log


def test_a_replicas_scheduler_gathers_a_sequence_in_its_prefill_too():
    """What a replica's verification scheduler gathers: every sequence it holds, one whose admission (prefill) is
    in flight included, so that the next pass waits a gather window for it. Left out, passes fragmented while
    requests arrived: 20 requests on 2 replicas (test_server's batching test) shared 3.8 sequences per forward at
    worst, against 7.6-12.4 counted."""
    class Replica:
        def __init__(self):
            self.prefill_done = asyncio.Event()

        async def step(self, sequence_id, input_ids, draft=None, *, request=None, **kwargs):
            if sequence_id == 2:
                await self.prefill_done.wait()
            return StepResult([1], [1.0], [[]], [[]])

    replica = Replica()
    replicated = ReplicatedEngine([replica])

    async def main():
        await replicated.step(1, [5], request=GenerationRequest("x", max_tokens=4))
        admitting = asyncio.ensure_future(replicated.step(2, [5], request=GenerationRequest("x", max_tokens=4)))
        await asyncio.sleep(0)
        during = replicated.schedulers[0].active_requests()
        replica.prefill_done.set()
        await admitting
        return during, replicated.schedulers[0].active_requests()
    assert asyncio.run(main()) == (2, 2)


def test_a_replica_that_refuses_an_admission_passes_it_on():
    """KV cache full or process died: the next replica takes the sequence, and keeps it; all refusing fails it."""
    class Replica:
        def __init__(self, name, full):
            self.name, self.full, self.steps = name, full, []

        async def step(self, sequence_id, input_ids, draft=None, *, request=None, **kwargs):
            if request is not None and self.full:
                raise ServingError(f"{self.name}: KV cache full", ServingError.UNAVAILABLE)
            self.steps.append(sequence_id)
            return StepResult([1], [1.0], [[]], [[]])

        async def release(self, sequence_id):
            self.steps.append(-sequence_id)
    full, free = Replica("target", full=True), Replica("target_1", full=False)
    replicated = ReplicatedEngine([full, free])
    request = GenerationRequest("x", max_tokens=4)

    async def main():
        await replicated.step(7, [1], request=request)  # both hold none: `target` is asked first and refuses
        await replicated.step(7, [2])
        await replicated.release(7)
        free.full = True
        with pytest.raises(ServingError, match="target_1: KV cache full"):
            await replicated.step(8, [1], request=request)
    asyncio.run(main())
    assert free.steps == [7, 7, -7] and full.steps == [] and not replicated.home


@pytest.mark.parametrize("client", [over_the_wire, in_this_process])
def test_a_bad_sequence_fails_alone_and_names_its_input(engine, client):
    coalesced, _ = client(engine)
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


def test_malformed_arrays_are_refused_naming_the_tensor_and_part():
    arrays = wire.pack_steps([StepRequest(1, [5, 6], DraftTree.chain([7]))])
    for name, broken, part in (("step_keys", [1, 0, 2], "values per sequence"),
                               ("step_ints", arrays["step_ints"][:-1], "draft_parents"),
                               ("step_ints", np.append(arrays["step_ints"], 3), "past its last section"),
                               ("step_reals", arrays["step_reals"][:1], "header")):
        with pytest.raises(ValueError, match=f"^{name}: .*{part}"):
            wire.unpack_steps(dict(arrays, **{name: np.asarray(broken, arrays[name].dtype)}))
    negative = arrays["step_ints"].copy()
    negative[0] = -1  # input_length, the header's first field
    with pytest.raises(ValueError, match="step_ints: input_length must be >= 0"):
        wire.unpack_steps(dict(arrays, step_ints=negative))


def test_a_step_is_a_few_tensors_whatever_it_carries():
    """Every tensor of a BLS call costs a trip through shared memory: a step travels as one per dtype."""
    q = SparseDistributions.over_vocabulary(torch.tensor([[0.25, 0.75, 0.0]]))
    steps = [StepRequest(1, [5], DraftTree.chain([1]), draft_q=q, return_q=True), StepRequest(2, [6], release=True)]
    assert len(wire.pack_steps(steps)) == 3
    assert len(wire.pack_results([StepResult([3], [0.5], [[3]], [[0.5]], q=q), ValueError("bad")])) == 3


def _nucleus(logits, top_p: float):
    """A top-p distribution per row (zero outside its support), as a sampling drafter's q."""
    probs = torch.softmax(logits, -1)
    ordered, order = probs.sort(-1, descending=True)
    keep = ordered.cumsum(-1) - ordered < top_p
    q = torch.zeros_like(probs).scatter(-1, order, ordered * keep)
    return q / q.sum(-1, keepdim=True)


def test_q_travels_sparse_and_comes_back_exactly():
    """Draft and returned q cross the wire as their support only: bit-exact back, and far fewer bytes than dense
    rows for a top-p q of a 2,048-token vocabulary."""
    generator = torch.Generator().manual_seed(0)
    q_a = _nucleus(torch.randn(3, 2048, generator=generator) * 4, 0.95)
    q_b = _nucleus(torch.randn(2, 2048, generator=generator) * 4, 0.95)
    sparse_a, sparse_b = SparseDistributions.over_vocabulary(q_a), SparseDistributions.over_vocabulary(q_b)
    steps = [StepRequest(1, [5], DraftTree.chain([7, 8, 9]), draft_q=sparse_a),
             StepRequest(2, [6], DraftTree.chain([4])),
             StepRequest(3, [7], DraftTree.chain([1, 2]), draft_q=sparse_b)]
    arrays = wire.pack_steps(steps)
    back = wire.unpack_steps(arrays)
    assert torch.equal(back[0].draft_q.dense(), q_a) and torch.equal(back[2].draft_q.dense(), q_b)
    assert back[1].draft_q is None and back[0].draft_q.vocab == 2048
    assert sum(array.nbytes for array in arrays.values()) * 10 < (q_a.numel() + q_b.numel()) * 4
    results = [StepResult([3, 4, 5], [0.5] * 3, [[]] * 3, [[]] * 3, q=sparse_a), StepResult([2], [1.0], [[]], [[]])]
    unpacked = wire.unpack_results(wire.pack_results(results), steps[:2], "drafter")
    assert torch.equal(unpacked[0].q.dense(), q_a) and unpacked[1].q is None


def test_rounds_travel_and_come_back_round_by_round():
    steps = [StepRequest(1, [5], rounds=Rounds(2, 4, 3)), StepRequest(2, [6]),
             StepRequest(3, [7], rounds=Rounds(0, 1, 1))]
    back = wire.unpack_steps(wire.pack_steps(steps))
    assert [step.rounds for step in back] == [Rounds(2, 4, 3), None, Rounds(0, 1, 1)]
    results = [StepResult([1, 2, 9, 4, 8], [1.0] * 5, [], [], rounds=[RoundOutcome([1, 2, 3], 2, 1),
                                                                      RoundOutcome([4, 5], 1, 2)]),
               StepResult([3], [1.0], [], []), StepResult([6], [1.0], [], [], rounds=[RoundOutcome([7], 0, 0)])]
    unpacked = wire.unpack_results(wire.pack_results(results), steps, "target")
    assert [result.rounds for result in unpacked] == [result.rounds for result in results]


def test_malformed_q_is_refused_naming_the_section():
    q = SparseDistributions.over_vocabulary(torch.tensor([[0.25, 0.75, 0.0]]))
    arrays = wire.pack_steps([StepRequest(1, [5], DraftTree.chain([1]), draft_q=q)])
    ints = arrays["step_ints"]  # ... draft_q_counts [2], draft_q_ids [0, 1]; step_reals ends with draft_q_probs
    for name, broken, section in (("step_ints", np.append(ints[:-3], [3, 0, 1]), "draft_q_ids"),
                                  ("step_ints", np.append(ints[:-2], [0, 3]), "draft_q_ids"),
                                  ("step_reals", arrays["step_reals"][:-1], "draft_q_probs")):
        with pytest.raises(ValueError, match=f"{name}: {section}"):
            wire.unpack_steps(dict(arrays, **{name: np.asarray(broken, arrays[name].dtype)}))