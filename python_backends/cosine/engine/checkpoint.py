"""Loading HF checkpoint directories (config.json + safetensors + tokenizer files) for the portable engine."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


class CheckpointError(ValueError):
    pass


def read_config(checkpoint_dir: str | Path) -> dict:
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{checkpoint_dir}: no config.json (expected a Hugging Face checkpoint directory)")
    config = json.loads(path.read_text())
    if config.get("model_type") not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"{path}: model_type {config.get('model_type')!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}"
        )
    return config


def max_context_tokens(config: dict) -> int:
    """Longest sequence the engine serves exactly: sliding-window attention is not implemented, so cap there."""
    limit = config.get("max_position_embeddings", 2048)
    window = config.get("sliding_window") if config.get("use_sliding_window", True) else None
    return min(limit, window) if window else limit


def load_causal_lm(checkpoint_dir: str | Path, device: str = "cpu", dtype: torch.dtype | None = None):
    """The HF model for a checkpoint directory, on `device`, in eval mode (float32 unless `dtype` says otherwise).
    Nothing is downloaded. torch and transformers are imported here, not with the module: reading configs (the
    repository writer, `build_engines.py`) does not need them."""
    import torch
    from transformers import AutoModelForCausalLM

    read_config(checkpoint_dir)
    model = AutoModelForCausalLM.from_pretrained(
        str(checkpoint_dir), dtype=dtype or torch.float32, local_files_only=True, attn_implementation="sdpa"
    )
    return model.to(device).eval()
