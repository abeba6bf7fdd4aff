"""Adaptive speculation control: how many tokens to draft, per request and per moment.

Cost model. With per-token acceptance rate a, a draft of k tokens yields E(k) = (1 - a^(k+1)) / (1 - a) tokens per
round (accepted + the target's own). A round costs drafting, one call plus k drafter steps, slower with load (other
requests' drafting shares the drafters and cores): t_draft = base + k * step + per_request * load, plus
verification; the verifier's batch holds every active request's sequence and tokens, so its time grows with load:
t_verify = base + per_sequence * load + per_token * load * (k + 1). The two are fitted apart because they differ: a
sequence costs its K/V gathered and its attention, a token mostly its share of the matmuls (measured in-process on
the demo target, 1-32 sequences: about 14 ms a pass, 0.65 ms per sequence, 0.27 ms per token); one slope for both
charges every token a share of the sequences' cost, so drafts look dearer under load than they are.
Plain decoding (k = 0) runs several target steps per call, so its cost per token is fitted apart from its own
calls: t_plain = base + per_request * load. Both calls are timed from the end of the request's previous call, so
what happens between calls counts for both (serving.generation._round).
The controller drafts the k in [0, k_max] that maximises tokens per second; k = 0 is plain decoding, which it falls
back to when the verifier is saturated or acceptance is poor. What the cost model cannot see (drafters slowing the
target for every request) SpeculationWindows measures: speculation is allowed only where it pays the deployment."""
from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import numpy as np


FIXED_DRAFT_TOKENS = 4  # vanilla's and specinfer's draft length unless a request names one
# cosine's ceiling: its controller picks each round's length below it. 8 bound at c1 on the demo zoo (most rounds
# drafted 8); measured against 8 in one run: 12 +5% greedy, +8% sampled; 16 +2% and +12%
ADAPTIVE_DRAFT_TOKENS = 12


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
    draft_per_request: float = 0.0  # each active request (its drafting calls share the drafters and the cores)
    # seconds per token of plain decoding = base + per_request * load; None before plain calls were measured (then:
    # one verification pass per token)
    plain: tuple[float, float] | None = None
    verify_per_sequence: float = 0.0  # each sequence in the verifier's batch

    def round_time(self, k: int, load: float) -> float:
        """Seconds of one round drafting a chain of k tokens; k = 0: of one plainly decoded token. A draft's sibling
        branches are not counted: each is hung only where its chance of acceptance pays its verifier token
        (FusionProposer._sibling_price), so they never make a depth worth less than the chain makes it."""
        if not k and self.plain is not None:
            return self.plain[0] + self.plain[1] * load
        return (self.drafting(k, load) + self.verify_base + self.verify_per_sequence * load
                + self.verify_per_token * load * (1 + k))

    def drafting(self, k: int, load: float) -> float:
        """Seconds of one round's drafting call for k tokens (none for k = 0)."""
        return self.draft_base + k * self.draft_per_token + self.draft_per_request * load if k else 0.0

    def best_draft_length(self, acceptance: float, load: float, k_max: int) -> int:
        rates = [expected_tokens(acceptance, k) / self.round_time(k, load) for k in range(k_max + 1)]
        return max(range(k_max + 1), key=lambda k: (rates[k], -k))


@dataclass
class AcceptanceTracker:
    """Per-token acceptance rate of one request: its recent rounds (exponentially weighted) shrunk towards a prior
    that does not decay. Without that anchor, two unlucky rounds of a good drafter read as a poor one, the request
    turns to plain decoding and its one-token probes hardly move the estimate back (measured at c1: the adaptive
    controller then accepted 2.3-2.7 tokens per round where a fixed k of 6 accepted 3.8, and was 10-20% slower)."""
    prior_rate: float = 0.6  # speculate until evidence says otherwise
    prior_trials: float = 2.0
    decay: float = 0.9  # about ten rounds of memory
    successes: float = 0.0
    trials: float = 0.0

    @classmethod
    def starting_at(cls, rate: float, trials: float = 4.0) -> "AcceptanceTracker":
        """A prior worth `trials` positions at a rate known beforehand (the router's estimate for the drafter)."""
        return cls(prior_rate=min(max(rate, 0.05), 0.95), prior_trials=trials)

    @property
    def rate(self) -> float:
        return (self.successes + self.prior_rate * self.prior_trials) / (self.trials + self.prior_trials)

    @property
    def optimistic_rate(self) -> float:
        """The rate plus one standard error: while evidence is thin, a request drafts and so gathers it, instead of
        decoding plainly on a guess (a plain round teaches nothing about acceptance)."""
        rate = self.rate
        return min(rate + math.sqrt(rate * (1 - rate) / (self.trials + self.prior_trials)), 0.99)

    def observe(self, depth: int, accepted: int) -> None:
        """A round drafted `depth` positions and `accepted` of them passed: each passed position is a success,
        the first rejected one (if any) a failure; positions after it were never tried."""
        if depth <= 0:
            return
        self.successes = self.decay * self.successes + accepted
        self.trials = self.decay * self.trials + accepted + (accepted < depth)


class LinearFit:
    """y = base + slopes . x by least squares with exponential forgetting (x: `regressors` values); base and slopes
    kept non-negative (a slope the data would make negative is fixed at 0 and the rest refitted).

    Every round reads the fit and adds an observation. Solving takes about 35 us; solved on every read, it took 2.5%
    of the `cosine` process's busy samples at c8, solved every 8 observations 1.1% (py-spy, 15 s of fixed-k-4 cosine,
    sessions 34 and 35). Forgetting keeps about 1 / (1 - forgetting) observations (50): a fit lagging fewer than
    `refit_every` of them behind differs little."""

    def __init__(self, forgetting: float, regressors: int = 1, refit_every: int = 8):
        self.forgetting, self.refit_every = forgetting, refit_every
        self.gram = np.zeros((regressors + 1, regressors + 1))  # sums of v v^T, v = (1, x)
        self.moments = np.zeros(regressors + 1)  # sums of y v
        self.fit: tuple[float, ...] | None = None
        self.unfitted = 0  # observations since the fit was solved

    def observe(self, x: float | tuple[float, ...], y: float) -> None:
        v = np.array([1.0, *np.atleast_1d(x)])
        self.gram = self.forgetting * self.gram + np.outer(v, v)
        self.moments = self.forgetting * self.moments + y * v
        self.unfitted += 1

    def fitted(self) -> tuple[float, ...] | None:
        """(base, *slopes), or None before 3 observations, and 2 more than the regressors that varied."""
        if self.unfitted and (self.fit is None or self.unfitted >= self.refit_every):
            self.fit, self.unfitted = self._solve(), 0
        return self.fit

    def _solve(self) -> tuple[float, ...] | None:
        count = self.gram[0, 0]
        squares = count * np.diag(self.gram)[1:]  # count * sum(x^2); minus sum(x)^2: count^2 * variance of x
        varied = np.count_nonzero(squares - self.gram[0, 1:] ** 2 > 1e-9 * squares)
        if count < 2 + max(1, varied):
            return None
        # a regressor that does not vary (one sequence per pass at c1) says nothing: a tiny ridge on the slopes
        # leaves its share in the base instead of splitting it arbitrarily
        ridge = np.diag([0.0, *(1e-9 * (count + np.diag(self.gram)[1:]))])
        free = list(range(len(self.moments)))
        while True:
            solution = np.linalg.lstsq((self.gram + ridge)[np.ix_(free, free)], self.moments[free], rcond=None)[0]
            negative = [i for i, value in zip(free[1:], solution[1:]) if value < 0]
            if not negative:
                break
            free.remove(negative[0])
        coefficients = np.zeros(len(self.moments))
        coefficients[free] = solution
        return (max(coefficients[0], 0.0), *coefficients[1:].tolist())


@dataclass
class WindowRates:
    """One kind of window (speculation allowed or forbidden) at one load: what its windows measured."""
    rate: float = 0.0  # output tokens per busy second, smoothed
    windows: int = 0
    variance: float = 0.0  # of one window's rate about `rate`, smoothed alike

    def observe(self, rate: float, smoothing: float) -> None:
        self.windows += 1
        weight = max(smoothing, 1 / self.windows)
        deviation = rate - self.rate
        self.rate += weight * deviation
        self.variance = (1 - weight) * (self.variance + weight * deviation ** 2)


class SpeculationWindows:
    """Whether speculation pays the deployment, by experiment. Time is cut into windows: in some, adaptive requests
    may speculate; in the others none drafts (drafters neither prefill nor draft). Where both kinds have min_windows
    measurements at the current load (output tokens per busy second over the time a window spent at that load, the
    load it spent most at), windows speculate where speculation was measured faster by more than the windows' noise
    (`confidence` standard errors of the difference, see _error), else decode plainly; one in explore_every of the
    windows measured at that load does the opposite, so the verdict follows the load (a load met for the first time
    waits a whole period before exploring); where the kinds differ widely, exploring is rarer, so that it costs at
    most exploring_cost of the output (the gap over the period between exploring windows, at most
    max_exploring_period: at c1, plain windows one in eight cost cosine 5-8%). At a load not measured yet, the
    nearest lower load measured decides unless speculation paid there clearly (a verdict: faster by decisive_gap or
    more, and by more than the noise; and a higher one where it clearly paid); else the cost model's prediction goes
    first and windows of both kinds follow until each is measured.
    A window's kind is chosen when the one before closes, for the load of that moment; a window stops speculating as
    soon as its load rises to one that would not (one that stops after its first `settling` of busy time is not
    measured).
    Windows are long enough to average over requests' starts (prefill bursts) on a closed-loop load.
    A window counts every request's tokens, but only while some request follows the windows (adaptive cosine):
    without one, allowed and forbidden windows would measure the same thing.

    Why the whole deployment's throughput and not each request's rounds: a speculating request's drafters take
    processor time from the target, which slows every request in its batch; only the deployment's output sees that
    (measured on two shared cores: per-request round rates kept cosine at 0.85-0.93x plain decoding at c8)."""

    def __init__(self, active_requests: Callable[[], int], adaptive_requests: Callable[[], int],
                 predicted: Callable[[int], bool] = lambda load: True, seconds: float = 3.0, explore_every: int = 8,
                 exploring_cost: float = 0.02, max_exploring_period: int = 32, min_windows: int = 2,
                 decisive_gap: float = 0.1, smoothing: float = 0.25, settling: float = 0.1,
                 confidence: float = 2.0, min_spread: float = 0.03,
                 on_change: Callable[[bool], None] = lambda on: None,
                 on_measured: Callable[[bool, int, float], None] = lambda speculating, bucket, rate: None,
                 clock: Callable[[], float] = time.monotonic):
        """predicted(load): whether the cost model expects speculation to pay with `load` requests active.
        on_measured(speculating, load bucket, rate): a window was measured; rate is that kind's smoothed rate there."""
        self.active_requests, self.adaptive_requests, self.predicted = active_requests, adaptive_requests, predicted
        self.clock, self.on_change, self.on_measured = clock, on_change, on_measured
        self.seconds, self.explore_every = seconds, explore_every
        self.exploring_cost, self.max_exploring_period = exploring_cost, max_exploring_period
        self.min_windows, self.decisive_gap, self.smoothing = min_windows, decisive_gap, smoothing
        self.settling = settling  # the share of a window's length that its load settles in (see _settle)
        self.confidence, self.min_spread = confidence, min_spread  # see _error
        self.allowed = True
        # per load bucket, how many windows had measured there when one last went against the verdict: the exploring
        # cadence of a load counts the windows measured at that load only, so a new load waits a whole period
        self.last_exploring: dict[int, int] = {}
        self.rates: dict[tuple[bool, int], WindowRates] = {}  # by (speculation allowed?, load bucket)
        self.plan: tuple[int, int | None] = (0, None)  # the open window's (load bucket, exploring at) (_next_allowed)
        self._open(clock())

    @staticmethod
    def load_bucket(load: float) -> int:
        """Powers of two of the mean number of active requests, each bucket centred on one (c8: 5.7 to 11.3)."""
        return min(round(math.log2(max(load, 1.0))), 6)

    def _open(self, now: float) -> None:
        self.started = self.last_event = now
        self.at_load: dict[int, list[float]] = {}  # load bucket -> [tokens, busy seconds] spent at that load
        self.highest = self.plan[0]  # the highest load bucket the window was checked for (see _settle)
        self.mixed = False  # stopped speculating after settling: it held both kinds

    @property
    def busy_s(self) -> float:
        """Seconds of the open window with an adaptive request active."""
        return sum(seconds for _, seconds in self.at_load.values())

    def advance(self, tokens: int = 0) -> None:
        """Call with the tokens emitted since the last call, before the number of active requests changes, and
        whenever the window is read."""
        now = self.clock()
        elapsed = now - self.last_event
        if self.allowed:
            self._settle(self.active_requests())
        if self.adaptive_requests():
            spent = self.at_load.setdefault(self.load_bucket(self.active_requests()), [0, 0.0])
            spent[0] += tokens
            spent[1] += elapsed
        self.last_event = now
        if now - self.started >= self.seconds:
            self._close(now)

    def _close(self, now: float) -> None:
        # a window busy for less than half its length (or busy with requests of other modes only) says nothing,
        # and does not bring exploring closer: else the first adaptive requests after a while of other modes would
        # always meet an exploring window (measured: the bench's first cosine segment after vanilla's decoded 3 of
        # 24 requests plainly, every time). Its busy time counts, not the idle time after it: a window closes at the
        # first event after its length, and a burst followed by a pause was lost (the bench's c64 bursts of 3 s,
        # each followed by other modes: no window counted, so cosine drafted through both at 0.87x plain decoding).
        # It measures the load it spent most of that time at, from that time only: a burst's ramp holds its requests'
        # prefills and its draining its last few requests, and the kind whose window got either measured low (a
        # window log, session 22: c32's plain window got the ramp, 998 tokens per busy second, its speculating one
        # the draining, 1,108; drafting at c32, the bench then made 0.88x plain decoding)
        bucket, (tokens, busy_s) = max(self.at_load.items(), key=lambda spent: spent[1][1], default=(0, (0, 0.0)))
        measured_at = bucket if tokens and busy_s >= 0.5 * self.seconds and not self.mixed else None
        if measured_at is not None:
            measured = self.rates.setdefault((self.allowed, bucket), WindowRates())
            measured.observe(tokens / busy_s, self.smoothing)
            self.on_measured(self.allowed, bucket, measured.rate)
        bucket, exploring_at = self.plan
        # the window that went against the verdict explored only if it measured its load: one that a pause took
        # (idle, or other modes' requests) explores again; counted as done, a bench's exploring windows all fell
        # between a variant's segments (docs/history.md, session 25)
        if exploring_at is not None and measured_at == bucket:
            self.last_exploring[bucket] = exploring_at
        allowed, self.plan = self._next_allowed(self.active_requests())
        if allowed != self.allowed:
            self.allowed = allowed
            self.on_change(allowed)
        self._open(now)

    def _settle(self, load: int) -> None:
        """A window's kind was chosen for the load when the last one closed: at a pause that is none, and the load
        that arrives may be any (the bench's c64 bursts, closing windows as they came, got c1's verdict). A window
        stops speculating as soon as its load rises to one that would not speculate; it never starts: a burst ramps up
        through lower loads, and chosen for those (some never measured: the cost model's guess), c64 bursts
        speculated whole windows at 0.86x plain decoding. It checks for the window's whole length, not only while
        its load settles (a c64 burst drafted a whole window at 0.76x when its settling time passed at c1); one that
        stops after its first `settling` of busy time is not measured: it held both kinds. Only a rise above the
        loads already checked counts, since speculation pays less as load grows: checked as bursts drained, lower
        loads never measured stopped every speculating window at c64, so none was measured there while exploring
        went on (docs/history.md, sessions 23-24)."""
        bucket = self.load_bucket(load)
        if bucket <= self.highest:
            return
        self.highest = bucket
        allowed, plan = self._next_allowed(load)
        if not allowed:
            self.mixed = self.busy_s >= self.settling * self.seconds
            self.plan, self.allowed = plan, False
            self.on_change(False)

    def _measured(self, bucket: int) -> tuple[WindowRates, WindowRates]:
        """With speculation allowed and forbidden at this load bucket (no windows: never measured)."""
        return self.rates.get((True, bucket), WindowRates()), self.rates.get((False, bucket), WindowRates())

    def _decided(self, bucket: int) -> bool:
        """Both kinds measured min_windows times at this load: enough for a verdict."""
        on, off = self._measured(bucket)
        return min(on.windows, off.windows) >= self.min_windows

    def verdicts(self) -> dict[int, bool]:
        """Load bucket -> whether speculation was measured to pay there, where it is decided; by load, lowest
        first."""
        return {bucket: self._pays(bucket) for bucket in sorted({bucket for _, bucket in self.rates})
                if self._decided(bucket)}

    def _error(self, bucket: int) -> float:
        """Standard error of the kinds' rate difference at this load. A window's rate varies with what part of the
        load's bursts it holds (a window log, session 23: at c16 a speculating window measured 1,053 tokens per busy
        second against 853 for a plain one, where the bench measured speculation at 1.03x plain decoding; at c32
        speculating windows 1,084 and 855): the spread of a window's rate about its kind's, relative to it, pooled
        over every load and kind measured twice or more (each has too few windows to say alone), at least
        min_spread; a smoothed rate averages at most (2 - smoothing) / smoothing windows."""
        cells = [measured for measured in self.rates.values() if measured.windows >= 2 and measured.rate > 0]
        squares = sum(m.windows * m.variance / m.rate ** 2 for m in cells)  # n * variance: the squared deviations
        degrees = sum(m.windows - 1 for m in cells)
        spread = max(math.sqrt(squares / degrees) if degrees else 0.0, self.min_spread)
        memory = (2 - self.smoothing) / self.smoothing
        return spread * math.sqrt(sum(m.rate ** 2 / min(m.windows, memory) for m in self._measured(bucket)
                                      if m.windows))

    def _gap(self, bucket: int) -> float:
        """How far apart the kinds' rates are at a measured load, as a fraction of the faster: what an exploring
        window loses."""
        on, off = self._measured(bucket)
        return 1.0 - min(on.rate, off.rate) / max(on.rate, off.rate, 1e-9)

    def _pays(self, bucket: int) -> bool:
        """Speculation measured faster here by more than the windows' noise."""
        on, off = self._measured(bucket)
        return on.rate - off.rate > self.confidence * self._error(bucket)

    def _clearly_pays(self, bucket: int) -> bool:
        """A verdict (min_windows of each kind) that speculation pays here by decisive_gap or more. One window each
        is no evidence, its two kinds holding different parts of the load's bursts: 1,192 against 924 tokens per
        busy second at c32 sent c64 drafting at 0.96x plain decoding (session 24)."""
        return self._decided(bucket) and self._pays(bucket) and self._gap(bucket) >= self.decisive_gap

    def _exploring_period(self, bucket: int) -> int:
        """Windows from one exploring window to the next at this load. Where the verdict is plain decoding although
        speculation measured faster (by less than the noise), an exploring window speculates, the kind measured
        faster: it costs nothing expected, so every other window does until the noise rule decides (measured one
        window in ten instead, speculation stayed off for 21 of 48 sampled requests at c1; session 24)."""
        if not self._decided(bucket):
            return self.explore_every
        on, off = self._measured(bucket)
        if on.rate > off.rate and not self._pays(bucket):
            return 2  # every other window
        return min(max(self.explore_every, math.ceil(self._gap(bucket) / self.exploring_cost)),
                   self.max_exploring_period)

    def _next_allowed(self, load: float) -> tuple[bool, tuple[int, int | None]]:
        """Whether the next window at this load allows speculation, and its plan: (its load bucket, the windows
        measured there if it explores, else None)."""
        bucket = self.load_bucket(load)
        on, off = self._measured(bucket)
        measured = on.windows + off.windows
        exploring = measured - self.last_exploring.get(bucket, 0) >= self._exploring_period(bucket)
        return self._allowed(load, bucket, exploring), (bucket, measured if exploring else None)

    def _allowed(self, load: float, bucket: int, exploring: bool) -> bool:
        on, off = self._measured(bucket)
        verdicts = self.verdicts()
        if bucket in verdicts:
            return verdicts[bucket] != exploring
        # Not measured here yet. Speculation pays less as load grows (the verifier saturates, drafters compete for
        # the processors), and it must never make the deployment slower: unless it paid clearly at the nearest lower
        # load measured (a verdict there), this load starts without it and exploring measures it
        # (counting only lower loads where both kinds were measured, session 23's bench skipped c16, measured plain
        # only, and c32 took c8's verdict: its windows alternated, 53 of 128 requests drafted, 0.94x). Started from
        # the cost model's guess instead, which cannot see drafters taking the target's processors, short bursts at
        # c16 / c32 / c64 ran cosine at 0.90 / 0.91 / 0.76x plain decoding after c8 had come out 0.98x (session 14),
        # and c16 at 0.88x after one window each way at c8 (480 against 553 tokens/s: no verdict yet; session 15,
        # instrumented); after c8 had paid within noise (1.04x), c32 / c64 at 0.85 / 0.90x (session 16). A higher
        # load where it clearly paid decides too.
        lower = [other for _, other in self.rates if other < bucket]
        higher = [other for other in verdicts if other > bucket and self._gap(other) >= self.decisive_gap]
        if lower and not self._clearly_pays(max(lower)):
            return exploring
        if higher and self._clearly_pays(higher[0]):
            return not exploring
        if not on.windows + off.windows:
            return self.predicted(load)  # a load never measured: the cost model's guess first
        return on.windows <= off.windows  # measure the kind measured less


class LoadMonitor:
    """Deployment-wide costs, fitted online: verification latency against the verifier's load in tokens, plain
    decoding's time per token against the number of active requests, and drafting time against draft length (apart
    for cooperating drafters, which share the processors); how many requests are active; and, by experiment,
    whether speculation pays the deployment at its load (SpeculationWindows), apart for each set of drafters that
    adaptive requests draft from: requests that may draft only from the general drafter pay differently from those
    routed among all (measured: interleaved in one bench, the general-only variant at 0.82x plain decoding turned the
    shared windows off for the routed requests after it, 6 of 24 then decoding plainly)."""

    def __init__(self, forgetting: float = 0.98,
                 on_speculation_change: Callable[[tuple[str, ...], bool], None] = lambda drafters, on: None,
                 on_window_measured: Callable[[tuple[str, ...], bool, int, float], None] = lambda *measured: None,
                 clock: Callable[[], float] = time.monotonic):
        self.verify_fit = LinearFit(forgetting, regressors=2)  # sequences and tokens in the pass
        self.plain_fit = LinearFit(forgetting)
        # drafting time against positions and active requests. Fitted on positions alone, it carried what drafting
        # cost under c32 load (34 ms a call) to c1 (about 4 ms), where the controller then drafted 2 tokens or none,
        # and plain rounds make no drafting calls to correct it (measured after a c32 warm-up: cosine at c1 accepted
        # 0.11 tokens per round and made 173-179 tokens/s, against 213-216 for plain decoding)
        self.draft_fits = {fused: LinearFit(forgetting, regressors=2) for fused in (False, True)}
        self.active_requests = 0
        # of them, by the drafters they draft from, those that speculate only while their windows allow it
        self.adaptive_requests: Counter[tuple[str, ...]] = Counter()
        # every adaptive request's rounds: what the cost model expects at a load where nothing was measured yet
        self.acceptance = AcceptanceTracker(decay=0.99)
        self.deepest_draft = 0
        self.on_speculation_change, self.on_window_measured = on_speculation_change, on_window_measured
        self.clock = clock
        self._windows: dict[tuple[str, ...], SpeculationWindows] = {}

    def windows(self, drafters: tuple[str, ...]) -> SpeculationWindows:
        """The speculation windows of adaptive requests drafting from `drafters` (sorted names)."""
        if drafters not in self._windows:
            self._windows[drafters] = SpeculationWindows(
                lambda: self.active_requests, lambda: self.adaptive_requests[drafters], self.cost_model_speculates,
                on_change=lambda on: self.on_speculation_change(drafters, on),
                on_measured=lambda *measured: self.on_window_measured(drafters, *measured), clock=self.clock)
        return self._windows[drafters]

    def _advance(self, tokens: int = 0) -> None:
        for windows in self._windows.values():
            windows.advance(tokens)

    def request_started(self, drafters: tuple[str, ...] | None) -> None:
        """drafters: an adaptive request's (sorted names); None for any other request."""
        self._advance()
        self.active_requests += 1
        if drafters is not None:
            self.windows(drafters)
            self.adaptive_requests[drafters] += 1

    def request_finished(self, drafters: tuple[str, ...] | None) -> None:
        self._advance()
        self.active_requests -= 1
        if drafters is not None:
            self.adaptive_requests[drafters] -= 1

    def observe_tokens(self, tokens: int) -> None:
        """Tokens a request emitted (any mode): the deployment's output."""
        self._advance(tokens)

    def observe_acceptance(self, depth: int, accepted: int) -> None:
        self.acceptance.observe(depth, accepted)
        self.deepest_draft = max(self.deepest_draft, depth)

    def cost_model_speculates(self, load: float) -> bool:
        """Whether the cost model expects some draft length to beat plain decoding at this load (nothing measured
        yet: yes)."""
        costs = self.costs()
        return costs is None or costs.best_draft_length(self.acceptance.rate, load, self.deepest_draft) > 0

    def speculation_allowed(self, drafters: tuple[str, ...]) -> bool:
        windows = self.windows(drafters)
        windows.advance()
        return windows.allowed

    def observe_verify(self, sequences: float, tokens: float, seconds: float) -> None:
        """A verification took `seconds`, its pass holding (as the cost model counts them) every active request:
        `sequences` of them with `tokens` tokens in all."""
        self.verify_fit.observe((sequences, tokens), seconds)

    def observe_plain(self, seconds_per_token: float) -> None:
        """A plain decoding call (several steps) under the current load."""
        self.plain_fit.observe(self.active_requests, seconds_per_token)

    def observe_draft(self, positions: int, seconds: float, fused: bool = False) -> None:
        """One round's drafting of `positions` tokens: by a lone drafter, or fused across cooperating drafters."""
        self.draft_fits[fused].observe((positions, self.active_requests), seconds)

    def costs(self, fused: bool = False) -> CostModel | None:
        """The cost model for lone or fused drafting; None until verification and lone drafting are measured. Fused
        drafting's is lone drafting's until fused drafting is measured (a fused round calls every cooperating drafter
        once, at the same time)."""
        verify = self.verify_fit.fitted()
        draft = (self.draft_fits[True].fitted() if fused else None) or self.draft_fits[False].fitted()
        if verify is None or draft is None:
            return None
        return CostModel(verify_base=verify[0], verify_per_sequence=verify[1], verify_per_token=verify[2],
                         draft_per_token=draft[1], draft_base=draft[0], draft_per_request=draft[2],
                         plain=self.plain_fit.fitted())


class SpeculationController:
    """Decides k for one request's next round from its acceptance and the deployment's load."""

    def __init__(self, k_max: int, adaptive: bool = True, probe_every: int = 8):
        self.k_max, self.adaptive = k_max, adaptive  # not adaptive: always k_max (the ablation)
        self.acceptance = AcceptanceTracker()
        self.probe_every = probe_every
        self.plain_rounds = 0

    def draft_length(self, costs: CostModel | None, load: float) -> int:
        if costs is None or not self.adaptive:  # nothing measured yet: speculate at full length
            return self.k_max
        k = costs.best_draft_length(self.acceptance.optimistic_rate, load, self.k_max)
        if k == 0:  # plain decoding learns nothing about acceptance: draft one token now and then
            self.plain_rounds += 1
            return 0 if self.plain_rounds % self.probe_every else 1
        return k

    def observe(self, depth: int, accepted: int) -> None:
        self.acceptance.observe(depth, accepted)
