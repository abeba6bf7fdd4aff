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


def probabilities(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                  top_p: torch.Tensor) -> torch.Tensor:
    """The distributions sampling draws from, one row per logits row with that row's parameters: temperature, then
    top-k, then top-p, all in one sorted order (no host synchronisation). Rows of greedy requests are not meant to
    come here (they compare argmaxes).

    logits: [rows, vocab]; temperature, top_p: [rows] float; top_k: [rows] int64, 0 = no filter."""
    vocab = logits.shape[-1]
    sorted_logits, order = (logits.float() / temperature[:, None]).sort(dim=-1, descending=True)
    kth = sorted_logits.gather(1, (torch.where(top_k > 0, top_k, vocab).clamp(max=vocab) - 1)[:, None])
    sorted_probs = torch.softmax(sorted_logits.masked_fill(sorted_logits < kth, float("-inf")), dim=-1)
    # keep the smallest prefix whose mass reaches top_p (the token crossing the threshold stays)
    outside = (sorted_probs.cumsum(-1) - sorted_probs >= top_p[:, None]) & (top_p[:, None] < 1.0)
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    sorted_probs = sorted_probs / sorted_probs.sum(-1, keepdim=True)
    return torch.zeros_like(sorted_probs).scatter(-1, order, sorted_probs)


def sample(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row of (unnormalised) probs by inverse CDF: uniforms [rows] in [0, 1) come from each
    request's own seeded generator, so a request's draws do not depend on what else is in the batch."""
    cdf = probs.double().cumsum(-1)
    index = (cdf < uniforms.double()[:, None] * cdf[:, -1:]).sum(-1)
    return index.clamp(max=probs.shape[-1] - 1)
