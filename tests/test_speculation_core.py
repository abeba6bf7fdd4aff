"""The speculation core on its own: fusion, tree merging, routing, control, scheduling (no Triton)."""
import asyncio
import collections
import dataclasses
import json
import random

import pytest
import torch

from cosine.speculation.control import (AcceptanceTracker, CostModel, LinearFit, LoadMonitor, SpeculationController,
                                        SpeculationWindows, WindowRates, expected_tokens)
from cosine.speculation.fusion import Candidate, TreeBuilder, merge_chains
from cosine.engine.engine import RoundOutcome, StepError, StepResult
from cosine.engine.sampling import SamplingParams, SparseDistributions
from cosine.speculation.proposers import DrafterSession, DraftOrigin, FusionProposer
from cosine.speculation.router import Route, Router
from cosine.speculation.scheduler import VerificationScheduler
from cosine.speculation.tree import DraftTree
from cosine.serving.request import GenerationRequest


def greedy_request() -> GenerationRequest:
    return GenerationRequest(prompt="")


# ---- fusion -----------------------------------------------------------------------------------------------------
def test_fusion_picks_the_most_confident_token_and_hangs_runner_ups_as_siblings():
    builder = TreeBuilder(max_siblings=2)
    first = builder.add_step([Candidate(5, 0.5, "code"), Candidate(7, 0.3, "code"),
                              Candidate(9, 0.8, "math"), Candidate(5, 0.1, "math")])
    assert first == Candidate(9, 0.8, "math")
    second = builder.add_step([Candidate(1, 0.6, "code"), Candidate(2, 0.4, "math")])
    assert second.token == 1
    tree = builder.tree()
    # depth 1: winner 9, siblings 5 (0.5, code's confidence kept) and 7; depth 2 grows from the winner 9
    assert tree == DraftTree((9, 5, 7, 1, 2), (-1, -1, -1, 0, 0))
    assert builder.sources == ["math", "code", "code", "code", "math"]
    tree.validate()


def test_fusion_keeps_a_fixed_winner_and_bounds_siblings():
    builder = TreeBuilder(max_siblings=1)
    winner = builder.add_step([Candidate(t, p, "a") for t, p in [(3, 0.5), (4, 0.3), (6, 0.2)]],
                              winner=Candidate(4, 0.3, "a"))
    assert winner.token == 4 and builder.tree() == DraftTree((4, 3), (-1, -1))


def test_specinfer_merges_chains_into_a_trie():
    tree, sources = merge_chains({"a": [1, 2, 3], "b": [1, 2, 4], "c": [5, 2]})
    assert tree == DraftTree((1, 2, 3, 4, 5, 2), (-1, 0, 1, 1, -1, 4))
    assert sources == ("a", "a", "a", "b", "c", "c")
    assert tree.accepted_path([1, 2, 4, 9]) == [0, 1, 3]


# ---- control ----------------------------------------------------------------------------------------------------
COSTS = CostModel(verify_base=0.010, verify_per_token=0.001, draft_per_token=0.002)


def test_expected_tokens_per_round():
    assert expected_tokens(0.0, 4) == 1.0
    assert expected_tokens(1.0, 4) == 5.0
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)


def test_controller_speculates_when_idle_and_decodes_plainly_under_saturation():
    controller = SpeculationController(k_max=8)
    for _ in range(5):
        controller.observe(depth=4, accepted=3)  # good acceptance
    assert controller.draft_length(COSTS, load=1) >= 2
    assert controller.draft_length(COSTS, load=64) == 0  # verifier saturated: extra tokens cost too much
    assert controller.draft_length(COSTS, load=1) >= 2  # back to speculation when the load goes away


def test_fixed_length_controller_ignores_load_and_acceptance():
    adaptive, fixed = SpeculationController(k_max=6), SpeculationController(k_max=6, adaptive=False)
    for controller in (adaptive, fixed):
        for _ in range(50):
            controller.observe(depth=6, accepted=0)
    assert adaptive.draft_length(COSTS, load=64) < 6
    assert all(fixed.draft_length(COSTS, load=load) == 6 for load in (1, 64))


def test_controller_stops_speculating_when_drafts_are_rejected():
    controller = SpeculationController(k_max=8, probe_every=1000)
    for _ in range(10):
        controller.observe(depth=4, accepted=0)
    assert controller.draft_length(COSTS, load=1) == 0


def test_controller_probes_now_and_then_while_plain():
    controller = SpeculationController(k_max=8, probe_every=4)
    for _ in range(10):
        controller.observe(depth=4, accepted=0)
    lengths = [controller.draft_length(COSTS, load=1) for _ in range(8)]
    assert lengths.count(1) == 2 and lengths.count(0) == 6


def test_acceptance_tracker_is_anchored_by_its_prior():
    """Two rejected rounds of a drafter the router rates 0.8 leave it worth drafting (they are noise at that
    rate), which a tracker without the anchor reads as a rate near 0."""
    anchored = AcceptanceTracker.starting_at(0.8)
    for _ in range(2):
        anchored.observe(6, 0)
    assert anchored.rate > 0.5
    controller = SpeculationController(k_max=8)
    controller.acceptance = anchored
    assert controller.draft_length(COSTS, load=1) > 0  # so the request goes on drafting
    for _ in range(20):  # a drafter that keeps failing does go down
        anchored.observe(6, 0)
    assert anchored.rate < 0.3


def test_acceptance_tracker_estimates_the_per_token_rate():
    tracker = AcceptanceTracker(decay=1.0)
    rng = random.Random(0)
    for _ in range(2000):
        accepted = 0
        while accepted < 4 and rng.random() < 0.7:
            accepted += 1
        tracker.observe(4, accepted)
    assert tracker.rate == pytest.approx(0.7, abs=0.03)


def test_load_monitor_recovers_the_verification_and_drafting_cost_models():
    monitor = LoadMonitor(forgetting=1.0)
    assert monitor.costs() is None
    for tokens in [1, 4, 8, 16, 32, 5, 12]:
        monitor.observe_verify(1, tokens, 0.010 + 0.002 * tokens)
    assert monitor.costs() is None  # drafting not measured yet
    for positions in [2, 4, 8, 3]:
        monitor.observe_draft(positions, 0.003 + 0.0005 * positions)
    costs = monitor.costs()
    assert costs.verify_base == pytest.approx(0.010) and costs.verify_per_token == pytest.approx(0.002)
    assert costs.draft_base == pytest.approx(0.003) and costs.draft_per_token == pytest.approx(0.0005)
    assert monitor.costs(fused=True) == costs  # fused drafting is measured apart; until it is, as lone drafting
    for positions in [2, 4, 8]:  # cooperating drafters: a call per position
        monitor.observe_draft(positions, 0.004 * positions, fused=True)
    fused = monitor.costs(fused=True)
    assert fused.draft_base == pytest.approx(0, abs=1e-9) and fused.draft_per_token == pytest.approx(0.004)


def test_verification_costs_per_sequence_and_per_token_are_fitted_apart():
    """Passes costed as measured in-process on the demo target (a base, 0.65 ms per sequence, 0.27 ms per token):
    both slopes are recovered, and under load the controller drafts longer than with one slope for both, which
    charges every token a share of the sequences' cost."""
    monitor, one_slope = LoadMonitor(forgetting=1.0), LinearFit(1.0)
    for load in (1, 4, 8, 16, 32):
        for size in (1, 4, 7, 13):
            seconds = 0.014 + 0.00065 * load + 0.00027 * load * size
            monitor.observe_verify(load, load * size, seconds)
            one_slope.observe(load * size, seconds)
    for positions in (2, 4, 8):
        monitor.observe_draft(positions, 0.001 + 0.0006 * positions)
    costs = monitor.costs()
    assert (costs.verify_base, costs.verify_per_sequence, costs.verify_per_token) == pytest.approx(
        (0.014, 0.00065, 0.00027), rel=1e-4)
    base, slope = one_slope.fitted()
    lumped = dataclasses.replace(costs, verify_base=base, verify_per_sequence=0.0, verify_per_token=slope)
    for load in (8, 32):
        assert costs.best_draft_length(0.7, load, 12) > lumped.best_draft_length(0.7, load, 12)


def test_drafting_under_load_does_not_make_drafting_at_a_light_load_look_dear():
    """Drafting calls take longer while many requests draft (they share the drafters and the cores): fitted against
    the load, what they cost under c32 (34 ms a call, as measured on the demo zoo) is not carried to c1 (about 4 ms),
    where the controller keeps drafting. Fitted on positions alone, the same observations make drafting at c1 look
    about 7x dearer than it is, and the controller decodes plainly (whose rounds make no drafting calls to correct
    it)."""
    monitor, positions_only = LoadMonitor(forgetting=0.98), LinearFit(0.98)

    def observe(load, positions, seconds):
        monitor.active_requests = load
        monitor.observe_draft(positions, seconds)
        positions_only.observe(positions, seconds)
    for round_ in range(60):
        monitor.observe_verify(1, 13, 0.0090 + 0.00025 * 13)
        monitor.observe_plain(0.0037)
        observe(1, 4 + round_ % 9, 0.0035 + 0.00024 * (4 + round_ % 9))
    for round_ in range(200):
        observe(32, 4 + round_ % 9, 0.034)
    monitor.active_requests = 1
    costs = monitor.costs()
    assert costs.drafting(6, 1) == pytest.approx(0.0035 + 0.00024 * 6, rel=0.3)
    base, per_position = positions_only.fitted()
    assert base + 6 * per_position > 5 * (0.0035 + 0.00024 * 6)
    controller = SpeculationController(12)
    controller.acceptance = AcceptanceTracker.starting_at(0.9, trials=100)
    assert controller.draft_length(costs, 1) >= 6
    assert controller.draft_length(dataclasses.replace(costs, draft_base=base, draft_per_token=per_position,
                                                       draft_per_request=0.0), 1) <= 2


def test_a_fit_read_every_round_is_solved_again_only_every_few_observations(monkeypatch):
    """Every round reads the cost model and adds an observation: solving is what costs, so it happens once per
    refit_every observations, and the fit never lags more observations behind."""
    fit, reference = LinearFit(0.98, refit_every=8), LinearFit(0.98)
    solves = []
    solve = fit._solve
    monkeypatch.setattr(fit, "_solve", lambda: solves.append(1) or solve())
    fits = []  # the fit on all observations so far, after each
    for x in range(96):
        seconds = 0.002 + 0.001 * (x % 12) if x < 64 else 0.004 + 0.003 * (x % 12)  # the cost changes
        fit.observe(x % 12, seconds)
        reference.observe(x % 12, seconds)
        fits.append(reference._solve())
        assert fit.fitted() in fits[-8:]
    assert len(solves) <= 96 // 8 + 3  # the first few return None (too few observations), each then solves again


def test_a_slope_the_data_would_make_negative_is_fixed_at_zero():
    fit = LinearFit(1.0, regressors=2)
    for x1, x2 in ((1, 2), (2, 1), (3, 5), (4, 3), (5, 8)):
        fit.observe((x1, x2), 0.01 + 0.002 * x2 - 0.0005 * x1)
    base, first, second = fit.fitted()
    assert first == 0.0 and second > 0 and base >= 0


def test_a_fixed_drafting_call_cost_favours_longer_drafts():
    per_position_only = CostModel(verify_base=0.008, verify_per_token=0.0003, draft_per_token=0.0008)
    with_call_cost = CostModel(verify_base=0.008, verify_per_token=0.0003, draft_per_token=0.0003, draft_base=0.004)
    # both cost the same at k=8; the second's is mostly per call, so shorter drafts save it less
    assert per_position_only.round_time(8, 1) == pytest.approx(with_call_cost.round_time(8, 1))
    assert with_call_cost.best_draft_length(0.8, 1, 8) > per_position_only.best_draft_length(0.8, 1, 8)
    assert with_call_cost.round_time(0, 1) == pytest.approx(0.008 + 0.0003)  # plain decoding drafts nothing


def test_plain_decoding_is_costed_from_its_own_multi_step_calls():
    one_pass_per_token = CostModel(verify_base=0.008, verify_per_token=0.0003, draft_per_token=0.002,
                                   draft_base=0.003)
    assert one_pass_per_token.best_draft_length(0.7, 8, 8) > 0
    # several steps per call spread the call's cost: measured, plain decoding beats any draft at this load
    multi_step = CostModel(verify_base=0.008, verify_per_token=0.0003, draft_per_token=0.002, draft_base=0.003,
                           plain=(0.002, 0.0003))
    assert multi_step.round_time(0, 8) == pytest.approx(0.002 + 0.0003 * 8)
    assert multi_step.best_draft_length(0.7, 8, 8) == 0


def _run_windows(windows, clock, rate, windows_to_run):
    """Drives a deployment whose output rate (tokens per second) depends on whether speculation is allowed, with
    1 s windows; returns whether each window allowed it (once its load settled: after its first eighth)."""
    allowed = []
    for _ in range(windows_to_run):
        for tick in range(8):
            clock.now += 0.125
            windows.advance(rate(windows.allowed) * 0.125)
            if not tick:
                allowed.append(windows.allowed)
    return allowed


def test_speculation_windows_follow_the_kind_measured_faster_at_each_load_and_keep_exploring():
    clock, active = FakeClock(), [8]
    changes, measured = [], []
    windows = SpeculationWindows(lambda: active[0], lambda: active[0], predicted=lambda load: True, seconds=1.0,
                                 explore_every=4, exploring_cost=1.0, min_windows=2, on_change=changes.append,
                                 on_measured=lambda *window: measured.append(window), clock=clock)
    # the cost model expects speculation to pay, but at c8 the drafters slow the deployment down: 150 tokens/s
    # plain, 120 with speculation
    allowed = _run_windows(windows, clock, lambda on: 120 if on else 150, 16)
    # both kinds until each is measured twice; then the faster, with every fourth window the other way
    assert allowed == [True, False, True, False] + [True, False, False, False] * 3
    assert windows.rates[(True, 3)].rate == pytest.approx(120) and windows.rates[(False, 3)].rate == pytest.approx(150)
    assert changes[:2] == [False, True]
    # what the cosine_speculation_window_* metrics show: each window's kind, load bucket and that kind's rate there
    assert [(on, bucket) for on, bucket, _ in measured] == [(on, 3) for on in allowed[:len(measured)]]
    assert measured[-1][2] == pytest.approx(120 if measured[-1][0] else 150)
    active[0] = 1  # another load: measured apart, and there speculation pays
    allowed = _run_windows(windows, clock, lambda on: 90 if on else 60, 12)
    assert allowed[4:] == [False, True, True, True] * 2
    active[0] = 8  # back at c8 the old verdict holds (the first window, chosen at c1, one exploring there, stays
    # plain: a window never starts speculating midway; the second is the exploring window c8 was owed: the last one
    # chosen there measured c1's load) until exploring shows that speculation pays there now, by more than the
    # windows' spread (the exploring windows' own jump from 120 to 200 is part of it)
    allowed = _run_windows(windows, clock, lambda on: 200 if on else 150, 24)
    assert allowed[:5] == [False, True, False, False, False]
    assert windows.verdicts()[3] and allowed[-4:].count(True) == 3


def test_exploring_is_rarer_where_the_kinds_differ_widely():
    """An exploring window loses the gap between the kinds: at most exploring_cost of the output, on average."""
    clock, active = FakeClock(), [1]
    windows = SpeculationWindows(lambda: active[0], lambda: active[0], seconds=1.0, explore_every=4,
                                 exploring_cost=0.05, max_exploring_period=12, min_windows=2, clock=clock)
    pattern = lambda allowed: "".join("S" if on else "." for on in allowed)  # noqa: E731 (S: may speculate)
    # both kinds measured twice, then a gap of 1/3: every 7th window explores (4 would have cost 8% of the output)
    assert pattern(_run_windows(windows, clock, lambda on: 120 if on else 80, 24)) == "S.S.SSS.SSSSSS.SSSSSS.SS"
    # a gap of 3/4 would take 15 windows; capped at 12, so that a change is still seen
    assert pattern(_run_windows(windows, clock, lambda on: 200 if on else 50, 24)) == "SSSSSSSSS.SSSSSSSSSSS.SS"


def test_a_load_above_one_where_speculation_did_not_pay_starts_without_it():
    """Speculation pays less as load grows: learning each new load from scratch cost cosine 0.80x plain decoding at
    c16 (measured) after c8 had shown that it does not pay."""
    clock, active = FakeClock(), [8]
    windows = SpeculationWindows(lambda: active[0], lambda: active[0], predicted=lambda load: True, seconds=1.0,
                                 explore_every=4, exploring_cost=1.0, min_windows=2, clock=clock)
    _run_windows(windows, clock, lambda on: 120 if on else 150, 8)
    assert windows.verdicts() == {3: False}
    active[0] = 16  # forbidden, exploring after a period of its own
    allowed = _run_windows(windows, clock, lambda on: 150 if on else 250, 12)
    assert allowed == [False] * 4 + [True, False, False, False] * 2
    assert windows.verdicts() == {3: False, 4: False}  # measured at c16 too now, by the exploring windows


def test_a_narrow_loss_at_a_lower_load_starts_a_higher_one_without_speculation_until_exploring_shows_it_pays():
    clock, active = FakeClock(), [8]
    windows = SpeculationWindows(lambda: active[0], lambda: active[0], predicted=lambda load: True, seconds=1.0,
                                 explore_every=4, exploring_cost=1.0, min_windows=2, decisive_gap=0.1, clock=clock)
    _run_windows(windows, clock, lambda on: 146 if on else 150, 8)  # 3% apart: within noise
    assert windows.verdicts() == {3: False}
    active[0] = 16  # plain first (never slower than plain decoding); exploring windows measure speculation
    allowed = _run_windows(windows, clock, lambda on: 300 if on else 250, 16)
    assert allowed[:4].count(True) <= 1 and allowed[-3:] == [True, True, True]
    assert windows.verdicts() == {3: False, 4: True}
    active[0] = 32  # the first window here, chosen at c16 (an exploring one there), stays plain: a window never
    # starts speculating midway; then the kind measured less
    assert _run_windows(windows, clock, lambda on: 300 if on else 250, 3) == [False, True, True]


def test_one_window_each_way_where_speculation_lost_starts_a_higher_load_plain_and_exploring_waits_a_period():
    """Measured (session 15, instrumented): after one window each way at c8 (480 against 553 tokens/s, no verdict
    yet) c16 started from the cost model's guess and ran at 0.88x plain decoding while it learned; and the exploring
    cadence, counted across loads, could fall on a new load's first window."""
    clock, active = FakeClock(), [8]
    windows = SpeculationWindows(lambda: active[0], lambda: active[0], predicted=lambda load: True, seconds=1.0,
                                 explore_every=4, exploring_cost=1.0, min_windows=2, clock=clock)
    _run_windows(windows, clock, lambda on: 480 if on else 553, 2)
    assert windows.verdicts() == {}
    active[0] = 16  # the first window here was set when c8's last closed; then plain, exploring after 4 of its own
    assert _run_windows(windows, clock, lambda on: 650 if on else 780, 8)[1:] == [False] * 3 + [True] + [False] * 3


def test_a_clear_win_in_one_window_each_way_at_a_lower_load_is_no_verdict_for_a_higher_one():
    """Measured (session 24): after one window each at c32 (1,192 tokens per busy second speculating, 924 plain: the
    kinds held different parts of the warm-up's burst), c64 took c32 as a verdict that speculation pays, drafted 262
    of 768 requests and made 0.96x plain decoding. Speculating windows alone at the lower load are no verdict
    either (plain decoding was never measured there)."""
    for lower_windows in ([True, False], [True]):  # one each way; one speculating window
        clock, active = FakeClock(), [32]
        windows = SpeculationWindows(lambda: active[0], lambda: active[0], predicted=lambda load: True, seconds=1.0,
                                     explore_every=4, exploring_cost=1.0, min_windows=2, clock=clock)
        assert _run_windows(windows, clock, lambda on: 1192 if on else 924, len(lower_windows)) == lower_windows
        active[0] = 64  # the window open at c32 stops speculating; plain, exploring after 4 windows of its own
        assert _run_windows(windows, clock, lambda on: 1300 if on else 1640, 8) == [False] * 4 + [True] + [False] * 3


def test_a_win_within_noise_at_a_lower_load_starts_a_higher_one_without_speculation():
    """Measured (session 16): c8 had paid within noise (1.04x plain decoding), and short bursts at c32 / c64 then ran
    cosine at 0.85 / 0.90x while their windows alternated to learn."""
    clock, active = FakeClock(), [8]
    windows = SpeculationWindows(lambda: active[0], lambda: active[0], predicted=lambda load: True, seconds=1.0,
                                 explore_every=4, exploring_cost=1.0, min_windows=2, decisive_gap=0.1, clock=clock)
    _run_windows(windows, clock, lambda on: 156 if on else 150, 8)  # 4% apart: within the windows' noise (3%)
    assert windows.verdicts() == {3: False}
    active[0] = 32  # the first window here was set when c8's last closed; then plain, exploring after 4 of its own
    assert _run_windows(windows, clock, lambda on: 900 if on else 1000, 8)[1:] == [False] * 3 + [True] + [False] * 3


def test_speculation_must_beat_plain_decoding_by_more_than_the_windows_noise():
    """A window's rate varies with the part of the load's bursts it holds (session 23: at c16 a speculating window
    measured 1,053 tokens per busy second, a plain one 853, where the bench measured 1.03x). Speculation 8% faster on
    average is no verdict while a kind's windows scatter by 15%; it is once they scatter by 2%."""
    def verdict(scatter):
        clock, active = FakeClock(), [16]
        windows = SpeculationWindows(lambda: active[0], lambda: active[0], seconds=1.0, min_windows=2, clock=clock)
        scattered = [1 + scatter, 1 + scatter, 1 - scatter, 1 - scatter]  # by window: each kind gets both
        allowed = _run_windows(windows, clock, lambda on: (1080 if on else 1000) * scattered[int(clock.now - 1e-9)], 4)
        assert allowed == [True, False, True, False]
        assert windows.rates[(True, 4)].rate == pytest.approx(1080) and windows.rates[(False, 4)].rate == 1000
        return windows.verdicts()[4]
    assert not verdict(scatter=0.15)
    assert verdict(scatter=0.02)


def test_where_speculation_measured_faster_within_the_noise_every_other_window_speculates():
    """An exploring window then speculates, the kind measured faster: it costs nothing expected, and measuring it
    only one window in eight kept speculation off for 21 of 48 sampled cosine requests at c1 (session 24)."""
    clock, active = FakeClock(), [1]
    windows = SpeculationWindows(lambda: active[0], lambda: active[0], seconds=1.0, min_windows=2, clock=clock)
    scattered = [1.15, 1.15, 0.85, 0.85]  # by window: each kind gets both
    rate = lambda on: (250 if on else 230) * scattered[int(clock.now - 1e-9) % 4]  # noqa: E731
    allowed = _run_windows(windows, clock, rate, 12)
    assert windows.verdicts() == {0: False}  # 9% faster, scattered by 15%: no verdict that it pays
    assert allowed == [True, False] * 6


def test_a_lower_load_measured_plain_only_has_not_shown_that_speculation_pays():
    """Session 23's bench: c8 paid (704 against 546 tokens per busy second), c16 was measured plain only, and c32
    took c8's verdict, skipping c16: its windows alternated, 53 of 128 requests drafted, 0.94x plain decoding."""
    clock, active = FakeClock(), [32]
    windows = SpeculationWindows(lambda: active[0], lambda: active[0], seconds=1.0, explore_every=4, clock=clock)
    windows.rates.update({(True, 3): WindowRates(704.0, 2), (False, 3): WindowRates(546.0, 2),
                          (False, 4): WindowRates(830.0, 4)})
    assert windows._clearly_pays(3)
    assert _run_windows(windows, clock, lambda on: 850 if on else 970, 6) == [False] * 4 + [True, False]


def test_at_a_load_never_measured_the_windows_start_from_the_cost_models_prediction():
    clock, active = FakeClock(), [0]
    windows = SpeculationWindows(lambda: active[0], lambda: active[0], predicted=lambda load: load < 4, seconds=1.0,
                                 clock=clock)
    clock.now += 1.0
    active[0] = 8
    windows.advance()  # an idle first window closes as load arrives: c8 was never measured
    assert not windows.allowed  # the cost model's guess
    assert _run_windows(windows, clock, lambda on: 100, 4) == [False, True, True, False]  # then both get measured
    monitor = LoadMonitor(forgetting=1.0)
    assert monitor.cost_model_speculates(8)  # nothing measured: speculate
    for tokens in (1, 8, 16, 64):
        monitor.observe_verify(1, tokens, 0.010 + 0.001 * tokens)
    for positions in (1, 4, 8):
        monitor.observe_draft(positions, 0.002 + 0.002 * positions)
    for _ in range(20):
        monitor.observe_acceptance(depth=4, accepted=2)
    assert monitor.cost_model_speculates(1) and not monitor.cost_model_speculates(32)


def test_idle_time_and_other_modes_say_nothing_about_speculation():
    clock, active, adaptive = FakeClock(), [0], [0]
    windows = SpeculationWindows(lambda: active[0], lambda: adaptive[0], seconds=1.0, clock=clock)
    for _ in range(5):
        clock.now += 1.0
        windows.advance()
    assert windows.rates == {}
    active[0] = adaptive[0] = 1  # one request for a tenth of a window: too little to count
    windows.advance(5)
    clock.now += 0.1
    windows.advance(5)
    active[0] = adaptive[0] = 0
    clock.now += 0.95
    windows.advance()
    assert windows.rates == {}
    active[0] = 8  # requests that do not follow the windows: whatever the windows allow, they do the same
    for _ in range(40):
        clock.now += 0.125
        windows.advance(20)
    assert windows.rates == {}


def test_a_burst_followed_by_a_pause_is_measured_and_a_window_follows_the_load_that_arrives():
    """A window closes at the first event after its length, and chooses its kind for the load of that moment: the
    bench's bursts at c64, each followed by a pause (other modes run), closed windows as their first requests came,
    at no load. Each burst is measured, and runs as c64 needs (not as c1, measured to pay, would)."""
    clock, active = FakeClock(), [64]
    windows = SpeculationWindows(lambda: active[0], lambda: active[0], predicted=lambda load: load < 32, seconds=1.0,
                                 clock=clock)
    windows.rates[(True, 0)] = WindowRates(100.0, 2)  # measured at c1, where speculation pays
    windows.rates[(False, 0)] = WindowRates(80.0, 2)
    allowed = []
    for ticks in (7, 8, 7):  # bursts shorter than a window, and one whose window closes within it
        for tick in range(ticks):
            clock.now += 0.125
            windows.advance(100)
            if not tick:
                allowed.append(windows.allowed)
        active[0] = 0
        clock.now += 10.0
        windows.advance()  # the next burst's first request arrives
        active[0] = 64
    # the cost model's guess for c64 first, then the other kind, then the kind measured less
    assert allowed == [False, True, True]
    assert windows.rates[(False, 6)] == WindowRates(800.0, 1) and windows.rates[(True, 6)] == WindowRates(800.0, 2)


def test_a_window_measures_the_load_it_spent_most_of_its_time_at_from_that_time_only():
    """A burst's ramp (its prefills) or its draining (its last few requests) falls in one window or another: a window
    of plain decoding that held a c32 burst's ramp measured 998 tokens per busy second, the speculating one after it,
    holding the draining, 1,108, and c32 drafted at 0.88x plain decoding. Each window here spends a quarter of its
    time at c2 with either kind, at 100 tokens/s, and the rest at c32, where plain decoding makes 1,000 and
    speculation 900; the first window holds the ramp, the second the draining."""
    clock, active = FakeClock(), [2]
    windows = SpeculationWindows(lambda: active[0], lambda: active[0], predicted=lambda load: True, seconds=1.0,
                                 clock=clock)
    rate = lambda on: (900 if on else 1000) if active[0] == 32 else 100  # noqa: E731
    kinds = []
    for loads in ([2, 32, 32, 32], [32, 32, 32, 2]):  # quarters of a window: a ramp, then a draining
        kinds.append(windows.allowed)
        for active[0] in loads:
            for _ in range(2):
                clock.now += 0.125
                windows.advance(rate(windows.allowed) * 0.125)  # the last one closes the window
    assert kinds == [True, False]  # the cost model's guess first, then the kind not measured yet
    assert (windows.rates[(True, 5)].rate, windows.rates[(False, 5)].rate) == (pytest.approx(900), pytest.approx(1000))


def test_a_burst_after_a_pause_gets_its_loads_verdict_before_its_requests_start_drafting():
    """A c32 burst after a pause: the window closed by its first request was chosen at no load (c1's verdict,
    speculate); its requests start drafting at their first round, after their prefill (tens of ms into the burst).
    The window stops speculating as soon as c32 is active (its verdict: plain): chosen again only after 0.3 s, 20 of
    the bench's 128 c32 requests had started their drafters and cosine made 0.93x plain decoding; after 60 ms, 2 of
    128 (0.97x)."""
    clock, active = FakeClock(), [0]
    windows = SpeculationWindows(lambda: active[0], lambda: active[0], seconds=3.0, explore_every=1000, clock=clock)
    windows.rates.update({(True, 0): WindowRates(400.0, 4), (False, 0): WindowRates(300.0, 4),
                          (True, 5): WindowRates(1100.0, 4), (False, 5): WindowRates(1200.0, 4)})
    clock.now += 10.0
    windows.advance()  # the burst's first request closes the idle window: chosen at no load
    assert windows.allowed
    for active[0] in (8, 16):  # the burst's first requests arrive
        clock.now += 0.01
        windows.advance(10)
    assert windows.allowed  # c8 and c16 never measured: the cost model's guess, speculate
    active[0] = 32
    clock.now += 0.01
    windows.advance(10)
    assert not windows.allowed  # at c32, 30 ms into the burst
    for active[0] in (16, 8, 2):  # and it does not start again while the burst drains
        clock.now += 0.01
        windows.advance(10)
        assert not windows.allowed


def test_a_window_stops_speculating_when_its_load_rises_even_after_it_settled():
    """A c64 burst whose window, chosen at no load, had settled at c1 (a stall at the burst's start, likely) drafted
    for the whole window at 0.76x plain decoding (session 23). It stops as soon as c64 is active; having held both
    kinds, the window is not measured."""
    clock, active = FakeClock(), [1]
    windows = SpeculationWindows(lambda: active[0], lambda: active[0], seconds=3.0, clock=clock)
    windows.rates.update({(True, 0): WindowRates(400.0, 4), (False, 0): WindowRates(300.0, 4),
                          (False, 5): WindowRates(1000.0, 4)})  # c32 measured plain only
    for _ in range(5):  # 0.5 s busy at c1: past the window's settling time
        clock.now += 0.1
        windows.advance(40)
    assert windows.allowed
    active[0] = 64
    clock.now += 0.01
    windows.advance(4)
    assert not windows.allowed
    for _ in range(30):
        clock.now += 0.1
        windows.advance(100)
    assert (False, 6) not in windows.rates and (True, 6) not in windows.rates


def test_a_speculating_window_goes_on_as_its_burst_drains_and_is_measured():
    """Session 24: the c64 windows' check for a load that rises also ran as a burst drained, and c16, never measured
    while c8 had one window each way (no verdict), stopped every speculating window there: none was measured at c64,
    while exploring windows drafted 192 of 768 cosine requests (0.97x plain decoding) and exploring went on."""
    clock, active = FakeClock(), [0]
    windows = SpeculationWindows(lambda: active[0], lambda: active[0], seconds=3.0, explore_every=4, clock=clock)
    windows.rates.update({(True, 0): WindowRates(400.0, 4), (False, 0): WindowRates(300.0, 4),
                          (True, 3): WindowRates(800.0, 1), (False, 3): WindowRates(580.0, 1),
                          (False, 6): WindowRates(1600.0, 4)})  # c64: plain measured 4 times, then an exploring one
    allowed = []
    for active[0], ticks in ((64, 25), (32, 1), (16, 1), (8, 1), (2, 1)):  # the burst, then its draining
        for _ in range(ticks):
            clock.now += 0.1
            windows.advance(130)
            allowed.append(windows.allowed)
    assert all(allowed)
    clock.now += 0.1
    windows.advance()  # closes the window
    measured = windows.rates[(True, 6)]
    assert measured.windows == 1 and measured.rate == pytest.approx(1300)


def test_windows_without_adaptive_requests_do_not_bring_exploring_closer():
    """Else the first adaptive requests after a while of other modes always meet an exploring window."""
    clock, active, adaptive = FakeClock(), [1], [1]
    windows = SpeculationWindows(lambda: active[0], lambda: adaptive[0], seconds=1.0, explore_every=4,
                                 exploring_cost=1.0, min_windows=2, clock=clock)
    rate = lambda on: 120 if on else 80  # noqa: E731
    pattern = lambda allowed: "".join("S" if on else "." for on in allowed)  # noqa: E731 (S: may speculate)
    assert pattern(_run_windows(windows, clock, rate, 6)) == "S.S..S"  # both measured twice, one exploring
    adaptive[0] = 0  # eighteen windows of another mode's requests
    _run_windows(windows, clock, rate, 18)
    adaptive[0] = 1  # the cadence goes on where it stopped (counting them, the first window back would explore)
    assert pattern(_run_windows(windows, clock, rate, 6)) == "SS.SSS"


def test_an_exploring_window_that_a_pause_took_explores_again():
    """A bench runs each variant in segments of about one window between other variants' segments: the window that
    measured a segment closes at its end and chooses the next, which then spends the pause unmeasured. Counted as
    explored, every exploring window fell in the pauses (session 25: `cosine:drafters=general` decoded 71 of 72
    requests plainly at c1, exploring every other window)."""
    clock, active, adaptive = FakeClock(), [1], [1]
    kinds = []  # the kind of every window measured
    windows = SpeculationWindows(lambda: active[0], lambda: adaptive[0], seconds=1.0, min_windows=2, clock=clock,
                                 on_measured=lambda on, bucket, rate: kinds.append(on))
    # speculation faster within the noise: every other window speculates (see above)
    windows.rates.update({(True, 0): WindowRates(240.0, 4, 0.02 * 240 ** 2),
                          (False, 0): WindowRates(230.0, 4, 0.02 * 230 ** 2)})
    assert windows.verdicts() == {0: False} and windows._exploring_period(0) == 2
    for _ in range(12):  # segments of 1.25 s, each followed by 5 s of other variants
        adaptive[0] = 1
        for _ in range(10):
            clock.now += 0.125
            windows.advance((240 if windows.allowed else 230) * 0.125)
        adaptive[0] = 0
        for _ in range(40):
            clock.now += 0.125
            windows.advance()
    assert len(kinds) >= 12 and kinds.count(True) >= len(kinds) // 2 - 1, kinds


def test_each_set_of_drafters_is_measured_in_its_own_windows():
    """Requests that may draft only from the general drafter must not turn speculation off for requests routed
    among all drafters (nor the other way round)."""
    clock, changes = FakeClock(), []
    monitor = LoadMonitor(on_speculation_change=lambda drafters, on: changes.append((drafters, on)), clock=clock)
    routed, general = ("code", "general"), ("general",)
    monitor.windows(routed)

    def serve(drafters, rate, windows):  # one request of this kind at a time: rate(allowed) tokens per second
        monitor.request_started(drafters)
        for _ in range(windows * 8):
            clock.now += 0.375  # windows of 3 s
            monitor.observe_tokens(rate(monitor.speculation_allowed(drafters)) * 0.375)
        monitor.request_finished(drafters)
    serve(general, lambda on: 60 if on else 100, 8)  # general-only drafting slows the deployment down
    assert monitor.windows(general).verdicts() == {0: False} and not monitor.windows(general).allowed
    assert monitor.windows(routed).rates == {}  # measured nothing meanwhile
    serve(routed, lambda on: 150 if on else 100, 8)
    assert monitor.windows(routed).verdicts() == {0: True} and monitor.windows(general).verdicts() == {0: False}
    assert (general, False) in changes


def test_a_request_drafts_only_while_speculation_pays_and_starts_late_when_it_does():
    first, explorer = CountingDrafter(5, 0.9), CountingDrafter(6, 0.4)
    sessions = [DrafterSession(name, engine, 1, greedy_request()) for name, engine in (("a", first), ("b", explorer))]
    monitor = LoadMonitor()
    monitor.windows(("a", "b")).allowed = False
    proposer = FusionProposer(sessions, CooperatingRouter(), monitor, k_max=3)

    async def rounds():
        await proposer.start([1, 2, 3])
        plain = await proposer.propose([1, 2, 3, 4], budget=10)
        calls_while_off = explorer.calls
        monitor.windows(("a", "b")).allowed = True
        return plain, calls_while_off, await proposer.propose([1, 2, 3, 4, 7], budget=10)
    plain, calls_while_off, late = asyncio.run(rounds())
    assert plain is None and calls_while_off == 0  # no prefill, no scoring, no drafting while speculation is off
    assert late.sources[0] == "a" and late.tree.tokens[0] == 5  # then routed and drafting at once
    assert explorer.calls == 1 + 1  # scoring the context so far, then one fused call


def test_under_load_a_request_starts_its_drafters_in_its_first_round_that_may_speculate():
    """Not as it arrives: a request arriving in a window that allows speculation would prefill every drafter, and
    decode plainly to its end if the windows forbid speculation before its first round."""
    first, explorer = CountingDrafter(5, 0.9), CountingDrafter(6, 0.4)
    sessions = [DrafterSession(name, engine, 1, greedy_request()) for name, engine in (("a", first), ("b", explorer))]
    monitor = LoadMonitor()
    proposer = FusionProposer(sessions, CooperatingRouter(), monitor, k_max=3)
    alone = FusionProposer([DrafterSession("c", CountingDrafter(5, 0.9), 2, greedy_request())], CooperatingRouter(),
                           monitor, k_max=3)

    async def rounds():
        monitor.active_requests = 8
        await proposer.start([1, 2, 3])  # arrives under load while speculation is allowed
        calls_at_arrival = first.calls + explorer.calls
        monitor.windows(("a", "b")).allowed = False
        plain = await proposer.propose([1, 2, 3, 4], budget=10)
        calls_while_off = first.calls + explorer.calls
        monitor.windows(("a", "b")).allowed = True
        late = await proposer.propose([1, 2, 3, 4, 7], budget=64 - 2 - 1)  # as generate() counts it
        monitor.active_requests = 1
        await alone.start([1, 2, 3])  # alone, the drafters prefill as soon as the target has admitted it
        return calls_at_arrival, plain, calls_while_off, late
    calls_at_arrival, plain, calls_while_off, late = asyncio.run(rounds())
    assert calls_at_arrival == 0 and plain is None and calls_while_off == 0
    assert late.sources[0] == "a" and late.tree.tokens[0] == 5  # started (scored, routed) and drafted in one round
    assert first.calls >= 2 and alone.started
    # a late start reserves what the request has left: 64 tokens asked, 2 generated before the drafters joined
    assert first.admitted == explorer.admitted == [(64 - 2, 0)]


# ---- routing ----------------------------------------------------------------------------------------------------
NAMES = ("code", "math", "chat")


def named(values):
    return dict(zip(NAMES, values))


def test_router_prefers_the_drafter_that_finds_the_prompt_likely():
    router = Router(NAMES, seed=1)
    assert all(router.route(named([-3.0, -1.0, -2.5]), max_drafters=2).ranking[0] == "math" for _ in range(200))


def _route_noisy_traffic(router, rng, rates, requests=300):
    """Prompts of 3 domains; each drafter's top token matches the target at rates[domain][drafter] per position.
    Returns how often the first choice was the domain's specialist."""
    right = 0
    for i in range(requests):
        domain = i % 3
        logprobs = named([-2.0 - rng.random() * 0.3 + (1.0 if d == domain else 0.0) for d in range(3)])
        route = router.route(logprobs, max_drafters=2)
        right += route.ranking[0] == NAMES[domain]
        for drafter in route.ranking[:route.cooperate]:
            matches = sum(rng.random() < rates[domain][NAMES.index(drafter)] for _ in range(40))
            router.feedback(route.context, drafter, matches, 40)
    return right / requests


def test_router_keeps_the_likely_specialist_when_acceptance_does_not_tell_drafters_apart():
    """Equal, noisy acceptance (an untrained zoo): feedback must not wash out what the prompt says."""
    rates = [[0.3] * 3] * 3
    assert _route_noisy_traffic(Router(NAMES, seed=4), random.Random(4), rates) >= 0.95
    # a router that ignores the prompt picks by noise: the check above can fail
    assert _route_noisy_traffic(Router(NAMES, seed=4, likelihood_weight=0.0), random.Random(4), rates) < 0.8


def test_router_learns_from_feedback_that_a_likely_drafter_drafts_badly():
    router = Router(NAMES[:2], seed=2)
    logprobs = {"code": -1.0, "math": -1.3}  # code looks best for this kind of prompt...
    for _ in range(50):  # ...but the target rarely agrees with it, and often with math
        router.feedback(context="code", drafter="code", matches=1, trials=10)
        router.feedback(context="code", drafter="math", matches=8, trials=10)
    assert all(router.route(logprobs, max_drafters=2).ranking[0] == "math" for _ in range(100))
    assert router.route(logprobs, max_drafters=1).acceptance == pytest.approx(0.8, abs=0.05)  # the controller's prior


def test_router_explores_by_cooperation_until_the_evidence_is_clear():
    router = Router(NAMES, seed=3)
    logprobs = named([-1.0, -1.2, -1.2])
    early = sum(router.route(logprobs, max_drafters=2).cooperate == 2 for _ in range(200))
    for _ in range(100):  # the first choice is right: the others rarely match the target
        router.feedback(context="code", drafter="code", matches=12, trials=16)
        for drafter in ("math", "chat"):
            router.feedback(context="code", drafter=drafter, matches=2, trials=16)
    late = sum(router.route(logprobs, max_drafters=2).cooperate == 2 for _ in range(200))
    assert early > 60 and late < 10
    assert all(router.route(logprobs, max_drafters=1).cooperate == 1 for _ in range(50))


def test_router_routes_any_subset_in_any_order_and_learns_by_name():
    router = Router(NAMES, seed=5)
    subset = {"chat": -2.0, "math": -1.0}  # two of three, not in deployment order
    route = router.route(subset, max_drafters=1)
    assert route.ranking == ["math", "chat"] and route.context == "math"
    for _ in range(50):  # feedback lands on the named drafter: chat drafts math prompts far better
        router.feedback(context="math", drafter="chat", matches=15, trials=16)
        router.feedback(context="math", drafter="math", matches=1, trials=16)
    assert router.evidence["math"]["chat"][0] > router.evidence["math"]["math"][0]
    assert router.evidence["math"]["code"] == [0.0, 0.0]
    assert router.route({"math": -1.0, "chat": -2.0}, max_drafters=1).ranking[0] == "chat"


def _domain_prompt(rng, domain, length=30):
    """Token ids of a prompt of one of NAMES' domains: mostly the domain's own tokens, some shared ones."""
    return [rng.randrange(100 * domain, 100 * domain + 60) if rng.random() < 0.7 else rng.randrange(900, 920)
            for _ in range(length)]


def _score(router, rng, domains=range(3), prompts=64):
    """Requests whose drafters scored their prompts: the domain's drafter finds each likeliest."""
    for i in range(prompts):
        domain = domains[i % len(domains)]
        router.route(named([-2.0 + (d == domain) for d in range(3)]), max_drafters=1,
                     prompt_ids=_domain_prompt(rng, domain))


def test_router_routes_from_the_prompt_alone_once_its_classifier_has_been_right():
    rng = random.Random(7)
    router = Router(NAMES, seed=7)
    assert router.classify(_domain_prompt(rng, 0), list(NAMES), 1) is None  # nothing learnt: score it
    _score(router, rng)
    assert router.classifier.trusted
    routes = [(domain, router.classify(_domain_prompt(rng, domain), list(NAMES), 1)) for domain in [0, 1, 2] * 100]
    classified = [(domain, route) for domain, route in routes if route is not None]
    # one request in check_every (8) is still scored, so that the classifier's accuracy stays measured
    assert 0.8 <= len(classified) / len(routes) <= 0.95
    assert all(route.context == route.ranking[0] == NAMES[domain] for domain, route in classified)
    # a subset of drafters, in any order: the route stays within it
    subset = [router.classify(_domain_prompt(rng, 1), ["chat", "code"], 1) for _ in range(20)]
    assert all(route.ranking[0] in ("chat", "code") and route.context in ("chat", "code")
               for route in subset if route is not None)


def test_a_restored_router_classifies_as_the_one_whose_state_it_took_back():
    """Router.state() through JSON (as the router model writes it for the process that replaces it): the feedback
    evidence and the trusted classifier come back; for another deployment only the shared drafters' counts do."""
    rng = random.Random(9)
    router = Router(NAMES, seed=9)
    _score(router, rng)
    router.feedback(context="math", drafter="chat", matches=3, trials=16)
    restored = Router(NAMES, seed=9)
    restored.restore(json.loads(json.dumps(router.state())))
    assert restored.classifier.trusted and restored.evidence == router.evidence
    prompts = [_domain_prompt(rng, domain) for domain in [0, 1, 2] * 10]
    assert [restored.classifier.posterior(ids, list(NAMES)) for ids in prompts] == \
        [router.classifier.posterior(ids, list(NAMES)) for ids in prompts]
    routes = [restored.classify(ids, list(NAMES), 1) for ids in prompts]
    assert sum(route is not None for route in routes) >= 20  # all but the one-in-eight checks
    # a deployment that lost a drafter keeps the others' counts, but must earn trust again
    other = Router(["code", "math", "poetry"], seed=9)
    other.restore(json.loads(json.dumps(router.state())))
    assert not other.classifier.trusted
    assert other.classifier.prompt_counts.tolist() == [router.classifier.prompt_counts[NAMES.index(name)]
                                                        for name in ("code", "math")] + [0.0]
    assert other.evidence["math"]["code"] == router.evidence["math"]["code"] and "chat" not in other.evidence


def test_a_classifier_whose_predictions_the_scores_contradict_is_not_trusted():
    rng = random.Random(8)
    router = Router(NAMES, seed=8)
    _score(router, rng)
    assert router.classifier.trusted
    for _ in range(4):  # 4 prompts of the code domain that the drafters' scores put in math
        router.route(named([-2.0, -1.0, -2.0]), max_drafters=1, prompt_ids=_domain_prompt(rng, 0))
    assert not router.classifier.trusted
    assert all(router.classify(_domain_prompt(rng, 0), list(NAMES), 1) is None for _ in range(50))
    # learning without prompt_ids teaches the classifier nothing
    untaught = Router(NAMES, seed=8)
    for i in range(40):
        untaught.route(named([-2.0 + (d == i % 3) for d in range(3)]), max_drafters=1)
    assert not untaught.classifier.trusted and not untaught.classifier.prompt_counts.any()


def test_a_request_the_router_classifies_is_prefilled_by_its_chosen_drafters_only():
    class ClassifyingRouter(OneDrafterRouter):
        classified = None

        async def classify(self, prompt_ids, drafters, max_drafters):
            self.classified = prompt_ids, drafters
            return Route(context="a", ranking=["a", "b"], cooperate=1, acceptance=0.9)

    chosen, other = CountingDrafter(5, 0.9), CountingDrafter(6, 0.4)
    sessions = [DrafterSession(name, engine, 1, greedy_request()) for name, engine in (("a", chosen), ("b", other))]
    router = ClassifyingRouter()
    proposer = FusionProposer(sessions, router, LoadMonitor(), k_max=3)

    async def rounds():
        await proposer.start([1, 2, 3])
        calls_after_start = chosen.calls + other.calls
        draft = await proposer.propose([1, 2, 3, 4], budget=10)
        await proposer.close()
        return calls_after_start, draft
    calls_after_start, draft = asyncio.run(rounds())
    assert router.classified == ([1, 2, 3], ["a", "b"])
    assert calls_after_start == 0 and other.calls == 0  # nobody scored the prompt; the other never saw it
    assert draft.sources == ("a",) * 3 and chosen.calls == 1 and len(chosen.admitted) == 1  # prefill + draft
    # the ablation (classify_prompt=false): the router is not asked to classify; every drafter scores the prompt
    scored, router = [CountingDrafter(5, 0.9), CountingDrafter(6, 0.4)], ClassifyingRouter()
    ablated = FusionProposer([DrafterSession(name, engine, 2, greedy_request()) for name, engine in zip("ab", scored)],
                             router, LoadMonitor(), k_max=3, classify=False)
    asyncio.run(ablated.start([1, 2, 3]))
    assert router.classified is None and [engine.calls for engine in scored] == [1, 1]


def test_the_targets_rounds_feed_the_router_the_drafters_top_token_matches():
    """A round the target ran counts, for the router, the positions it settled and at how many of them the drafter's
    top token was the emitted one (a sampled draft's tokens are draws: its acceptance is not that)."""
    class RecordingRouter(OneDrafterRouter):
        async def feedback(self, context, matches, trials):
            self.given = matches, trials

    router = RecordingRouter()
    proposer = FusionProposer([DrafterSession("a", CountingDrafter(5, 0.9), 1, greedy_request())], router,
                              LoadMonitor(), k_max=3)

    async def rounds():
        await proposer.start([1, 2, 3])
        proposer.observe_rounds([RoundOutcome([4, 5, 6], 3, 1), RoundOutcome([7, 8, 9], 0, 1)])
        await proposer.close()
    asyncio.run(rounds())
    # settled: the whole first draft (3 accepted), the second's first position (rejected there)
    assert router.given == ({"a": 2.0}, {"a": 4.0})


def test_router_rejects_malformed_input():
    with pytest.raises(ValueError, match="drafter_names: unknown drafter 'poetry'"):
        Router(NAMES).route({"poetry": -1.0}, max_drafters=1)
    with pytest.raises(ValueError, match="prompt_logprobs"):
        Router(NAMES).route({}, max_drafters=1)
    with pytest.raises(ValueError, match="feedback"):
        Router(NAMES).feedback(context="poetry", drafter="code", matches=1, trials=1)


class CountingDrafter:
    """A drafter engine that always proposes one token; counts its calls."""
    available = True  # never down (DrafterEngine.available)

    def __init__(self, token: int, prob: float):
        self.token, self.prob, self.calls = token, prob, 0
        self.admitted = []  # (max_tokens, min_length) of each admission

    async def step(self, sequence_id, input_ids, draft=None, *, request=None, keep_length=None, extra_tokens=0,
                   candidates=0, score_input=False, draft_q=None, return_q=False, sent=None):
        if not input_ids:  # as the engine refuses it: the next token comes from the last fed token's logits
            raise StepError("input_ids is empty")
        if request is not None:  # a sequence's first step: what it reserves
            self.admitted.append((request.max_tokens, request.min_length))
        self.calls += 1
        n = extra_tokens + 1
        return StepResult([self.token] * n, [self.prob] * n, [[self.token]] * n, [[self.prob]] * n, -1.0)

    async def release(self, sequence_id):
        pass


class ScoringRouter:
    """A router client whose classifier is never trusted: every request's drafters score its prompt."""

    async def classify(self, prompt_ids, drafters, max_drafters):
        return None

    async def feedback(self, context, matches, trials):
        pass


class CooperatingRouter(ScoringRouter):
    async def route(self, prompt_logprobs, max_drafters, prompt_ids):
        return Route(context="a", ranking=["a", "b"], cooperate=2, acceptance=0.7)


class OneDrafterRouter(ScoringRouter):
    """Routes every request to one drafter, whose acceptance it expects at `acceptance`."""

    def __init__(self, name: str = "a", acceptance: float = 0.9):
        self.name, self.acceptance = name, acceptance

    async def route(self, prompt_logprobs, max_drafters, prompt_ids):
        return Route(context=self.name, ranking=[self.name], cooperate=1, acceptance=self.acceptance)


def monitor_at_one_request(verify_per_token: float) -> LoadMonitor:
    """A load monitor, one request active, that measured verification at 2 ms a pass and verify_per_token a token."""
    monitor = LoadMonitor(forgetting=1.0)
    monitor.active_requests = 1
    for tokens in (1, 2, 4, 8):
        monitor.observe_verify(1, tokens, 0.002 + verify_per_token * tokens)
    return monitor


class SlowDrafter(CountingDrafter):
    """An engine whose every call costs `call_s` on top of its work: a drafter on another node (a network round
    trip), or a target that takes its time."""

    def __init__(self, token: int, prob: float, call_s: float):
        super().__init__(token, prob)
        self.call_s = call_s

    async def step(self, *args, **kwargs):
        await asyncio.sleep(self.call_s)
        return await super().step(*args, **kwargs)


class ClockedTarget(CountingDrafter):
    """A target whose every call takes `call_s` on a fake clock (the deployment's, as generation reads it)."""

    def __init__(self, clock, call_s: float):
        super().__init__(5, 0.9)
        self.clock, self.call_s = clock, call_s

    async def step(self, *args, **kwargs):
        await asyncio.sleep(0)  # the call leaves the event loop
        self.clock.now += self.call_s
        return await super().step(*args, **kwargs)


@pytest.mark.parametrize("mode", ["autoregressive", "vanilla"])
def test_a_rounds_cost_counts_the_time_between_the_requests_calls(tiny_dir, mode, monkeypatch):
    """A round is costed from the end of the request's previous call: the time between calls (here a streamed chunk
    whose send blocks the event loop, as Triton's does) is paid per round by plain decoding and speculation alike.
    Counted for neither, plain decoding, whose calls find their work done ahead on a CPU target, looked cheaper.
    On a fake clock: calls of 20 ms, sends of 20 ms; a request's second round goes before its first round's chunk
    is sent (the chunk waits for the next call), so one round in ten counts no send: 5% below."""
    import types
    from transformers import AutoTokenizer
    from cosine.serving import generation
    from cosine.serving.generation import Deployment, generate
    clock, call_s, between_s = FakeClock(), 0.02, 0.02
    monkeypatch.setattr(generation, "time", types.SimpleNamespace(monotonic=clock))
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir / "tokenizer")
    deployment = Deployment(target=ClockedTarget(clock, call_s), tokenizer=tokenizer, max_context=256, end_id=None,
                            drafters={"general": CountingDrafter(5, 0.9)}, general_drafter="general",
                            plain_decode_steps_alone=4)  # the request is alone on the target

    async def serve():
        async for _ in generate(GenerationRequest("x", max_tokens=41, speculation_mode=mode), deployment):
            clock.now += between_s  # the chunk's send
    asyncio.run(serve())
    monitor = deployment.monitor
    if mode == "autoregressive":  # seconds a token: 4 steps a call
        assert monitor.plain_fit.fitted()[0] == pytest.approx((call_s + between_s) / 4, rel=0.1)
    else:  # seconds a verification of 1 sequence and its 4-token draft
        base, per_sequence, per_token = monitor.verify_fit.fitted()
        assert base + per_sequence + 5 * per_token == pytest.approx(call_s + between_s, rel=0.1)


class ReplicaLog(SlowDrafter):
    """A target replica of a deployment that logs each decoding call in a shared log: (sequence, the call: its
    extra_tokens, "verify" or "rounds", sequences its replica holds, requests active in the deployment). Its rounds
    accept their whole draft, one round a call."""

    def __init__(self, index: int, log: list):
        super().__init__(5, 0.9, 0.001)
        self.index, self.log, self.deployment = index, log, None

    async def step(self, sequence_id, input_ids, draft=None, *, rounds=None, **kwargs):
        if kwargs.get("request") is None:
            call = "rounds" if rounds else "verify" if draft else kwargs.get("extra_tokens", 0)
            self.log.append((sequence_id, call, self.deployment.target.sequences_on(self.index),
                             self.deployment.monitor.active_requests))
        if rounds is None:
            return await super().step(sequence_id, input_ids, draft, **kwargs)
        result = await super().step(sequence_id, input_ids, extra_tokens=rounds.draft_tokens)
        result.rounds = [RoundOutcome(result.tokens[:-1], rounds.draft_tokens, rounds.draft_tokens)]
        return result


@pytest.mark.parametrize("mode", ["autoregressive", "vanilla"])
def test_a_request_alone_on_its_replica_runs_long_calls(tiny_dir, mode):
    """A request alone on its target replica speculates in rounds the target runs (verifications otherwise), and
    decodes plainly in calls of plain_decode_steps_alone steps (plain_decode_steps otherwise) only while no more
    requests are active than there are replicas (else one arriving at its replica would wait for the long call); a
    request's last call runs what its max_tokens leave."""
    from transformers import AutoTokenizer
    from cosine.serving.batching import ReplicatedEngine
    from cosine.serving.generation import Deployment, generate
    log = []
    replicas = [ReplicaLog(index, log) for index in range(2)]
    deployment = Deployment(target=ReplicatedEngine(replicas), tokenizer=AutoTokenizer.from_pretrained(
        tiny_dir / "tokenizer"), max_context=256, end_id=None, plain_decode_steps=4, plain_decode_steps_alone=16,
        drafters={"general": CountingDrafter(5, 0.9)}, general_drafter="general", target_rounds=3,
        round_drafters=("general",))
    for replica in replicas:
        replica.deployment = deployment

    async def serve(lengths: tuple[int, ...]):  # admitted in this order, each to the replica holding fewest
        async def one(max_tokens):
            async for _ in generate(GenerationRequest("x", max_tokens=max_tokens, speculation_mode=mode,
                                                      num_draft_tokens=2), deployment):
                pass
        await asyncio.gather(*map(one, lengths))
    # alone; each alone on its replica; the first and third share a replica, then the second, alone on the other,
    # ends first, and they share it with no more requests active than replicas
    for lengths in ((41,), (41, 41), (41, 21, 41)):
        asyncio.run(serve(lengths))
    long_call, short_call = (15, 3) if mode == "autoregressive" else ("rounds", "verify")
    last_call = {sequence: i for i, (sequence, *_) in enumerate(log)}
    seen = set()
    for i, (sequence, call, held, active) in enumerate(log):
        if last_call[sequence] != i:
            seen.add((held, active))
            load_allows = active <= len(replicas) or mode == "vanilla"  # target rounds run at any load
            assert call == (long_call if held == 1 and load_allows else short_call), log
    assert {(1, 1), (1, 2), (1, 3), (2, 3), (2, 2)} <= seen, seen


def test_an_exploring_drafter_cooperates_for_the_first_rounds_only():
    first, explorer = CountingDrafter(5, 0.9), CountingDrafter(6, 0.4)
    sessions = [DrafterSession(name, engine, 1, greedy_request()) for name, engine in (("a", first), ("b", explorer))]
    proposer = FusionProposer(sessions, CooperatingRouter(), LoadMonitor(), k_max=3, exploring_rounds=2)

    async def rounds():
        await proposer.start([1, 2, 3])
        drafts = []
        for _ in range(3):
            drafts.append((await proposer.propose([1, 2, 3], budget=10), len(proposer.sessions) > 1))
        return drafts
    drafts = asyncio.run(rounds())
    # fused: both propose, the confident token leads, the other is its sibling; the other's later tokens followed
    # its own, so it proposes no more
    assert [exploring for _, exploring in drafts] == [True, True, False]
    assert drafts[0][0].tree.tokens == (5, 6, 5, 5) and drafts[0][0].sources == ("a", "b", "a", "a")
    assert drafts[2][0].tree.tokens == (5, 5, 5)  # the first choice alone (this fake offers no runner-ups)
    assert [draft.origin for draft, _ in drafts] == [DraftOrigin.FUSED, DraftOrigin.FUSED, DraftOrigin.ALONE]
    assert explorer.calls == 1 + 2 and first.calls == 1 + 3  # the prompt's scoring, then one call per round


class ChainSampler(CountingDrafter):
    """A sampling drafter over 3 tokens whose q depends on the last token; its confidence is its q's largest
    probability, as the engine's untempered top probability depends on the context only."""

    def __init__(self, q_after: list[list[float]], rng: random.Random):
        super().__init__(0, 1.0)
        self.q_after, self.rng = q_after, rng

    async def step(self, sequence_id, input_ids, draft=None, *, extra_tokens=0, **_):
        tokens, probs, q_rows, last = [], [], [], input_ids[-1]
        for _ in range(extra_tokens + 1):
            q = self.q_after[last]
            last = self.rng.choices(range(3), q)[0]
            tokens.append(last)
            probs.append(q[last])
            q_rows.append(q)
        return StepResult(tokens, probs, [[max(range(3), key=q.__getitem__)] for q in q_rows],
                          [[max(q)] for q in q_rows], -1.0, SparseDistributions.over_vocabulary(torch.tensor(q_rows)))


def test_a_fused_sampled_draft_token_is_a_draw_from_its_leaders_q_given_the_draft_before_it():
    """Exactness of fused sampling: at each depth the leader is chosen from what came before (who still follows
    the draft, their confidences there), never from this depth's draws. A rule that picks the leader by the
    probability of the token it drew fails this."""
    rng = random.Random(3)
    q_after = {"a": [[0.5, 0.3, 0.2], [0.6, 0.2, 0.2], [0.2, 0.2, 0.6]],
               "b": [[0.3, 0.6, 0.1], [0.1, 0.1, 0.8], [0.3, 0.5, 0.2]]}
    sampled = dataclasses.replace(greedy_request(), params=SamplingParams(temperature=1.0))
    counts = collections.Counter()  # (first token, second depth's leader, second token)

    sessions = [DrafterSession(name, ChainSampler(q, rng), 1, sampled) for name, q in q_after.items()]
    proposer = FusionProposer(sessions, CooperatingRouter(), LoadMonitor(), k_max=2, adaptive=False,
                              exploring_rounds=20_000)

    async def drafts():
        await proposer.start([0])
        for _ in range(20_000):
            draft = await proposer.propose([0], budget=2)
            assert draft.origin == DraftOrigin.FUSED and draft.tree.parents == (-1, 0)
            leader = draft.sources[1]
            if len(counts) < 18:  # each draft's q rows are its leaders'
                assert draft.q.dense("cpu").flatten().tolist() == pytest.approx(
                    q_after[draft.sources[0]][0] + q_after[leader][draft.tree.tokens[0]])
            counts[draft.tree.tokens[0], leader, draft.tree.tokens[1]] += 1
    asyncio.run(drafts())
    first = [sum(n for (t, *_), n in counts.items() if t == token) / 20_000 for token in range(3)]
    assert first == pytest.approx(q_after["b"][0], abs=0.015)  # "b" is the more confident after token 0
    for token in range(3):
        for leader in q_after:
            cell = [counts[token, leader, second] for second in range(3)]
            if sum(cell) >= 500:
                assert [n / sum(cell) for n in cell] == pytest.approx(q_after[leader][token], abs=0.05), \
                    (token, leader, cell)


# ---- scheduling -------------------------------------------------------------------------------------------------
class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _waiting(scheduler, clock, entries):
    from cosine.speculation.scheduler import _Waiting

    loop = asyncio.new_event_loop()
    for arrival, tokens, value in entries:
        scheduler.waiting.append(_Waiting(arrival, tokens, value, loop.create_future()))
    loop.close()


def test_scheduler_caps_tokens_and_prefers_value_and_waiting():
    clock = FakeClock()
    scheduler = VerificationScheduler(token_cap=20, latency_weight=1.0, max_wait_s=10, clock=clock)
    _waiting(scheduler, clock, [(0.0, 10, 0.1), (0.0, 10, 0.9), (0.0, 8, 0.5), (0.0, 5, 0.2)])
    clock.now = 0.05
    batch = scheduler.next_batch()
    assert [e.value for e in batch] == [0.9, 0.5]  # 18 tokens; the 10-token 0.1 one does not fit, 5 more would
    assert sum(e.tokens for e in batch) <= 20
    assert [e.value for e in scheduler.next_batch()] == [0.2, 0.1]


def test_scheduler_never_starves_a_low_value_request():
    clock = FakeClock()
    scheduler = VerificationScheduler(token_cap=10, latency_weight=0.0, max_wait_s=1.0, clock=clock)
    _waiting(scheduler, clock, [(0.0, 10, 0.01)])
    for step in range(5):
        clock.now = step * 0.3
        _waiting(scheduler, clock, [(clock.now, 10, 0.9)])
        batch = scheduler.next_batch()
        if batch[0].value == 0.01:
            break
    assert batch[0].value == 0.01 and clock.now >= 1.0


def test_scheduler_gathers_the_active_requests_before_releasing():
    active = 3
    scheduler = VerificationScheduler(gather_window_s=5.0, active_requests=lambda: active)
    started = []

    async def verify(name, delay):
        await asyncio.sleep(delay)
        async with scheduler.slot(name, 1):
            started.append((name, scheduler.in_flight))

    async def main():
        await asyncio.wait_for(asyncio.gather(verify("a", 0), verify("b", 0.01), verify("c", 0.02)), timeout=2)

    asyncio.run(main())  # well inside the 5 s window: released as soon as all three waited
    assert sorted(name for name, _ in started) == ["a", "b", "c"]
    assert max(in_flight for _, in_flight in started) == 3  # one batch of three


def test_scheduler_window_releases_a_partial_batch():
    scheduler = VerificationScheduler(gather_window_s=0.01, active_requests=lambda: 5)

    async def main():
        async with scheduler.slot("a", 1):
            return scheduler.in_flight

    assert asyncio.run(asyncio.wait_for(main(), timeout=2)) == 1


def test_scheduler_releases_one_batch_at_a_time():
    scheduler = VerificationScheduler(token_cap=100)
    order = []

    async def verify(name, tokens):
        async with scheduler.slot(name, tokens):
            order.append(("start", name, scheduler.in_flight))
            await asyncio.sleep(0.01)
            order.append(("end", name))

    async def main():
        await asyncio.gather(*(verify(n, 10) for n in "abc"))

    asyncio.run(main())
    assert order[0] == ("start", "a", 1)  # the first arrival went alone
    assert max(in_flight for kind, *rest in order if kind == "start" for in_flight in rest[1:]) == 2
    assert scheduler.in_flight == 0 and not scheduler.waiting


def test_scheduler_waits_for_a_sequence_back_from_the_last_pass_as_long_as_that_pass_took():
    """Base window 1 ms, passes of 100 ms. A sequence that drafts 30 ms after a pass still joins the other's next
    pass; one admitted meanwhile that never passed is not waited for; one that drafts longer than a pass is waited
    for about a pass's time only; one that finished not at all."""
    held = ["a", "b"]
    scheduler = VerificationScheduler(gather_window_s=0.001, active_requests=lambda: len(held))
    passes = []  # (sequence, sequences in its pass, seconds from its round's start to its pass)

    async def verify(name, drafting_s, started):
        await asyncio.sleep(drafting_s)
        async with scheduler.slot(name, 1):
            passes.append((name, scheduler.in_flight, asyncio.get_running_loop().time() - started))
            await asyncio.sleep(0.1)

    async def round_of(**drafting_s):
        passes.clear()
        started = asyncio.get_running_loop().time()
        await asyncio.gather(*(verify(name, s, started) for name, s in drafting_s.items()))
        return sorted(passes)

    async def main():
        await round_of(a=0, b=0)
        together = await round_of(a=0, b=0.03)
        held.append("c")  # admitted, prefilling
        without_c = await round_of(a=0, b=0.03)
        apart = await round_of(a=0, b=0.3)
        scheduler.forget("b")  # b finished; still held until its release
        alone = await round_of(a=0)
        return together, without_c, apart, alone

    together, without_c, apart, alone = asyncio.run(asyncio.wait_for(main(), timeout=10))
    assert [size for _, size, _ in together] == [2, 2]  # the 1-ms window alone would have split them
    assert [size for _, size, _ in without_c] == [2, 2] and without_c[0][2] < 0.08  # not held for c
    assert apart[0][1] == 1 and 0.08 < apart[0][2] < 0.25  # a waited about one pass's time, then went alone
    assert alone[0][2] < 0.05


def test_a_requests_last_chunk_leaves_its_replicas_next_pass_free_of_it(tiny_dir):
    """When a request has its last tokens, its replica's scheduler stops waiting for it while the chunk goes out,
    before the release that follows the consumer's taking it."""
    from transformers import AutoTokenizer
    from cosine.serving.batching import ReplicatedEngine
    from cosine.serving.generation import Deployment, generate
    target = ReplicatedEngine([CountingDrafter(5, 1.0)])
    deployment = Deployment(target=target, tokenizer=AutoTokenizer.from_pretrained(tiny_dir / "tokenizer"),
                            max_context=128, end_id=None)
    seen = []

    async def main():
        async for chunk in generate(GenerationRequest("x", max_tokens=5), deployment):
            seen.append((chunk.finished, set(target.schedulers[0].returning), len(target.home)))

    asyncio.run(main())
    assert seen[-1] == (True, set(), 1) and len(seen) > 2
    assert not target.home


class CandidatesDrafter(CountingDrafter):
    """A greedy drafter whose every position offers these (token, confidence) candidates, best first."""

    def __init__(self, candidates):
        super().__init__(candidates[0][0], 1.0)
        self.candidates = candidates

    async def step(self, sequence_id, input_ids, draft=None, *, extra_tokens=0, candidates=0, **_):
        self.calls += 1
        n = extra_tokens + 1
        top = self.candidates[:candidates or 1]
        return StepResult([self.token] * n, [1.0] * n, [[t for t, _ in top]] * n, [[p for _, p in top]] * n, -1.0)


def test_fusion_follows_the_more_confident_drafter_and_skips_worthless_siblings():
    unsure = CandidatesDrafter([(6, 0.4), (9, 0.0)])  # ranked first by the router, but unsure
    sure = CandidatesDrafter([(5, 0.9), (8, 0.05)])
    sessions = [DrafterSession(name, engine, 1, greedy_request()) for name, engine in (("a", unsure), ("b", sure))]
    proposer = FusionProposer(sessions, CooperatingRouter(), LoadMonitor(), k_max=2, exploring_rounds=2)

    async def draft():
        await proposer.start([1, 2, 3])
        return await proposer.propose([1, 2, 3], budget=10)
    tree = asyncio.run(draft()).tree
    chain = [tree.tokens[n] for n, parent in enumerate(tree.parents) if parent == -1 or tree.tokens[parent] == 5]
    assert chain[0] == 5  # the confident drafter's token leads, whatever the router's order
    assert 9 not in tree.tokens  # a zero-confidence candidate never costs a verifier token
    assert 6 in tree.tokens  # a runner-up with a real chance is worth one (nothing measured yet: no price)


def test_siblings_must_pay_for_their_verifier_token():
    builder = TreeBuilder(max_siblings=2, min_sibling_value=0.3)
    builder.add_step([Candidate(1, 0.5, "a"), Candidate(2, 0.35, "a"), Candidate(3, 0.1, "a")])
    builder.add_step([Candidate(4, 0.6, "a"), Candidate(5, 0.4, "a")])  # reach 0.5: 0.5 * 0.4 < 0.3
    assert builder.tree().tokens == (1, 2, 4)


def test_sibling_branches_do_not_shorten_the_draft_since_each_pays_for_itself():
    """The controller costs a draft by its chain. Costed as if every depth hung a sibling (greedy and idle: siblings
    allowed), greedy rounds at c1 decoded plainly where chains of 12 paid (session 27, the controller's log: plain in
    128 of 730 rounds against 21), though a sibling is hung only where its chance pays its verifier token."""
    monitor = monitor_at_one_request(verify_per_token=0.0005)  # a verifier token costs a quarter of a pass
    for positions in (1, 2, 4):
        monitor.observe_draft(positions, 0.0002 * positions)
    for _ in range(3):
        monitor.observe_plain(0.0016)
    drafter = CandidatesDrafter([(5, 0.9), (8, 0.1)])
    proposer = FusionProposer([DrafterSession("a", drafter, 1, greedy_request())], OneDrafterRouter(acceptance=0.7),
                              monitor, k_max=4)

    async def draft():
        await proposer.start([1, 2, 3])
        return await proposer.propose([1, 2, 3], budget=10)
    drafted = asyncio.run(draft())
    assert proposer._siblings() == 1  # siblings may be hung, and none is worth its token here
    assert drafted is not None and drafted.tree.tokens == (5, 5, 5, 5)


def test_a_remote_drafters_round_trip_is_measured_into_its_cost_and_can_turn_speculation_off():
    monitor = monitor_at_one_request(verify_per_token=0.0001)  # a fast verifier: 2 ms a pass
    session = DrafterSession("far", SlowDrafter(5, 0.9, call_s=0.03), 1, greedy_request())
    proposer = FusionProposer([session], OneDrafterRouter("far"), monitor, k_max=4)

    async def rounds():
        await proposer.start([1, 2, 3])
        for _ in range(3):  # nothing measured yet: full-length drafts, every one accepted
            draft = await proposer.propose([1, 2, 3], budget=10)
            proposer.observe(draft, accepted=list(range(len(draft.tree))), emitted=[5] * 5)
        return await proposer.propose([1, 2, 3], budget=10)
    after = asyncio.run(rounds())
    assert monitor.costs().draft_base >= 0.025  # the 30 ms round trip is in the fitted cost, measured
    assert after is None  # drafting costs more than it saves even at full acceptance: plain decoding


def test_where_fused_drafting_does_not_pay_the_first_choice_drafts_alone_at_once():
    """A call per position to remote drafters can cost more than fused drafting brings: exploring would then mean
    plain decoding until the next probe (measured: cosine 0.9x plain decoding at 2 ms); the first choice drafts."""
    monitor = monitor_at_one_request(verify_per_token=0.0001)
    for positions in (2, 4, 8):
        monitor.observe_draft(positions, 0.05 * positions, fused=True)  # a round trip per position, each 50 ms
    first, explorer = CountingDrafter(5, 0.9), CountingDrafter(6, 0.4)
    sessions = [DrafterSession(name, engine, 1, greedy_request()) for name, engine in (("a", first), ("b", explorer))]
    proposer = FusionProposer(sessions, CooperatingRouter(), monitor, k_max=4)

    async def draft():
        await proposer.start([1, 2, 3])
        return await proposer.propose([1, 2, 3], budget=10)
    tree = asyncio.run(draft()).tree
    assert tree.tokens == (5, 5, 5, 5) and len(proposer.sessions) == 1
    assert explorer.calls == 1  # its prompt scoring only


class RecordingDrafter(CountingDrafter):
    """Drafts token 5 at every position; records each call's (keep_length, input_ids, tokens drafted)."""

    def __init__(self):
        super().__init__(5, 0.9)
        self.log = []

    async def step(self, sequence_id, input_ids, draft=None, *, keep_length=None, extra_tokens=0, **kwargs):
        self.log.append((keep_length, list(input_ids), extra_tokens + 1))
        return await super().step(sequence_id, input_ids, extra_tokens=extra_tokens, **kwargs)


@pytest.mark.parametrize("pipelined,busy", [(True, False), (False, False), (True, True)])
def test_pipelined_drafting_drafts_the_next_round_during_verification(pipelined, busy):
    """While the target verifies a chain, the drafter drafts the round after it, assuming the whole chain is
    accepted and the target's token is the drafter's own next one; that draft is used only when this happened, and
    only while the deployment is not busy."""
    drafter = RecordingDrafter()
    monitor = LoadMonitor()
    monitor.active_requests = 3 if busy else 1
    proposer = FusionProposer([DrafterSession("a", drafter, 1, greedy_request())], OneDrafterRouter(), monitor,
                              k_max=3, pipelined=pipelined)
    prompt = [1, 2, 3]
    first_round = prompt + [9]  # the target's first token

    async def rounds():
        await proposer.start(prompt)
        drafts = [await proposer.propose(first_round, budget=20)]
        proposer.draft_ahead(drafts[-1], first_round, budget=20)
        hit = first_round + [5, 5, 5, 5]  # the chain accepted, and the target's own token was 5
        drafts.append(await proposer.propose(hit, budget=16))
        proposer.draft_ahead(drafts[-1], hit, budget=16)
        drafts.append(await proposer.propose(hit + [5, 7], budget=14))  # one accepted, then the target's 7
        await proposer.close()
        return drafts
    drafts = asyncio.run(rounds())
    assert [draft.tree.tokens for draft in drafts] == [(5, 5, 5)] * 3
    # each call: (tokens the drafter keeps, tokens fed, tokens drafted)
    # prompt scored (busy: in the first round, with the target's first token), then the first chain drafted
    assert drafter.log[:2] == [(None, first_round if busy else prompt, 1), (3, [9], 3)]
    if pipelined and not busy:
        assert drafter.log[2:] == [(6, [5], 4),  # during verification: the assumed token, then the next chain
                                   (10, [5], 4),  # the hit used that draft and drafted ahead again
                                   (9, [7], 3)]  # the miss drafts anew, rolled back to what the target kept
        # what the metrics count: the hit's draft was made ahead; the miss dropped the one made ahead
        assert [(d.origin, d.dropped_ahead) for d in drafts] == [
            (DraftOrigin.ALONE, False), (DraftOrigin.AHEAD, False), (DraftOrigin.ALONE, True)]
    else:
        assert drafter.log[2:] == [(6, [5, 5], 3), (9, [7], 3)]  # a call per round, after verification
        assert [(d.origin, d.dropped_ahead) for d in drafts] == [(DraftOrigin.ALONE, False)] * 3
