"""Sampling parameters and the logits -> distribution transform shared by target and drafters."""
from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass

import torch


class InvalidParameter(ValueError):
    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field, self.reason = field_name, message


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def validate(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidParameter("temperature", f"must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise InvalidParameter("top_k", f"must be >= 0 (0 = disabled), got {self.top_k}")
        if not (math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise InvalidParameter("top_p", f"must be in (0, 1], got {self.top_p}")

    def seeded(self) -> "SamplingParams":
        """These parameters with a seed: a fresh random one when the request named none (an engine always gets one,
        so a request's rounds draw from its own stream)."""
        return self if self.seed is not None else dataclasses.replace(self, seed=random.getrandbits(63))

    def generator(self) -> torch.Generator:
        generator = torch.Generator()
        if self.seed is None:
            generator.seed()
        else:
            generator.manual_seed(self.seed)
        return generator


CANDIDATES = 64  # the most likely tokens of a row that a CPU sorts before its whole vocabulary
WIDENING = 8  # rows whose top-p support is beyond CANDIDATES try this many times as many before sorting everything


def probabilities(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                  top_p: torch.Tensor) -> torch.Tensor:
    """The distributions sampling draws from, one row per logits row with that row's parameters: temperature, then
    top-k, then top-p. Rows of greedy requests are not meant to come here (they compare argmaxes).
    Sorting the vocabulary is what costs on a CPU (2,048 logits: 58 us a row). So a row is computed from its
    CANDIDATES most likely tokens when its top-k / top-p support lies within them (a top_k up to that, or a top_p
    those tokens reach: 90% of the demo target's rows at temperature 0.8, top_p 0.95), else from WIDENING times as
    many (99.5%), and only the rest sort the whole vocabulary. On the demo models' rows, with the normaliser below:
    a drafting position's row 108 -> 95 us, a verification's 13 rows 0.93 -> 0.68 ms against sorting every row
    beyond 64. On a GPU every row sorts it: that is cheap there, and the host synchronisation that choosing takes
    is not.

    logits: [rows, vocab]; temperature, top_p: [rows] float; top_k: [rows] int64, 0 = no filter."""
    scaled, top_k = _tempered(logits, temperature, top_k)
    vocab = scaled.shape[-1]
    if scaled.is_cuda:
        return _scattered(scaled, *_from_candidates(scaled, vocab, top_k, top_p)[:2])
    ids, sorted_probs, exact = _from_candidates(scaled, min(CANDIDATES, vocab), top_k, top_p)
    probs = _scattered(scaled, ids, sorted_probs)
    if bool(exact.all()):
        return probs
    unfiltered = (top_k == vocab) & (top_p >= 1.0)
    probs[unfiltered] = torch.softmax(scaled[unfiltered], dim=-1)
    slow = (~exact & ~unfiltered).nonzero()[:, 0]
    for candidates in (min(CANDIDATES * WIDENING, vocab), vocab):
        if not slow.numel():
            break
        ids, sorted_probs, exact = _from_candidates(scaled[slow], candidates, top_k[slow], top_p[slow])
        probs[slow] = _scattered(scaled[slow], ids, sorted_probs)
        slow = slow[~exact]
    return probs


def proposal(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
             top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The distributions of `probabilities`, held on each row's likeliest tokens: ([rows, width] token ids, [rows,
    width] their probabilities, zero past the row's support), width CANDIDATES or WIDENING times as many where those
    hold every row's support, else the vocabulary (ids in order; rows without top-k or top-p are not sorted). A
    drafting position draws from this and reports it without laying the vocabulary out: one row with its draw took
    0.91x the time of `probabilities` and a draw over the vocabulary at 2,048 tokens, 0.74x at 32,000 and 0.66x at
    151,936 (T 0.8, top_p 0.95), 0.35-0.46x without top-k or top-p (the two interleaved, medians of 400, one thread,
    this CPU). Arguments as `probabilities`'."""
    tempered, bounded_top_k = _tempered(logits, temperature, top_k)
    vocab = tempered.shape[-1]

    def over_vocabulary(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.arange(vocab, device=probs.device).expand(probs.shape[0], vocab), probs
    if not tempered.is_cuda:
        unfiltered = (bounded_top_k == vocab) & (top_p >= 1.0)  # the support is the vocabulary
        if bool(unfiltered.all()):
            return over_vocabulary(torch.softmax(tempered, dim=-1))
        if not bool(unfiltered.any()):
            for width in (CANDIDATES, CANDIDATES * WIDENING):
                if width >= vocab:
                    break
                ids, sorted_probs, exact = _from_candidates(tempered, width, bounded_top_k, top_p)
                if bool(exact.all()):
                    return ids, sorted_probs
    return over_vocabulary(probabilities(logits, temperature, top_k, top_p))


def draw(ids: torch.Tensor, probs: torch.Tensor, uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of a `proposal` (ids, probs: [rows, width]) and its probability ([rows] each)."""
    index = sample(probs, uniforms)[:, None]
    return ids.gather(1, index)[:, 0], probs.gather(1, index)[:, 0]


def _tempered(logits: torch.Tensor, temperature: torch.Tensor,
              top_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, vocab] logits / temperature, and top_k in [1, vocab] (0: the vocabulary)."""
    vocab = logits.shape[-1]
    return logits.float() / temperature[:, None], torch.where(top_k > 0, top_k, vocab).clamp(max=vocab)


def _scattered(scaled: torch.Tensor, ids: torch.Tensor, sorted_probs: torch.Tensor) -> torch.Tensor:
    """[rows, vocab] the probabilities held on ids ([rows, c]) laid over the vocabulary."""
    return torch.zeros_like(scaled).scatter_(-1, ids, sorted_probs)


def _from_candidates(scaled: torch.Tensor, candidates: int, top_k: torch.Tensor,
                     top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's distribution from its `candidates` most likely tokens (the whole vocabulary sorted when that is
    all of it): ([rows, c] their ids, [rows, c] their probabilities), and [rows] whether that is exact: top-k keeps
    none beyond them, or top-p keeps only some of them."""
    vocab = scaled.shape[-1]
    if candidates >= vocab:
        values, ids = scaled.sort(dim=-1, descending=True)
        probs, _ = _truncated(scaled, values, top_k, top_p)
        return ids, probs, torch.ones(scaled.shape[0], dtype=torch.bool, device=scaled.device)
    values, ids = scaled.topk(candidates, dim=-1)
    probs, mass = _truncated(scaled, values, top_k, top_p)
    return ids, probs, (top_k <= candidates) | ((top_k == vocab) & (top_p < 1.0) & (mass >= top_p))


def _truncated(scaled: torch.Tensor, values: torch.Tensor, top_k: torch.Tensor,
               top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k then top-p over each row's c most likely tokens, which must hold its support where top_k < vocab:
    ([rows, c] their probabilities, [rows] the mass those c tokens have under the top-k distribution).
    scaled: [rows, vocab] tempered logits; values: [rows, c] its c largest in descending order; top_k: [rows] in
    [1, vocab]; top_p: [rows]."""
    candidates = values.shape[-1]
    outside = torch.arange(candidates, device=values.device) >= top_k[:, None]
    # exp relative to the row's largest logit, normalised over the top-k set: the candidates where it lies within
    # them, else (top_k = vocab) the whole vocabulary. Four ops, where softmax + logsumexp took 12.
    weights = (values - values[:, :1]).exp_().masked_fill_(outside, 0.0)
    total = weights.sum(-1)
    if candidates < scaled.shape[-1]:
        total = torch.where(top_k <= candidates, total, (scaled - values[:, :1]).exp_().sum(-1))
    sorted_probs = weights / total[:, None]
    mass = sorted_probs.cumsum(-1)
    # keep the smallest prefix whose mass reaches top_p (the token crossing the threshold stays)
    outside |= (mass - sorted_probs >= top_p[:, None]) & (top_p[:, None] < 1.0)
    sorted_probs = sorted_probs.masked_fill_(outside, 0.0)
    return sorted_probs / sorted_probs.sum(-1, keepdim=True), mass[:, -1]


def sample(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row of (unnormalised) probs by inverse CDF: uniforms [rows] in [0, 1) come from each
    request's own seeded generator, so a request's draws do not depend on what else is in the batch."""
    cdf = probs.double().cumsum(-1)
    index = (cdf < uniforms.double()[:, None] * cdf[:, -1:]).sum(-1)
    return index.clamp(max=probs.shape[-1] - 1)
