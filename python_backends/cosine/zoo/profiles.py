"""Build profiles: model sizes, training budgets and evaluation sizes of the zoo."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    heads: int
    intermediate: int


@dataclass(frozen=True)
class Profile:
    name: str
    seed: int
    vocab_size: int
    context: int  # training window and max_position_embeddings
    train_chars_per_domain: int
    prompts_per_domain: int
    target: ModelShape
    target_steps: int
    target_batch: int
    target_lr: float
    drafter: ModelShape
    distill_windows_per_domain: int
    distill_top_k: int
    # on-policy windows: a corpus prefix continued by the target's own greedy output (what drafters must predict)
    distill_generated_per_domain: int
    distill_prefix: int
    drafter_steps: int
    drafter_batch: int
    drafter_lr: float
    eval_prompts_per_domain: int
    eval_new_tokens: int
    eval_loss_windows: int
    step_cost_steps: int
    draft_length: int = 4


PROFILES = {
    # ~10 minutes on 2 CPU cores. The target is deep rather than wide: at batch 1 a step's cost is mostly
    # per-layer work, so twelve layers make it >= 8x a one-layer drafter while staying cheap enough to train.
    # Drafters are narrow so that one drafter cannot hold every domain as well as a specialist holds its own.
    "demo": Profile(
        name="demo", seed=0, vocab_size=2048, context=256, train_chars_per_domain=1_000_000, prompts_per_domain=50,
        target=ModelShape(hidden=192, layers=12, heads=3, intermediate=512),
        target_steps=560, target_batch=8, target_lr=2e-3,
        drafter=ModelShape(hidden=16, layers=1, heads=1, intermediate=256),
        distill_windows_per_domain=1024, distill_top_k=16, distill_generated_per_domain=128, distill_prefix=64,
        drafter_steps=800, drafter_batch=8, drafter_lr=3e-3,
        eval_prompts_per_domain=48, eval_new_tokens=64, eval_loss_windows=16, step_cost_steps=200),
    # Seconds: exercises every stage for tests; its quality numbers mean nothing.
    # (trained just enough that each specialist finds its own domain's prompts likeliest: the router test needs it)
    "tiny": Profile(
        name="tiny", seed=0, vocab_size=512, context=256, train_chars_per_domain=40_000, prompts_per_domain=5,
        target=ModelShape(hidden=64, layers=2, heads=2, intermediate=128),
        target_steps=80, target_batch=4, target_lr=3e-3,
        drafter=ModelShape(hidden=32, layers=1, heads=2, intermediate=64),
        distill_windows_per_domain=16, distill_top_k=8, distill_generated_per_domain=2, distill_prefix=16,
        drafter_steps=60, drafter_batch=4, drafter_lr=3e-3,
        eval_prompts_per_domain=2, eval_new_tokens=12, eval_loss_windows=2, step_cost_steps=20),
}
