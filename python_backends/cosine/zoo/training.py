"""Training of the zoo's models: the general target on the domain mixture, drafters distilled from it."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from .profiles import ModelShape


def new_model(shape: ModelShape, tokenizer: PreTrainedTokenizerFast, context: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.heads,
        max_position_embeddings=context, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config).float()


def parameter_count(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def pack(encoded_documents: list[list[int]]) -> torch.Tensor:
    """One domain's documents as a single token stream."""
    return torch.tensor([token for document in encoded_documents for token in document], dtype=torch.long)


def consecutive_windows(stream: torch.Tensor, length: int, limit: int) -> torch.Tensor:
    count = min(limit, len(stream) // length)
    return stream[:count * length].view(count, length)


def train_target(model: LlamaForCausalLM, streams: list[torch.Tensor], steps: int, batch: int, lr: float,
                 context: int, seed: int, progress: bool) -> float:
    """Next-token training on random windows; every batch holds the same number of windows of each domain."""
    generator = torch.Generator().manual_seed(seed)

    def batch_loss() -> torch.Tensor:
        windows = torch.stack([_random_window(streams[row % len(streams)], context, generator) for row in range(batch)])
        return model(input_ids=windows, labels=windows).loss

    return _optimize(model, steps, lr, batch_loss, "train target", progress)


@dataclass(frozen=True)
class SoftLabels:
    """The target's top-k next-token distribution at every position of some windows of text."""
    windows: torch.Tensor  # [n, length] token ids
    top_ids: torch.Tensor  # [n, length, k]
    top_probs: torch.Tensor  # [n, length, k], renormalised over the k tokens

    @staticmethod
    def concatenate(parts: list[SoftLabels]) -> SoftLabels:
        return SoftLabels(torch.cat([part.windows for part in parts]), torch.cat([part.top_ids for part in parts]),
                          torch.cat([part.top_probs for part in parts]))


def continue_greedily(target: LlamaForCausalLM, windows: torch.Tensor, prefix: int, desc: str, progress: bool,
                      batch: int = 64) -> torch.Tensor:
    """Each window's first `prefix` tokens followed by the target's greedy continuation to the window's length
    (new windows: the corpus windows stay as they are).
    Speculative decoding asks drafters for exactly this: the target's own next tokens, not the corpus's."""
    new_tokens = windows.shape[1] - prefix
    out = []
    for start in tqdm(range(0, len(windows), batch), desc=desc, disable=not progress):
        out.append(target.generate(windows[start:start + batch, :prefix], do_sample=False, max_new_tokens=new_tokens,
                                   min_new_tokens=new_tokens))
    return torch.cat(out)


def label_with_target(target: LlamaForCausalLM, windows: torch.Tensor, top_k: int, desc: str,
                      progress: bool, batch: int = 8) -> SoftLabels:
    top_ids, top_probs = [], []
    with torch.inference_mode():
        for start in tqdm(range(0, len(windows), batch), desc=desc, disable=not progress):
            probs = target(input_ids=windows[start:start + batch]).logits.softmax(-1)
            top = probs.topk(top_k, dim=-1)
            top_ids.append(top.indices)
            top_probs.append(top.values / top.values.sum(-1, keepdim=True))
    return SoftLabels(windows, torch.cat(top_ids), torch.cat(top_probs))


def distill_drafter(drafter: LlamaForCausalLM, labels: SoftLabels, steps: int, batch: int, lr: float, seed: int,
                    desc: str, progress: bool) -> float:
    """Minimise the cross-entropy from the target's top-k distribution to the drafter's, position by position."""
    generator = torch.Generator().manual_seed(seed)

    def batch_loss() -> torch.Tensor:
        rows = torch.randint(len(labels.windows), (batch,), generator=generator)
        log_probs = drafter(input_ids=labels.windows[rows]).logits.log_softmax(-1)
        return -(labels.top_probs[rows] * log_probs.gather(-1, labels.top_ids[rows])).sum(-1).mean()

    return _optimize(drafter, steps, lr, batch_loss, desc, progress)


def _random_window(stream: torch.Tensor, length: int, generator: torch.Generator) -> torch.Tensor:
    start = int(torch.randint(len(stream) - length, (1,), generator=generator))
    return stream[start:start + length]


def _optimize(model: torch.nn.Module, steps: int, lr: float, batch_loss: Callable[[], torch.Tensor], desc: str,
              progress: bool) -> float:
    """AdamW with linear warm-up and cosine decay to a tenth; returns the final smoothed loss."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * (0.55 + 0.45 * math.cos(math.pi * step / steps)))
    model.train()
    smoothed = None
    bar = tqdm(range(steps), desc=desc, disable=not progress)
    for _ in bar:
        loss = batch_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        smoothed = loss.item() if smoothed is None else 0.9 * smoothed + 0.1 * loss.item()
        bar.set_postfix(loss=f"{smoothed:.3f}")
    model.eval()
    return smoothed
