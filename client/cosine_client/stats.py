"""Benchmark statistics from per-request timings (pure functions, no I/O). Times are in seconds."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

VANILLA_BEST = "vanilla (best k)"  # per load point, the fastest of the vanilla variants run (vanilla:k=N)
BASELINES = ("autoregressive", "vanilla", VANILLA_BEST)
_ON_OFF = {"on": True, "off": False}.__getitem__
# the options of a variant, `MODE[:option=value]...` -> (request input, parser of the value)
VARIANT_OPTIONS = {"k": ("num_draft_tokens", int), "drafters": ("drafters", lambda v: v.split("+")),
                   "max_drafters": ("max_drafters", int), "adaptive": ("adaptive_draft_length", _ON_OFF),
                   "pipeline": ("pipelined_drafting", _ON_OFF), "classify": ("classify_prompt", _ON_OFF)}


def variant_inputs(variant: str) -> dict:
    """A mode, or a variant of one: `MODE[:option=value]...`. The ablations of cosine: `cosine:drafters=general`
    (no routing), `cosine:max_drafters=1` (no fusion: the routed drafter alone), `cosine:k=6:adaptive=off` (no
    adaptive length: 6 tokens every round), `cosine:pipeline=off` (no pipelined drafting), `cosine:classify=off`
    (every drafter scores every prompt: no routing from the prompt's tokens); `vanilla:k=6` is
    vanilla at draft length 6. Returns the request inputs it stands for."""
    mode, *options = variant.split(":")
    inputs = {"speculation_mode": mode}
    for option in options:
        key, _, value = option.partition("=")
        if key not in VARIANT_OPTIONS:
            raise ValueError(f"{variant}: unknown option {key!r} ({', '.join(VARIANT_OPTIONS)})")
        name, parse = VARIANT_OPTIONS[key]
        try:
            inputs[name] = parse(value)
        except (KeyError, ValueError):
            raise ValueError(f"{variant}: bad value {value!r} for {key}") from None
    return inputs


@dataclass
class Record:
    """One request as the client saw it."""
    mode: str
    domain: str
    load: str  # "concurrency" (closed loop) or "poisson" (open loop)
    level: float  # number of workers, or arrivals per second
    run: int  # requests sent together (one mode, one load point, one round) share a run id
    start: float
    arrivals: list[float]  # arrival time of each streamed response that carried tokens
    tokens: list[int]  # number of tokens each of those responses carried
    stats: list[int]  # [rounds, draft tokens, accepted draft tokens] of the whole request
    bench_round: int = 0  # the bench's round: every mode runs once per round at a load point, side by side in time


def token_latencies(record: Record) -> list[float]:
    """Inter-token latencies: the gap before a response is shared equally by the tokens it carries. Tokens of the
    first response count toward time to first token instead."""
    latencies = []
    for previous, arrived, count in zip(record.arrivals, record.arrivals[1:], record.tokens[1:]):
        latencies += [(arrived - previous) / count] * count
    return latencies


def _percentile(values, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else float("nan")


def acceptance(records: list[Record]) -> tuple[float, float]:
    """(accepted draft tokens per verification round, output tokens per verification round). The server counts the
    prefill as a round of its own that emits one token, so both leave it out."""
    verify_rounds = sum(max(0, r.stats[0] - 1) for r in records if r.stats)
    accepted = sum(r.stats[2] for r in records if r.stats)
    tokens = sum(sum(r.tokens) - 1 for r in records if r.stats and r.tokens)
    return _ratio(accepted, verify_rounds), _ratio(tokens, verify_rounds)


def summarize_point(records: list[Record]) -> dict:
    """Statistics of one mode at one load point. Throughput divides by the summed wall span of its runs, so time
    spent on other modes between interleaved runs does not count."""
    runs = defaultdict(list)
    for record in records:
        runs[record.run].append(record)
    span = sum(_span(run) for run in runs.values())
    ttft = [r.arrivals[0] - r.start for r in records]
    latencies = [latency for r in records for latency in token_latencies(r)]
    accepted_per_round, tokens_per_round = acceptance(records)
    return {
        "requests": len(records),
        "output_tokens": sum(sum(r.tokens) for r in records),
        "tokens_per_s": _ratio(sum(sum(r.tokens) for r in records), span),
        "requests_per_s": _ratio(len(records), span),
        "ttft_mean": float(np.mean(ttft)),
        "ttft_p50": _percentile(ttft, 50),
        "token_latency_p50": _percentile(latencies, 50),
        "token_latency_p90": _percentile(latencies, 90),
        "token_latency_p99": _percentile(latencies, 99),
        "accepted_per_round": accepted_per_round,
        "accepted_tokens": sum(r.stats[2] for r in records if r.stats),
        "tokens_per_round": tokens_per_round,
        # requests that drafted nothing: in an adaptive mode, those the deployment's speculation windows (or the
        # controller) kept plain, which a comparison of variants must see (a window lands on whichever runs)
        "undrafted_requests": sum(1 for r in records if r.stats and not r.stats[1]),
    }


def summarize(records: list[Record]) -> list[dict]:
    """One row per (load, level, mode), with throughput and p50 per-token latency relative to each baseline mode
    measured at the same load point (throughput ratio > 1 and latency ratio < 1 are better)."""
    groups = defaultdict(list)
    for record in records:
        groups[record.load, record.level, record.mode].append(record)
    rows = {key: {"load": key[0], "level": key[1], "mode": key[2], **summarize_point(group)}
            for key, group in groups.items()}
    for (load, level, mode), row in list(rows.items()):
        inputs = variant_inputs(mode)
        if inputs.pop("speculation_mode") == "vanilla" and set(inputs) <= {"num_draft_tokens"}:  # vanilla at any k
            best = rows.get((load, level, VANILLA_BEST))
            if best is None or row["tokens_per_s"] > best["tokens_per_s"]:
                rows[load, level, VANILLA_BEST] = row
    by_round = {key: _throughput_by_round(group) for key, group in groups.items()}
    for (load, level, mode), row in rows.items():
        if mode == VANILLA_BEST:
            continue
        for baseline in BASELINES:
            base = rows.get((load, level, baseline))
            if base:
                row[f"throughput_vs_{baseline}"] = _ratio(row["tokens_per_s"], base["tokens_per_s"])
                row[f"token_latency_p50_vs_{baseline}"] = _ratio(row["token_latency_p50"], base["token_latency_p50"])
                # base["mode"]: vanilla (best k) is the row of the best k's mode
                ratios = _paired_ratios(by_round[load, level, mode], by_round[load, level, base["mode"]])
                if len(ratios) > 1:
                    row[f"throughput_vs_{baseline}_range"] = (min(ratios), max(ratios))
    first_seen = {mode: i for i, mode in enumerate(dict.fromkeys(r.mode for r in records))}
    return sorted((row for (_, _, mode), row in rows.items() if mode != VANILLA_BEST),
                  key=lambda row: (row["load"], row["level"], first_seen[row["mode"]]))


def _throughput_by_round(records: list[Record]) -> dict[int, float]:
    """Bench round -> tokens/s of the one run of these records (one mode at one load point) in that round."""
    rounds = defaultdict(list)
    for record in records:
        rounds[record.bench_round].append(record)
    return {index: _ratio(sum(sum(r.tokens) for r in run), _span(run)) for index, run in rounds.items()}


def _span(run: list[Record]) -> float:
    """Seconds from the first request's start to the last token of one run (its requests were sent together)."""
    return max(r.arrivals[-1] for r in run) - min(r.start for r in run)


def _paired_ratios(numerator: dict[int, float], denominator: dict[int, float]) -> list[float]:
    """Per round that ran both: the ratio of their throughputs. The runs of one round follow each other, so the
    machine's drift hits both alike: the spread of these ratios is what one comparison can be trusted to."""
    return [_ratio(numerator[index], denominator[index]) for index in sorted(numerator) if index in denominator]


def acceptance_by_domain(records: list[Record]) -> dict[str, dict[str, float]]:
    """mode -> domain -> accepted draft tokens per verification round, over all load points, for modes that
    drafted anything."""
    groups = defaultdict(list)
    for record in records:
        groups[record.mode, record.domain].append(record)
    drafted = {r.mode for r in records if r.stats and r.stats[1]}
    result: dict[str, dict[str, float]] = defaultdict(dict)
    for (mode, domain), group in sorted(groups.items()):
        if mode in drafted:
            result[mode][domain] = acceptance(group)[0]
    return dict(result)
