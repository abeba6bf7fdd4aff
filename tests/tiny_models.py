"""Tiny random-weight checkpoints the tests build themselves (no model hub): a byte-level BPE tokenizer and Llama /
Qwen2 / Mistral models saved as HF checkpoint directories."""
from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
PROMPTS = [
    "def fibonacci(n):",
    "The quick brown fox",
    "SELECT name FROM users WHERE",
    "héllo wörld 🌍 中文",
    "1 + 1 =",
    "import os",
    "class Foo:",
    "Once upon a time",
]


def make_tokenizer(out_dir: Path, vocab_size: int = 400) -> Path:
    text = inspect.getsource(json) + inspect.getsource(inspect)[:50000] + " ".join(PROMPTS) * 20
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(text.splitlines(), trainer)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL).save_pretrained(out_dir)
    return out_dir


def make_checkpoint(out_dir: Path, tokenizer_dir: Path, model_type: str = "llama", seed: int = 0,
                    hidden_size: int = 64, layers: int = 2, max_positions: int = 256, **config) -> Path:
    """A random model whose logits are peaked (large init), so greedy decoding has no near-ties to flip. config:
    further config fields (RoPE scaling, say)."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    config = AutoConfig.for_model(
        model_type, vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
        initializer_range=0.2, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **{"tie_word_embeddings": False, **config})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def reference_generate(checkpoint: Path, prompt: str, max_new_tokens: int) -> list[int]:
    """transformers' own greedy generate: the ground truth for every exactness test."""
    return reference_generate_all(checkpoint, [prompt], max_new_tokens)[prompt]


def reference_generate_all(checkpoint: Path, prompts: list[str], max_new_tokens: int) -> dict[str, list[int]]:
    """reference_generate for several prompts, loading the model once."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    outputs = {}
    for prompt in prompts:
        ids = torch.tensor([tokenizer.encode(prompt)])
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        outputs[prompt] = out[0, ids.shape[1]:].tolist()
    return outputs
