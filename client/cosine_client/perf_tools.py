"""Load-test a running CoSine deployment with NVIDIA's perf_analyzer and genai-perf (installed by `make tools`).

perf_analyzer drives the decoupled `cosine` model over gRPC streaming with prompts from a JSON-lines file (an
--input-data file generated here); genai-perf sends synthetic (or file) prompts through its tensorrtllm/kserve
interface and computes token metrics with a local Hugging Face tokenizer. Both write their raw exports into an
output folder; the functions here return parsed summaries (throughput, latencies) as dicts.

    python -m cosine_client.perf_tools perf-analyzer --url localhost:8001 --prompts prompts.jsonl \\
        --concurrency 1 2 --request-count 20 --max-tokens 32 --out results/perf_analyzer
    python -m cosine_client.perf_tools genai-perf --url localhost:8001 --tokenizer artifacts/zoo-demo/tokenizer \\
        --concurrency 1 --num-prompts 20 --request-count 20 --input-tokens-mean 64 --output-tokens-mean 32 \\
        --out results/genai_perf
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from cosine.contract import COSINE, SPECULATION_MODES

TOOLS_BIN_ENV = "COSINE_TOOLS_BIN"
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TOOLS_BIN = REPO_ROOT / "artifacts" / "tools" / "bin"

# perf_analyzer's input-data JSON holds each value as the JSON type of its Triton datatype.
JSON_TYPES = {"TYPE_STRING": str, "TYPE_BOOL": bool, "TYPE_INT32": int, "TYPE_UINT64": int, "TYPE_FP32": float}


class PerfToolError(RuntimeError):
    """A load-testing tool is missing, failed, or wrote nothing usable."""


# ---------------------------------------------------------------------------------------------- finding the tools

def find_tool(name: str, tools_bin: str | os.PathLike | None = None) -> str:
    """Path of `perf_analyzer` or `genai-perf`: tools_bin, $COSINE_TOOLS_BIN, artifacts/tools/bin, then PATH."""
    folders = [tools_bin, os.environ.get(TOOLS_BIN_ENV), DEFAULT_TOOLS_BIN]
    for folder in filter(None, folders):
        candidate = Path(folder) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    raise PerfToolError(f"{name} not found in {DEFAULT_TOOLS_BIN} nor on PATH: run `make tools`")


def tools_installed(tools_bin: str | os.PathLike | None = None) -> bool:
    try:
        find_tool("perf_analyzer", tools_bin)
        find_tool("genai-perf", tools_bin)
    except PerfToolError:
        return False
    return True


def _strip_scheme(url: str) -> str:
    for scheme in ("grpc://", "http://", "https://"):
        if url.startswith(scheme):
            return url[len(scheme):]
    return url


def _run(command: Sequence[str], log_path: Path, timeout: float | None, cwd: Path | None = None) \
        -> subprocess.CompletedProcess:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(list(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=timeout, cwd=cwd)
    except subprocess.TimeoutExpired as error:
        output = error.stdout.decode(errors="replace") if isinstance(error.stdout, bytes) else error.stdout or ""
        log_path.write_text(output)
        raise PerfToolError(f"{command[0]} ran past {timeout} s (log: {log_path})") from None
    log_path.write_text(done.stdout)
    if done.returncode != 0:
        tail = "\n".join(done.stdout.splitlines()[-25:])
        raise PerfToolError(f"{' '.join(command)}\nexited with {done.returncode} (log: {log_path}):\n{tail}")
    return done


# ---------------------------------------------------------------------------------------- perf_analyzer input data

def load_prompts(path: str | os.PathLike, limit: int | None = None) -> list[str]:
    """Prompts from a JSON-lines file: objects with "prompt" (or "text" / "text_input"), or bare JSON strings."""
    prompts = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if isinstance(row, dict):
                text = next((row[key] for key in ("prompt", "text", "text_input") if key in row), None)
            else:
                text = row
            if not isinstance(text, str):
                raise ValueError(f"{path}:{number}: no prompt (expected a 'prompt', 'text' or 'text_input' string)")
            prompts.append(text)
            if limit is not None and len(prompts) >= limit:
                break
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def filter_prompts_by_length(prompts: Iterable[str], tokenizer_dir: str | os.PathLike, max_input_tokens: int) \
        -> list[str]:
    """The prompts of at most max_input_tokens tokens (so that prompt + max_tokens fits a small model's context)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
    kept = [prompt for prompt in prompts if len(tokenizer.encode(prompt).ids) <= max_input_tokens]
    if not kept:
        raise ValueError(f"no prompt has at most {max_input_tokens} tokens")
    return kept


def _tensor(name: str, value) -> dict:
    spec = COSINE.input_by_name.get(name)
    if spec is None or spec.dims != (1,):
        single = [t.name for t in COSINE.inputs if t.dims == (1,)]
        raise ValueError(f"{name!r} is not a single-value input of the cosine model (those are: {', '.join(single)})")
    if spec.dtype == "TYPE_BOOL" and isinstance(value, str):
        if value.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"{name}: expected true or false, not {value!r}")
        value = value.lower() in ("true", "1")
    # "shape" leaves out the batch dimension (the model has max_batch_size > 0); perf_analyzer sends batch 1.
    return {"content": [JSON_TYPES[spec.dtype](value)], "shape": list(spec.dims)}


def perf_input_data(prompts: Iterable[str], max_tokens: int = 32, exclude_input_in_output: bool = True,
                    stream: bool = True, speculation_mode: str | None = None, return_stats: bool = False,
                    extra_inputs: Mapping[str, object] | None = None) -> dict:
    """perf_analyzer's --input-data document: one entry per prompt, every tensor as {"content": [v], "shape": [1]}."""
    if speculation_mode is not None and speculation_mode not in SPECULATION_MODES:
        raise ValueError(f"speculation_mode must be one of {', '.join(SPECULATION_MODES)}, not {speculation_mode!r}")
    common = {"max_tokens": max_tokens, "exclude_input_in_output": exclude_input_in_output, "stream": stream}
    if speculation_mode is not None:
        common["speculation_mode"] = speculation_mode
    if return_stats:
        common["return_stats"] = True
    common.update(extra_inputs or {})
    entries = []
    for prompt in prompts:
        entry = {"text_input": _tensor("text_input", prompt)}
        entry.update((name, _tensor(name, value)) for name, value in common.items())
        entries.append(entry)
    if not entries:
        raise ValueError("no prompts")
    return {"data": entries}


def write_input_data(prompts: Iterable[str], path: str | os.PathLike, **options) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(perf_input_data(prompts, **options), indent=1, ensure_ascii=False) + "\n")
    return path


# ---------------------------------------------------------------------------------------------------- parsing

def _number(text: str):
    try:
        value = float(text)
    except ValueError:
        return text
    return int(value) if value.is_integer() and "." not in text and "e" not in text.lower() else value


def parse_perf_analyzer_csv(path: str | os.PathLike) -> list[dict]:
    """Rows of perf_analyzer's -f CSV (one per concurrency), with latencies converted from us to ms.

    Keys: concurrency, throughput_infer_per_s, response_throughput_per_s, latency_avg_ms, latency_p50_ms, ...,
    plus "raw": the row as written (numbers parsed)."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    # With --collect-metrics a second table may follow a blank line; keep the latency table only.
    parsed = []
    for row in rows:
        raw = {key: _number(value) for key, value in row.items() if key and value not in (None, "")}
        if "Concurrency" not in raw or not isinstance(raw["Concurrency"], (int, float)):
            continue
        summary = {"concurrency": raw["Concurrency"],
                   "throughput_infer_per_s": raw.get("Inferences/Second"),
                   "response_throughput_per_s": raw.get("Response Throughput")}
        for label, key in (("Avg latency", "latency_avg_ms"), ("p50 latency", "latency_p50_ms"),
                           ("p90 latency", "latency_p90_ms"), ("p95 latency", "latency_p95_ms"),
                           ("p99 latency", "latency_p99_ms")):
            if label in raw:
                summary[key] = raw[label] / 1000.0
        summary["raw"] = raw
        parsed.append(summary)
    return parsed


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), q in [0, 100]."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _stats(values: Sequence[float]) -> dict:
    if not values:
        return {}
    return {"avg": sum(values) / len(values), "min": min(values), "max": max(values),
            **{f"p{q}": percentile(values, q) for q in (50, 90, 95, 99)}}


def _tokens(output: Mapping, max_tokens: int) -> int:
    """Tokens in one exported response. The cosine model may end a stream with a flags-only final response, which
    perf_analyzer exports with uninitialised values: a length no request could produce counts as none."""
    if isinstance(output.get("output_ids"), list):
        return len(output["output_ids"])
    length = output.get("sequence_length")
    if isinstance(length, list):
        length = length[0] if length else 0
    return int(length) if isinstance(length, (int, float)) and 0 <= length <= max_tokens else 0


def summarize_profile_export(path: str | os.PathLike) -> list[dict]:
    """Per-experiment token metrics from a perf_analyzer --profile-export-file JSON (times in ms).

    A request's output tokens are the sum of its responses' `sequence_length` (a response may carry several
    tokens). Throughputs use the span from the first request sent to the last response received. Speculation
    statistics (with return_stats) come from each request's last [rounds, draft, accepted] triple."""
    document = json.loads(Path(path).read_text())
    summaries = []
    for experiment in document.get("experiments", []):
        ttft, latency, itl, tokens, starts, ends = [], [], [], [], [], []
        draft = accepted = rounds = 0
        stats_seen = False
        for request in experiment.get("requests", []):
            sent, times = request["timestamp"], request.get("response_timestamps", [])
            if not times:
                continue
            outputs = request.get("response_outputs", [])
            max_tokens = request.get("request_inputs", {}).get("max_tokens", 2 ** 16)
            count = sum(_tokens(output, max_tokens) for output in outputs) if outputs else len(times)
            starts.append(sent)
            ends.append(times[-1])
            ttft.append((times[0] - sent) / 1e6)
            latency.append((times[-1] - sent) / 1e6)
            tokens.append(count)
            if count > 1:
                itl.append((times[-1] - times[0]) / 1e6 / (count - 1))
            last_stats = next((o["speculation_stats"] for o in reversed(outputs)
                               if isinstance(o.get("speculation_stats"), list)
                               and len(o["speculation_stats"]) == 3), None)
            if last_stats is not None:
                stats_seen = True
                rounds, draft, accepted = rounds + last_stats[0], draft + last_stats[1], accepted + last_stats[2]
        span_s = (max(ends) - min(starts)) / 1e9 if starts else 0.0
        summary = {**experiment.get("experiment", {}), "request_count": len(latency),
                   "output_tokens": sum(tokens),
                   "request_throughput_per_s": len(latency) / span_s if span_s > 0 else None,
                   "output_token_throughput_per_s": sum(tokens) / span_s if span_s > 0 else None,
                   "time_to_first_token_ms": _stats(ttft), "request_latency_ms": _stats(latency),
                   "inter_token_latency_ms": _stats(itl), "output_sequence_length": _stats(tokens)}
        if stats_seen:
            summary["speculation"] = {"rounds": rounds, "draft_tokens": draft, "accepted_tokens": accepted,
                                      "acceptance_rate": accepted / draft if draft else None}
        summaries.append(summary)
    return summaries


def parse_genai_perf_json(path: str | os.PathLike) -> dict:
    """genai-perf's profile_export_genai_perf.json as {metric: {"unit": ..., "avg": ..., "p50": ..., ...}}, with
    headline numbers on top: request_throughput_per_s, output_token_throughput_per_s, and *_avg_ms / *_p99_ms
    for time_to_first_token, inter_token_latency and request_latency."""
    document = json.loads(Path(path).read_text())
    metrics = {name: value for name, value in document.items()
               if isinstance(value, dict) and "unit" in value}
    summary = {"metrics": metrics,
               "request_count": metrics.get("request_count", {}).get("avg"),
               "request_throughput_per_s": metrics.get("request_throughput", {}).get("avg"),
               "output_token_throughput_per_s": metrics.get("output_token_throughput", {}).get("avg")}
    for name in ("time_to_first_token", "inter_token_latency", "request_latency"):
        metric = metrics.get(name, {})
        scale = {"ms": 1.0, "us": 1e-3, "ns": 1e-6, "s": 1e3}.get(metric.get("unit", "ms"), 1.0)
        for stat in ("avg", "p50", "p99"):
            if stat in metric:
                summary[f"{name}_{stat}_ms"] = metric[stat] * scale
    for name in ("output_sequence_length", "input_sequence_length"):
        if "avg" in metrics.get(name, {}):
            summary[f"{name}_avg"] = metrics[name]["avg"]
    config = document.get("input_config")
    if isinstance(config, dict):
        summary["input_config"] = config
    return summary


def parse_genai_perf_csv(path: str | os.PathLike) -> dict:
    """genai-perf's profile_export_genai_perf.csv: {metric label: {column: number}} from both of its tables."""
    tables: dict[str, dict] = {}
    header: list[str] | None = None
    with open(path, newline="") as handle:
        for row in csv.reader(handle):
            if not row or not any(cell.strip() for cell in row):
                header = None
                continue
            if header is None:
                header = row
                continue
            tables[row[0]] = {column: _number(cell) for column, cell in zip(header[1:], row[1:])}
    return tables


# ------------------------------------------------------------------------------------------------------ running

def _version(binary: str, flag: str = "--version") -> str:
    try:
        done = subprocess.run([binary, flag], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else "unknown"


def perf_analyzer_command(binary: str, grpc_url: str, input_data: Path, concurrency: int, csv_path: Path,
                          export_path: Path, model: str = "cosine", request_count: int | None = 20,
                          measurement_interval_ms: int | None = None, stability_percentage: float | None = None,
                          max_trials: int | None = None, extra_args: Sequence[str] = ()) -> list[str]:
    command = [binary, "-m", model, "-i", "grpc", "-u", _strip_scheme(grpc_url), "--streaming", "--async",
               "--input-data", str(input_data), "--concurrency-range", str(concurrency),
               "-f", str(csv_path), "--profile-export-file", str(export_path), "--verbose-csv"]
    if request_count:
        # One measurement of exactly this many requests; perf_analyzer allows it with one concurrency per run.
        command += ["--request-count", str(request_count)]
    else:
        if measurement_interval_ms:
            command += ["--measurement-interval", str(measurement_interval_ms)]
        if max_trials:
            command += ["--max-trials", str(max_trials)]
    if stability_percentage is not None:
        command += ["--stability-percentage", str(stability_percentage)]
    return command + list(extra_args)


def run_perf_analyzer(grpc_url: str, prompts: str | os.PathLike | Sequence[str], out_dir: str | os.PathLike,
                      concurrency: Sequence[int] = (1,), request_count: int | None = 20, max_tokens: int = 32,
                      model: str = "cosine", speculation_mode: str | None = None, return_stats: bool = False,
                      num_prompts: int | None = None, tokenizer: str | os.PathLike | None = None,
                      max_input_tokens: int | None = None, measurement_interval_ms: int | None = None,
                      stability_percentage: float | None = None, max_trials: int | None = None,
                      extra_inputs: Mapping[str, object] | None = None, extra_args: Sequence[str] = (),
                      timeout: float | None = 900, tools_bin: str | os.PathLike | None = None) -> dict:
    """Runs perf_analyzer once per concurrency level against the streaming `model` over gRPC.

    `prompts` is a JSON-lines file (see load_prompts) or a list of strings; with tokenizer and max_input_tokens,
    longer prompts are left out. request_count: requests measured per level (None: perf_analyzer's own
    stabilisation over time windows, which a busy machine may fail). Writes into out_dir: input_data.json,
    perf_analyzer_c<N>.csv, profile_export_c<N>.json, perf_analyzer_c<N>.log and summary.json; returns the
    summary: per level, perf_analyzer's CSV numbers and the token metrics of its profile export."""
    binary = find_tool("perf_analyzer", tools_bin)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    texts = list(prompts) if not isinstance(prompts, (str, os.PathLike)) else load_prompts(prompts)
    if tokenizer is not None and max_input_tokens is not None:
        texts = filter_prompts_by_length(texts, tokenizer, max_input_tokens)
    if num_prompts is not None:
        texts = texts[:num_prompts]
    input_data = write_input_data(texts, out / "input_data.json", max_tokens=max_tokens,
                                  speculation_mode=speculation_mode, return_stats=return_stats,
                                  extra_inputs=extra_inputs)
    results, commands = [], []
    for level in concurrency:
        csv_path, export_path = out / f"perf_analyzer_c{level}.csv", out / f"profile_export_c{level}.json"
        for stale in (csv_path, export_path):
            stale.unlink(missing_ok=True)
        command = perf_analyzer_command(binary, grpc_url, input_data, level, csv_path, export_path, model,
                                        request_count, measurement_interval_ms, stability_percentage, max_trials,
                                        extra_args)
        commands.append(command)
        _run(command, out / f"perf_analyzer_c{level}.log", timeout)
        if not csv_path.is_file():
            raise PerfToolError(f"perf_analyzer wrote no {csv_path} (log: {out / f'perf_analyzer_c{level}.log'})")
        rows = parse_perf_analyzer_csv(csv_path)
        tokens = summarize_profile_export(export_path) if export_path.is_file() else []
        for row in rows:
            match = next((t for t in tokens if t.get("value") == row["concurrency"]), None)
            results.append({**row, "tokens": match, "csv": str(csv_path), "profile_export": str(export_path)})
    summary = {"tool": "perf_analyzer", "version": _version(binary), "model": model, "url": grpc_url,
               "speculation_mode": speculation_mode, "max_tokens": max_tokens, "num_prompts": len(texts),
               "request_count": request_count, "commands": commands, "results": results}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def genai_perf_command(binary: str, grpc_url: str, tokenizer: str | os.PathLike, artifact_dir: Path,
                       concurrency: int, model: str = "cosine", num_prompts: int = 20,
                       request_count: int | None = 20, input_tokens_mean: int = 64, input_tokens_stddev: int = 0,
                       output_tokens_mean: int = 32, output_tokens_stddev: int = 0,
                       input_file: Path | None = None, warmup_requests: int = 0, random_seed: int = 0,
                       extra_inputs: Mapping[str, object] | None = None, extra_args: Sequence[str] = ()) \
        -> list[str]:
    command = [binary, "profile", "-m", model, "--endpoint-type", "kserve", "--backend", "tensorrtllm",
               "--streaming", "-u", _strip_scheme(grpc_url), "--tokenizer", str(tokenizer),
               "--concurrency", str(concurrency), "--num-prompts", str(num_prompts),
               "--output-tokens-mean", str(output_tokens_mean), "--output-tokens-stddev", str(output_tokens_stddev),
               "--random-seed", str(random_seed), "--artifact-dir", str(artifact_dir)]
    if input_file is not None:
        command += ["--input-file", str(input_file)]
    else:
        command += ["--synthetic-input-tokens-mean", str(input_tokens_mean),
                    "--synthetic-input-tokens-stddev", str(input_tokens_stddev)]
    if request_count:
        command += ["--request-count", str(request_count)]
    if warmup_requests:
        command += ["--warmup-request-count", str(warmup_requests)]
    for name, value in (extra_inputs or {}).items():
        # genai-perf types "name:value" itself (true/false -> bool, digits -> int); the model checks the dtype.
        value = str(value).lower() if isinstance(value, bool) else value
        command += ["--extra-inputs", f"{name}:{value}"]
    return command + list(extra_args)


def run_genai_perf(grpc_url: str, tokenizer: str | os.PathLike, out_dir: str | os.PathLike,
                   concurrency: Sequence[int] = (1,), num_prompts: int = 20, request_count: int | None = 20,
                   input_tokens_mean: int = 64, input_tokens_stddev: int = 0, output_tokens_mean: int = 32,
                   output_tokens_stddev: int = 0, prompts: str | os.PathLike | Sequence[str] | None = None,
                   model: str = "cosine", speculation_mode: str | None = None, return_stats: bool = False,
                   extra_inputs: Mapping[str, object] | None = None, warmup_requests: int = 0,
                   random_seed: int = 0, extra_args: Sequence[str] = (), timeout: float | None = 1800,
                   tools_bin: str | os.PathLike | None = None) -> dict:
    """Runs `genai-perf profile` (kserve endpoint, tensorrtllm backend, streaming) once per concurrency level.

    Prompts are synthetic (input_tokens_mean/stddev tokens of the tokenizer's vocabulary) unless `prompts` (a
    JSON-lines file or a list of strings) is given; genai-perf asks for output_tokens_mean tokens through
    max_tokens. speculation_mode / return_stats / extra_inputs are sent with every request (--extra-inputs).
    genai-perf's artifacts land in out_dir/artifacts/<model>-triton-tensorrtllm-concurrency<N>/; the exports are
    copied to out_dir as genai_perf_c<N>.json / .csv / profile_export_c<N>.json. Returns the parsed summaries
    (genai-perf counts tokens by re-tokenizing the text; "from_profile_export" has the model's own counts)."""
    binary = find_tool("genai-perf", tools_bin)
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not (Path(tokenizer) / "tokenizer.json").is_file() and not (Path(tokenizer) / "tokenizer_config.json").is_file():
        raise PerfToolError(f"{tokenizer} is not a local Hugging Face tokenizer folder (no hub access here)")
    if speculation_mode is not None and speculation_mode not in SPECULATION_MODES:
        raise ValueError(f"speculation_mode must be one of {', '.join(SPECULATION_MODES)}, not {speculation_mode!r}")
    inputs = dict(extra_inputs or {})
    if speculation_mode is not None:
        inputs["speculation_mode"] = speculation_mode
    if return_stats:
        inputs["return_stats"] = True
    input_file = None
    if prompts is not None:
        texts = list(prompts) if not isinstance(prompts, (str, os.PathLike)) else load_prompts(prompts)
        input_file = out / "genai_perf_prompts.jsonl"
        input_file.write_text("".join(json.dumps({"text": text}, ensure_ascii=False) + "\n" for text in texts))
    artifact_root = out / "artifacts"
    results, commands = [], []
    for level in concurrency:
        command = genai_perf_command(binary, grpc_url, Path(tokenizer).resolve(), artifact_root, level, model,
                                     num_prompts, request_count, input_tokens_mean, input_tokens_stddev,
                                     output_tokens_mean, output_tokens_stddev, input_file, warmup_requests,
                                     random_seed, inputs, extra_args)
        commands.append(command)
        run_dir = artifact_root / f"{model}-triton-tensorrtllm-concurrency{level}"
        shutil.rmtree(run_dir, ignore_errors=True)
        # genai-perf may write next to its working directory: run it inside the output folder.
        _run(command, out / f"genai_perf_c{level}.log", timeout, cwd=out)
        exports = sorted(artifact_root.glob(f"*concurrency{level}/profile_export_genai_perf.json"))
        if not exports:
            raise PerfToolError(f"genai-perf wrote no profile_export_genai_perf.json under {artifact_root} "
                                f"(log: {out / f'genai_perf_c{level}.log'})")
        run_dir = exports[0].parent
        copies = {}
        for source, target in (("profile_export_genai_perf.json", f"genai_perf_c{level}.json"),
                               ("profile_export_genai_perf.csv", f"genai_perf_c{level}.csv"),
                               ("profile_export.json", f"profile_export_c{level}.json"),
                               ("inputs.json", f"genai_perf_inputs_c{level}.json")):
            if (run_dir / source).is_file():
                shutil.copyfile(run_dir / source, out / target)
                copies[source] = str(out / target)
        parsed = parse_genai_perf_json(run_dir / "profile_export_genai_perf.json")
        parsed.pop("input_config", None)
        if (run_dir / "profile_export.json").is_file():
            # exact token counts (sequence_length) and, with return_stats, speculation statistics
            exported = summarize_profile_export(run_dir / "profile_export.json")
            if exported:
                parsed["from_profile_export"] = exported[0]
        results.append({"concurrency": level, **parsed, "files": copies})
    summary = {"tool": "genai-perf", "version": _version(binary), "model": model, "url": grpc_url,
               "tokenizer": str(tokenizer), "speculation_mode": speculation_mode, "extra_inputs": inputs,
               "commands": commands, "results": results}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


# ---------------------------------------------------------------------------------------------------------- CLI

def _headline(summary: dict) -> str:
    lines = []
    for result in summary["results"]:
        if summary["tool"] == "perf_analyzer":
            tokens = result.get("tokens") or {}
            lines.append(f"c={result['concurrency']}: {result['throughput_infer_per_s']:.3f} req/s, "
                         f"latency avg {result.get('latency_avg_ms', math.nan):.1f} ms "
                         f"p99 {result.get('latency_p99_ms', math.nan):.1f} ms; "
                         f"{tokens.get('output_token_throughput_per_s') or math.nan:.1f} tokens/s, TTFT avg "
                         f"{tokens.get('time_to_first_token_ms', {}).get('avg', math.nan):.1f} ms, ITL avg "
                         f"{tokens.get('inter_token_latency_ms', {}).get('avg', math.nan):.2f} ms")
        else:
            lines.append(f"c={result['concurrency']}: {result['request_throughput_per_s']:.3f} req/s, "
                         f"{result['output_token_throughput_per_s']:.1f} tokens/s, TTFT avg "
                         f"{result.get('time_to_first_token_avg_ms', math.nan):.1f} ms, ITL avg "
                         f"{result.get('inter_token_latency_avg_ms', math.nan):.2f} ms, request latency avg "
                         f"{result.get('request_latency_avg_ms', math.nan):.1f} ms")
    return "\n".join(lines)


def _key_values(items: Sequence[str] | None) -> dict:
    values = {}
    for item in items or ():
        name, sep, value = item.partition(":")
        if not sep:
            raise argparse.ArgumentTypeError(f"--extra-input {item!r}: expected name:value")
        values[name] = {"true": True, "false": False}.get(value.lower(), value)
    return values


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cosine_client.perf_tools", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    def common(sub):
        sub.add_argument("--url", default="localhost:8001", help="gRPC host:port of the server")
        sub.add_argument("--model", default="cosine")
        sub.add_argument("--concurrency", type=int, nargs="+", default=[1])
        sub.add_argument("--request-count", type=int, default=20,
                         help="requests measured per concurrency level (0: the tool's own stabilisation)")
        sub.add_argument("--mode", choices=SPECULATION_MODES, help="speculation_mode sent with every request")
        sub.add_argument("--return-stats", action="store_true", help="ask for speculation_stats in responses")
        sub.add_argument("--extra-input", action="append", metavar="NAME:VALUE", help="another model input")
        sub.add_argument("--tools-bin", help=f"folder with the tools (default {DEFAULT_TOOLS_BIN})")
        sub.add_argument("--timeout", type=float, default=1800, help="seconds per tool run")
        sub.add_argument("--out", type=Path, required=True, help="output folder")

    pa = commands.add_parser("perf-analyzer", help="perf_analyzer, streaming gRPC, prompts from a file")
    common(pa)
    pa.add_argument("--prompts", required=True, help="JSON lines with 'prompt' (or 'text')")
    pa.add_argument("--num-prompts", type=int, help="use the first N prompts (after the length filter)")
    pa.add_argument("--max-tokens", type=int, default=32)
    pa.add_argument("--tokenizer", help="tokenizer folder, to leave out prompts over --max-input-tokens")
    pa.add_argument("--max-input-tokens", type=int)
    pa.add_argument("--stability-percentage", type=float)
    pa.add_argument("--measurement-interval", type=int, help="ms (without --request-count)")

    gp = commands.add_parser("genai-perf", help="genai-perf profile, kserve/tensorrtllm interface, streaming")
    common(gp)
    gp.add_argument("--tokenizer", required=True, help="local Hugging Face tokenizer folder")
    gp.add_argument("--num-prompts", type=int, default=20, help="distinct prompts to cycle through")
    gp.add_argument("--input-tokens-mean", type=int, default=64)
    gp.add_argument("--input-tokens-stddev", type=int, default=0)
    gp.add_argument("--output-tokens-mean", type=int, default=32)
    gp.add_argument("--output-tokens-stddev", type=int, default=0)
    gp.add_argument("--prompts", help="JSON lines with 'prompt' (or 'text') instead of synthetic prompts")
    gp.add_argument("--warmup-requests", type=int, default=0)
    gp.add_argument("--random-seed", type=int, default=0)

    data = commands.add_parser("input-data", help="only write perf_analyzer's --input-data JSON")
    data.add_argument("--prompts", required=True)
    data.add_argument("--out", type=Path, required=True, help="JSON file to write")
    data.add_argument("--num-prompts", type=int)
    data.add_argument("--max-tokens", type=int, default=32)
    data.add_argument("--mode", choices=SPECULATION_MODES)
    data.add_argument("--return-stats", action="store_true")

    args = parser.parse_args(argv)
    try:
        if args.command == "input-data":
            path = write_input_data(load_prompts(args.prompts, args.num_prompts), args.out,
                                    max_tokens=args.max_tokens, speculation_mode=args.mode,
                                    return_stats=args.return_stats)
            print(path)
            return 0
        if args.command == "perf-analyzer":
            summary = run_perf_analyzer(
                args.url, args.prompts, args.out, concurrency=args.concurrency,
                request_count=args.request_count or None, max_tokens=args.max_tokens, model=args.model,
                speculation_mode=args.mode, return_stats=args.return_stats, num_prompts=args.num_prompts,
                tokenizer=args.tokenizer, max_input_tokens=args.max_input_tokens,
                measurement_interval_ms=args.measurement_interval, stability_percentage=args.stability_percentage,
                extra_inputs=_key_values(args.extra_input), timeout=args.timeout, tools_bin=args.tools_bin)
        else:
            summary = run_genai_perf(
                args.url, args.tokenizer, args.out, concurrency=args.concurrency, num_prompts=args.num_prompts,
                request_count=args.request_count or None, input_tokens_mean=args.input_tokens_mean,
                input_tokens_stddev=args.input_tokens_stddev, output_tokens_mean=args.output_tokens_mean,
                output_tokens_stddev=args.output_tokens_stddev, prompts=args.prompts, model=args.model,
                speculation_mode=args.mode, return_stats=args.return_stats,
                extra_inputs=_key_values(args.extra_input), warmup_requests=args.warmup_requests,
                random_seed=args.random_seed, timeout=args.timeout, tools_bin=args.tools_bin)
    except (PerfToolError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(_headline(summary))
    print(f"wrote {args.out}/summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
