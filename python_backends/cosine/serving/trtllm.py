"""The engine interface the loop calls (`step`, `release`), over a TensorRT-LLM model served by Triton's
tensorrtllm backend (contract.TENSORRT_LLM).

TRT-LLM keeps no sequence state between requests: this adapter keeps each sequence's tokens and resends them every
round; the backend's KV block reuse spares recomputing their prefix. Every step is its own request, sent at once:
the steps the loop makes in one tick (a verification batch, a drafting tick) reach the backend together and its
in-flight batcher runs them in the same iterations, so no coalescing into one call is needed (nor possible: the
backend takes several sequences in one request only when decoupled).

Verification. A target built with draft_tokens_external verifies one chain of draft tokens per request, by token
match: at each draft position it computes its own token (argmax, or a draw with the request's sampling parameters)
and keeps the draft token while they agree; it then emits its own token. For a draft tree we send its best path
(`best_path`) rather than each root-to-leaf path as a parallel request, because:
  - fused trees (cosine) are a chain of winners with runner-up siblings that are leaves. Under greedy decoding a
    sibling matches exactly when the target's own token at that depth equals it, and then the chain's verification
    emits that very token as its correction; a leaf has no continuation to accept. So verifying the winners' chain
    yields the same tokens as verifying the whole tree, and a parallel request per sibling would buy nothing.
    Sampled drafts have no siblings (see FusionProposer).
  - merged chains (specinfer) do lose the other drafters' continuations, but each extra path is a whole extra
    request: its own slot in the in-flight batch, its own KV blocks and a recomputed partial last block of the
    shared prefix, i.e. the verifier cost of a separate sequence for a chance of a few more tokens.
Sampling stays lossless without draft_logits: token match accepts a draft token x with probability p(x) and
otherwise emits a draw from the target's own distribution: this is the acceptance rule (speculation/acceptance.py)
for a draft taken as deterministic, exact for any draft chosen independently of the target's draws (our drafters
draw with their own seeds). Rejection sampling with q (draft_logits) would accept more often, but only if the
backend applied exactly the sampling transform the drafter drew from; we do not depend on that, so drafter steps
return q=None and a draft's q is not sent.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Awaitable, Callable

import numpy as np
import torch

from ..contract import TENSORRT_LLM
from ..engine.engine import StepResult
from ..engine.sampling import SamplingParams, probabilities
from ..speculation.tree import DraftTree
from .errors import ServingError
from .health import BreakerGuarded, CircuitBreaker

# one request to a `tensorrt_llm` model: packed inputs and the outputs to ask for -> those outputs (no batch dim)
Transport = Callable[[dict[str, np.ndarray], tuple[str, ...]], Awaitable[dict[str, np.ndarray]]]
# an odd 64-bit constant (the golden ratio's): consecutive rounds of one request get well-spread seeds
_SEED_STRIDE = 0x9E3779B97F4A7C15


def best_path(tree: DraftTree) -> list[int]:
    """The chain of first children from the root: the winners of a fused tree (siblings follow the winner in
    confidence order), the first drafter's chain of merged chains."""
    first_child: dict[int, int] = {}
    for node, parent in enumerate(tree.parents):
        first_child.setdefault(parent, node)
    path, node = [], -1
    while node in first_child:
        node = first_child[node]
        path.append(tree.tokens[node])
    return path


@dataclass
class _Sequence:
    tokens: list[int]  # what the engine was fed so far (the caller sends the last emitted token next time)
    params: SamplingParams
    end_id: int | None
    min_end_position: int  # end_id may not be emitted at positions before this


class TrtllmEngine(BreakerGuarded):
    def __init__(self, name: str, transport: Transport, breaker: CircuitBreaker | None = None):
        """breaker: the engine's health (drafters), as for CoalescingEngine."""
        self.name, self.transport, self.breaker = name, transport, breaker
        self.sequences: dict[int, _Sequence] = {}

    async def step(self, sequence_id, input_ids, draft=None, *, request=None, keep_length=None, extra_tokens=0,
                   candidates=0, score_input=False, draft_q=None, return_q=False, sent=None) -> StepResult:
        sequence = self._sequence(sequence_id, request, len(input_ids))
        if keep_length is not None and request is None:
            if not 0 <= keep_length <= len(sequence.tokens):
                raise ServingError(f"{self.name}: keep_length {keep_length} is outside the sequence's "
                                   f"{len(sequence.tokens)} tokens", ServingError.INVALID)
            del sequence.tokens[keep_length:]
        if not input_ids:
            raise ServingError(f"{self.name}: input_ids is empty: a step appends at least one token",
                               ServingError.INVALID)
        context = sequence.tokens + list(input_ids)
        chain = best_path(draft) if draft else []
        wanted = 1 + len(chain) + extra_tokens
        # a sampling drafter would return q; it returns its tokens' probabilities instead (see the module doc)
        logits_needed = candidates > 0 or return_q
        outputs = ("output_ids", "sequence_length") + (("generation_logits",) if logits_needed else ()) + (
            ("context_logits",) if score_input else ())
        arrays = dict(TENSORRT_LLM.pack(**self._inputs(sequence, context, chain, wanted, logits_needed,
                                                       score_input)))
        send = functools.partial(self.transport, arrays, outputs)
        if sent is not None:  # as CoalescingEngine's: waiters run after this turn, in which the call goes out
            sent.set_result(None)
        out = await self._guarded(send)
        tokens = out["output_ids"][0][:int(out["sequence_length"][0])].tolist()
        generated = len(tokens)
        stopped_at_end = generated < wanted and sequence.end_id is not None
        if stopped_at_end and tokens[-1:] != [sequence.end_id]:
            # TRT-LLM ends a sequence at end_id without returning it (possibly with no token at all): the loop
            # ends a request on end_id, so it gets it, drawn with certainty
            tokens.append(sequence.end_id)
        if not tokens:
            raise ServingError(f"{self.name}: the model returned no tokens")
        sequence.tokens = context + tokens[:-1]
        result = StepResult(tokens, [1.0 if sequence.params.greedy else math.nan] * len(tokens),
                            [[] for _ in tokens], [[] for _ in tokens])
        if logits_needed:
            self._read_generation_logits(out["generation_logits"][0][:generated], sequence.params, candidates,
                                         result)
        if len(tokens) > generated:
            result.probs[-1] = 1.0
            result.top_ids[-1], result.top_probs[-1] = [sequence.end_id][:candidates], [1.0][:candidates]
        if score_input:
            result.input_logprob = _mean_logprob(out["context_logits"], context)
        return result

    async def release(self, sequence_id) -> None:
        self.sequences.pop(sequence_id, None)

    def _sequence(self, sequence_id: int, request, input_length: int) -> _Sequence:
        if request is None:
            if sequence_id not in self.sequences:
                raise ServingError(f"{self.name}: sequence {sequence_id} is not active (finished or released)",
                                   ServingError.INVALID)
            return self.sequences[sequence_id]
        sequence = _Sequence([], request.params.seeded(), request.end_id, input_length + request.min_length)
        self.sequences[sequence_id] = sequence
        return sequence

    @staticmethod
    def _inputs(sequence: _Sequence, context: list[int], chain: list[int], wanted: int, logits_needed: bool,
                score_input: bool) -> dict:
        params = sequence.params
        values = dict(input_ids=context, input_lengths=len(context), request_output_len=wanted,
                      draft_input_ids=chain or None, end_id=sequence.end_id, exclude_input_in_output=True,
                      min_tokens=max(0, sequence.min_end_position - len(context)) or None,
                      return_generation_logits=logits_needed or None, return_context_logits=score_input or None)
        if params.greedy:
            values.update(runtime_top_k=1)
        else:
            # a fresh seed per round (a function of the request's seed and position, so still reproducible):
            # reusing one seed every round would replay the same random draws
            values.update(temperature=params.temperature, runtime_top_k=params.top_k, runtime_top_p=params.top_p,
                          seed=(params.seed + len(context) * _SEED_STRIDE) % 2**64)
        return values

    @staticmethod
    def _read_generation_logits(logits: np.ndarray, params: SamplingParams, candidates: int,
                                result: StepResult) -> None:
        """Candidates (untempered softmax) and, for a sampling sequence, each token's probability under the
        distribution it was drawn from, from the generation logits of the returned tokens ([tokens, vocab])."""
        rows = torch.from_numpy(np.ascontiguousarray(logits)).float()
        if candidates:
            top = torch.softmax(rows, -1).topk(candidates)
            result.top_ids[:len(rows)] = top.indices.tolist()
            result.top_probs[:len(rows)] = top.values.tolist()
        if not params.greedy:
            n = len(rows)
            drawn_from = probabilities(rows, torch.full((n,), params.temperature), torch.full((n,), params.top_k),
                                       torch.full((n,), params.top_p))
            tokens = torch.tensor(result.tokens[:n])
            result.probs[:n] = drawn_from.gather(1, tokens[:, None])[:, 0].tolist()


def _mean_logprob(context_logits: np.ndarray, context: list[int]) -> float:
    """The mean log-probability of context[1:] from the [input tokens, vocab] context logits."""
    if len(context) < 2:
        return 0.0
    rows = torch.from_numpy(np.ascontiguousarray(context_logits[:len(context) - 1])).float()
    return torch.log_softmax(rows, -1).gather(1, torch.tensor(context[1:])[:, None]).mean().item()
