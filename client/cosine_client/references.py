"""In-process reference decode rates, no server: the project's engine, transformers' own batched decode,
transformers' assisted generation and the engines' own chain speculation. Each warms up once, then times decoding
only (prefill excluded), except the engine serving the requests and the two speculative ones, which time whole
requests.

Imports torch, transformers, cosine.engine and cosine.speculation.tree only, so that it runs on a bare CUDA machine."""
from __future__ import annotations

import inspect
import itertools
import os
import time

import torch
from transformers import DynamicCache

from cosine.engine.engine import Admission, CausalLMEngine, StepRequest, use_step_attention
from cosine.engine.sampling import SamplingParams
from cosine.speculation.tree import DraftTree

WARMUP_TOKENS = 4  # enough to run prefill and decode steps once before timing


def random_prompts(vocab_size: int, batch: int, prompt_len: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(vocab_size, (batch, prompt_len), generator=generator).tolist()


def _sync() -> None:
    # CUDA kernels run asynchronously: the clock must not be read before they finish
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def engine_generate(engine: CausalLMEngine, prompts: list[list[int]], new_tokens: int,
                    params: SamplingParams = SamplingParams()) -> tuple[list[list[int]], float]:
    """All prompts decoded together, one batched step per token; returns their tokens and the seconds spent in the
    decode steps (after the prefill step)."""
    outputs = [[] for _ in prompts]
    calls = engine_closed_loop(engine, prompts, new_tokens, len(prompts), 1, outputs, params)
    next(calls)  # the prefill
    _sync()
    start = time.perf_counter()
    for _ in calls:
        pass
    _sync()
    return outputs, time.perf_counter() - start


def _ok(result):
    if isinstance(result, Exception):
        raise result
    return result


def engine_decode_rate(model, batch: int, new_tokens: int, prompt_len: int, max_draft_tokens: int = 64,
                       seed: int = 0) -> float:
    """Tokens/s of `batch` greedy sequences decoded together by CausalLMEngine."""
    engine = CausalLMEngine(model, kv_cache_tokens=batch * (prompt_len + new_tokens + max_draft_tokens + 16),
                            max_draft_tokens=max_draft_tokens)
    prompts = random_prompts(model.config.vocab_size, batch, prompt_len, seed)
    engine_generate(engine, prompts, min(new_tokens, WARMUP_TOKENS))
    _, seconds = engine_generate(engine, prompts, new_tokens)
    return batch * (new_tokens - 1) / seconds


def engine_serving_rate(model, prompts_ids: list[list[int]], new_tokens: int, concurrency: int = 1,
                        steps_per_call: int = 1, max_draft_tokens: int = 64) -> float:
    """Tokens/s of CausalLMEngine serving these prompts as greedy requests in a closed loop (engine_closed_loop),
    timed from the first prompt to the last token: how served requests are counted, their prefills included, where
    engine_decode_rate counts the decode steps only."""
    engine = CausalLMEngine(model, kv_cache_tokens=concurrency * (max(map(len, prompts_ids)) + new_tokens
                                                                  + max_draft_tokens + 16),
                            max_draft_tokens=max_draft_tokens)
    engine_generate(engine, prompts_ids[:1], min(new_tokens, WARMUP_TOKENS))
    _sync()
    start = time.perf_counter()
    outputs = [[] for _ in prompts_ids]
    for _ in engine_closed_loop(engine, prompts_ids, new_tokens, concurrency, steps_per_call, outputs):
        pass
    _sync()
    return sum(map(len, outputs)) / (time.perf_counter() - start)


def engine_closed_loop(engine: CausalLMEngine, prompts_ids: list[list[int]], new_tokens: int, concurrency: int,
                       steps_per_call: int, outputs: list[list[int]], params: SamplingParams = SamplingParams()):
    """Serves the prompts as a target replica serves requests, `concurrency` at a time: each engine call steps every
    active request `steps_per_call` tokens (fewer where it ends) and admits new ones (their prefill) in the places of
    those that ended, in prompt order; each request emits new_tokens, appended to its prompt's list in `outputs`.
    Yields after each engine call."""
    waiting = list(enumerate(prompts_ids))[::-1]  # popped from the end: prompt order
    left: dict[int, int] = {}  # active request (its prompt's index) -> tokens it has still to emit
    while waiting or left:
        steps = [StepRequest(i, outputs[i][-1:], extra_tokens=min(steps_per_call, left[i]) - 1) for i in left]
        while waiting and len(steps) < concurrency:
            i, prompt = waiting.pop()
            steps.append(StepRequest(i, list(prompt), admission=Admission(new_tokens, params)))
            left[i] = new_tokens
        for step, result in zip(steps, engine.step(steps)):
            i, tokens = step.sequence_id, _ok(result).tokens
            outputs[i] += tokens
            left[i] -= len(tokens)
            if not left[i]:
                del left[i]
                engine.release(i)
        yield


@torch.inference_mode()
def _transformers_decode(model, prompts: list[list[int]], new_tokens: int) -> float:
    """Seconds of transformers' greedy batched decode loop (after prefill) over equal-length prompts."""
    use_step_attention(model.device)  # the engine's attention kernels: the comparison is of the steps around them
    # transformers 5.24 renamed past_key_values to cache (the old name warns, and goes in 5.40)
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    cache_kwarg = {name: DynamicCache()}
    logits = model(input_ids=torch.tensor(prompts, device=model.device), use_cache=True, logits_to_keep=1,
                   **cache_kwarg).logits
    next_ids = logits[:, -1].argmax(-1)
    _sync()
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        logits = model(input_ids=next_ids[:, None], use_cache=True, **cache_kwarg).logits
        next_ids = logits[:, -1].argmax(-1)
    _sync()
    return time.perf_counter() - start


def transformers_decode_rate(model, batch: int, new_tokens: int, prompt_len: int, seed: int = 0) -> float:
    """Tokens/s of transformers' own batched greedy decode (DynamicCache), the same work as engine_decode_rate."""
    prompts = random_prompts(model.config.vocab_size, batch, prompt_len, seed)
    _transformers_decode(model, prompts, min(new_tokens, WARMUP_TOKENS))
    return batch * (new_tokens - 1) / _transformers_decode(model, prompts, new_tokens)


@torch.inference_mode()
def assisted_generation_rate(target, drafter, prompts_ids: list[list[int]], new_tokens: int) -> float:
    """Tokens/s of transformers' assisted generation (greedy, the assistant's default settings), one prompt at a
    time. Counts the tokens actually generated: generate() stops early at an end token."""
    use_step_attention(target.device)

    def generate(prompt: list[int]) -> int:
        ids = torch.tensor([prompt], device=target.device)
        out = target.generate(ids, attention_mask=torch.ones_like(ids), assistant_model=drafter, do_sample=False,
                              max_new_tokens=new_tokens)
        return out.shape[1] - ids.shape[1]

    generate(prompts_ids[0])
    _sync()
    start = time.perf_counter()
    tokens = sum(generate(prompt) for prompt in prompts_ids)
    _sync()
    return tokens / (time.perf_counter() - start)


def engine_speculation(target: CausalLMEngine, drafter: CausalLMEngine, prompt: list[int], new_tokens: int,
                       k: int) -> list[int]:
    """Greedy chain speculation of one prompt with the project's engines in this process: each round the drafter
    drafts k tokens and the target verifies them, the round `cosine` makes over BLS, with no process between the
    two (and no pipelining). Returns the new tokens: the target's own greedy output."""
    admission = Admission(new_tokens + k, SamplingParams())
    out = _ok(target.step([StepRequest(0, prompt, admission=admission)])[0]).tokens
    _ok(drafter.step([StepRequest(0, prompt, admission=admission)])[0])
    drafter_cached = len(prompt)  # context tokens the drafter's cache holds
    while len(out) < new_tokens:
        context = prompt + out
        chain = _ok(drafter.step([StepRequest(0, context[drafter_cached:], keep_length=drafter_cached,
                                              extra_tokens=k - 1)])[0]).tokens
        emitted = _ok(target.step([StepRequest(0, context[-1:], DraftTree.chain(chain),
                                               keep_length=len(context) - 1)])[0]).tokens
        drafter_cached = len(context) + min(len(emitted) - 1, k - 1)  # it fed itself chain[:k - 1]
        out += emitted
    target.release(0)
    drafter.release(0)
    return out[:new_tokens]


def speculation_rate(target: CausalLMEngine, drafters: list[CausalLMEngine], prompts_ids: list[list[int]],
                     new_tokens: int, k: int) -> float:
    """Tokens/s of engine_speculation, one prompt at a time, each with its own drafter (drafters[i] for prompt i)."""
    engine_speculation(target, drafters[0], prompts_ids[0], min(new_tokens, WARMUP_TOKENS), k)
    _sync()
    start = time.perf_counter()
    tokens = sum(len(engine_speculation(target, drafter, prompt, new_tokens, k))
                 for drafter, prompt in zip(drafters, prompts_ids))
    _sync()
    return tokens / (time.perf_counter() - start)


class DeploymentReferences:
    """The physical references of a deployment, measured in this process on its own checkpoints with the torch threads
    of one served target replica: at a concurrency, the engine's batched decode rate and transformers' batched
    decode (batch = concurrency, decode steps only), and the engine serving the round's requests in a closed loop of
    that concurrency (prefills included, as served requests are counted); at concurrency 1 transformers' assisted
    generation with the general drafter and the engines' chain speculation with each prompt's own domain drafter
    (the one routing finds) at cosine's draft-length ceiling: what `cosine`'s rounds make without processes between
    target and drafters. Where the target's replicas use more cores than one replica's threads, transformers'
    batched decode with every core's threads too (the served target then uses them all).

    A bench measures them between its served runs, on each round's prompts, as one more interleaved variant: on a
    shared machine a reference measured once, at one moment, is off by as much as the speed of the machine drifts
    (this project's CPU machine: the same in-process engine at 83 and at 119 tokens/s at two times of one session)."""

    def __init__(self, spec_path):
        from transformers import AutoTokenizer

        from cosine.deploy.spec import engine_threads, load_spec, target_replicas
        from cosine.engine.checkpoint import load_causal_lm

        spec = load_spec(spec_path)
        self.replicas = target_replicas(spec.target)
        self.threads = engine_threads(spec.target.num_threads or 0, self.replicas)  # one served replica's
        self.cores = len(os.sched_getaffinity(0))
        self.target = load_causal_lm(spec.target.checkpoint)
        # the engine fuses the model's projections in place: it runs on a copy of its own
        self.engine_model = load_causal_lm(spec.target.checkpoint)
        self.drafter = load_causal_lm(spec.drafters[spec.vanilla_drafter].checkpoint) if spec.vanilla_drafter \
            else None
        self.general_drafter, self.draft_tokens = spec.vanilla_drafter, spec.adaptive_draft_tokens
        self.plain_decode_steps = (spec.plain_decode_steps_alone, spec.plain_decode_steps)
        # copies for their engines, apart from the general drafter above: the engine fuses projections in place
        self.drafter_models = {name: load_causal_lm(drafter.checkpoint) for name, drafter in spec.drafters.items()}
        self.tokenizer = AutoTokenizer.from_pretrained(str(spec.tokenizer_dir), local_files_only=True)
        self.rates: dict[int, dict[str, list[float]]] = {}  # concurrency -> reference -> one rate per measurement
        self.prompt_tokens: list[int] = []

    def steps_per_call(self, concurrency: int) -> int:
        """Plain-decoding steps per target call as the deployment runs them: its longer calls for a request alone (at
        concurrency 1; one engine here holds every request of a higher one), else its shorter ones."""
        alone, shared = self.plain_decode_steps
        return alone if concurrency == 1 else shared

    def measure(self, concurrency: int, prompts: list[str], max_tokens: int, domains: list[str | None] = ()) -> None:
        """One measurement of every reference at `concurrency`, on these prompts (their mean length for the
        batched decodes, the prompts themselves for the speculative ones) and their domains (a prompt whose domain
        names no drafter drafts with the general one)."""
        prompt_ids = [self.tokenizer.encode(prompt) for prompt in prompts]
        self.prompt_tokens += map(len, prompt_ids)
        prompt_len = round(sum(map(len, prompt_ids)) / len(prompt_ids))
        rates = self.rates.setdefault(concurrency, {})
        previous = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            rates.setdefault("transformers", []).append(
                transformers_decode_rate(self.target, concurrency, max_tokens, prompt_len))
            rates.setdefault("engine", []).append(
                engine_decode_rate(self.engine_model, concurrency, max_tokens, prompt_len))
            rates.setdefault("engine_serving", []).append(engine_serving_rate(
                self.engine_model, prompt_ids, max_tokens, concurrency, self.steps_per_call(concurrency)))
            if concurrency == 1 and self.drafter is not None:
                rates.setdefault("assisted_generation", []).append(
                    assisted_generation_rate(self.target, self.drafter, prompt_ids, max_tokens))
                kv_tokens = max(map(len, prompt_ids)) + max_tokens + 2 * self.draft_tokens + 128  # one sequence
                engines = {name: CausalLMEngine(model, kv_tokens) for name, model in self.drafter_models.items()}
                drafters = [engines.get(domain, engines[self.general_drafter])
                            for domain, _ in itertools.zip_longest(domains, prompt_ids)]
                rates.setdefault("engine_speculation", []).append(speculation_rate(
                    CausalLMEngine(self.engine_model, kv_tokens), drafters, prompt_ids, max_tokens, self.draft_tokens))
            if self.replicas > 1 and concurrency > 1:  # the replicas together use more than one replica's threads
                torch.set_num_threads(self.cores)
                rates.setdefault("transformers_all_cores", []).append(
                    transformers_decode_rate(self.target, concurrency, max_tokens, prompt_len))
        finally:
            torch.set_num_threads(previous)

    def summary(self) -> dict:
        """Per concurrency, each reference's mean rate over its measurements (and how many there were)."""
        return {"threads": self.threads, "replicas": self.replicas, "cores": self.cores,
                "prompt_tokens": round(sum(self.prompt_tokens) / max(1, len(self.prompt_tokens))),
                "decode": {level: {name: sum(values) / len(values) for name, values in rates.items()}
                           for level, rates in self.rates.items()},
                "measurements": {level: len(rates["engine"]) for level, rates in self.rates.items()}}
