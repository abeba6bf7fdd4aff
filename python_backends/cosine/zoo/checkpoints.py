"""Checkpoint directories: how the zoo saves them, and the check that drafters speak the target's tokenizer."""
from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path

from transformers import GenerationConfig, LlamaForCausalLM
from transformers.utils import logging as transformers_logging

_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")
_TOKENIZER_PIPELINE_KEYS = ("normalizer", "pre_tokenizer", "post_processor", "decoder")


def save_checkpoint(model: LlamaForCausalLM, tokenizer_dir: Path, out_dir: Path) -> None:
    """A directory that AutoModelForCausalLM and AutoTokenizer both load on their own."""
    config = model.config
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                                               pad_token_id=config.pad_token_id)
    with _without_transformers_progress_bars():
        model.save_pretrained(out_dir)
    for path in sorted(tokenizer_dir.iterdir()):
        shutil.copy2(path, out_dir / path.name)


@contextmanager
def _without_transformers_progress_bars():
    # save_pretrained draws a bar per call even for a single small file, which buries the zoo's own progress.
    was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            transformers_logging.enable_progress_bar()


def check_compatible(target_dir: Path, drafter_dirs: dict[str, Path]) -> None:
    """Raise ValueError naming the drafter and the file when a drafter's vocabulary differs from the target's.

    Speculation compares token ids, so a drafter is only usable with the target's exact tokenizer.
    """
    target_dir = Path(target_dir)
    for name, drafter_dir in drafter_dirs.items():
        for file_name, compare in _COMPARISONS.items():
            target_file, drafter_file = target_dir / file_name, Path(drafter_dir) / file_name
            if not target_file.is_file():
                if file_name in _REQUIRED:
                    raise ValueError(f"target: {file_name} missing in {target_dir}")
                continue
            if not drafter_file.is_file():
                raise ValueError(f"drafter {name!r}: {file_name} missing in {drafter_dir}")
            difference = compare(_read_json(drafter_file), _read_json(target_file))
            if difference:
                raise ValueError(f"drafter {name!r}: {file_name} differs from target's ({difference})")


def _config_difference(drafter: dict, target: dict) -> str | None:
    if drafter.get("vocab_size") != target.get("vocab_size"):
        return f"vocab_size: {drafter.get('vocab_size')} vs {target.get('vocab_size')}"
    return None


def _tokenizer_json_difference(drafter: dict, target: dict) -> str | None:
    drafter_model, target_model = drafter.get("model", {}), target.get("model", {})
    drafter_vocab, target_vocab = drafter_model.get("vocab", {}), target_model.get("vocab", {})
    if drafter_model.get("type") != target_model.get("type"):
        return f"model type: {drafter_model.get('type')} vs {target_model.get('type')}"
    if len(drafter_vocab) != len(target_vocab):
        return f"vocab: {len(drafter_vocab)} vs {len(target_vocab)} tokens"
    if drafter_vocab != target_vocab:
        moved = sum(drafter_vocab.get(token) != token_id for token, token_id in target_vocab.items())
        return f"vocab: {moved} of {len(target_vocab)} tokens have different ids"
    if _merge_rules(drafter_model) != _merge_rules(target_model):
        return "merges differ"
    if _added_tokens(drafter) != _added_tokens(target):
        return f"special tokens: {_added_tokens(drafter)} vs {_added_tokens(target)}"
    for key in _TOKENIZER_PIPELINE_KEYS:
        if drafter.get(key) != target.get(key):
            return f"{key} differs"
    return None


def _special_tokens_difference(drafter: dict, target: dict) -> str | None:
    for key in _SPECIAL_TOKEN_KEYS:
        drafter_token, target_token = _token_text(drafter.get(key)), _token_text(target.get(key))
        if drafter_token != target_token:
            return f"{key}: {drafter_token!r} vs {target_token!r}"
    return None


_COMPARISONS = {"config.json": _config_difference, "tokenizer.json": _tokenizer_json_difference,
                "tokenizer_config.json": _special_tokens_difference,
                "special_tokens_map.json": _special_tokens_difference}
_REQUIRED = {"config.json", "tokenizer.json"}


def _merge_rules(model: dict) -> list[str]:
    # tokenizers writes merges as "a b" strings in old versions and as ["a", "b"] pairs in new ones.
    return [merge if isinstance(merge, str) else " ".join(merge) for merge in model.get("merges", [])]


def _added_tokens(tokenizer: dict) -> list[tuple[int, str, bool]]:
    return sorted((token["id"], token["content"], token.get("special", False))
                  for token in tokenizer.get("added_tokens", []))


def _token_text(token) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))
