"""TensorRT-LLM engines for a deployment's trtllm models, built from their HF checkpoints in two steps:
TensorRT-LLM's converter (trtllm_convert.py) writes a TRT-LLM checkpoint, `trtllm-build` compiles it.

The target is built for draft-target speculation (draft_tokens_external, max_draft_len); drafters gather their
generation logits (candidates and probabilities for confidence fusion) and context logits (prompt scoring for the
router). Logits come in the dtype the tensorrt_llm model's outputs declare (the backend checks they match). All use
paged context FMHA, which KV block reuse needs: every round resends the whole sequence.

A build is skipped when its engine directory holds a finished build of the same inputs (checkpoint files, build
commands, TensorRT-LLM version). Nothing here imports tensorrt_llm; the commands run inside the NGC trtllm container.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from ..contract import TENSORRT_LLM
from ..contract import TARGET
from .spec import TRTLLM, DeploymentSpec, EngineSpec, SpecError

CONVERTER = Path(__file__).resolve().with_name("trtllm_convert.py")
BUILD_RECORD = "cosine-build.json"  # written last: with the same input hash, the engine is built
ENGINE_CONFIG = "config.json"  # trtllm-build writes it beside the engine files
CONTAINER = "nvcr.io/nvidia/tritonserver:26.04-trtllm-python-py3"
_LOGITS_DTYPE = {"TYPE_FP32": "float32", "TYPE_FP16": "float16"}[
    next(t.dtype for t in TENSORRT_LLM.outputs if t.name == "generation_logits")]


@dataclass(frozen=True)
class EngineBuild:
    model: str  # Triton model name
    field: str  # where the spec sets it
    checkpoint: Path  # the HF checkpoint
    engine_dir: Path
    commands: tuple[tuple[str, ...], ...]

    @property
    def record(self) -> Path:
        return self.engine_dir / BUILD_RECORD

    @property
    def built(self) -> bool:
        """An engine is there (whatever its inputs: a hand-built one serves too)."""
        return (self.engine_dir / ENGINE_CONFIG).is_file()


def engine_builds(spec: DeploymentSpec) -> list[EngineBuild]:
    return [EngineBuild(model, field, engine.checkpoint, engine.trtllm.engine_dir, _commands(engine, model == TARGET))
            for model, (field, engine) in spec.engines().items() if engine.kind == TRTLLM]


def _commands(engine: EngineSpec, is_target: bool) -> tuple[tuple[str, ...], ...]:
    settings = engine.trtllm
    converted = settings.engine_dir / "checkpoint"
    convert = ("python3", str(CONVERTER), "--model_dir", str(engine.checkpoint), "--output_dir", str(converted),
               "--dtype", settings.dtype)
    build = ["trtllm-build", "--checkpoint_dir", str(converted), "--output_dir", str(settings.engine_dir),
             # every round resends the whole sequence as input: inputs grow to the whole context
             "--max_batch_size", str(engine.max_batch_size), "--max_input_len", str(settings.max_seq_len - 1),
             "--max_seq_len", str(settings.max_seq_len), "--max_num_tokens", str(settings.max_num_tokens),
             "--max_beam_width", "1", "--gemm_plugin", "auto", "--kv_cache_type", "paged",
             "--use_paged_context_fmha", "enable", "--logits_dtype", _LOGITS_DTYPE]
    if is_target:
        build += ["--speculative_decoding_mode", "draft_tokens_external", "--max_draft_len",
                  str(settings.max_draft_len)]
    else:
        build += ["--gather_generation_logits", "--gather_context_logits"]
    return convert, tuple(build)


def input_hash(build: EngineBuild, trtllm_version: str) -> str:
    """The build's commands, TensorRT-LLM's version and the checkpoint's files (config contents; weights by name,
    size and modification time: hashing GBs of weights would take minutes)."""
    digest = hashlib.sha256(json.dumps([build.commands, trtllm_version]).encode())
    for path in sorted(build.checkpoint.iterdir()):
        if path.suffix == ".json":
            digest.update(path.name.encode() + path.read_bytes())
        elif path.is_file():
            stat = path.stat()
            digest.update(f"{path.name} {stat.st_size} {stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def describe(builds: list[EngineBuild]) -> str:
    """The exact commands, one build after another (--dry-run)."""
    lines = []
    for build in builds:
        state = "engine present" if build.built else "not built yet"
        lines.append(f"# {build.model} ({build.field}, {state}): {build.checkpoint} -> {build.engine_dir}")
        lines += [shlex.join(command) for command in build.commands]
        lines.append("")
    return "\n".join(lines)


def build_engines(builds: list[EngineBuild], progress=print) -> None:
    """Builds every engine whose inputs changed, showing each step and its time; raises SpecError naming the
    field of a checkpoint that is not there, RuntimeError when TensorRT-LLM is not installed or a step fails."""
    if not builds:
        return
    if shutil.which("trtllm-build") is None:
        raise RuntimeError(f"trtllm-build is not on PATH: build TensorRT-LLM engines inside {CONTAINER} "
                           f"(--dry-run prints the commands)")
    version = importlib.metadata.version("tensorrt_llm")
    for index, build in enumerate(builds, 1):
        if not (build.checkpoint / "config.json").is_file():
            raise SpecError(f"{build.field}.checkpoint: {build.checkpoint} is not an HF checkpoint directory "
                            f"(no config.json): the {build.model} engine is built from it")
        digest = input_hash(build, version)
        if build.built and build.record.is_file() and json.loads(build.record.read_text()).get("input_hash") == digest:
            progress(f"[{index}/{len(builds)}] {build.model}: engine up to date in {build.engine_dir}")
            continue
        build.record.unlink(missing_ok=True)  # an interrupted build is never taken for a finished one
        build.engine_dir.mkdir(parents=True, exist_ok=True)
        for step, command in zip(("converting the checkpoint", "building the engine"), build.commands):
            progress(f"[{index}/{len(builds)}] {build.model}: {step}\n  {shlex.join(command)}")
            started = time.monotonic()
            if subprocess.run(command).returncode != 0:
                raise RuntimeError(f"{build.model}: {step} failed (command above)")
            progress(f"[{index}/{len(builds)}] {build.model}: {step} took {time.monotonic() - started:.0f} s")
        build.record.write_text(json.dumps({"input_hash": digest, "tensorrt_llm": version,
                                            "commands": [list(c) for c in build.commands]}, indent=2) + "\n")
