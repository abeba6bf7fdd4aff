"""Routing a request to the drafters that know its domain.

Prior: how likely each drafter finds the prompt (mean token log-probability, computed by the drafters while they
prefill it anyway). Evidence: how often each drafter's top token matched what the target verified, kept per apparent
domain (the drafter that found the prompt most likely). Thompson sampling over Beta posteriors balances exploring
drafters against exploiting the best one; runners-up whose sampled rate is close to the best's cooperate."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass


@dataclass
class Route:
    context: int  # apparent domain: index of the drafter that found the prompt most likely
    ranking: list[int]  # drafter indices, best first
    cooperate: int  # how many of the ranking's head draft together


class Router:
    def __init__(self, num_drafters: int, prior_strength: float = 16.0, temperature: float = 0.5,
                 cooperation_margin: float = 0.03, seed: int = 0):
        self.num_drafters = num_drafters
        self.prior_strength = prior_strength  # pseudo-trials the likelihood prior is worth
        self.temperature = temperature  # in standard deviations: softness of the likelihood prior
        self.cooperation_margin = cooperation_margin
        self.rng = random.Random(seed)
        # (context, drafter) -> [matches, trials] observed
        self.evidence = [[[0.0, 0.0] for _ in range(num_drafters)] for _ in range(num_drafters)]

    def prior(self, logprobs: list[float]) -> list[float]:
        """Prior acceptance rate per drafter: 0.2..0.8 by the softmax of standardised prompt log-likelihoods
        (standardised, so the likeliest drafter stands out whatever the models' scale)."""
        top = max(logprobs)
        mean = sum(logprobs) / len(logprobs)
        spread = max(math.sqrt(sum((lp - mean) ** 2 for lp in logprobs) / len(logprobs)), 1e-6)
        weights = [math.exp((lp - top) / spread / self.temperature) for lp in logprobs]
        total = sum(weights)
        return [0.2 + 0.6 * w / total for w in weights]

    def route(self, logprobs: list[float], max_drafters: int, explore: bool = True) -> Route:
        if len(logprobs) != self.num_drafters:
            raise ValueError(f"prompt_logprobs: expected {self.num_drafters} values, got {len(logprobs)}")
        context = max(range(self.num_drafters), key=lambda d: logprobs[d])
        scores = []
        for drafter, prior in enumerate(self.prior(logprobs)):
            matches, trials = self.evidence[context][drafter]
            alpha = 1 + self.prior_strength * prior + matches
            beta = 1 + self.prior_strength * (1 - prior) + trials - matches
            scores.append(self.rng.betavariate(alpha, beta) if explore else alpha / (alpha + beta))
        ranking = sorted(range(self.num_drafters), key=lambda d: -scores[d])
        best = scores[ranking[0]]
        cooperate = sum(1 for d in ranking[:max(1, max_drafters)] if scores[d] >= best - self.cooperation_margin)
        return Route(context, ranking, max(1, cooperate))

    def feedback(self, context: int, drafter: int, matches: float, trials: float) -> None:
        """Verification outcome of a request: at `trials` verified positions, the drafter's top token was the
        target's `matches` times."""
        if not (0 <= context < self.num_drafters and 0 <= drafter < self.num_drafters) or trials <= 0:
            raise ValueError(f"feedback: context {context} / drafter {drafter} / trials {trials} out of range")
        cell = self.evidence[context][drafter]
        cell[0] += min(matches, trials)
        cell[1] += trials
