"""perf_analyzer / genai-perf helpers: input-data generation, output parsers, and (with `make tools`) one real run."""
import json
import math
from pathlib import Path

import pytest
from tiny_models import PROMPTS

from cosine.contract import COSINE
from cosine_client import perf_tools
from cosine_client.perf_tools import (filter_prompts_by_length, genai_perf_command, load_prompts,
                                      parse_genai_perf_csv, parse_genai_perf_json, parse_perf_analyzer_csv,
                                      percentile, perf_analyzer_command, perf_input_data, summarize_profile_export,
                                      write_input_data)

DATA = Path(__file__).parent / "data"
JSON_TYPES = {"TYPE_STRING": str, "TYPE_BOOL": bool, "TYPE_INT32": int, "TYPE_UINT64": int, "TYPE_FP32": float}


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "Q: What is 2 + 2?\n", "domain": "math"}, {"text": "héllo wörld 🌍"}, "def f(x):"]
    path.write_text("\n".join(json.dumps(row, ensure_ascii=False) for row in rows) + "\n\n")
    return path


def test_load_prompts_reads_prompt_text_and_bare_strings(prompts_file, tmp_path):
    assert load_prompts(prompts_file) == ["Q: What is 2 + 2?\n", "héllo wörld 🌍", "def f(x):"]
    assert load_prompts(prompts_file, limit=2) == ["Q: What is 2 + 2?\n", "héllo wörld 🌍"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"domain": "math"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        load_prompts(bad)


def test_input_data_matches_perf_analyzer_schema_and_the_model_contract(prompts_file, tmp_path):
    path = write_input_data(load_prompts(prompts_file), tmp_path / "input.json", max_tokens=12,
                            speculation_mode="specinfer", return_stats=True, extra_inputs={"num_draft_tokens": 3})
    document = json.loads(path.read_text())  # well-formed JSON, as perf_analyzer reads it
    assert list(document) == ["data"]
    entries = document["data"]
    assert len(entries) == 3
    assert [entry["text_input"]["content"] for entry in entries] == [["Q: What is 2 + 2?\n"], ["héllo wörld 🌍"],
                                                                     ["def f(x):"]]
    for entry in entries:
        assert set(entry) == {"text_input", "max_tokens", "exclude_input_in_output", "stream", "speculation_mode",
                              "return_stats", "num_draft_tokens"}
        for name, tensor in entry.items():
            spec = COSINE.input_by_name[name]  # every key is an input of the cosine model
            # perf_analyzer's explicit form: content (flattened values) and shape without the batch dimension
            assert set(tensor) == {"content", "shape"}
            assert tensor["shape"] == list(spec.dims) == [1]
            assert len(tensor["content"]) == math.prod(tensor["shape"])
            value = tensor["content"][0]
            assert type(value) is JSON_TYPES[spec.dtype], (name, value)
        assert entry["max_tokens"]["content"] == [12]
        assert entry["stream"]["content"] == [True]  # decoupled streaming, as --streaming needs
        assert entry["exclude_input_in_output"]["content"] == [True]
        assert entry["speculation_mode"]["content"] == ["specinfer"]
        assert entry["num_draft_tokens"]["content"] == [3]
    # The required input is always there; no optional one is sent unless asked for.
    plain = perf_input_data(["hi"])["data"][0]
    assert set(plain) == {"text_input", "max_tokens", "exclude_input_in_output", "stream"}


def test_input_data_rejects_what_the_model_would_reject():
    with pytest.raises(ValueError, match="speculation_mode"):
        perf_input_data(["hi"], speculation_mode="warp")
    with pytest.raises(ValueError, match="single-value input"):
        perf_input_data(["hi"], extra_inputs={"stop_words": "x"})  # dims [-1]: not a scalar
    with pytest.raises(ValueError, match="single-value input"):
        perf_input_data(["hi"], extra_inputs={"beam_width": 4})  # not an input of the model
    with pytest.raises(ValueError, match="no prompts"):
        perf_input_data([])
    assert perf_input_data(["hi"], extra_inputs={"return_stats": "false"})["data"][0]["return_stats"] == \
        {"content": [False], "shape": [1]}


def test_filter_prompts_by_length(tiny_dir):
    tokenizer = tiny_dir / "tokenizer"
    long_prompt = "def fibonacci(n): " * 40
    assert filter_prompts_by_length(["1 + 1 =", long_prompt], tokenizer, 32) == ["1 + 1 ="]
    with pytest.raises(ValueError):
        filter_prompts_by_length([long_prompt], tokenizer, 4)


def test_parse_perf_analyzer_csv():
    rows = parse_perf_analyzer_csv(DATA / "perf_analyzer_sample.csv")
    assert len(rows) == 1
    row = rows[0]
    assert row["concurrency"] == 2
    assert row["throughput_infer_per_s"] == pytest.approx(1.65537)
    assert row["response_throughput_per_s"] == pytest.approx(25.4927)
    assert row["latency_avg_ms"] == pytest.approx(1132.854)
    assert row["latency_p50_ms"] == pytest.approx(850.395)
    assert row["latency_p99_ms"] == pytest.approx(2466.112)
    assert row["raw"]["Server Queue"] == 257


def test_summarize_profile_export_token_metrics():
    by_level = {s["value"]: s for s in summarize_profile_export(DATA / "perf_profile_export_sample.json")}
    two = by_level[2]
    # Request A: sent at 1.000 s, responses at +20/+50/+80 ms carrying 1+2+1 tokens;
    # request B: sent at 1.010 s, responses at +40/+200 ms carrying 3+1 tokens. Span 1.000 -> 1.210 s.
    assert two["request_count"] == 2 and two["output_tokens"] == 8
    assert two["time_to_first_token_ms"]["avg"] == pytest.approx(30.0)
    assert two["request_latency_ms"]["avg"] == pytest.approx(140.0)
    assert two["request_latency_ms"]["max"] == pytest.approx(200.0)
    assert two["inter_token_latency_ms"]["min"] == pytest.approx(20.0)  # (80 - 20) / 3
    assert two["inter_token_latency_ms"]["max"] == pytest.approx(160 / 3)
    assert two["request_throughput_per_s"] == pytest.approx(2 / 0.21)
    assert two["output_token_throughput_per_s"] == pytest.approx(8 / 0.21)
    # the last [rounds, draft, accepted] of each request, summed
    assert two["speculation"] == {"rounds": 5, "draft_tokens": 20, "accepted_tokens": 6, "acceptance_rate": 0.3}
    one = by_level[1]
    # without return_stats perf_analyzer exports junk scalars for the absent speculation_stats: ignored
    assert "speculation" not in one
    assert one["output_tokens"] == 2 and one["inter_token_latency_ms"]["avg"] == pytest.approx(100.0)


def test_summarize_profile_export_ignores_the_flags_only_final_response(tmp_path):
    """perf_analyzer exports the stream's closing (empty) response with uninitialised values."""
    outputs = [{"sequence_length": 1, "output_ids": 7, "text_output": "a"},
               {"sequence_length": 2, "output_ids": [8, 9], "text_output": "bc"},
               {"sequence_length": 1677721744, "output_ids": -7978986, "text_output": ""}]
    export = {"experiments": [{"experiment": {"mode": "concurrency", "value": 1}, "requests": [
        {"timestamp": 0, "response_timestamps": [10_000_000, 20_000_000, 21_000_000], "response_outputs": outputs}]}]}
    (tmp_path / "export.json").write_text(json.dumps(export))
    summary = summarize_profile_export(tmp_path / "export.json")[0]
    assert summary["output_tokens"] == 3
    assert summary["output_token_throughput_per_s"] == pytest.approx(3 / 0.021)


def test_percentile_matches_linear_interpolation():
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([10], 99) == 10
    assert percentile([0, 10], 90) == pytest.approx(9.0)
    assert math.isnan(percentile([], 50))


def test_parse_genai_perf_json():
    summary = parse_genai_perf_json(DATA / "perf_genai_perf_sample.json")
    assert summary["request_count"] == 10
    assert summary["request_throughput_per_s"] == pytest.approx(1.9007070623049087)
    assert summary["output_token_throughput_per_s"] == pytest.approx(29.841100878187067)
    assert summary["time_to_first_token_avg_ms"] == pytest.approx(114.6875282)
    assert summary["time_to_first_token_p99_ms"] == pytest.approx(281.73033608)
    assert summary["inter_token_latency_avg_ms"] == pytest.approx(27.725185999999997)
    assert summary["request_latency_p50_ms"] == pytest.approx(358.840037)
    assert summary["request_latency_p99_ms"] == pytest.approx(967.63587971)
    assert summary["output_sequence_length_avg"] == pytest.approx(15.7)
    assert summary["input_sequence_length_avg"] == pytest.approx(32.0)
    assert summary["metrics"]["request_latency"]["unit"] == "ms"
    assert summary["input_config"]["endpoint"]["backend"] == "tensorrtllm"


def test_parse_genai_perf_csv():
    tables = parse_genai_perf_csv(DATA / "perf_genai_perf_sample.csv")
    assert tables["Time To First Token (ms)"]["avg"] == pytest.approx(114.69)
    assert tables["Request Latency (ms)"]["p99"] == pytest.approx(967.64)
    assert tables["Inter Token Latency (ms)"]["p50"] == pytest.approx(20.57)
    assert tables["Output Token Throughput (tokens/sec)"]["Value"] == pytest.approx(29.84)
    assert tables["Request Throughput (per sec)"]["Value"] == pytest.approx(1.90)
    assert tables["Request Count (count)"]["Value"] == 10


def test_commands(tmp_path):
    pa = perf_analyzer_command("pa", "grpc://h:1", tmp_path / "in.json", 2, tmp_path / "o.csv", tmp_path / "e.json",
                               request_count=10)
    assert pa[:8] == ["pa", "-m", "cosine", "-i", "grpc", "-u", "h:1", "--streaming"]
    assert pa[pa.index("--concurrency-range") + 1] == "2" and pa[pa.index("--request-count") + 1] == "10"
    stabilised = perf_analyzer_command("pa", "h:1", tmp_path / "in.json", 1, tmp_path / "o.csv",
                                       tmp_path / "e.json", request_count=None, measurement_interval_ms=4000)
    assert "--request-count" not in stabilised and "--measurement-interval" in stabilised
    gp = genai_perf_command("gp", "h:1", "/tok", tmp_path, 3, num_prompts=7, request_count=9, input_tokens_mean=16,
                            output_tokens_mean=8, extra_inputs={"speculation_mode": "cosine", "return_stats": True})
    text = " ".join(gp)
    for part in ("profile -m cosine --endpoint-type kserve --backend tensorrtllm --streaming -u h:1",
                 "--tokenizer /tok", "--concurrency 3", "--num-prompts 7", "--request-count 9",
                 "--synthetic-input-tokens-mean 16", "--output-tokens-mean 8",
                 "--extra-inputs speculation_mode:cosine", "--extra-inputs return_stats:true"):
        assert part in text
    with_file = genai_perf_command("gp", "h:1", "/tok", tmp_path, 1, input_file=tmp_path / "p.jsonl")
    assert "--input-file" in with_file and "--synthetic-input-tokens-mean" not in with_file


def test_cli_input_data(prompts_file, tmp_path):
    out = tmp_path / "data.json"
    assert perf_tools.main(["input-data", "--prompts", str(prompts_file), "--out", str(out), "--num-prompts", "2",
                            "--max-tokens", "5", "--mode", "cosine"]) == 0
    entries = json.loads(out.read_text())["data"]
    assert len(entries) == 2 and entries[0]["speculation_mode"]["content"] == ["cosine"]


def test_missing_tool_is_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(perf_tools, "DEFAULT_TOOLS_BIN", tmp_path / "none")
    monkeypatch.delenv(perf_tools.TOOLS_BIN_ENV, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(perf_tools.PerfToolError, match="make tools"):
        perf_tools.find_tool("perf_analyzer")


@pytest.mark.skipif(not (perf_tools.DEFAULT_TOOLS_BIN / "perf_analyzer").is_file(),
                    reason="perf_analyzer not installed (run `make tools`)")
def test_perf_analyzer_against_a_real_server(server, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in PROMPTS[:4]))
    summary = perf_tools.run_perf_analyzer(server.grpc_url, prompts, tmp_path / "out", concurrency=(1, 2),
                                           request_count=6, max_tokens=8, speculation_mode="vanilla",
                                           return_stats=True, timeout=300)
    assert summary["version"].startswith("Perf Analyzer Version")
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["results"] == summary["results"]
    assert [r["concurrency"] for r in summary["results"]] == [1, 2]
    for result in summary["results"]:
        assert result["throughput_infer_per_s"] > 0 and result["latency_avg_ms"] > 0
        tokens = result["tokens"]
        assert tokens["request_count"] == 6
        assert 6 <= tokens["output_tokens"] <= 6 * 8
        assert 0 < tokens["time_to_first_token_ms"]["avg"] <= tokens["request_latency_ms"]["avg"]
        # perf_analyzer's CSV latency of a decoupled model is the whole request's, as our own summary shows
        assert result["latency_avg_ms"] == pytest.approx(tokens["request_latency_ms"]["avg"], rel=0.01)
        # speculation_mode and return_stats reached the model through the input-data file (the server default drafts
        # nothing; vanilla drafts every round, where cosine may start plainly once measured)
        assert tokens["speculation"]["rounds"] > 0 and tokens["speculation"]["draft_tokens"] > 0
