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


def probabilities(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                  top_p: torch.Tensor) -> torch.Tensor:
    """The distributions sampling draws from, one row per logits row with that row's parameters: temperature, then
    top-k, then top-p. Rows of greedy requests are not meant to come here (they compare argmaxes).
    Sorting the vocabulary is what costs on a CPU (2,048 logits: 0.13 ms a row). So the rows whose top-k / top-p
    support lies within their CANDIDATES most likely tokens (a top_k up to that, or a top_p those tokens reach: the
    usual case) are computed from those alone, and only the others sort the whole vocabulary (measured on the demo
    models' logits: 13 rows 1.23 -> 0.35-0.67 ms, 1 row 0.13 -> 0.08 ms, as a sampling drafter computes at every
    position). On a GPU every row sorts it: that is cheap there, and the host synchronisation that choosing takes
    is not.

    logits: [rows, vocab]; temperature, top_p: [rows] float; top_k: [rows] int64, 0 = no filter."""
    scaled = logits.float() / temperature[:, None]
    vocab = scaled.shape[-1]
    top_k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab)
    if scaled.is_cuda:
        return _truncated(scaled, *scaled.sort(dim=-1, descending=True), top_k, top_p)[0]
    candidates = min(CANDIDATES, vocab)
    probs, mass = _truncated(scaled, *scaled.topk(candidates, dim=-1), top_k, top_p)
    # exact where top-k keeps none beyond the candidates, or top-p keeps only some of them
    exact = (top_k <= candidates) | ((top_k == vocab) & (top_p < 1.0) & (mass >= top_p))
    if bool(exact.all()):
        return probs
    unfiltered = (top_k == vocab) & (top_p >= 1.0)
    probs[unfiltered] = torch.softmax(scaled[unfiltered], dim=-1)
    slow = (~exact & ~unfiltered).nonzero()[:, 0]
    rows = scaled[slow]
    probs[slow] = _truncated(rows, *rows.sort(dim=-1, descending=True), top_k[slow], top_p[slow])[0]
    return probs


def _truncated(scaled: torch.Tensor, values: torch.Tensor, ids: torch.Tensor, top_k: torch.Tensor,
               top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k then top-p over each row's c most likely tokens, which must hold its support where top_k < vocab,
    and the mass those c tokens have under the top-k distribution.
    scaled: [rows, vocab] tempered logits; values, ids: [rows, c] its c largest in descending order and their token
    ids; top_k: [rows] in [1, vocab]; top_p: [rows]."""
    candidates = values.shape[-1]
    outside = torch.arange(candidates, device=values.device) >= top_k[:, None]
    sorted_probs = torch.softmax(values.masked_fill(outside, float("-inf")), dim=-1)  # normalised over the top-k set,
    if candidates < scaled.shape[-1]:  # which, where it goes beyond the candidates, must be the whole vocabulary
        sorted_probs = torch.where((top_k <= candidates)[:, None], sorted_probs,
                                   torch.exp(values - torch.logsumexp(scaled, -1, keepdim=True)))
    mass = sorted_probs.cumsum(-1)
    # keep the smallest prefix whose mass reaches top_p (the token crossing the threshold stays)
    outside |= (mass - sorted_probs >= top_p[:, None]) & (top_p[:, None] < 1.0)
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    probs = torch.zeros_like(scaled).scatter(-1, ids, sorted_probs / sorted_probs.sum(-1, keepdim=True))
    return probs, mass[:, -1]


def sample(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row of (unnormalised) probs by inverse CDF: uniforms [rows] in [0, 1) come from each
    request's own seeded generator, so a request's draws do not depend on what else is in the batch."""
    cdf = probs.double().cumsum(-1)
    index = (cdf < uniforms.double()[:, None] * cdf[:, -1:]).sum(-1)
    return index.clamp(max=probs.shape[-1] - 1)
