"""Benchmark the speculation modes of one CoSine deployment against each other, in one run on one server.

Closed loop: N workers, each sending its next request when its previous one has finished. Open loop: requests
arrive at Poisson times at a given rate, whatever the server's backlog. Every request streams greedy output of
exactly max_tokens tokens (end_id=-1) for a held-out prompt. Modes are interleaved: at every load point they run
one after another, in an order that rotates from one run to the next, so slow drift of the machine hits all alike.
"""
from __future__ import annotations

import importlib
import json
import math
import os
import platform
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from cosine.contract import (AHEAD_DRAFTS_DROPPED, DRAFTS, ENGINE_BATCH_REQUESTS, ENGINE_BATCHES,
                             ENGINE_BUSY_SECONDS, METRICS_FLUSH_S, SPECULATION_MODES, engine_of)
from cosine.speculation.proposers import DraftOrigin

from .api import grpc_generate, http_generate
from .plots import write_plots
from .references import DeploymentReferences
from .stats import BASELINES, Record, acceptance_by_domain, summarize, variant_inputs

PRESETS = {  # settings not given explicitly come from here
    "full": dict(concurrencies=(1, 8, 16, 32, 64), requests_per_point=32, max_tokens=64, rounds=2,
                 poisson_rates=()),
    "quick": dict(concurrencies=(1, 4, 8), requests_per_point=8, max_tokens=32, rounds=1, poisson_rates=()),
}


def load_prompts(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def fitting_prompts(url: str, protocol: str, prompts: list[dict], max_tokens: int) -> list[dict]:
    """The prompts that leave room for max_tokens in the target's context (the server rejects the others), counted
    by the deployment's own tokenizer model."""
    triton = importlib.import_module(f"tritonclient.{protocol}")
    with triton.InferenceServerClient(url) as client:
        config = client.get_model_config("cosine", **({"as_json": True} if protocol == "grpc" else {}))
        params = {k: v["string_value"] for k, v in config.get("config", config)["parameters"].items()}

        def length(prompt: str) -> int:
            text = triton.InferInput("text", [1, 1], "BYTES")
            text.set_data_from_numpy(np.array([[prompt.encode()]], dtype=np.object_))
            return client.infer(params["preprocessing_model"], [text]).as_numpy("input_ids").shape[-1]

        return [p for p in prompts if length(p["prompt"]) + max_tokens <= int(params["max_context_tokens"])]


def machine_info() -> dict:
    import torch

    return {"cpu_count": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
            "platform": platform.platform(), "python": platform.python_version(),
            "client_torch_threads": torch.get_num_threads()}


ENGINE_COUNTERS = {ENGINE_BUSY_SECONDS: "busy_seconds", ENGINE_BATCHES: "passes", ENGINE_BATCH_REQUESTS: "sequences"}
DROPPED_AHEAD = "dropped_ahead"  # drafts made ahead (pipelined) that assumed another context


def server_counters(metrics_url: str | None) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """From the Prometheus endpoint: engine -> {busy_seconds, passes, sequences} of every engine, the target's
    replicas summed (its busy fraction then counts busy processes: up to its number of replicas); and the drafts
    made so far by origin (alone, ahead, fused, merged; every mode summed) plus those made ahead and dropped."""
    if not metrics_url:
        return {}, {}
    import urllib.request

    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    engines: dict[str, dict[str, float]] = {}
    drafts: dict[str, float] = {}
    for line in text.splitlines():
        name, value = line.split("{", 1)[0], line.rsplit(" ", 1)[-1]
        if name in ENGINE_COUNTERS:
            engine = engine_of(_label(line, "model"))
            totals = engines.setdefault(engine, {})
            totals[ENGINE_COUNTERS[name]] = totals.get(ENGINE_COUNTERS[name], 0.0) + float(value)
        elif name in (DRAFTS, AHEAD_DRAFTS_DROPPED):
            origin = _label(line, "origin") if name == DRAFTS else DROPPED_AHEAD
            drafts[origin] = drafts.get(origin, 0.0) + float(value)
    return engines, drafts


def settled_counters(metrics_url: str | None) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """server_counters once the updates made so far have reached the endpoint: read before a run, counters still in
    flight from the warm-up or the previous run would be counted in it (an autoregressive run showed the warm-up's
    fused cosine draft)."""
    if metrics_url:
        time.sleep(3 * METRICS_FLUSH_S)
    return server_counters(metrics_url)


def _label(line: str, label: str) -> str:
    return line.split(f'{label}="', 1)[1].split('"', 1)[0]


def drafting_shares(drafts: dict[str, float], accepted_tokens: int) -> dict[str, float]:
    """Over one mode's drafts at a load point: accepted draft tokens per round that drafted (plain rounds left out,
    which `accepted_per_round` counts: an adaptive request decodes plainly where speculation does not pay), the
    share of drafts made fused, the share made ahead (pipelined), and of the drafts made ahead the share the next
    round used (the pipelining hit rate)."""
    total = sum(count for origin, count in drafts.items() if origin != DROPPED_AHEAD)
    ahead, dropped = drafts.get(DraftOrigin.AHEAD.value, 0.0), drafts.get(DROPPED_AHEAD, 0.0)
    share = lambda count: count / total if total else 0.0  # noqa: E731
    return {"accepted_per_drafted_round": share(accepted_tokens),
            "fused_share": share(drafts.get(DraftOrigin.FUSED.value, 0.0)),
            "ahead_share": share(ahead), "ahead_hit_rate": ahead / (ahead + dropped) if ahead + dropped else 0.0}


def engine_activity(before: dict, after: dict, wall: float) -> dict[str, dict[str, float]]:
    """Per engine model over one run: busy fraction, and sequences per forward pass (how well calls batch)."""
    activity = {}
    for model, counters in after.items():
        delta = {key: value - before.get(model, {}).get(key, 0.0) for key, value in counters.items()}
        activity[model] = {"busy_fraction": delta.get("busy_seconds", 0.0) / wall,
                           "sequences_per_pass": delta.get("sequences", 0.0) / max(delta.get("passes", 0.0), 1.0)}
    return activity


def _request(call, url: str, prompt: dict, mode: str, max_tokens: int, sampling: dict, **record) -> Record:
    """mode: a mode or variant (see variant_inputs); sampling: temperature/top_p inputs (empty: greedy)."""
    start = time.perf_counter()
    arrivals, tokens, stats = [], [], []
    for event in call(url, stream=True, text_input=prompt["prompt"], max_tokens=max_tokens,
                      exclude_input_in_output=True, end_id=-1, return_stats=True,
                      **{"temperature": 0.0, **sampling}, **variant_inputs(mode)):
        if event.output_ids:
            arrivals.append(event.arrived)
            tokens.append(len(event.output_ids))
        stats = event.stats or stats
    if not tokens:
        raise RuntimeError(f"{mode}: a request returned no tokens")
    return Record(mode, prompt.get("domain", "unknown"), start=start, arrivals=arrivals, tokens=tokens,
                  stats=stats, **record)


def _closed_loop(send, prompts: list[dict], concurrency: int) -> list[Record]:
    """A pool of `concurrency` threads fed from one queue: each worker takes the next prompt when its request is
    done. The first wave starts together, once every worker runs: started as each thread was created, a segment's 64
    requests started over up to 0.75 s after another mode's segment (measured at c64, whatever the mode), and a run is
    timed from its first request's start."""
    wave = min(concurrency, len(prompts))
    everyone_running = threading.Barrier(wave)

    def in_wave(indexed: tuple[int, dict]) -> Record:
        index, prompt = indexed
        if index < wave:
            everyone_running.wait()
        return send(prompt)
    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(in_wave, enumerate(prompts)))


def _open_loop(send, prompts: list[dict], offsets: list[float]) -> list[Record]:
    with ThreadPoolExecutor(len(prompts)) as pool:
        begin, futures = time.perf_counter(), []
        for prompt, offset in zip(prompts, offsets):
            time.sleep(max(0.0, begin + offset - time.perf_counter()))
            futures.append(pool.submit(send, prompt))
        return [future.result() for future in futures]


def markdown_table(rows: list[dict]) -> str:
    baselines = [b for b in BASELINES if any(f"throughput_vs_{b}" in row for row in rows)]
    header = ["load", "mode", "requests", "tokens/s", "requests/s", "TTFT mean / p50 (ms)",
              "token latency p50 / p90 / p99 (ms)", "accepted / round", "tokens / round", "undrafted requests",
              "target seqs / pass", "accepted / drafted round", "drafts fused / ahead", "ahead hits"]
    # tokens/s ratios: over the whole point, then (with several rounds) the range of the rounds' paired ratios
    header += [f"{what} vs {b}" for b in baselines for what in ("tokens/s (rounds' range)", "p50 latency")]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        load = f"c={row['level']:g}" if row["load"] == "concurrency" else f"poisson {row['level']:g}/s"
        cells = [load, row["mode"], str(row["requests"]), f"{row['tokens_per_s']:.1f}", f"{row['requests_per_s']:.2f}",
                 f"{row['ttft_mean'] * 1e3:.0f} / {row['ttft_p50'] * 1e3:.0f}",
                 " / ".join(f"{row[f'token_latency_p{q}'] * 1e3:.1f}" for q in (50, 90, 99)),
                 f"{row['accepted_per_round']:.2f}", f"{row['tokens_per_round']:.2f}", str(row["undrafted_requests"]),
                 f"{row['target_sequences_per_pass']:.1f}" if "target_sequences_per_pass" in row else "",
                 f"{row['accepted_per_drafted_round']:.2f}" if "accepted_per_drafted_round" in row else "",
                 f"{row['fused_share']:.0%} / {row['ahead_share']:.0%}" if "fused_share" in row else "",
                 f"{row['ahead_hit_rate']:.0%}" if "ahead_hit_rate" in row else ""]
        for b in baselines:
            spread = row.get(f"throughput_vs_{b}_range")
            cells += [f"{row[f'throughput_vs_{b}']:.2f}x" + (f" ({spread[0]:.2f}-{spread[1]:.2f})" if spread else "")
                      if f"throughput_vs_{b}" in row else "",
                      f"{row[f'token_latency_p50_vs_{b}']:.2f}x" if f"token_latency_p50_vs_{b}" in row else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_bench(url: str, prompts_file, modes=SPECULATION_MODES, concurrencies=None, requests_per_point=None,
              max_tokens=None, protocol: str = "http", quick: bool = False, poisson_rates=None, rounds=None,
              out_dir="results/bench", seed: int = 0, metrics_url: str | None = None, spec=None,
              sampling: dict | None = None) -> dict:
    """Runs the sweep, writes results.json, results.md and PNG plots to out_dir, and returns the results.
    Each run (one mode at one load point in one round) sends requests_per_point requests, and at least one per
    closed-loop worker. With `spec` (the deployment spec), in-process references on its checkpoints come too."""
    given = dict(concurrencies=concurrencies, requests_per_point=requests_per_point, max_tokens=max_tokens,
                 rounds=rounds, poisson_rates=poisson_rates)
    settings = {k: v if v is not None else PRESETS["quick" if quick else "full"][k] for k, v in given.items()}
    modes = list(modes)
    sampling = sampling or {}
    for mode in modes:
        variant_inputs(mode)  # a misspelt variant fails before the run, not in it
    rng = random.Random(seed)
    prompts = load_prompts(prompts_file)
    fitting = fitting_prompts(url, protocol, prompts, settings["max_tokens"])
    if len(fitting) < len(prompts):
        print(f"{len(prompts) - len(fitting)} of {len(prompts)} prompts leave no room for {settings['max_tokens']} "
              f"tokens in the model's context; skipping them")
    if not fitting:
        raise ValueError("no prompt fits; lower --max-tokens")
    prompts = fitting
    rng.shuffle(prompts)
    try:
        server_counters(metrics_url)
    except OSError as error:  # busy fractions are extras: the run goes on without them
        print(f"no engine busy fractions: metrics at {metrics_url} unreachable ({error}); pass --metrics-url")
        metrics_url = None
    call = grpc_generate if protocol == "grpc" else http_generate
    points = [("concurrency", c) for c in settings["concurrencies"]] + \
             [("poisson", rate) for rate in settings["poisson_rates"]]
    sizes = {(load, level): max(settings["requests_per_point"], level) if load == "concurrency"
             else settings["requests_per_point"] for load, level in points}

    # the physical references: the same checkpoints in this process, measured while the server idles after each
    # round's served runs at a concurrency, on that round's prompts
    references = DeploymentReferences(spec) if spec else None
    for mode in modes:  # warm-up: first calls of a mode can pay one-off costs
        _request(call, url, prompts[0], mode, 4, sampling, load="warmup", level=0, run=-1)
    records: list[Record] = []
    utilization: dict[str, dict[str, list[float]]] = {}  # "mode load=level" -> model -> busy fractions per run
    drafting: dict[str, dict[str, float]] = {}  # "mode load=level" -> drafts by origin over its runs
    cursor, run = 0, 0
    with tqdm(total=sum(sizes.values()) * len(modes) * settings["rounds"], unit="req") as bar:
        for turn, (load, level) in enumerate(point for point in points for _ in range(settings["rounds"])):
            batch = [prompts[(cursor + i) % len(prompts)] for i in range(sizes[load, level])]
            cursor += len(batch)
            offsets, at = [], 0.0
            for _ in batch:  # one arrival schedule per round, shared by every mode
                at += rng.expovariate(level) if load == "poisson" else 0.0
                offsets.append(at)
            for mode in modes[turn % len(modes):] + modes[:turn % len(modes)]:
                bar.set_description(f"{mode} {load}={level:g}")

                def send(prompt, mode=mode, load=load, level=level, run=run, bench_round=turn):
                    record = _request(call, url, prompt, mode, settings["max_tokens"], sampling, load=load,
                                      level=level, run=run, bench_round=bench_round)
                    bar.update()
                    return record

                (engines_before, drafts_before), started = settled_counters(metrics_url), time.perf_counter()
                records += _closed_loop(send, batch, level) if load == "concurrency" else \
                    _open_loop(send, batch, offsets)
                wall = time.perf_counter() - started
                engines_after, drafts_after = settled_counters(metrics_url)
                activity = engine_activity(engines_before, engines_after, wall)
                drafts = drafting.setdefault(f"{mode} {load}={level:g}", {})
                for origin, count in drafts_after.items():
                    drafts[origin] = drafts.get(origin, 0.0) + count - drafts_before.get(origin, 0.0)
                per_model = utilization.setdefault(f"{mode} {load}={level:g}", {})
                for model, values in activity.items():
                    for key, value in values.items():
                        per_model.setdefault(model, {}).setdefault(key, []).append(value)
                run += 1
            if references is not None and load == "concurrency":
                bar.set_description(f"in-process references, batch {level}")
                references.measure(level, [prompt["prompt"] for prompt in batch], settings["max_tokens"],
                                   [prompt.get("domain") for prompt in batch])

    rows = summarize(records)
    engine_activity_means = {key: {model: {name: float(np.mean(values)) for name, values in stats.items()}
                                   for model, stats in models.items()} for key, models in utilization.items()}
    for row in rows:
        key = f"{row['mode']} {row['load']}={row['level']:g}"
        target = engine_activity_means.get(key, {}).get("target")
        if target:
            row["target_sequences_per_pass"] = target["sequences_per_pass"]
        if drafting.get(key):
            row.update(drafting_shares(drafting[key], row["accepted_tokens"]))
    acceptance = acceptance_by_domain(records)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {"url": url, "protocol": protocol, "prompts": str(prompts_file), "prompts_used": len(prompts),
               "modes": modes, "sampling": sampling, **settings, "machine": machine_info(), "summaries": rows,
               "acceptance_by_domain": acceptance,
               # per engine model and run: busy fraction (drafters and target both busy = pipelining) and
               # sequences per forward pass
               "engine_activity": engine_activity_means,
               "references": references.summary() if references is not None else None,
               "records": [asdict(record) for record in records]}
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    (out_dir / "results.md").write_text(markdown_table(rows) + "\n")
    results["plots"] = [str(path) for path in write_plots(rows, acceptance, out_dir)]
    return results


def references_table(rows: list[dict], references: dict) -> str:
    """Served plain decoding and cosine against the in-process references at every concurrency."""
    served = {(row["level"], row["mode"]): row["tokens_per_s"] for row in rows if row["load"] == "concurrency"}
    nan = float("nan")
    rate = lambda value: "-" if math.isnan(value) else f"{value:.0f}"  # noqa: E731  (not measured: -)
    ratio = lambda value: "-" if math.isnan(value) else f"{value:.2f}"  # noqa: E731
    measured = sorted(set(references["measurements"].values()))
    lines = [f"in-process references: {references['threads']} torch threads (one served target replica's; the "
             f"target has {references['replicas']}), prompts of {references['prompt_tokens']} tokens, measured "
             f"{'/'.join(map(str, measured))} times per concurrency between the served rounds (means)",
             "| concurrency | served autoregressive | engine in-process | engine serving the requests "
             "| transformers batched | served / engine | served / engine serving | served / transformers "
             f"| transformers batched, {references['cores']} threads | served / that | served cosine |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for level, decode in sorted(references["decode"].items(), key=lambda item: float(item[0])):
        plain = served.get((float(level), "autoregressive"), nan)
        serving = decode.get("engine_serving", nan)
        all_cores = decode.get("transformers_all_cores", nan)
        cosine = served.get((float(level), "cosine"), nan)
        lines.append(f"| {level} | {rate(plain)} | {rate(decode['engine'])} | {rate(serving)} | "
                     f"{rate(decode['transformers'])} | {ratio(plain / decode['engine'])} | {ratio(plain / serving)} | "
                     f"{ratio(plain / decode['transformers'])} | {rate(all_cores)} | {ratio(plain / all_cores)} | "
                     f"{rate(cosine)} |")
    lines += ["", "engine in-process and transformers: decode steps only; the engine serving the requests: each "
                  "round's requests in a closed loop, prefills included and as many steps a call as the deployment's "
                  "plain decoding runs, as served requests are counted"]
    for level, decode in references["decode"].items():
        notes = []  # under the table, a blank line before each level's
        if "assisted_generation" in decode:
            assisted = decode["assisted_generation"]
            notes.append(f"transformers assisted generation (general drafter), c={level}: {assisted:.0f} tokens/s")
            if (float(level), "cosine") in served:
                cosine = served[float(level), "cosine"]
                notes[-1] += f"; served cosine: {cosine:.0f} ({cosine / assisted:.2f}x)"
        if "engine_speculation" in decode:
            speculation = decode["engine_speculation"]
            notes.append(f"the engines' chain speculation in process (each prompt's domain drafter, cosine's ceiling "
                         f"k; no processes between them), c={level}: {speculation:.0f} tokens/s")
            if "assisted_generation" in decode:
                notes[-1] += f" ({speculation / decode['assisted_generation']:.2f}x assisted generation)"
            if (float(level), "cosine") in served:
                notes[-1] += f"; served cosine: {served[float(level), 'cosine'] / speculation:.2f}x it"
        if notes:
            lines += ["", *notes]
    return "\n".join(lines)
