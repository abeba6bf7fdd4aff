"""Routing a request to the drafters that know its domain.

Two signals. The prompt's likelihood under each drafter (mean token log-probability, computed while the drafters
prefill it anyway) says which domain the prompt looks like; it is a per-request preference worth up to
`likelihood_weight` of acceptance rate. Verification feedback says how often each drafter's top token is the
target's in each apparent domain (the drafter that found the prompt likeliest); it is a Beta posterior per
(domain, drafter), centred before any evidence on the domain's pooled rate so that scales stay comparable.

The first choice exploits: the best posterior mean plus preference. Exploration never risks it: a drafter whose
posterior sample (Thompson sampling) beats the first choice cooperates with it, drafting the same positions, so the
router learns how it compares at no more than a fused drafting step's cost. When the evidence is clear, samples stop
beating the first choice and drafting goes back to one drafter."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass


@dataclass
class Route:
    context: int  # apparent domain: index of the drafter that found the prompt most likely
    ranking: list[int]  # drafter indices, first choice first, then cooperating explorers
    cooperate: int  # how many of the ranking's head draft together
    acceptance: float  # the first choice's expected rate of drafting the target's token, per position


class Router:
    def __init__(self, num_drafters: int, likelihood_weight: float = 0.15, temperature: float = 0.5,
                 prior_trials: float = 4.0, trials_per_request: float = 16.0, seed: int = 0):
        self.num_drafters = num_drafters
        self.likelihood_weight = likelihood_weight
        self.temperature = temperature  # in standard deviations: softness of the likelihood preference
        self.prior_trials = prior_trials  # pseudo-trials of the pooled rate before a drafter's own evidence
        # A request's positions are correlated (same prompt, same drafter state): it counts for at most this many
        self.trials_per_request = trials_per_request
        self.rng = random.Random(seed)
        # (context, drafter) -> [matches, trials] observed
        self.evidence = [[[0.0, 0.0] for _ in range(num_drafters)] for _ in range(num_drafters)]

    def preference(self, logprobs: list[float]) -> list[float]:
        """Softmax of standardised prompt log-likelihoods (standardised: the likeliest drafter stands out whatever
        the models' scale)."""
        top = max(logprobs)
        mean = sum(logprobs) / len(logprobs)
        spread = max(math.sqrt(sum((lp - mean) ** 2 for lp in logprobs) / len(logprobs)), 1e-6)
        weights = [math.exp((lp - top) / spread / self.temperature) for lp in logprobs]
        total = sum(weights)
        return [w / total for w in weights]

    def posterior(self, context: int, drafter: int) -> tuple[float, float]:
        cells = self.evidence[context]
        pooled = (1 + sum(m for m, _ in cells)) / (2 + sum(t for _, t in cells))
        matches, trials = cells[drafter]
        return 1 + self.prior_trials * pooled + matches, 1 + self.prior_trials * (1 - pooled) + trials - matches

    def route(self, logprobs: list[float], max_drafters: int) -> Route:
        if len(logprobs) != self.num_drafters:
            raise ValueError(f"prompt_logprobs: expected {self.num_drafters} values, got {len(logprobs)}")
        context = max(range(self.num_drafters), key=lambda d: logprobs[d])
        bonus = [self.likelihood_weight * p for p in self.preference(logprobs)]
        posteriors = [self.posterior(context, d) for d in range(self.num_drafters)]
        exploit = [a / (a + b) + bonus[d] for d, (a, b) in enumerate(posteriors)]
        first = max(range(self.num_drafters), key=lambda d: exploit[d])
        explorers = []
        if max_drafters > 1:
            sampled = {d: self.rng.betavariate(a, b) + bonus[d] for d, (a, b) in enumerate(posteriors) if d != first}
            explorers = sorted((d for d in sampled if sampled[d] > exploit[first]), key=lambda d: -sampled[d])
            explorers = explorers[:max_drafters - 1]
        rest = sorted((d for d in range(self.num_drafters) if d != first and d not in explorers),
                      key=lambda d: -exploit[d])
        alpha, beta = posteriors[first]
        return Route(context, [first, *explorers, *rest], 1 + len(explorers), alpha / (alpha + beta))

    def feedback(self, context: int, drafter: int, matches: float, trials: float) -> None:
        """Verification outcome of a request: at `trials` verified positions, the drafter's top token was the
        target's `matches` times."""
        if not (0 <= context < self.num_drafters and 0 <= drafter < self.num_drafters) or trials <= 0:
            raise ValueError(f"feedback: context {context} / drafter {drafter} / trials {trials} out of range")
        weight = min(1.0, self.trials_per_request / trials)
        cell = self.evidence[context][drafter]
        cell[0] += weight * min(matches, trials)
        cell[1] += weight * trials
