"""Measurements of a built zoo: held-out loss, speculative acceptance, per-token step cost."""
from __future__ import annotations

import inspect
import statistics
import time
from dataclasses import dataclass
from typing import Iterator

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, LlamaForCausalLM

ACCEPTANCE_METRIC = "mean accepted draft tokens per round of greedy speculative decoding (0..k, bonus token excluded)"


@dataclass(frozen=True)
class DomainEvalSet:
    prompts: list[list[int]]  # token ids of held-out prompts, BOS first
    loss_windows: torch.Tensor  # [n, context] held-out text


def quality_report(target: LlamaForCausalLM, drafters: dict[str, LlamaForCausalLM],
                   eval_sets: dict[str, DomainEvalSet], draft_length: int, new_tokens: int, step_cost_steps: int,
                   progress: bool) -> dict:
    """Everything quality_report.json holds except the bars."""
    losses = {domain: heldout_loss(target, data.loss_windows) for domain, data in eval_sets.items()}
    continuations = {domain: greedy_continuations(target, data.prompts, new_tokens)
                     for domain, data in tqdm(eval_sets.items(), desc="eval target continuations",
                                              disable=not progress)}
    accepted = {name: {domain: _mean_accepted(drafter, data.prompts, continuations[domain], draft_length)
                       for domain, data in eval_sets.items()}
                for name, drafter in tqdm(drafters.items(), desc="eval acceptance", disable=not progress)}
    costs = step_costs_ms({"target": target, **drafters}, step_cost_steps, progress)
    return {"acceptance_metric": ACCEPTANCE_METRIC, "draft_length": draft_length,
            "target_heldout_loss": losses, "mean_accepted": accepted, "step_cost_ms": costs,
            "step_cost_ratio": {name: costs["target"] / costs[name] for name in drafters},
            "step_cost_method": f"median of {step_cost_steps} greedy decoding steps at batch 1 with a KV cache, "
                                f"models taking turns, {torch.get_num_threads()} torch threads"}


def heldout_loss(model: LlamaForCausalLM, windows: torch.Tensor, batch: int = 8) -> float:
    with torch.inference_mode():
        losses = [model(input_ids=windows[start:start + batch], labels=windows[start:start + batch]).loss.item()
                  for start in range(0, len(windows), batch)]
    return _mean(losses)


def greedy_continuations(target: LlamaForCausalLM, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """The target's greedy output for each prompt, up to and including EOS: what speculation must reproduce."""
    config = target.config
    width = max(map(len, prompts))
    padded = torch.tensor([[config.pad_token_id] * (width - len(p)) + p for p in prompts])
    with torch.inference_mode():
        output = target.generate(input_ids=padded, attention_mask=(padded != config.pad_token_id).long(),
                                 max_new_tokens=new_tokens, do_sample=False, eos_token_id=config.eos_token_id,
                                 pad_token_id=config.pad_token_id)
    continuations = []
    for row in output[:, width:].tolist():
        end = row.index(config.eos_token_id) + 1 if config.eos_token_id in row else len(row)
        continuations.append(row[:end])
    return continuations


def _mean_accepted(drafter: LlamaForCausalLM, prompts: list[list[int]], continuations: list[list[int]],
                   draft_length: int) -> float:
    return _mean(accepted for prompt, continuation in zip(prompts, continuations)
                 for accepted in accepted_per_round(drafter, prompt, continuation, draft_length))


def accepted_per_round(drafter: LlamaForCausalLM, prompt: list[int], continuation: list[int],
                       draft_length: int) -> list[int]:
    """Accepted draft tokens of each round when the drafter speculates for the target's greedy continuation.

    Equivalent to the explicit loop (draft k tokens greedily, the target keeps the longest prefix matching its own
    greedy choices, then adds one token of its own) but needs a single drafter pass: a draft token is only judged
    when all earlier ones were accepted, i.e. equal to the continuation, so every judged draft token is the
    drafter's greedy choice after a prefix of the true sequence, which a teacher-forced pass yields for all
    positions at once.
    """
    sequence = torch.tensor([prompt + continuation])
    with torch.inference_mode():
        guesses = drafter(input_ids=sequence).logits[0, len(prompt) - 1:-1].argmax(-1)
    matches = (guesses == torch.tensor(continuation)).tolist()
    rounds, position = [], 0
    while position < len(continuation):
        accepted = 0
        while accepted < draft_length and position + accepted < len(continuation) and matches[position + accepted]:
            accepted += 1
        rounds.append(accepted)
        position += accepted + 1
    return rounds


def step_costs_ms(models: dict[str, LlamaForCausalLM], steps: int, progress: bool,
                  prefix_length: int = 32) -> dict[str, float]:
    """Median wall time of one decoding step at batch 1 with a KV cache, for each model.

    The models take turns step by step, so that a busy machine slows them all alike and their ratios stay fair.
    """
    decoders = {name: _timed_decoding_steps(model, prefix_length) for name, model in models.items()}
    for decoder in decoders.values():
        next(decoder)  # the prefill is not a decoding step
    timings = {name: [] for name in models}
    for _ in tqdm(range(steps), desc="eval step cost", disable=not progress):
        for name, decoder in decoders.items():
            timings[name].append(next(decoder))
    return {name: 1000 * statistics.median(seconds) for name, seconds in timings.items()}


def _timed_decoding_steps(model: LlamaForCausalLM, prefix_length: int) -> Iterator[float]:
    """Greedy decoding, one step per next(); yields each step's wall time in seconds."""
    cache_argument = {_cache_keyword(model): DynamicCache()}
    token = torch.arange(prefix_length).view(1, -1) % model.config.vocab_size
    while True:
        start = time.perf_counter()
        with torch.inference_mode():
            token = model(input_ids=token, use_cache=True, **cache_argument).logits[:, -1:].argmax(-1)
        yield time.perf_counter() - start


def _cache_keyword(model: LlamaForCausalLM) -> str:
    # transformers 5 renamed past_key_values to cache.
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0
