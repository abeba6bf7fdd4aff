"""Benchmark statistics on synthetic timings with known answers (no server, no timing assertions)."""
import pytest

from cosine_client.bench import DROPPED_AHEAD, drafting_shares
from cosine_client.plots import write_plots
from cosine_client.stats import Record, acceptance_by_domain, summarize, summarize_point, token_latencies


def record(arrivals, tokens=None, start=0.0, mode="cosine", domain="code", run=0, level=1, stats=(1, 0, 0),
           bench_round=0):
    return Record(mode, domain, "concurrency", level, run, start, list(arrivals),
                  list(tokens or [1] * len(arrivals)), list(stats), bench_round)


def test_fixed_gaps_give_exact_percentiles():
    gaps = [k / 1000 for k in range(1, 101)]  # 1 ms .. 100 ms, one token per response
    arrivals = [0.5]
    for gap in gaps:
        arrivals.append(arrivals[-1] + gap)
    row = summarize_point([record(arrivals)])
    assert row["token_latency_p50"] == pytest.approx(0.0505)
    assert row["token_latency_p90"] == pytest.approx(0.0901)
    assert row["token_latency_p99"] == pytest.approx(0.09901)
    assert row["ttft_mean"] == row["ttft_p50"] == pytest.approx(0.5)


def test_gap_before_multi_token_response_is_split_over_its_tokens():
    # the first response's tokens count toward time to first token, not per-token latency
    assert token_latencies(record([1.0, 1.3, 1.5], tokens=[2, 3, 1])) == pytest.approx([0.1, 0.1, 0.1, 0.2])


def test_throughput_spans_only_the_runs_of_the_mode():
    first_run = [record([0.5, 1.0], start=0.0, run=0), record([1.5, 2.0], tokens=[4, 4], start=0.5, run=0)]
    second_run = [record([101.0, 102.0], tokens=[5, 5], start=100.0, run=7)]  # other modes ran in between
    row = summarize_point(first_run + second_run)
    assert row["output_tokens"] == 20
    assert row["tokens_per_s"] == pytest.approx(20 / 4)
    assert row["requests_per_s"] == pytest.approx(3 / 4)
    assert row["ttft_mean"] == pytest.approx((0.5 + 1.0 + 1.0) / 3)


def test_ratios_against_baselines_at_the_same_load_point():
    rows = summarize([
        record([0.1 * k for k in range(1, 11)], mode="autoregressive"),  # 10 tokens/s, 0.1 s per token
        record([0.04 * k for k in range(1, 11)], mode="cosine"),  # 25 tokens/s, 0.04 s per token
        record([0.05 * k for k in range(1, 11)], mode="cosine", level=4),  # no baseline measured at 4
    ])
    by_point = {(row["mode"], row["level"]): row for row in rows}
    cosine = by_point["cosine", 1]
    assert cosine["throughput_vs_autoregressive"] == pytest.approx(2.5)
    assert cosine["token_latency_p50_vs_autoregressive"] == pytest.approx(0.4)
    assert by_point["autoregressive", 1]["throughput_vs_autoregressive"] == pytest.approx(1.0)
    assert "throughput_vs_vanilla" not in cosine
    assert "throughput_vs_autoregressive" not in by_point["cosine", 4]


def test_each_rounds_runs_are_compared_with_each_other():
    """The machine drifts between rounds: round 1 runs both modes twice as fast as round 0. Paired within their
    rounds, cosine is 2.0x and 3.0x plain decoding; pooled across rounds the ratio would be neither."""
    def run(tokens_per_s, mode, bench_round, start):
        return record([start + k / tokens_per_s for k in range(1, 11)], mode=mode, start=start,
                      run=2 * bench_round + (mode == "cosine"), bench_round=bench_round)
    rows = summarize([run(10, "autoregressive", 0, 0.0), run(20, "cosine", 0, 10.0),
                      run(20, "autoregressive", 1, 20.0), run(60, "cosine", 1, 30.0)])
    cosine = next(row for row in rows if row["mode"] == "cosine")
    assert cosine["throughput_vs_autoregressive_range"] == pytest.approx((2.0, 3.0))
    assert "throughput_vs_autoregressive_range" not in summarize([run(10, "autoregressive", 0, 0.0),
                                                                    run(20, "cosine", 0, 10.0)])[1]  # one round


def test_accepted_length_leaves_out_the_prefill_round():
    # 5 rounds = prefill + 4 verifications; 8 of 16 drafted tokens accepted; 13 tokens in all
    row = summarize_point([record([0.1, 0.2, 0.3], tokens=[1, 6, 6], stats=(5, 16, 8))])
    assert row["accepted_per_round"] == pytest.approx(2.0)
    assert row["tokens_per_round"] == pytest.approx(3.0)
    assert row["undrafted_requests"] == 0


def test_requests_that_drafted_nothing_are_counted():
    """An adaptive variant's requests kept plain by the speculation windows: what separates its rows from noise."""
    drafted = record([0.1, 0.2], tokens=[1, 6], stats=(3, 8, 5))
    plain = record([0.1, 0.2], tokens=[1, 4], stats=(2, 0, 0))
    assert summarize_point([drafted, plain, plain])["undrafted_requests"] == 2


def test_acceptance_by_domain_skips_modes_that_never_drafted():
    records = [record([0.1, 0.2], tokens=[1, 4], domain="code", stats=(3, 8, 6)),
               record([0.1, 0.2], tokens=[1, 2], domain="math", stats=(3, 8, 1)),
               record([0.1, 0.2], mode="autoregressive", stats=(2, 0, 0))]
    assert acceptance_by_domain(records) == {"cosine": {"code": pytest.approx(3.0), "math": pytest.approx(0.5)}}


def test_plots_write_png_files(tmp_path):
    records = [record([0.1 * k * (1 + level / 8) for k in range(1, 6)], mode=mode, domain=domain, level=level,
                      stats=(5, 8, 4 if mode == "cosine" else 2) if mode != "autoregressive" else (5, 0, 0))
               for mode in ("autoregressive", "vanilla", "cosine") for level in (1, 4)
               for domain in ("code", "math")]
    paths = write_plots(summarize(records), acceptance_by_domain(records), tmp_path)
    assert {path.name for path in paths} == {"throughput_vs_latency.png", "speedup_vs_concurrency.png",
                                             "acceptance_by_domain.png"}
    for path in paths:
        data = path.read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 1000


def test_bench_variants_name_their_request_inputs():
    from cosine_client.bench import variant_inputs

    assert variant_inputs("autoregressive") == {"speculation_mode": "autoregressive"}
    assert variant_inputs("vanilla:k=6") == {"speculation_mode": "vanilla", "num_draft_tokens": 6}
    assert variant_inputs("cosine:drafters=general") == {"speculation_mode": "cosine", "drafters": ["general"]}
    assert variant_inputs("cosine:max_drafters=1") == {"speculation_mode": "cosine", "max_drafters": 1}
    assert variant_inputs("cosine:k=6:adaptive=off") == {"speculation_mode": "cosine", "num_draft_tokens": 6,
                                                         "adaptive_draft_length": False}
    with pytest.raises(ValueError, match="unknown option 'depth'"):
        variant_inputs("vanilla:depth=3")
    with pytest.raises(ValueError, match="bad value 'maybe' for adaptive"):
        variant_inputs("cosine:adaptive=maybe")


def test_vanilla_best_k_is_the_fastest_vanilla_variant_at_each_load_point():
    rows = summarize([
        record([0.1 * k for k in range(1, 11)], mode="vanilla:k=2"),  # 10 tokens/s
        record([0.05 * k for k in range(1, 11)], mode="vanilla:k=6"),  # 20 tokens/s
        record([0.04 * k for k in range(1, 11)], mode="cosine"),  # 25 tokens/s
        # another drafter is another baseline, not a tuning of vanilla's k
        record([0.01 * k for k in range(1, 11)], mode="vanilla:drafters=itself"),
        record([0.1 * k for k in range(1, 11)], mode="vanilla:k=2", level=4),  # the only vanilla at 4
        record([0.02 * k for k in range(1, 11)], mode="cosine", level=4),
    ])
    by_point = {(row["mode"], row["level"]): row for row in rows}
    assert by_point["cosine", 1]["throughput_vs_vanilla (best k)"] == pytest.approx(1.25)
    assert by_point["cosine", 4]["throughput_vs_vanilla (best k)"] == pytest.approx(5.0)
    assert "vanilla (best k)" not in {row["mode"] for row in rows}  # a ratio, not a row of its own


def test_drafting_shares_count_pipelining_hits_among_the_drafts_made_ahead():
    shares = drafting_shares({"alone": 5.0, "ahead": 3.0, "fused": 2.0, DROPPED_AHEAD: 1.0}, accepted_tokens=45)
    assert shares == pytest.approx({"accepted_per_drafted_round": 4.5, "fused_share": 0.2, "ahead_share": 0.3,
                                    "ahead_hit_rate": 0.75})
    assert set(drafting_shares({}, 0).values()) == {0.0}


def test_a_closed_loop_runs_first_wave_starts_together_however_slowly_its_threads_start(monkeypatch):
    """Threads that take 10 ms each to start (a busy machine) must not spread the first wave's starts: a run is
    timed from its first request's start."""
    import threading
    import time

    from cosine_client.bench import _closed_loop

    start_thread = threading.Thread.start

    def slowly(thread):
        time.sleep(0.01)
        start_thread(thread)
    monkeypatch.setattr(threading.Thread, "start", slowly)

    def request(prompt):  # its start, then 0.2 s streaming
        started = time.perf_counter()
        time.sleep(0.2)
        return started
    starts = _closed_loop(request, [{}] * 24, 16)
    assert len(starts) == 24 and max(starts[:16]) - min(starts[:16]) < 0.05


def test_the_references_table_sets_served_cosine_against_the_engines_own_speculation():
    from cosine_client.bench import references_table

    rows = [{"load": "concurrency", "level": 1.0, "mode": mode, "tokens_per_s": rate}
            for mode, rate in (("autoregressive", 250.0), ("cosine", 440.0))]
    references = {"threads": 1, "replicas": 2, "cores": 2, "prompt_tokens": 82, "measurements": {"1": 6},
                  "decode": {"1": {"engine": 290.0, "transformers": 225.0, "assisted_generation": 330.0,
                                   "engine_speculation": 550.0, "engine_serving": 270.0}}}
    table = references_table(rows, references)
    assert "| 1 | 250 | 290 | 270 | 225 | 0.86 | 0.93 | 1.11 | - | - | 440 |" in table  # no 2-thread reference at c1
    assert "assisted generation (general drafter), c=1: 330 tokens/s; served cosine: 440 (1.33x)" in table
    assert "c=1: 550 tokens/s (1.67x assisted generation); served cosine: 0.80x it" in table
    del references["decode"]["1"]["engine_speculation"]
    assert "chain speculation" not in references_table(rows, references)
