"""Batching benchmark: aggregate tokens/s of a Triton deployment at concurrency 1 and 8 against sequential
transformers `generate` in one process, on a ~100M-parameter Llama-shaped random-weight model.

Modes are interleaved round by round so machine drift cancels. Run: python -m cosine_client.batching_bench
"""
from __future__ import annotations

import argparse
import inspect
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm.auto import tqdm

from cosine.deploy.repository import write_repository
from cosine.deploy.spec import parse_spec
from cosine.launcher import TritonServer, free_ports
from cosine.zoo.tokenizer import train_tokenizer

from .api import http_generate

PROMPTS = ["def parse(line):", "The weather today", "SELECT * FROM", "Once upon a time", "import numpy as np",
           "Dear customer,", "for i in range(", "Q: What is 12 * 7?"]


def llama_100m(out_dir: Path) -> Path:
    """A random-weight Llama with ~100M parameters (hidden 768, 12 layers), built once and reused."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if (out_dir / "model.safetensors").is_file():
        return out_dir
    documents = [inspect.getsource(module) for module in (json, inspect, argparse, statistics)]
    tokenizer = train_tokenizer(documents, vocab_size=8000, context=1024, out_dir=out_dir, progress=False)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out_dir)
    return out_dir


def transformers_sequential(checkpoint: Path, max_tokens: int) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    start, tokens = time.perf_counter(), 0
    for prompt in PROMPTS:
        ids = torch.tensor([tokenizer.encode(prompt)])
        out = model.generate(ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        tokens += out.shape[1] - ids.shape[1]
    return tokens / (time.perf_counter() - start)


def triton_throughput(url: str, max_tokens: int, concurrency: int) -> float:
    def one(prompt):
        event = next(http_generate(url, text_input=prompt, max_tokens=max_tokens, end_id=-1))
        return len(event.output_ids)

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        tokens = sum(pool.map(one, PROMPTS))
    return tokens / (time.perf_counter() - start)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--work-dir", type=Path, default=Path("artifacts/batching-bench"))
    parser.add_argument("--out", type=Path, default=Path("results/batching.json"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads, the same for both sides")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    checkpoint = llama_100m(args.work_dir / "llama-100m")
    spec = parse_spec({"target": {"checkpoint": str(checkpoint), "kv_cache_tokens": 16384, "num_threads": args.threads,
                                  "max_batch_size": 16}}, Path("."))
    repository = write_repository(spec, args.work_dir / "repository")
    results = {"transformers sequential": [], "triton concurrency 1": [], "triton concurrency 8": []}
    with TritonServer(repository, *free_ports(3), log_path=args.work_dir / "server.log") as srv:
        triton_throughput(srv.http_url, 4, 8)  # warm-up
        for _ in tqdm(range(args.rounds), desc="rounds"):
            results["transformers sequential"].append(transformers_sequential(checkpoint, args.max_tokens))
            results["triton concurrency 1"].append(triton_throughput(srv.http_url, args.max_tokens, 1))
            results["triton concurrency 8"].append(triton_throughput(srv.http_url, args.max_tokens, 8))
    baseline = statistics.median(results["transformers sequential"])
    summary = {mode: {"tokens_per_s": statistics.median(v), "vs_transformers": statistics.median(v) / baseline}
               for mode, v in results.items()}
    print(f"{'mode':<26}{'tokens/s':>10}{'vs transformers':>18}")
    for mode, row in summary.items():
        print(f"{mode:<26}{row['tokens_per_s']:>10.1f}{row['vs_transformers']:>17.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"summary": summary, "rounds": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
