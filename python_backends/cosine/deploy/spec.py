"""The deployment spec (YAML): which checkpoints are served as which Triton models, and how.

Errors name the offending field, e.g. "target.kv_cache_tokens: must be a positive integer, got -1"."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from ..address import split_host_port
from ..contract import DRAFTER_MODEL_PREFIX, GENERAL_DRAFTER, SPECULATION_MODES, target_model_names
from ..serving.limits import Limits
from ..speculation.control import ADAPTIVE_DRAFT_TOKENS, FIXED_DRAFT_TOKENS


class SpecError(ValueError):
    pass


def drafter_model_name(name: str) -> str:
    return f"{DRAFTER_MODEL_PREFIX}{name}"


DTYPES = ("float32", "float16", "bfloat16")
ENGINE_KINDS = PORTABLE, TRTLLM = ("portable", "trtllm")
TRTLLM_DTYPES = ("float16", "bfloat16")
BATCH_SCHEDULER_POLICIES = ("guaranteed_no_evict", "max_utilization")
# kv_cache_free_gpu_mem_fraction is a fraction of the memory free when a model loads; the TRT-LLM models sharing a
# GPU together may claim at most this much of it, leaving room for activations and the other models' weights.
MAX_SHARED_KV_FRACTION = 0.9


@dataclass(frozen=True)
class TrtllmSpec:
    """A TensorRT-LLM engine built from the model's HF checkpoint, served by Triton's tensorrtllm backend."""
    engine_dir: Path
    dtype: str = "bfloat16"  # float16 | bfloat16
    # prompt + output; for the target also the context the cosine model admits against. Every round resends the
    # whole sequence as the request's input, so the engine's input limit is this too (max_seq_len - 1).
    max_seq_len: int = 8192
    # tokens per engine iteration (in-flight batching packs prefills and decodes; longer inputs go in chunks)
    max_num_tokens: int = 8192
    max_draft_len: int = 8  # target only: draft tokens one pass verifies (trtllm-build --max_draft_len)
    kv_cache_free_gpu_mem_fraction: float = 0.3
    gpu: int = 0  # CUDA device the engine runs on (tensor parallelism is not supported here)
    batch_scheduler_policy: str = "guaranteed_no_evict"
    max_queue_size: int = 0  # Triton's queue limit for the model; 0: unlimited


MAIN_NODE = "main"  # the node of the target, `cosine`, the router and every drafter that names no other node


@dataclass(frozen=True)
class EngineSpec:
    checkpoint: Path
    trtllm: TrtllmSpec | None = None  # kind trtllm: its engine's settings; None: kind portable
    # The target's data-parallel replicas: each its own Triton model and process with its own KV cache, a sequence
    # kept on the replica that admitted it. None: default_replicas (the target); a drafter has one.
    replicas: int | None = None
    device: str = "cpu"  # cpu | gpu
    kv_cache_tokens: int = 32768
    max_batch_size: int = 32
    # The cosine process already sends one call per engine per tick; waiting for more would only add latency.
    # Calls from several cosine instances still merge while the engine is busy.
    max_queue_delay_us: int = 0
    # torch threads of the engine process; None: the target engine_threads(0), a drafter one (its tiny matmuls do
    # not scale, and extra threads would contend with the target's)
    num_threads: int | None = None
    dtype: str = "float32"  # float32 | float16 | bfloat16 (GPU)
    max_draft_tokens: int = 64
    idle_timeout_s: float = 600.0
    node: str = MAIN_NODE  # a drafter on another Triton server: one of the spec's `nodes`
    # A drafter of the main node run inside the `cosine` model's process instead of as a Triton model of its own:
    # no process hop per round, one process less on the cores. The event loop waits out its steps: small drafters
    # on a CPU only; a crash in it takes `cosine` with it.
    in_cosine_process: bool = False

    @property
    def kind(self) -> str:
        """portable (PyTorch, Python backend) | trtllm (TensorRT-LLM engine): the spec's `kind`, known from
        whether the engine has TensorRT-LLM settings (the spec requires them with kind trtllm, and only then)."""
        return PORTABLE if self.trtllm is None else TRTLLM


@dataclass(frozen=True)
class NodeSpec:
    """Another Triton server of the deployment, serving drafters only."""
    url: str  # host:port of its gRPC endpoint, as the main node reaches it


@dataclass(frozen=True)
class DeploymentSpec:
    target: EngineSpec
    drafters: dict[str, EngineSpec] = field(default_factory=dict)
    nodes: dict[str, NodeSpec] = field(default_factory=dict)
    tokenizer: Path | None = None  # defaults to the target's checkpoint directory
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    default_max_tokens: int = 64
    speculation_mode: str | None = None  # default: vanilla when there are drafters, else autoregressive
    num_draft_tokens: int = FIXED_DRAFT_TOKENS  # vanilla's and specinfer's fixed draft length
    adaptive_draft_tokens: int = ADAPTIVE_DRAFT_TOKENS  # cosine's ceiling; its controller picks each round's k below
    # Plain decoding (autoregressive requests, and any round a speculative mode's controller drafts nothing) runs
    # this many target steps per engine call, as vLLM's multi-step scheduling does: the per-call cost (BLS hop, packing,
    # the engine's batch set-up; a few ms on a small CPU) is paid once per this many tokens. New requests join
    # the batch between calls, so larger values delay their first steps.
    plain_decode_steps: int = 4
    # ... and this many for a request alone on its target replica while no more requests are active than there are
    # replicas: its calls' fixed cost is the largest share of their time, and no other request waits for them (one
    # admitted to its replica would wait for the call in flight: 16 steps of the demo target take about 45 ms; at c4
    # on 2 replicas, requests left alone for a moment made plain decoding 10-28% slower, before the load condition).
    # 16 against 4, measured on the demo zoo: docs/architecture.md, and docs/history.md, session 33.
    plain_decode_steps_alone: int = 16
    # ... and while the answer to one call travels to the `cosine` process and the next call comes back, the target
    # computes that next call ahead (serving.lookahead), on the portable engine
    plain_decode_lookahead: bool = True
    # A request alone on its target replica, drafting with one drafter (vanilla; cosine once routed) asks the
    # target for this many speculation rounds per call, run in the target's process by copies of the drafters
    # (serving.rounds): the hop between the processes is paid once per call instead of once per round (demo zoo,
    # 2 cores, alternated servers: cosine at c1 1.83-1.95x plain decoding against 1.25-1.40x greedy, 1.68-1.73x
    # against 1.47x sampled). 0: never; portable engines only, drafters of the main node only.
    target_rounds: int = 3
    general_drafter: str | None = None  # vanilla's drafter; default: one named GENERAL_DRAFTER, else the first
    # overload protection (serving.limits): a request waits in Triton's queue while the model is at these limits;
    # beyond max_queued_requests Triton refuses it at once (503 / UNAVAILABLE)
    max_inflight_requests: int = Limits.max_inflight_requests
    max_queued_tokens: int = Limits.max_queued_tokens
    max_queued_requests: int = Limits.max_queued_requests
    queue_timeout_s: float = Limits.queue_timeout_s
    # Drafter health (every drafter, local or remote): a call that fails or takes longer than this takes the
    # drafter out of routing (the requests drafting with it go on without it) ...
    drafter_timeout_s: float = 5.0
    # ... until a probe call, let through this long after the failure (then twice as long after each failed probe)
    drafter_probe_after_s: float = 1.0

    @property
    def default_mode(self) -> str:
        return self.speculation_mode or ("vanilla" if self.drafters else "autoregressive")

    @property
    def vanilla_drafter(self) -> str | None:
        if self.general_drafter or not self.drafters:
            return self.general_drafter
        return GENERAL_DRAFTER if GENERAL_DRAFTER in self.drafters else next(iter(self.drafters))

    @property
    def tokenizer_dir(self) -> Path:
        return self.tokenizer or self.target.checkpoint

    def engines(self) -> dict[str, tuple[str, EngineSpec]]:
        """{Triton model name: (the spec field that sets it, its engine)} of every engine served as a model (not
        those in the `cosine` process), the target's replicas first."""
        return {**{name: ("target", self.target) for name in target_model_names(target_replicas(self.target))},
                **{drafter_model_name(name): (f"drafters.{name}", drafter)
                   for name, drafter in self.drafters_as_models.items()}}

    @property
    def drafters_as_models(self) -> dict[str, EngineSpec]:
        """The drafters served as Triton models: all but those in the `cosine` process."""
        return {name: drafter for name, drafter in self.drafters.items() if not drafter.in_cosine_process}

    def drafters_on(self, node: str) -> dict[str, EngineSpec]:
        """The drafters a node serves as Triton models."""
        return {name: drafter for name, drafter in self.drafters_as_models.items() if drafter.node == node}

    @property
    def drafters_in_cosine_process(self) -> dict[str, EngineSpec]:
        return {name: drafter for name, drafter in self.drafters.items() if drafter.in_cosine_process}

    @property
    def round_drafters(self) -> dict[str, EngineSpec]:
        """The drafters the target holds copies of for speculation rounds in its process (target_rounds), in order:
        a call names one by its index here."""
        if not self.target_rounds or self.target.kind == TRTLLM:
            return {}
        return {name: drafter for name, drafter in self.drafters.items()
                if drafter.kind != TRTLLM and drafter.node == MAIN_NODE}


def _positive_int(where: str, value, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        raise SpecError(f"{where}: must be a {'non-negative' if allow_zero else 'positive'} integer, got {value!r}")
    return value


def engine_threads(configured: int, replicas: int = 1) -> int:
    """Torch threads of an engine process: as configured, or (0) its share of every core this process may use but
    one, counted where it runs, among the engine's `replicas`. The core left over is for the `cosine` orchestrator,
    tritonserver, the drafters and the clients: an engine whose threads share cores with them stalls at every
    parallel region until its preempted thread comes back. Measured on 2 cores, the target on 1 thread against 2
    served plain decoding at 72 against 54-66 tokens/s at c1, 273 against 219 at c8, 349 against 369 at c32, and
    cosine (k 6) at 397 against 338 at c32."""
    return configured or max(1, (len(os.sched_getaffinity(0)) - 1) // replicas)


MAX_DEFAULT_REPLICAS = 2  # more were not measured


def default_replicas(device: str) -> int:
    """The target's replicas when the spec names none: on a CPU one per core, up to MAX_DEFAULT_REPLICAS, counted
    where the repository is written; on a GPU one, which batches every sequence in one process.
    Measured on 2 cores (demo zoo, session 12), two single-thread target processes against one: plain decoding 747
    against 400 tokens/s at c32 and 429 against 328 at c8, cosine 606 against 469 and 343 against 268, c1 unchanged.
    Two processes of one thread use both cores where one process of two threads stalls in every parallel region
    (engine_threads). Each replica holds its own copy of the weights and its own kv_cache_tokens."""
    return 1 if device == "gpu" else min(MAX_DEFAULT_REPLICAS, len(os.sched_getaffinity(0)))


def target_replicas(target: EngineSpec) -> int:
    """A TensorRT-LLM target has one: its in-flight batcher batches every sequence on its GPU."""
    return 1 if target.kind == TRTLLM else target.replicas or default_replicas(target.device)


# Portable-engine settings that a TensorRT-LLM model does not take (its own live under `trtllm`).
PORTABLE_ONLY = ("replicas", "device", "kv_cache_tokens", "num_threads", "dtype", "max_draft_tokens",
                 "idle_timeout_s", "in_cosine_process")


def _fraction(where: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_SHARED_KV_FRACTION:
        raise SpecError(f"{where}: must be a number in (0, {MAX_SHARED_KV_FRACTION}], got {value!r}")
    return float(value)


def _check_fields(where: str, raw, cls, required: str, meaning: str, also_known: tuple[str, ...] = ()) -> None:
    """raw: a mapping of `cls`'s fields (and `also_known`) with at least `required` (what it means, for the
    error)."""
    if not isinstance(raw, dict):
        raise SpecError(f"{where}: must be a mapping with at least '{required}'")
    known = set(cls.__dataclass_fields__) | set(also_known)
    unknown = set(raw) - known
    if unknown:
        raise SpecError(f"{where}.{sorted(unknown)[0]}: unknown field (known: {', '.join(sorted(known))})")
    if required not in raw:
        raise SpecError(f"{where}.{required}: required ({meaning})")


def _trtllm(where: str, raw, base: Path) -> TrtllmSpec:
    _check_fields(where, raw, TrtllmSpec, "engine_dir", "where the TensorRT-LLM engine is built and served from")
    values = dict(raw, engine_dir=(base / str(raw["engine_dir"])).resolve())
    for name in ("max_seq_len", "max_num_tokens", "max_draft_len"):
        if name in values:
            _positive_int(f"{where}.{name}", values[name])
    for name in ("gpu", "max_queue_size"):
        if name in values:
            _positive_int(f"{where}.{name}", values[name], allow_zero=True)
    if "kv_cache_free_gpu_mem_fraction" in values:
        values["kv_cache_free_gpu_mem_fraction"] = _fraction(f"{where}.kv_cache_free_gpu_mem_fraction",
                                                             values["kv_cache_free_gpu_mem_fraction"])
    if values.get("dtype", TrtllmSpec.dtype) not in TRTLLM_DTYPES:
        raise SpecError(f"{where}.dtype: must be one of {', '.join(TRTLLM_DTYPES)}, got {values['dtype']!r}")
    if values.get("batch_scheduler_policy", TrtllmSpec.batch_scheduler_policy) not in BATCH_SCHEDULER_POLICIES:
        raise SpecError(f"{where}.batch_scheduler_policy: must be one of {', '.join(BATCH_SCHEDULER_POLICIES)}, "
                        f"got {values['batch_scheduler_policy']!r}")
    return TrtllmSpec(**values)


def _positive_number(where: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise SpecError(f"{where}: must be a positive number, got {value!r}")
    return float(value)


def _node(where: str, raw) -> NodeSpec:
    if not isinstance(raw, dict) or set(raw) != {"url"}:
        raise SpecError(f"{where}: must be a mapping with only 'url' (host:port of the node's gRPC endpoint)")
    try:
        split_host_port(str(raw["url"]))
    except ValueError as error:
        raise SpecError(f"{where}.url: {error}") from None
    return NodeSpec(str(raw["url"]))


def _engine(where: str, raw, base: Path) -> EngineSpec:
    _check_fields(where, raw, EngineSpec, "checkpoint", "the model's HF checkpoint directory", also_known=("kind",))
    kind = raw.get("kind", PORTABLE)
    if kind not in ENGINE_KINDS:
        raise SpecError(f"{where}.kind: must be one of {', '.join(ENGINE_KINDS)}, got {kind!r}")
    checkpoint = (base / str(raw["checkpoint"])).resolve()
    if kind == TRTLLM:
        # The HF checkpoint is read when its engine is built and (its tokenizer) when the target serves, not to
        # write the repository: build_engines.py reports a missing one then.
        misplaced = [name for name in PORTABLE_ONLY if name in raw]
        if misplaced:
            raise SpecError(f"{where}.{misplaced[0]}: a portable-engine setting; a trtllm model takes its engine "
                            f"settings under {where}.trtllm")
        if "trtllm" not in raw:
            raise SpecError(f"{where}.trtllm: required for kind trtllm (at least engine_dir)")
        raw = dict(raw, trtllm=_trtllm(f"{where}.trtllm", raw["trtllm"], base))
    elif "trtllm" in raw:
        raise SpecError(f"{where}.trtllm: only for kind trtllm (this model's kind is {kind})")
    elif not (checkpoint / "config.json").is_file():
        raise SpecError(f"{where}.checkpoint: {checkpoint} is not a checkpoint directory (no config.json)")
    values = dict(raw, checkpoint=checkpoint)
    values.pop("kind", None)  # EngineSpec.kind: whether it has trtllm settings, checked above
    for name in ("kv_cache_tokens", "max_batch_size", "max_draft_tokens"):
        if name in values:
            _positive_int(f"{where}.{name}", values[name])
    if "max_queue_delay_us" in values:
        _positive_int(f"{where}.max_queue_delay_us", values["max_queue_delay_us"], allow_zero=True)
    for name in ("num_threads", "replicas"):
        if values.get(name) is not None:
            _positive_int(f"{where}.{name}", values[name])
    if values.get("device", "cpu") not in ("cpu", "gpu"):
        raise SpecError(f"{where}.device: must be 'cpu' or 'gpu', got {values['device']!r}")
    if values.get("dtype", "float32") not in DTYPES:
        raise SpecError(f"{where}.dtype: must be one of {', '.join(DTYPES)}, got {values['dtype']!r}")
    if not isinstance(values.get("in_cosine_process", False), bool):
        raise SpecError(f"{where}.in_cosine_process: must be true or false, got {values['in_cosine_process']!r}")
    engine = EngineSpec(**values)
    if engine.in_cosine_process and (engine.node != MAIN_NODE or engine.device != "cpu"):
        raise SpecError(f"{where}.in_cosine_process: only for a drafter on the CPU of the '{MAIN_NODE}' node")
    return engine


def parse_spec(raw: dict, base: Path) -> DeploymentSpec:
    """raw: the YAML mapping; relative paths are relative to `base` (the spec file's folder)."""
    if not isinstance(raw, dict) or "target" not in raw:
        raise SpecError("target: required (the target model's engine settings)")
    known = set(DeploymentSpec.__dataclass_fields__)
    unknown = set(raw) - known
    if unknown:
        raise SpecError(f"{sorted(unknown)[0]}: unknown field (known: {', '.join(sorted(known))})")
    drafters_raw = raw.get("drafters") or {}
    if not isinstance(drafters_raw, dict):
        raise SpecError("drafters: must be a mapping of name -> engine settings")
    nodes_raw = raw.get("nodes") or {}
    if not isinstance(nodes_raw, dict) or MAIN_NODE in nodes_raw:
        raise SpecError(f"nodes: must be a mapping of node name -> {{url: host:port}}; '{MAIN_NODE}' is the "
                        f"target's node")
    nodes = {str(name): _node(f"nodes.{name}", node) for name, node in nodes_raw.items()}
    drafters = {}
    for name, drafter in drafters_raw.items():
        if not str(name).replace("_", "").isalnum():
            raise SpecError(f"drafters.{name}: names may use letters, digits and '_' only")
        drafters[str(name)] = _engine(f"drafters.{name}", drafter, base)
        if drafters[str(name)].replicas not in (None, 1):
            raise SpecError(f"drafters.{name}.replicas: only the target has replicas")
        if drafters[str(name)].node not in (MAIN_NODE, *nodes):
            raise SpecError(f"drafters.{name}.node: {drafters[str(name)].node!r} is not one of the nodes "
                            f"({', '.join([MAIN_NODE, *nodes])})")
        if drafters[str(name)].node != MAIN_NODE and drafters[str(name)].kind == TRTLLM:
            raise SpecError(f"drafters.{name}.node: TensorRT-LLM drafters run on the '{MAIN_NODE}' node (the "
                            f"adapter reaches them through BLS only)")
    target = _engine("target", raw["target"], base)
    if target.node != MAIN_NODE:
        raise SpecError(f"target.node: the target runs on the '{MAIN_NODE}' node")
    if target.in_cosine_process:
        raise SpecError("target.in_cosine_process: only drafters run in the `cosine` process")
    values = dict(raw, target=target, drafters=drafters, nodes=nodes)
    for name in ("drafter_timeout_s", "drafter_probe_after_s", "queue_timeout_s"):
        if name in values:
            values[name] = _positive_number(name, values[name])
    if "tokenizer" in values:
        values["tokenizer"] = (base / str(values["tokenizer"])).resolve()
    if values.get("speculation_mode", SPECULATION_MODES[0]) not in SPECULATION_MODES:
        raise SpecError(f"speculation_mode: must be one of {', '.join(SPECULATION_MODES)}, "
                        f"got {values['speculation_mode']!r}")
    if values.get("general_drafter") is not None and values["general_drafter"] not in drafters:
        raise SpecError(f"general_drafter: {values['general_drafter']!r} is not one of the drafters")
    if not isinstance(values.get("plain_decode_lookahead", True), bool):
        raise SpecError(f"plain_decode_lookahead: must be true or false, got {values['plain_decode_lookahead']!r}")
    ports = []
    for name in ("http_port", "grpc_port", "metrics_port", "default_max_tokens", "num_draft_tokens",
                 "adaptive_draft_tokens", "plain_decode_steps", "plain_decode_steps_alone", "max_inflight_requests",
                 "max_queued_tokens", "max_queued_requests"):
        if name in values:
            _positive_int(name, values[name])
    if "target_rounds" in values:
        _positive_int("target_rounds", values["target_rounds"], allow_zero=True)
    for name in ("http_port", "grpc_port", "metrics_port"):
        ports.append(values.get(name, DeploymentSpec.__dataclass_fields__[name].default))
    if len(set(ports)) != 3:
        raise SpecError(f"http_port/grpc_port/metrics_port: must differ, got {ports}")
    spec = DeploymentSpec(**values)
    _check_shared_gpus(spec)
    return spec


def _check_shared_gpus(spec: DeploymentSpec) -> None:
    # (node, GPU) -> [(spec field of a TRT-LLM model, its KV fraction)]: a node's GPUs are its own
    by_gpu: dict[tuple[str, int], list[tuple[str, float]]] = {}
    for where, engine in spec.engines().values():
        if engine.trtllm is not None:
            by_gpu.setdefault((engine.node, engine.trtllm.gpu), []).append(
                (where, engine.trtllm.kv_cache_free_gpu_mem_fraction))
    for (_, gpu), models in by_gpu.items():
        total = sum(fraction for _, fraction in models)
        if total > MAX_SHARED_KV_FRACTION + 1e-9:
            raise SpecError(f"{models[-1][0]}.trtllm.kv_cache_free_gpu_mem_fraction: the TensorRT-LLM models on "
                            f"GPU {gpu} ({', '.join(where for where, _ in models)}) reserve {total:g} of its free "
                            f"memory for KV cache together; at most {MAX_SHARED_KV_FRACTION} may be")


def load_spec(path: str | Path) -> DeploymentSpec:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise SpecError(f"{path}: not valid YAML: {error}") from None
    return parse_spec(raw, path.parent)


def dump_spec(spec: DeploymentSpec, path: str | Path) -> None:
    """Writes the spec as YAML with paths relative to the file's folder."""
    path = Path(path)

    def rel(p: Path) -> str:
        return str(Path(os.path.relpath(p, path.parent.resolve())))

    def non_default(obj) -> dict:
        fields = type(obj).__dataclass_fields__
        return {k: getattr(obj, k) for k in fields if getattr(obj, k) != fields[k].default}

    def engine(e: EngineSpec) -> dict:
        out = {"checkpoint": rel(e.checkpoint)}
        if e.trtllm is not None:
            out.update(kind=e.kind, trtllm=dict(non_default(e.trtllm), engine_dir=rel(e.trtllm.engine_dir)))
        return dict(out, **{name: value for name, value in non_default(e).items() if name not in out})

    raw = {"target": engine(spec.target), "drafters": {n: engine(d) for n, d in spec.drafters.items()}}
    if spec.nodes:
        raw["nodes"] = {name: asdict(node) for name, node in spec.nodes.items()}
    if spec.tokenizer:
        raw["tokenizer"] = rel(spec.tokenizer)
    # every other field is a plain value, written even at its default (None: chosen when the spec is loaded)
    raw.update((f.name, getattr(spec, f.name)) for f in fields(spec)
               if f.name not in ("target", "drafters", "nodes", "tokenizer") and getattr(spec, f.name) is not None)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
