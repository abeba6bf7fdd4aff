"""Speculative decoding through the real deployment: exactness, acceptance, errors."""
import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from served import as_list, generate, metric, start_server
from tiny_models import PROMPTS


def run(server, prompt, max_tokens=30, **extra):
    out = generate(server, text_input=prompt, max_tokens=max_tokens, return_stats=True, **extra)
    return as_list(out["output_ids"]), as_list(out["speculation_stats"])


@pytest.mark.parametrize("k", [1, 3, 6])
def test_vanilla_with_the_target_as_drafter_accepts_everything(server, k):
    target_only, _ = run(server, PROMPTS[0], speculation_mode="autoregressive")
    ids, (rounds, drafted, accepted) = run(server, PROMPTS[0], speculation_mode="vanilla", drafters=["itself"],
                                           num_draft_tokens=k)
    assert ids == target_only
    assert accepted == drafted > 0
    assert rounds <= 1 + -(-(len(ids) - 1) // (k + 1))  # k + 1 tokens per round after the prefill's first


@pytest.mark.parametrize("k", [1, 3, 6])
def test_vanilla_with_an_unrelated_drafter_is_still_exact(server, k):
    target_only, _ = run(server, PROMPTS[2], speculation_mode="autoregressive")
    ids, (rounds, drafted, accepted) = run(server, PROMPTS[2], speculation_mode="vanilla", drafters=["unrelated"],
                                           num_draft_tokens=k)
    assert ids == target_only
    assert accepted < drafted / 4


MODES = [("vanilla", ["itself"], 3), ("vanilla", ["unrelated"], 2), ("autoregressive", [], 1),
         ("specinfer", [], 3), ("cosine", [], 4), ("specinfer", ["unrelated", "itself"], 2)]


def test_every_mode_beside_concurrent_requests_is_exact(server):
    alone = {p: run(server, p, speculation_mode="autoregressive")[0] for p in PROMPTS}
    jobs = [(p, MODES[i % len(MODES)]) for i, p in enumerate(PROMPTS * 3)]

    def one(job):
        prompt, (mode, drafters, k) = job
        return run(server, prompt, speculation_mode=mode, num_draft_tokens=k, **({"drafters": drafters} if drafters
                                                                                   else {}))[0]
    with ThreadPoolExecutor(8) as pool:
        outputs = list(pool.map(one, jobs))
    assert outputs == [alone[p] for p, _ in jobs]


@pytest.mark.parametrize("drafters", [["unrelated"], ["itself"], ["unrelated", "itself"], ["itself", "unrelated"]])
def test_cosine_routes_within_a_named_subset_in_any_order(server, drafters):
    """Routing is by name: the first choice is one of the named drafters (a positional router, given a subset,
    failed or picked by position), the router counts it under that name, and the output stays exact. Which of
    them wins is the router's business (prompt likelihood, then feedback; unit-tested)."""
    before = {name: metric(server, "cosine_router_requests_total", drafter=name) for name in drafters}
    # fixed length: an adaptive request may start plainly, unrouted, where plain decoding is measured faster
    out = generate(server, text_input=PROMPTS[4], max_tokens=30, return_stats=True, speculation_mode="cosine",
                   drafters=drafters, adaptive_draft_length=False)
    chosen = as_list(out["routed_drafters"])[0]
    assert chosen in drafters
    assert metric(server, "cosine_router_requests_total", drafter=chosen) == before[chosen] + 1
    assert as_list(out["output_ids"]) == run(server, PROMPTS[4], speculation_mode="autoregressive")[0]


def test_cosine_ablation_switches(server):
    """max_drafters=1: the routed drafter alone (no fusion); adaptive_draft_length=false: num_draft_tokens drafted
    every round (the controller would shorten drafts that are all rejected). Output stays exact."""
    target_only, _ = run(server, PROMPTS[1], speculation_mode="autoregressive")
    out = generate(server, text_input=PROMPTS[1], max_tokens=30, return_stats=True, speculation_mode="cosine",
                   drafters=["unrelated", "itself"], max_drafters=1)
    assert len(as_list(out["routed_drafters"])) == 1
    assert as_list(out["output_ids"]) == target_only
    ids, (rounds, drafted, _) = run(server, PROMPTS[1], speculation_mode="cosine", drafters=["unrelated"],
                                    num_draft_tokens=3, adaptive_draft_length=False)
    assert ids == target_only
    assert drafted >= 3 * (rounds - 2)  # every verification round but a budget-capped last one drafts 3


def test_acceptance_metrics_per_drafter(server):
    before = metric(server, "cosine_accepted_tokens_total", drafter="itself")
    drafted_before = metric(server, "cosine_draft_tokens_total", drafter="itself")
    drafts_before = {origin: metric(server, "cosine_drafts_total", mode=mode, origin=origin)
                     for mode, origin in (("vanilla", "alone"), ("specinfer", "merged"))}
    rounds_before = metric(server, "cosine_rounds_total", mode="vanilla")
    four_before = metric(server, "cosine_rounds_total", mode="vanilla", draft_depth="4")
    _, (rounds, drafted, accepted) = run(server, PROMPTS[4], speculation_mode="vanilla", drafters=["itself"],
                                         num_draft_tokens=4)
    # every round after the prefill's, by its draft's depth: 4, but a budget-capped last one
    assert metric(server, "cosine_rounds_total", mode="vanilla") - rounds_before == rounds - 1
    assert metric(server, "cosine_accepted_tokens_total", drafter="itself") - before == accepted
    assert metric(server, "cosine_draft_tokens_total", drafter="itself") - drafted_before == drafted
    assert metric(server, "cosine_accepted_at_position_total", drafter="itself", position="4") > 0
    # every chain vanilla drafted was one drafter's call in its round; a round of 4 tokens at most
    assert metric(server, "cosine_drafts_total", mode="vanilla", origin="alone") - drafts_before["alone"] \
        == pytest.approx(drafted / 4, abs=1)
    assert metric(server, "cosine_rounds_total", mode="vanilla", draft_depth="4") - four_before \
        == pytest.approx(drafted / 4, abs=1)
    run(server, PROMPTS[4], speculation_mode="specinfer", drafters=["itself", "unrelated"], num_draft_tokens=2)
    assert metric(server, "cosine_drafts_total", mode="specinfer", origin="merged") > drafts_before["merged"]


def test_a_drafter_in_the_cosine_process_is_no_model_and_reports_as_one(server):
    """`itself` drafts inside the `cosine` model's process (conftest): Triton serves no model of it, and its
    engine's steps count under its model's name, as an engine model's do."""
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(f"http://{server.http_url}/v2/models/drafter_itself/ready")
    assert urllib.request.urlopen(f"http://{server.http_url}/v2/models/drafter_unrelated/ready").status == 200
    batches, busy = (metric(server, name, model="drafter_itself")
                     for name in ("cosine_engine_batches_total", "cosine_engine_busy_seconds_total"))
    _, (rounds, drafted, accepted) = run(server, PROMPTS[1], speculation_mode="vanilla", drafters=["itself"],
                                         num_draft_tokens=4)
    assert accepted == drafted > 0
    assert metric(server, "cosine_engine_batches_total", model="drafter_itself") - batches >= drafted / 4
    assert metric(server, "cosine_engine_busy_seconds_total", model="drafter_itself") > busy


def test_cosine_drafts_ahead_while_the_target_verifies(server):
    """Pipelined drafting through the deployment: with the target as its own drafter every main chain is accepted
    whole (runner-up siblings never are) and the target's next token is the drafter's, so after the first round
    each draft was made ahead, and none made ahead is dropped; with pipelining off none is made ahead."""
    def drafts(origin):
        return metric(server, "cosine_drafts_total", mode="cosine", origin=origin)
    body = dict(speculation_mode="cosine", drafters=["itself"], num_draft_tokens=3, adaptive_draft_length=False)
    before = {origin: drafts(origin) for origin in ("alone", "ahead")}
    dropped = metric(server, "cosine_ahead_drafts_dropped_total", mode="cosine")
    ids, (rounds, _, _) = run(server, PROMPTS[0], **body)
    ahead, alone = (drafts(origin) - before[origin] for origin in ("ahead", "alone"))
    assert ahead >= alone > 0 and ahead + alone <= rounds - 1  # the prefill's round drafts nothing
    assert metric(server, "cosine_ahead_drafts_dropped_total", mode="cosine") == dropped
    before = drafts("ahead")
    assert run(server, PROMPTS[0], pipelined_drafting=False, **body)[0] == ids
    assert drafts("ahead") == before


def test_speculation_windows_publish_their_evidence(server):
    """Adaptive cosine requests for a window's length (3 s) close at least one speculation window: the metrics show
    it, with the rate it measured, under the request's drafters, its load and whether it could draft."""
    before = metric(server, "cosine_speculation_windows_total")
    deadline = time.monotonic() + 5.0  # a 3 s window at least half busy closes within 4.5 s of the first request

    def keep_busy(worker):
        while time.monotonic() < deadline:
            run(server, PROMPTS[worker], speculation_mode="cosine")
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(keep_busy, range(2)))
    assert metric(server, "cosine_speculation_windows_total") > before
    text = urllib.request.urlopen(server.metrics_url).read().decode()
    rates = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
             if line.startswith("cosine_speculation_window_tokens_per_second{")]
    assert rates and all(rate > 0 for rate in rates)
    assert any('load="1"' in line or 'load="2"' in line for line in text.splitlines()
               if line.startswith("cosine_speculation_windows_total{"))


def test_a_failing_drafter_is_routed_around(server):
    target_only, _ = run(server, PROMPTS[3], speculation_mode="autoregressive")
    for mode, drafters in [("vanilla", ["broken"]), ("specinfer", ["broken", "itself"]), ("cosine", [])]:
        ids, (_, drafted, accepted) = run(server, PROMPTS[3], speculation_mode=mode, drafters=drafters)
        assert ids == target_only, mode
    assert metric(server, "cosine_requests_total", status="error") == 0


@pytest.mark.parametrize("extra,field", [
    (dict(num_draft_tokens=-1), "num_draft_tokens"),
    (dict(num_draft_tokens=0), "num_draft_tokens"),
    (dict(num_draft_tokens=100000), "num_draft_tokens"),
    (dict(drafters=["nope"]), "drafters"),
    (dict(speculation_mode="warp"), "speculation_mode"),
    (dict(speculation_mode="cosine", max_drafters=0), "max_drafters"),
])
def test_bad_speculative_parameters_are_400s(server, extra, field):
    with pytest.raises(urllib.error.HTTPError) as caught:
        generate(server, text_input="hi", **{"speculation_mode": "vanilla", **extra})
    assert caught.value.code == 400
    assert field in json.loads(caught.value.read())["error"]


def test_seeded_speculative_sampling_is_reproducible(server):
    body = dict(speculation_mode="vanilla", drafters=["itself"], temperature=1.0, top_p=0.9, num_draft_tokens=3)
    a, _ = run(server, PROMPTS[5], random_seed=11, **body)
    b, _ = run(server, PROMPTS[5], random_seed=11, **body)
    c, _ = run(server, PROMPTS[5], random_seed=12, **body)
    assert a == b and a != c


@pytest.mark.parametrize("mode", ["vanilla", "cosine"])
def test_sampling_with_the_target_as_drafter_accepts_almost_everything(server, mode):
    """q travels drafter -> cosine -> target: with q == p, min(1, p/q) = 1 (without q about 1% was accepted)."""
    drafted = accepted = 0
    for seed in range(4):
        _, (_, d, a) = run(server, PROMPTS[seed], max_tokens=40, speculation_mode=mode, drafters=["itself"],
                           num_draft_tokens=4, temperature=1.0, random_seed=seed,
                           **({"adaptive_draft_length": False} if mode == "cosine" else {}))  # drafts every round
        drafted, accepted = drafted + d, accepted + a
    assert drafted > 0 and accepted / drafted >= 0.95, (accepted, drafted)


@pytest.fixture(scope="module")
def rounds_server(tmp_path_factory, tiny_dir, llama):
    """A target with copies of the drafters, running 3 speculation rounds per call for a request alone on it."""
    root = tmp_path_factory.mktemp("rounds")
    engine = {"kv_cache_tokens": 8192, "num_threads": 1, "idle_timeout_s": 30}
    spec = {"target": dict(engine, checkpoint=str(llama), replicas=1),
            "drafters": {"itself": dict(engine, checkpoint=str(llama), in_cosine_process=True),
                         "unrelated": dict(engine, checkpoint=str(tiny_dir / "unrelated"))},
            "speculation_mode": "autoregressive", "target_rounds": 3}
    server = start_server(spec, root, text_models=False)
    yield server
    server.stop()


@pytest.mark.parametrize("mode, drafters", [("vanilla", ["itself"]), ("vanilla", ["unrelated"]),
                                            ("cosine", ["itself", "unrelated"])])
def test_rounds_in_the_target_are_exact_and_learn_as_rounds_made_here(rounds_server, mode, drafters):
    """A request alone on the target: its rounds run in the target's process, 3 a call (counted by origin
    `target`), its output is the target's own greedy output, and what they drafted and accepted comes back (the
    target itself as the drafter: everything accepted)."""
    server = rounds_server
    target_only, _ = run(server, PROMPTS[3], max_tokens=40, speculation_mode="autoregressive")
    before = metric(server, "cosine_drafts_total", origin="target")
    ids, (rounds, drafted, accepted) = run(server, PROMPTS[3], max_tokens=40, speculation_mode=mode,
                                           drafters=drafters, num_draft_tokens=3, adaptive_draft_length=False)
    assert ids == target_only
    target_rounds = metric(server, "cosine_drafts_total", origin="target") - before
    # every round but the prefill's; cosine's first three draft here: two fused with the exploring drafter, then one
    # alone as it leaves
    assert target_rounds >= rounds - (4 if mode == "cosine" else 1) > 0 and drafted > 0
    if drafters == ["itself"]:
        assert accepted == drafted


def test_rounds_in_the_target_beside_concurrent_requests_are_exact(rounds_server):
    """Requests that share the target verify in passes here; one left alone goes on in target rounds."""
    alone = {p: run(rounds_server, p, speculation_mode="autoregressive")[0] for p in PROMPTS}
    jobs = [(p, MODES[i % 2]) for i, p in enumerate(PROMPTS * 2)]
    with ThreadPoolExecutor(4) as pool:
        outputs = list(pool.map(lambda job: run(rounds_server, job[0], speculation_mode=job[1][0],
                                                num_draft_tokens=job[1][2], drafters=job[1][1])[0], jobs))
    assert outputs == [alone[p] for p, _ in jobs]


@pytest.mark.parametrize("mode", ["vanilla", "cosine"])
def test_sampled_rounds_in_the_target_accept_the_target_as_drafter_by_its_q(rounds_server, mode):
    """Sampled rounds run in the target too, the drafter copy's q never leaving the target's process: with the
    target itself as the drafter at temperature 1 nearly every draft token is accepted (min(1, p/q) = 1)."""
    before = metric(rounds_server, "cosine_drafts_total", origin="target")
    body = dict(max_tokens=40, speculation_mode=mode, drafters=["itself"], num_draft_tokens=4, temperature=1.0,
                adaptive_draft_length=False)
    ids, (rounds, drafted, accepted) = run(rounds_server, PROMPTS[0], random_seed=3, **body)
    assert metric(rounds_server, "cosine_drafts_total", origin="target") - before >= rounds - 4 > 0
    assert drafted > 0 and accepted / drafted >= 0.95, (accepted, drafted)
    if mode == "vanilla":  # every round after the prefill in the target: a seeded request repeats
        assert run(rounds_server, PROMPTS[0], random_seed=3, **body)[0] == ids
