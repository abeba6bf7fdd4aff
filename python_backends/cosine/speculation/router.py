"""Routing a request to the drafters that know its domain.

Two signals. The prompt's likelihood under each drafter (mean token log-probability, computed while the drafters
prefill it anyway) says which domain the prompt looks like; it is a per-request preference worth up to
`likelihood_weight` of acceptance rate. Verification feedback says how often each drafter's top token is the
target's in each apparent domain (the drafter that found the prompt likeliest); it is a Beta posterior per
(domain, drafter), centred before any evidence on the domain's pooled rate so that scales stay comparable.

The first choice exploits: the best posterior mean plus preference. Exploration never risks it: a drafter whose
posterior sample (Thompson sampling) beats the first choice cooperates with it, drafting the same positions, so the
router learns how it compares at no more than a fused drafting step's cost. When the evidence is clear, samples stop
beating the first choice and drafting goes back to one drafter.

Scoring a prompt costs a call to every drafter (at c1 on two cores, 12 ms of a 164 ms request), so the router also
learns to predict the apparent domain from the prompt's tokens (PromptClassifier). Once those predictions have been
right, a request is routed from its tokens alone, its posterior standing in for the likelihood preference, and only
its chosen drafters ever see its prompt."""
from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass

import numpy as np


@dataclass
class Route:
    context: str  # apparent domain: the drafter that found the prompt most likely
    ranking: list[str]  # drafter names, first choice first, then cooperating explorers, then the rest
    cooperate: int  # how many of the ranking's head draft together
    acceptance: float  # the first choice's expected rate of drafting the target's token, per position


class PromptClassifier:
    """A prompt's apparent domain (the candidate drafter that finds it likeliest) predicted from its token ids:
    multinomial naive Bayes over the ids hashed into `features` buckets, learnt from the prompts the drafters scored.
    Trusted while its prequential accuracy (each scored prompt predicted before it is learnt) over the last `window`
    scored prompts, at least `min_scored` of them, reaches `min_accuracy`."""

    def __init__(self, contexts: list[str], features: int = 1 << 14, window: int = 64, min_scored: int = 32,
                 min_accuracy: float = 0.95, smoothing: float = 0.1):
        self.contexts, self.features, self.smoothing = list(contexts), features, smoothing
        self.min_scored, self.min_accuracy = min_scored, min_accuracy
        self.token_counts = np.zeros((len(contexts), features))  # [contexts, features] learnt token counts
        self.prompt_counts = np.zeros(len(contexts))  # [contexts] learnt prompts
        self.right = deque(maxlen=window)  # per recent scored prompt: was its prediction the scores' verdict

    @property
    def trusted(self) -> bool:
        return len(self.right) >= self.min_scored and sum(self.right) >= self.min_accuracy * len(self.right)

    def posterior(self, prompt_ids: list[int], candidates: list[str]) -> dict[str, float]:
        """P(apparent domain | the prompt's tokens) over the candidates."""
        buckets, counts = np.unique(np.asarray(prompt_ids, np.int64) % self.features, return_counts=True)
        rows = [self.contexts.index(name) for name in candidates]
        seen = self.token_counts[np.ix_(rows, buckets)]  # [candidates, the prompt's buckets]
        totals = self.token_counts.sum(1)[rows]  # [candidates]
        log_prior = np.log(self.prompt_counts[rows] + 1.0)
        log_likelihood = np.log(seen + self.smoothing) @ counts \
            - counts.sum() * np.log(totals + self.smoothing * self.features)
        log_posterior = log_prior + log_likelihood
        weights = np.exp(log_posterior - log_posterior.max())
        return dict(zip(candidates, (weights / weights.sum()).tolist()))

    def state(self) -> dict:
        """What it learnt, JSON-ready and keyed by drafter name: per context its prompt count and its non-zero
        token buckets (a prompt touches few of them), and the recent predictions' record."""
        learnt = {}
        for row, context in enumerate(self.contexts):
            buckets = np.flatnonzero(self.token_counts[row])
            learnt[context] = {"prompts": float(self.prompt_counts[row]), "buckets": buckets.tolist(),
                               "counts": self.token_counts[row, buckets].tolist()}
        return {"features": self.features, "learnt": learnt, "right": [bool(right) for right in self.right]}

    def restore(self, state: dict) -> None:
        """Takes back state(): nothing when it was learnt over another number of buckets; else the counts of the
        contexts it knows, and the record of predictions only when every context's came back (a changed deployment
        earns trust again)."""
        if state.get("features") != self.features:
            return
        learnt = state["learnt"]
        for row, context in enumerate(self.contexts):
            if context in learnt:
                self.prompt_counts[row] = learnt[context]["prompts"]
                self.token_counts[row, learnt[context]["buckets"]] = learnt[context]["counts"]
        if set(learnt) == set(self.contexts):
            self.right.extend(bool(right) for right in state["right"])

    def learn(self, prompt_ids: list[int], context: str, candidates: list[str]) -> None:
        """The drafters scored the prompt: `context` is their verdict among the candidates."""
        if self.prompt_counts.sum():
            posterior = self.posterior(prompt_ids, candidates)
            self.right.append(max(posterior, key=posterior.get) == context)
        row = self.contexts.index(context)
        np.add.at(self.token_counts[row], np.asarray(prompt_ids, np.int64) % self.features, 1.0)
        self.prompt_counts[row] += 1


class Router:
    """Routes among any subset of the deployment's drafters, in any order; all state is keyed by drafter name."""

    def __init__(self, drafters: list[str], likelihood_weight: float = 0.15, temperature: float = 0.5,
                 prior_trials: float = 4.0, trials_per_request: float = 16.0, check_every: int = 8,
                 min_confidence: float = 0.9, seed: int = 0):
        """check_every: a trusted classifier's requests are still scored one in this many, so that its accuracy
        stays measured; min_confidence: a prompt it is less sure of than this is scored."""
        self.drafters = list(drafters)
        self.classifier = PromptClassifier(self.drafters)
        self.check_every, self.min_confidence = check_every, min_confidence
        self.likelihood_weight = likelihood_weight
        self.temperature = temperature  # in standard deviations: softness of the likelihood preference
        self.prior_trials = prior_trials  # pseudo-trials of the pooled rate before a drafter's own evidence
        # A request's positions are correlated (same prompt, same drafter state): it counts for at most this many
        self.trials_per_request = trials_per_request
        self.rng = random.Random(seed)
        # context -> drafter -> [matches, trials] observed
        self.evidence = {context: {drafter: [0.0, 0.0] for drafter in drafters} for context in drafters}

    def _check(self, field: str, names) -> None:
        unknown = [name for name in names if name not in self.evidence]
        if unknown:
            raise ValueError(f"{field}: unknown drafter {unknown[0]!r}; the deployment has {', '.join(self.drafters)}")

    def preference(self, logprobs: dict[str, float]) -> dict[str, float]:
        """Softmax of standardised prompt log-likelihoods (standardised: the likeliest drafter stands out whatever
        the models' scale)."""
        values = list(logprobs.values())
        top, mean = max(values), sum(values) / len(values)
        spread = max(math.sqrt(sum((lp - mean) ** 2 for lp in values) / len(values)), 1e-6)
        weights = {d: math.exp((lp - top) / spread / self.temperature) for d, lp in logprobs.items()}
        total = sum(weights.values())
        return {d: w / total for d, w in weights.items()}

    def posterior(self, context: str, drafter: str) -> tuple[float, float]:
        cells = self.evidence[context]
        pooled = (1 + sum(m for m, _ in cells.values())) / (2 + sum(t for _, t in cells.values()))
        matches, trials = cells[drafter]
        return 1 + self.prior_trials * pooled + matches, 1 + self.prior_trials * (1 - pooled) + trials - matches

    def classify(self, prompt_ids: list[int], candidates: list[str], max_drafters: int) -> Route | None:
        """A route from the prompt's tokens alone, or None: the candidate drafters must score it first (the
        classifier is not trusted yet, is unsure of this prompt, or this request is one of its checks)."""
        if not candidates:
            raise ValueError("drafter_names: no drafter to route to")
        self._check("drafter_names", candidates)
        if not prompt_ids:
            raise ValueError("prompt_ids: empty")
        if not self.classifier.trusted or self.rng.random() < 1.0 / self.check_every:
            return None
        posterior = self.classifier.posterior(prompt_ids, candidates)
        context = max(posterior, key=posterior.get)
        return self._rank(context, posterior, max_drafters) if posterior[context] >= self.min_confidence else None

    def route(self, logprobs: dict[str, float], max_drafters: int, prompt_ids: list[int] | None = None) -> Route:
        """logprobs: the request's candidate drafters (any subset, any order) -> the prompt's mean log-probability;
        prompt_ids: the prompt they scored, for the classifier to learn (None: it learns nothing)."""
        if not logprobs:
            raise ValueError("prompt_logprobs: no drafter to route to")
        self._check("drafter_names", logprobs)
        context = max(logprobs, key=logprobs.get)
        if prompt_ids:
            self.classifier.learn(prompt_ids, context, list(logprobs))
        return self._rank(context, self.preference(logprobs), max_drafters)

    def _rank(self, context: str, preference: dict[str, float], max_drafters: int) -> Route:
        """preference: per candidate drafter, a weight (summing to 1) for how much the prompt looks its domain."""
        bonus = {d: self.likelihood_weight * p for d, p in preference.items()}
        posteriors = {d: self.posterior(context, d) for d in preference}
        exploit = {d: a / (a + b) + bonus[d] for d, (a, b) in posteriors.items()}
        first = max(exploit, key=exploit.get)
        explorers = []
        if max_drafters > 1:
            sampled = {d: self.rng.betavariate(a, b) + bonus[d] for d, (a, b) in posteriors.items() if d != first}
            explorers = sorted((d for d in sampled if sampled[d] > exploit[first]), key=lambda d: -sampled[d])
            explorers = explorers[:max_drafters - 1]
        rest = sorted((d for d in preference if d != first and d not in explorers), key=lambda d: -exploit[d])
        alpha, beta = posteriors[first]
        return Route(context, [first, *explorers, *rest], 1 + len(explorers), alpha / (alpha + beta))

    def state(self) -> dict:
        """What it learnt, JSON-ready: the feedback evidence and the prompt classifier."""
        return {"evidence": self.evidence, "classifier": self.classifier.state()}

    def restore(self, state: dict) -> None:
        """Takes back state() (e.g. read back from JSON) for the drafters this router knows; the rest is dropped
        (the deployment changed)."""
        classifier, evidence = state["classifier"], state["evidence"]  # a file missing either changes nothing
        self.classifier.restore(classifier)
        for context, cells in evidence.items():
            for drafter, (matches, trials) in cells.items():
                if drafter in self.evidence.get(context, {}):
                    self.evidence[context][drafter] = [float(matches), float(trials)]

    def feedback(self, context: str, drafter: str, matches: float, trials: float) -> None:
        """Verification outcome of a request: at `trials` verified positions, the drafter's top token was the
        target's `matches` times."""
        self._check("feedback", (context, drafter))
        if trials <= 0:
            raise ValueError(f"feedback: trials must be > 0, got {trials}")
        weight = min(1.0, self.trials_per_request / trials)
        cell = self.evidence[context][drafter]
        cell[0] += weight * min(matches, trials)
        cell[1] += weight * trials
