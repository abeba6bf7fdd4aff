"""`make gpu-check`: the engine's exactness against transformers, and its decode rate against transformers' own
batched decode, on a machine with only torch + transformers (no Triton, no network, the project not installed).
Builds its own random-weight checkpoints.

    PYTHONPATH=python_backends:client python3 -m cosine_client.gpu_check [--device cuda|cpu] [--dtype D] [--out FILE]

Exits 1 when an exactness check fails."""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from cosine.engine.checkpoint import load_causal_lm
from cosine.engine.engine import Admission, CausalLMEngine, StepRequest
from cosine.engine.sampling import SamplingParams
from cosine.speculation.tree import DraftTree

from .references import engine_decode_rate, engine_generate, random_prompts, transformers_decode_rate

# initializer_range 0.2 makes logits peaked, so greedy decoding has no near-ties that rounding could flip
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2)
# shaped like the demo zoo's target (profiles.py "demo")
DEMO_TARGET = dict(vocab_size=2048, hidden_size=192, intermediate_size=512, num_hidden_layers=12,
                   num_attention_heads=3, num_key_value_heads=3, max_position_embeddings=256)
LLAMA_100M = dict(vocab_size=8000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                  num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=1024)
PROMPT_LENGTHS = (1, 3, 7, 16, 40, 64)
NEW_TOKENS = 24
BATCHES = (1, 8, 32, 64)
DRAFT_RESERVE = 64  # KV tokens CausalLMEngine reserves per sequence for a draft tree (its default max_draft_tokens)


def say(*parts) -> None:
    print(*parts, flush=True)


def random_checkpoint(out_dir: Path, seed: int = 0, **shape) -> Path:
    """A random-weight Llama checkpoint directory (safetensors). No end token: every output runs to full length."""
    torch.manual_seed(seed)
    config = LlamaConfig(**shape, bos_token_id=None, eos_token_id=None, pad_token_id=None, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def transformers_greedy(model, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """transformers' generate() of each prompt alone: the ground truth."""
    outputs = []
    for prompt in prompts:
        ids = torch.tensor([prompt], device=model.device)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens)
        outputs.append(out[0, len(prompt):].tolist())
    return outputs


def engine_for(model, prompts: list[list[int]], new_tokens: int) -> CausalLMEngine:
    # each sequence's reservation is rounded up to whole KV blocks: a block of slack per sequence
    return CausalLMEngine(model, kv_cache_tokens=sum(len(p) + new_tokens + DRAFT_RESERVE + 16 for p in prompts))


def check_greedy(model, prompts: list[list[int]], new_tokens: int) -> list[str]:
    """Failures of: the engine's greedy output, all prompts batched in the same steps, equals transformers'."""
    batched, _ = engine_generate(engine_for(model, prompts, new_tokens), prompts, new_tokens)
    truth = transformers_greedy(model, prompts, new_tokens)
    return [f"greedy: prompt of {len(p)} tokens: engine {got} != transformers {want}"
            for p, got, want in zip(prompts, batched, truth) if got != want]


def check_tree(model, prompt: list[int], depth: int) -> list[str]:
    """Failures of: after prefill, a draft chain of the true next tokens is fully accepted, plus one bonus token."""
    truth = transformers_greedy(model, [prompt], depth + 2)[0]
    engine = engine_for(model, [prompt], depth + 2)
    first = engine.step([StepRequest(0, prompt, admission=Admission(depth + 2, SamplingParams()))])[0]
    verified = engine.step([StepRequest(0, truth[:1], DraftTree.chain(truth[1:depth + 1]))])[0]
    engine.release(0)
    emitted = [r if isinstance(r, Exception) else r.tokens for r in (first, verified)]
    if emitted != [truth[:1], truth[1:]]:
        return [f"tree: prefill + verified chain of {depth} emitted {emitted}, transformers {truth}"]
    return []


def check_sampled_chain(model, prompt: list[int], depth: int) -> list[str]:
    """Failures of: a chain sampled by a drafter equal to the target (temperature 1), verified as a block with its q,
    is kept whole (the block rule's weight stays 1), on the model's device. A failed step raises."""
    def step(engine: CausalLMEngine, request: StepRequest):
        result = engine.step([request])[0]
        if isinstance(result, Exception):
            raise result
        return result
    drafter, target = (engine_for(model, [prompt], depth + 2) for _ in range(2))
    first = step(target, StepRequest(0, prompt, admission=Admission(depth + 2, SamplingParams(1.0, seed=7))))
    step(drafter, StepRequest(0, prompt, admission=Admission(depth + 2, SamplingParams(1.0, seed=8))))
    drafted = step(drafter, StepRequest(0, first.tokens, keep_length=len(prompt), extra_tokens=depth - 1,
                                        return_q=True))
    verified = step(target, StepRequest(0, first.tokens, DraftTree.chain(drafted.tokens), draft_q=drafted.q))
    if verified.tokens[:depth] != drafted.tokens or len(verified.tokens) != depth + 1:
        return [f"sampled chain: drafted {drafted.tokens}, the target (same model) kept {verified.tokens}"]
    return []


def check_sampling(model, prompt: list[int], new_tokens: int) -> list[str]:
    """Failures of: a seeded sampled request gives the same valid tokens twice."""
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=1234)
    runs = [engine_generate(engine_for(model, [prompt], new_tokens), [prompt], new_tokens, params)[0][0]
            for _ in range(2)]
    failures = []
    if runs[0] != runs[1]:
        failures.append(f"sampling: seed 1234 gave {runs[0]} then {runs[1]}")
    if len(runs[0]) != new_tokens or not all(0 <= t < model.config.vocab_size for t in runs[0]):
        failures.append(f"sampling: {runs[0]} is not {new_tokens} ids below {model.config.vocab_size}")
    return failures


def exactness_checks(checkpoint: Path, device: str) -> list[str]:
    """All exactness checks on `checkpoint` in float32 (TF32 off on CUDA: exactness needs full fp32 matmuls)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = load_causal_lm(checkpoint, device, torch.float32)
    vocab = model.config.vocab_size
    prompts = [random_prompts(vocab, 1, length, seed=length)[0] for length in PROMPT_LENGTHS]
    failures = []
    for name, check in [("greedy, batched", lambda: check_greedy(model, prompts, NEW_TOKENS)),
                        ("tree verification", lambda: check_tree(model, prompts[3], depth=5)),
                        ("sampled chain, drafter = target", lambda: check_sampled_chain(model, prompts[4], depth=8)),
                        ("seeded sampling", lambda: check_sampling(model, prompts[2], NEW_TOKENS))]:
        try:
            found = check()
        except Exception as error:  # a crash is a failed check; the others still run
            found = [f"{name}: {error!r}"]
        say(f"  {name}: {'FAIL' if found else 'ok'}")
        for failure in found:
            say("    " + failure)
        failures += found
    return failures


def scaling_rows(name: str, checkpoint: Path, device: str, dtype: torch.dtype, new_tokens: int) -> list[dict]:
    model = load_causal_lm(checkpoint, device, dtype)
    params = sum(p.numel() for p in model.parameters())
    rows = []
    for batch in BATCHES:
        engine = engine_decode_rate(model, batch, new_tokens, prompt_len=16)
        reference = transformers_decode_rate(model, batch, new_tokens, prompt_len=16)
        rows.append(dict(model=name, params_m=round(params / 1e6, 1), batch=batch, engine_tok_s=round(engine, 1),
                         transformers_tok_s=round(reference, 1), ratio=round(engine / reference, 3)))
        say(f"  {name} batch {batch}: engine {engine:.0f} tok/s, transformers {reference:.0f} tok/s")
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = ["| model | params (M) | batch | engine tok/s | transformers tok/s | engine/transformers |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['params_m']} | {r['batch']} | {r['engine_tok_s']:.0f} | "
              f"{r['transformers_tok_s']:.0f} | {r['ratio']:.2f} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                        help="of the scaling table (default: bfloat16 on cuda, float32 on cpu)")
    parser.add_argument("--new-tokens", type=int, default=32, help="decoded per sequence in the scaling table")
    parser.add_argument("--out", type=Path, help="JSON summary")
    args = parser.parse_args(argv)
    transformers.utils.logging.disable_progress_bar()  # a bar per save/load would bury the progress lines
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    if args.device == "cpu":
        torch.set_num_threads(len(os.sched_getaffinity(0)))
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    say(f"device: {device_name}; torch {torch.__version__}, transformers {transformers.__version__}")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        say("exactness (float32, tiny random Llama):")
        failures = exactness_checks(random_checkpoint(Path(tmp) / "tiny", **TINY), args.device)
        models = [("demo-target", DEMO_TARGET)] + ([("llama-100m", LLAMA_100M)] if args.device == "cuda" else [])
        say(f"batch scaling ({str(dtype).removeprefix('torch.')}, prompt 16 tokens, {args.new_tokens} new tokens):")
        rows = []
        for name, shape in models:
            rows += scaling_rows(name, random_checkpoint(Path(tmp) / name, **shape), args.device, dtype,
                                 args.new_tokens)
    say(markdown_table(rows))
    say(f"{f'FAILED ({len(failures)} exactness failures, above)' if failures else 'passed'} "
        f"in {time.perf_counter() - started:.0f} s")
    if args.out:
        args.out.write_text(json.dumps(dict(
            device=device_name, torch=torch.__version__, transformers=transformers.__version__,
            dtype=str(dtype).removeprefix("torch."), failures=failures, scaling=rows), indent=2) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
