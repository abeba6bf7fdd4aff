"""Adaptive speculation control: how many tokens to draft, per request and per moment.

Cost model. With per-token acceptance rate a, a draft of k tokens yields E(k) = (1 - a^(k+1)) / (1 - a) tokens per
round (accepted + the target's own). A round costs drafting, k * t_draft, plus verification; the verifier's batch
holds every active request's tokens, so its time grows with load: t_verify = base + per_token * load * (k + 1).
The controller drafts the k in [0, k_max] that maximises E(k) / round time; k = 0 is plain decoding, which it falls
back to when the verifier is saturated or acceptance is poor, so speculation never costs more than it brings."""
from __future__ import annotations

from dataclasses import dataclass


def expected_tokens(acceptance: float, k: int) -> float:
    if k == 0:
        return 1.0
    if acceptance >= 1.0:
        return k + 1.0
    return (1.0 - acceptance ** (k + 1)) / (1.0 - acceptance)


@dataclass
class CostModel:
    """Seconds; estimated online from what the deployment measures (see LoadMonitor)."""
    verify_base: float  # a verification pass, whatever its size
    verify_per_token: float  # each token in the verifier's batch
    draft_per_token: float  # one drafting step (drafters of a request run in parallel)

    def round_time(self, k: int, load: float, tree_factor: float = 1.0) -> float:
        tokens_per_request = 1 + k * tree_factor
        return k * self.draft_per_token + self.verify_base + self.verify_per_token * load * tokens_per_request

    def best_draft_length(self, acceptance: float, load: float, k_max: int, tree_factor: float = 1.0) -> int:
        rates = [expected_tokens(acceptance, k) / self.round_time(k, load, tree_factor) for k in range(k_max + 1)]
        return max(range(k_max + 1), key=lambda k: (rates[k], -k))


@dataclass
class AcceptanceTracker:
    """Per-token acceptance rate of one request, exponentially weighted over its recent rounds."""
    successes: float = 1.2  # prior: rate 0.6, worth two observations; speculate until evidence says otherwise
    trials: float = 2.0
    decay: float = 0.8

    @property
    def rate(self) -> float:
        return self.successes / self.trials

    def observe(self, depth: int, accepted: int) -> None:
        """A round drafted `depth` positions and `accepted` of them passed: each passed position is a success,
        the first rejected one (if any) a failure; positions after it were never tried."""
        if depth <= 0:
            return
        self.successes = self.decay * self.successes + accepted
        self.trials = self.decay * self.trials + accepted + (accepted < depth)


class LoadMonitor:
    """The deployment-wide verification cost, fitted online: latency against the verifier's load in tokens (least
    squares with exponential forgetting); and how many requests are active."""

    def __init__(self, forgetting: float = 0.98, smoothing: float = 0.05):
        self.forgetting, self.smoothing = forgetting, smoothing
        self.sums = [0.0] * 5  # n, sum x, sum y, sum x*x, sum x*y  (x = tokens in flight, y = seconds)
        self.active_requests = 0
        # (speculative?, load bucket) -> measured tokens per second of a request's round
        self.round_rates: dict[tuple[bool, int], float] = {}

    def load_bucket(self) -> int:
        return min(self.active_requests, 32).bit_length()  # 0, 1, 2-3, 4-7, ...: rounds under similar load

    def observe_round(self, speculative: bool, tokens: int, seconds: float) -> None:
        """What a round really delivered, drafting, queueing and verification included."""
        key = (speculative, self.load_bucket())
        rate = tokens / max(seconds, 1e-6)
        old = self.round_rates.get(key)
        self.round_rates[key] = rate if old is None else old + self.smoothing * (rate - old)

    def speculation_pays(self) -> bool:
        """False once measurements at the current load show speculative rounds delivering tokens slower than plain
        ones: whatever the cost model says, requests then decode plainly (and keep probing)."""
        bucket = self.load_bucket()
        speculative, plain = self.round_rates.get((True, bucket)), self.round_rates.get((False, bucket))
        return speculative is None or plain is None or speculative >= plain

    def observe_verify(self, tokens_in_flight: float, seconds: float) -> None:
        f = self.forgetting
        for i, value in enumerate((1.0, tokens_in_flight, seconds, tokens_in_flight ** 2, tokens_in_flight * seconds)):
            self.sums[i] = f * self.sums[i] + value

    def costs(self, draft_per_token: float | None) -> CostModel | None:
        """The cost model, given what drafting one position costs the caller; None until both are measured."""
        n, sx, sy, sxx, sxy = self.sums
        if n < 3 or draft_per_token is None:
            return None
        variance = n * sxx - sx * sx
        slope = (n * sxy - sx * sy) / variance if variance > 1e-9 else 0.0
        slope = max(slope, 0.0)
        base = max((sy - slope * sx) / n, 0.0)
        return CostModel(verify_base=base, verify_per_token=slope, draft_per_token=draft_per_token)


class SpeculationController:
    """Decides k for one request's next round from its acceptance and the deployment's load."""

    def __init__(self, k_max: int, probe_every: int = 8):
        self.k_max = k_max
        self.acceptance = AcceptanceTracker()
        self.probe_every = probe_every
        self.plain_rounds = 0

    def draft_length(self, costs: CostModel | None, load: float, tree_factor: float = 1.0,
                     speculation_pays: bool = True) -> int:
        if costs is None:  # nothing measured yet: speculate at full length
            return self.k_max
        k = costs.best_draft_length(self.acceptance.rate, load, self.k_max, tree_factor)
        if k == 0 or not speculation_pays:
            # plain decoding learns nothing about acceptance or speed: probe now and then, at the length the
            # model would choose (so the measured speed is that of real speculation)
            self.plain_rounds += 1
            if self.plain_rounds % self.probe_every:
                return 0
            return max(k, 1)
        return k

    def observe(self, depth: int, accepted: int) -> None:
        self.acceptance.observe(depth, accepted)
