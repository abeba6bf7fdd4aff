"""Writes a Triton model repository for a deployment spec: config.pbtxt from the contract, adapters copied in."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..contract import COSINE, ENGINE, POSTPROCESSING, PREPROCESSING, ROUTER, TARGET, TENSORRT_LLM, target_model_names
from ..engine.checkpoint import max_context_tokens, read_config
from .spec import (MAIN_NODE, TRTLLM, DeploymentSpec, EngineSpec, SpecError, drafter_model_name,
                   target_replicas)

# The checked-in repository holds the one model.py of each kind of model.
ADAPTERS = Path(__file__).resolve().parents[3] / "model_repository"
PREPROCESSING_MODEL, POSTPROCESSING_MODEL, COSINE_MODEL = "preprocessing", "postprocessing", "cosine"
ROUTER_MODEL = "router"


def _parameters(values: dict) -> str:
    entries = ",\n".join(f'  {{ key: "{key}" value: {{ string_value: "{value}" }} }}' for key, value in values.items())
    return f"parameters [\n{entries}\n]\n"


def list_parameter(names) -> str:
    """A list of names as a model parameter: `name,...` (names without ',')."""
    return ",".join(names)


def read_list_parameter(text: str) -> list[str]:
    return [name for name in text.split(",") if name]


def mapping_parameter(mapping: dict[str, str]) -> str:
    """A {name: value} model parameter as `name=value,...` (names and values without ',' or '=')."""
    return list_parameter(f"{name}={value}" for name, value in mapping.items())


def read_mapping_parameter(text: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in read_list_parameter(text))


def _config(name: str, contract, max_batch_size: int, parameters: dict, *, backend: str = "python",
            kind: str = "KIND_CPU", dynamic_batching: str | None = None, decoupled: bool = False) -> str:
    lines = [f'name: "{name}"', f'backend: "{backend}"', f"max_batch_size: {max_batch_size}"]
    if dynamic_batching is not None:
        lines.append(f"dynamic_batching {{ {dynamic_batching} }}")
    if decoupled:
        lines.append("model_transaction_policy { decoupled: true }")
    # one instance: an engine's sequences live in its process (more throughput comes from the target's replicas)
    lines.append(f"instance_group [ {{ kind: {kind} count: 1 }} ]")
    return "\n".join(lines) + "\n" + contract.pbtxt_io() + _parameters(parameters)


def _engine_parameters(engine: EngineSpec, path, is_target: bool, lookahead: bool = False) -> dict:
    """What a portable engine is built from (triton/engine_model.py:portable_engine)."""
    return {
        "checkpoint_dir": path(engine.checkpoint),
        "kv_cache_tokens": engine.kv_cache_tokens,
        "max_draft_tokens": engine.max_draft_tokens,
        # 0: counted where the engine runs, shared among the replicas (spec.engine_threads)
        "num_threads": engine.num_threads or (0 if is_target else 1),
        "replicas": target_replicas(engine) if is_target else 1,
        "dtype": engine.dtype,
        "idle_timeout_s": engine.idle_timeout_s,
        "lookahead": int(lookahead),  # serving.lookahead: the target's plain decoding
    }


def drafter_engine_parameter(drafter: str, key: str) -> str:
    """A model's parameter holding an engine parameter of a drafter in its process (the `cosine` model's drafters,
    a target's copies of them for speculation rounds)."""
    return f"{drafter_model_name(drafter)}.{key}"


def drafter_engine_parameters(drafter: str, params: dict[str, str]) -> dict[str, str]:
    """The engine parameters of a drafter in a model's process, read back from the model's parameters."""
    prefix = drafter_engine_parameter(drafter, "")
    return {key[len(prefix):]: value for key, value in params.items() if key.startswith(prefix)}


def _drafter_engines(drafters: dict[str, EngineSpec], path) -> dict:
    """What a model holding these drafters in its process builds them from."""
    return {drafter_engine_parameter(name, key): value for name, drafter in drafters.items()
            for key, value in _engine_parameters(drafter, path, is_target=False).items()}


def _engine_config(name: str, engine: EngineSpec, path, is_target: bool, lookahead: bool,
                   round_drafters: dict[str, EngineSpec]) -> str:
    parameters = _engine_parameters(engine, path, is_target, lookahead)
    if round_drafters:
        parameters.update(round_drafters=list_parameter(round_drafters), **_drafter_engines(round_drafters, path))
    return _config(name, ENGINE, engine.max_batch_size, parameters,
                   kind="KIND_GPU" if engine.device == "gpu" else "KIND_CPU",
                   dynamic_batching=f"max_queue_delay_microseconds: {engine.max_queue_delay_us}")


def _trtllm_config(name: str, engine: EngineSpec, is_target: bool) -> str:
    """The tensorrtllm backend's model with the parameters TensorRT-LLM's template (inflight_batcher_llm/
    tensorrt_llm/config.pbtxt) sets for draft-target speculation; unset template parameters keep the backend's
    defaults. Not decoupled (Triton's default): the adapter sends one sequence per request and reads one response
    (the backend takes a batch of sequences in one request only when decoupled; the in-flight batcher batches
    requests anyway)."""
    settings = engine.trtllm
    parameters = {
        "gpt_model_type": "inflight_fused_batching",
        # absolute: the backend opens it from the server's working directory, not relative to the repository
        "gpt_model_path": str(settings.engine_dir),
        "max_beam_width": 1,
        "FORCE_CPU_ONLY_INPUT_TENSORS": "no",
        "batch_scheduler_policy": settings.batch_scheduler_policy,
        "kv_cache_free_gpu_mem_fraction": settings.kv_cache_free_gpu_mem_fraction,
        # every round resends the whole sequence: block reuse spares recomputing its prefix
        "enable_kv_cache_reuse": "true",
        # a resent sequence may be longer than max_num_tokens: its uncached part is computed in chunks
        "enable_chunked_context": "true",
        "exclude_input_in_output": "true",
        "gpu_device_ids": settings.gpu,
        "executor_worker_path": "/opt/tritonserver/backends/tensorrtllm/trtllmExecutorWorker",
    }
    if not is_target:
        parameters["normalize_log_probs"] = "false"
    # the backend runs the engine on its own GPU (gpu_device_ids); the instance itself is one CPU thread
    return _config(name, TENSORRT_LLM, engine.max_batch_size, parameters, backend="tensorrtllm", dynamic_batching=(
        f"preferred_batch_size: [ {engine.max_batch_size} ] max_queue_delay_microseconds: "
        f"{engine.max_queue_delay_us} default_queue_policy: {{ max_queue_size: {settings.max_queue_size} }}"))


def _model_config(name: str, engine: EngineSpec, path, is_target: bool, lookahead: bool = False,
                  round_drafters: dict[str, EngineSpec] | None = None) -> tuple[str | None, str]:
    """(adapter folder to copy model.py from, or None for the tensorrtllm backend; config.pbtxt text)."""
    if engine.kind == TRTLLM:
        return None, _trtllm_config(name, engine, is_target)
    return TARGET, _engine_config(name, engine, path, is_target, lookahead, round_drafters or {})


def _verifiable_draft(engine: EngineSpec, is_target: bool) -> int | None:
    """The longest draft (nodes) the engine can verify; None: no limit from it (a TRT-LLM drafter only drafts)."""
    if engine.kind == TRTLLM:
        return engine.trtllm.max_draft_len if is_target else None
    return engine.max_draft_tokens


def _max_context(spec: DeploymentSpec) -> int:
    target = spec.target
    return target.trtllm.max_seq_len if target.kind == TRTLLM else max_context_tokens(read_config(target.checkpoint))


def _end_id(checkpoint: Path) -> str:
    """The checkpoint's EOS id (generation_config.json first, as transformers does). "" where it lists several
    (Llama 3 Instruct: end_of_text, eom, eot): the cosine model then takes the tokenizer's EOS, the one that ends a
    chat turn, where the list's first would never stop a chat answer. The engines take one end id."""
    for name in ("generation_config.json", "config.json"):
        path = checkpoint / name
        if path.is_file():
            eos = json.loads(path.read_text()).get("eos_token_id")
            if isinstance(eos, list):
                eos = eos[0] if len(eos) == 1 else None if not eos else ""
            if eos is not None:
                return str(eos)
    return ""


def engine_kinds(spec: DeploymentSpec) -> dict[str, str]:
    """{engine model name: kind}."""
    return {model: engine.kind for model, (_, engine) in spec.engines().items()}


def model_configs(spec: DeploymentSpec, path, node: str = MAIN_NODE) -> dict[str, tuple[str | None, str]]:
    """{model name: (adapter folder or None, config.pbtxt text)} of one node's models; `path` renders checkpoint
    paths. The main node serves everything but the drafters of other nodes; another node serves its drafters only."""
    if node not in (MAIN_NODE, *spec.nodes):
        raise SpecError(f"node: {node!r} is not one of the spec's nodes ({', '.join([MAIN_NODE, *spec.nodes])})")
    drafters = {drafter_model_name(name): _model_config(drafter_model_name(name), drafter, path, is_target=False)
                for name, drafter in spec.drafters_on(node).items()}
    if node != MAIN_NODE:
        return drafters
    tokenizer = {"tokenizer_dir": path(spec.tokenizer_dir)}
    targets = target_model_names(target_replicas(spec.target))
    configs = {
        PREPROCESSING_MODEL: (PREPROCESSING_MODEL, _config(PREPROCESSING_MODEL, PREPROCESSING, 64, tokenizer,
                                                           dynamic_batching="max_queue_delay_microseconds: 500")),
        POSTPROCESSING_MODEL: (POSTPROCESSING_MODEL, _config(POSTPROCESSING_MODEL, POSTPROCESSING, 64, tokenizer,
                                                             dynamic_batching="max_queue_delay_microseconds: 500")),
        **{name: _model_config(name, spec.target, path, is_target=True, lookahead=spec.plain_decode_lookahead,
                               round_drafters=spec.round_drafters)
           for name in targets},
        # at its limits the model blocks execute: the backlog waits in Triton's queue (serving/limits.py)
        COSINE_MODEL: (COSINE_MODEL, _config(COSINE_MODEL, COSINE, 64, {
            "target_model": list_parameter(targets),  # its replicas
            "tokenizer_dir": path(spec.tokenizer_dir),
            "router_model": ROUTER_MODEL if spec.drafters else "",
            "drafters": list_parameter(spec.drafters),
            # drafters on other nodes, called over gRPC: name=host:port,...
            "remote_drafters": mapping_parameter({name: spec.nodes[drafter.node].url for name, drafter
                                                  in spec.drafters.items() if drafter.node != MAIN_NODE}),
            # drafters run in this model's process, each from its engine parameters below
            "in_process_drafters": list_parameter(spec.drafters_in_cosine_process),
            **_drafter_engines(spec.drafters_in_cosine_process, path),
            # the target's copies of drafters (serving.rounds), in the order a call names them
            "round_drafters": list_parameter(spec.round_drafters),
            "target_rounds": spec.target_rounds if spec.round_drafters else 0,
            "drafter_timeout_s": spec.drafter_timeout_s,
            "drafter_probe_after_s": spec.drafter_probe_after_s,
            "general_drafter": spec.vanilla_drafter or "",
            "speculation_mode": spec.default_mode,
            "num_draft_tokens": spec.num_draft_tokens,
            "adaptive_draft_tokens": spec.adaptive_draft_tokens,
            "plain_decode_steps": spec.plain_decode_steps,
            "plain_decode_steps_alone": spec.plain_decode_steps_alone,
            # a draft must fit every engine's verification slack
            "max_draft_tokens": min(filter(None, [_verifiable_draft(spec.target, True)] + [
                _verifiable_draft(e, False) for e in spec.drafters.values()])),
            "preprocessing_model": PREPROCESSING_MODEL,  # clients count prompt tokens with it
            "max_context_tokens": _max_context(spec),
            # "": the tokenizer's EOS (a TRT-LLM target's checkpoint may not be here when the repository is written)
            "end_id": _end_id(spec.target.checkpoint),
            # model=kind for every engine: the cosine model picks the adapter that speaks its contract
            "engine_kinds": mapping_parameter(engine_kinds(spec)),
            "default_max_tokens": spec.default_max_tokens,
            "max_inflight_requests": spec.max_inflight_requests,
            "max_queued_tokens": spec.max_queued_tokens,
            "queue_timeout_s": spec.queue_timeout_s,
        }, decoupled=True, dynamic_batching=(
            f"default_queue_policy {{ max_queue_size: {spec.max_queued_requests} default_timeout_microseconds: "
            f"{round(spec.queue_timeout_s * 1e6)} timeout_action: REJECT }}"))),
    }
    configs.update(drafters)
    if spec.drafters:
        # learned routing state lives in one process: one instance, requests in order
        configs[ROUTER_MODEL] = (ROUTER_MODEL, _config(ROUTER_MODEL, ROUTER, 64,
                                                       {"drafters": list_parameter(spec.drafters)}))
    return configs


def write_repository(spec: DeploymentSpec, out_dir: str | Path, relative_paths: bool = False,
                     node: str = MAIN_NODE) -> Path:
    """(Re)writes out_dir as the Triton model repository of one node of `spec`. With relative_paths, checkpoint
    paths are written relative to out_dir (so a checked-in repository works from any clone)."""
    out_dir = Path(out_dir).resolve()

    def path(p: Path) -> str:
        return os.path.relpath(p, out_dir) if relative_paths else str(p)

    configs = model_configs(spec, path, node)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*out_dir.glob(drafter_model_name("*")), *out_dir.glob(f"{TARGET}_*")]:  # models the spec no
        if stale.name not in configs:  # longer has
            shutil.rmtree(stale)
    for model, (adapter, config) in configs.items():
        model_dir = out_dir / model
        (model_dir / "1").mkdir(parents=True, exist_ok=True)
        (model_dir / "config.pbtxt").write_text(config)
        if adapter is None:  # served by a C++ backend
            continue
        source = ADAPTERS / adapter / "1" / "model.py"
        if source.resolve() != (model_dir / "1" / "model.py").resolve():
            shutil.copyfile(source, model_dir / "1" / "model.py")
    return out_dir
