"""Adaptive speculation control: how many tokens to draft, per request and per moment.

Cost model. With per-token acceptance rate a, a draft of k tokens yields E(k) = (1 - a^(k+1)) / (1 - a) tokens per
round (accepted + the target's own). A round costs drafting, one call plus k drafter steps: t_draft = base + k * step,
plus verification; the verifier's batch holds every active request's tokens, so its time grows with load:
t_verify = base + per_token * load * (k + 1). Plain decoding (k = 0) runs several target steps per call, so its cost
per token is fitted apart from its own calls: t_plain = base + per_request * load.
The controller drafts the k in [0, k_max] that maximises tokens per second; k = 0 is plain decoding, which it falls
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
    draft_base: float = 0.0  # a drafting call, whatever its length
    # seconds per token of plain decoding = base + per_request * load; None before plain calls were measured (then:
    # one verification pass per token)
    plain: tuple[float, float] | None = None

    def round_time(self, k: int, load: float, tree_factor: float = 1.0) -> float:
        """Seconds of one round drafting k tokens; k = 0: of one plainly decoded token."""
        if not k and self.plain is not None:
            return self.plain[0] + self.plain[1] * load
        tokens_per_request = 1 + k * tree_factor
        drafting = self.draft_base + k * self.draft_per_token if k else 0.0
        return drafting + self.verify_base + self.verify_per_token * load * tokens_per_request

    def best_draft_length(self, acceptance: float, load: float, k_max: int, tree_factor: float = 1.0) -> int:
        rates = [expected_tokens(acceptance, k) / self.round_time(k, load, tree_factor) for k in range(k_max + 1)]
        return max(range(k_max + 1), key=lambda k: (rates[k], -k))


@dataclass
class AcceptanceTracker:
    """Per-token acceptance rate of one request, exponentially weighted over its recent rounds."""
    successes: float = 1.2  # prior: rate 0.6, worth two observations; speculate until evidence says otherwise
    trials: float = 2.0
    decay: float = 0.8

    @classmethod
    def starting_at(cls, rate: float) -> "AcceptanceTracker":
        """A prior worth two observations at a rate known beforehand (the router's estimate for the drafter)."""
        rate = min(max(rate, 0.05), 0.95)
        return cls(successes=2 * rate, trials=2.0)

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


class LinearFit:
    """y = base + slope * x by least squares with exponential forgetting; base and slope kept non-negative."""

    def __init__(self, forgetting: float):
        self.forgetting = forgetting
        self.sums = [0.0] * 5  # n, sum x, sum y, sum x*x, sum x*y

    def observe(self, x: float, y: float) -> None:
        for i, value in enumerate((1.0, x, y, x * x, x * y)):
            self.sums[i] = self.forgetting * self.sums[i] + value

    def fitted(self) -> tuple[float, float] | None:
        """(base, slope), or None before three observations."""
        n, sx, sy, sxx, sxy = self.sums
        if n < 3:
            return None
        variance = n * sxx - sx * sx
        slope = max((n * sxy - sx * sy) / variance if variance > 1e-9 else 0.0, 0.0)
        return max((sy - slope * sx) / n, 0.0), slope


class LoadMonitor:
    """Deployment-wide costs, fitted online: verification latency against the verifier's load in tokens, plain
    decoding's time per token against the number of active requests, and drafting time against draft length (apart
    for cooperating drafters, which make a call per position); how many requests are active; and what rounds really
    delivered, speculative and plain, per load."""

    def __init__(self, forgetting: float = 0.98, smoothing: float = 0.05, probe_every: int = 32,
                 start_evidence_rounds: int = 16):
        self.smoothing = smoothing
        self.start_evidence_rounds = start_evidence_rounds
        self.verify_fit = LinearFit(forgetting)
        self.plain_fit = LinearFit(forgetting)
        self.draft_fits = {fused: LinearFit(forgetting) for fused in (False, True)}
        self.active_requests = 0
        self.probe_every = probe_every
        self.plain_starts = 0
        # (speculative?, load bucket) -> [measured tokens per second of a request's round, rounds measured]
        self.round_rates: dict[tuple[bool, int], list[float]] = {}

    def load_bucket(self) -> int:
        return min(self.active_requests, 32).bit_length()  # 0, 1, 2-3, 4-7, ...: rounds under similar load

    def observe_round(self, speculative: bool, tokens: int, seconds: float) -> None:
        """What a round really delivered, drafting, queueing and verification included."""
        key = (speculative, self.load_bucket())
        rate = tokens / max(seconds, 1e-6)
        # a plain mean over the first 1/smoothing rounds, then exponential: one slow first round (a cold process)
        # must not keep speculation off for long
        entry = self.round_rates.setdefault(key, [0.0, 0])
        entry[1] += 1
        entry[0] += (rate - entry[0]) * max(self.smoothing, 1 / entry[1])

    def speculation_pays(self, min_rounds: int = 1) -> bool:
        """False once measurements at the current load (at least min_rounds of each kind) show speculative rounds
        delivering tokens slower than plain ones: whatever the cost model says, requests then decode plainly (and
        keep probing)."""
        bucket = self.load_bucket()
        speculative, plain = self.round_rates.get((True, bucket)), self.round_rates.get((False, bucket))
        return (speculative is None or plain is None or min(speculative[1], plain[1]) < min_rounds
                or speculative[0] >= plain[0])

    def start_speculating(self) -> bool:
        """At a request's start: False where speculative rounds are measured slower than plain ones at this load,
        over enough rounds that a cold process's first slow rounds do not decide; the request then decodes plainly
        from the start, and its drafters do not even score the prompt (a prefill for each of them). One such request
        in probe_every speculates anyway, so the measurements follow the load."""
        if self.speculation_pays(min_rounds=self.start_evidence_rounds):
            return True
        self.plain_starts += 1
        return self.plain_starts % self.probe_every == 0

    def observe_verify(self, tokens_in_flight: float, seconds: float) -> None:
        self.verify_fit.observe(tokens_in_flight, seconds)

    def observe_plain(self, seconds_per_token: float) -> None:
        """A plain decoding call (several steps) under the current load."""
        self.plain_fit.observe(self.active_requests, seconds_per_token)

    def observe_draft(self, positions: int, seconds: float, fused: bool = False) -> None:
        """One round's drafting of `positions` tokens: by a lone drafter, or fused across cooperating drafters."""
        self.draft_fits[fused].observe(positions, seconds)

    def costs(self, fused: bool = False) -> CostModel | None:
        """The cost model for lone or fused drafting; None until verification and that drafting are measured."""
        verify, draft = self.verify_fit.fitted(), self.draft_fits[fused].fitted()
        if verify is None or draft is None:
            return None
        return CostModel(verify_base=verify[0], verify_per_token=verify[1], draft_per_token=draft[1],
                         draft_base=draft[0], plain=self.plain_fit.fitted())


class SpeculationController:
    """Decides k for one request's next round from its acceptance and the deployment's load."""

    def __init__(self, k_max: int, adaptive: bool = True, probe_every: int = 8):
        self.k_max, self.adaptive = k_max, adaptive  # not adaptive: always k_max (the ablation)
        self.acceptance = AcceptanceTracker()
        self.probe_every = probe_every
        self.plain_rounds = 0

    def draft_length(self, costs: CostModel | None, load: float, tree_factor: float = 1.0,
                     speculation_pays: bool = True) -> int:
        if costs is None or not self.adaptive:  # nothing measured yet: speculate at full length
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
