"""build_zoo: the demo model zoo, trained from scratch on corpora any machine with Python can generate.

Layout of out_dir (all paths in manifest.json are relative to it):
  tokenizer/                the one byte-level BPE tokenizer
  target/                   general Llama target, trained on the mixture of all domains
  drafters/<domain>/        small Llama specialist distilled from the target on one domain
  drafters/general/         the same small Llama distilled on the mixture
  prompts/<domain>.jsonl    held-out prompts {"prompt", "domain"}; prompts/mixed.jsonl holds them all, shuffled
  quality_report.json/.png  target held-out loss, acceptance drafter x domain, step costs, bars
  manifest.json             written last: its presence with the same input hash means the build is done
"""
from __future__ import annotations

import hashlib
import json
import random
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import tokenizers
import torch
import transformers

from ..contract import GENERAL_DRAFTER
from .checkpoints import save_checkpoint
from .corpus import DOMAINS, DomainCorpus, build_corpora
from .evaluation import DomainEvalSet, quality_report
from .profiles import PROFILES, Profile
from .report import check_bars, write_report
from .tokenizer import encode_documents, train_tokenizer
from .training import (SoftLabels, consecutive_windows, continue_greedily, distill_drafter, label_with_target,
                       new_model, pack, parameter_count, train_target)

MANIFEST = "manifest.json"
_OWNED_OUTPUTS = ("tokenizer", "target", "drafters", "prompts", "quality_report.json", "quality_report.png")
_TORCH_THREADS = 2  # the budgets of the profiles are measured with two threads


def build_zoo(out_dir: Path, profile: str = "demo", progress: bool = True) -> dict:
    """Build the zoo into out_dir and return its manifest; a no-op when out_dir already holds this exact build."""
    out_dir = Path(out_dir)
    input_hash = build_input_hash(profile)
    existing = read_manifest(out_dir)
    if existing is not None and existing.get("input_hash") == input_hash:
        return existing
    started = time.perf_counter()
    _clear_outputs(out_dir)
    with _torch_threads(_TORCH_THREADS):
        manifest = _build(out_dir, PROFILES[profile], progress)
    manifest.update(input_hash=input_hash, build_seconds=round(time.perf_counter() - started, 1))
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def build_input_hash(profile: str) -> str:
    """Everything a build depends on: the profile's values, this package's source and the versions of what it runs
    on. The profiles file itself is left out, so that tuning one profile does not invalidate builds of the others."""
    digest = hashlib.sha256(f"{PROFILES[profile]!r}\n".encode())
    for path in sorted(Path(__file__).parent.glob("*.py")):
        if path.name != "profiles.py":
            digest.update(path.name.encode() + b"\n" + path.read_bytes())
    digest.update(json.dumps(_versions(), sort_keys=True).encode())
    return digest.hexdigest()


def read_manifest(out_dir: Path) -> dict | None:
    path = Path(out_dir) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def _build(out_dir: Path, profile: Profile, progress: bool) -> dict:
    corpora = build_corpora(profile.train_chars_per_domain, profile.prompts_per_domain, profile.seed, progress)
    tokenizer_dir = out_dir / "tokenizer"
    tokenizer = train_tokenizer([doc for corpus in corpora.values() for doc in corpus.train], profile.vocab_size,
                                profile.context, tokenizer_dir, progress)
    streams = {domain: pack(encode_documents(tokenizer, corpus.train)) for domain, corpus in corpora.items()}

    target = new_model(profile.target, tokenizer, profile.context, profile.seed)
    train_target(target, list(streams.values()), profile.target_steps, profile.target_batch, profile.target_lr,
                 profile.context, profile.seed, progress)
    save_checkpoint(target, tokenizer_dir, out_dir / "target")

    drafters = _distill_drafters(target, tokenizer, streams, profile, progress)
    for name, drafter in drafters.items():
        save_checkpoint(drafter, tokenizer_dir, out_dir / "drafters" / name)

    prompt_files = _write_prompts(corpora, out_dir / "prompts", profile.seed)
    eval_sets = {domain: _eval_set(tokenizer, corpus, profile) for domain, corpus in corpora.items()}
    report = quality_report(target, drafters, eval_sets, profile.draft_length, profile.eval_new_tokens,
                            profile.step_cost_steps, progress)
    report["bars"] = check_bars(report)
    write_report(report, out_dir, show=progress)

    return {
        "format": 1, "profile": profile.name, "domains": list(DOMAINS), "vocab_size": len(tokenizer),
        "context": profile.context, "tokenizer": "tokenizer",
        "target": {"path": "target", "parameters": parameter_count(target), "trained_on": list(DOMAINS)},
        "drafters": {name: {"path": f"drafters/{name}", "parameters": parameter_count(drafter),
                            "trained_on": list(DOMAINS) if name == GENERAL_DRAFTER else [name]}
                     for name, drafter in drafters.items()},
        "prompts": {name: str(path.relative_to(out_dir)) for name, path in prompt_files.items()},
        "quality_report": "quality_report.json", "quality_plot": "quality_report.png",
        "bars_passed": all(bar["passed"] for bar in report["bars"].values()), "versions": _versions(),
    }


def _distill_drafters(target, tokenizer, streams: dict[str, torch.Tensor], profile: Profile,
                      progress: bool) -> dict:
    """One specialist per domain and a general drafter of the same size and training budget on the mixture.
    Distillation data: corpus windows, and corpus prefixes continued by the target (on-policy)."""
    labels = {}
    for domain, stream in streams.items():
        corpus = consecutive_windows(stream, profile.context, profile.distill_windows_per_domain)
        generated = continue_greedily(target, corpus[:profile.distill_generated_per_domain], profile.distill_prefix,
                                      f"continue {domain}", progress)
        labels[domain] = label_with_target(target, torch.cat([corpus, generated]), profile.distill_top_k,
                                           f"label {domain}", progress)
    labels[GENERAL_DRAFTER] = SoftLabels.concatenate(list(labels.values()))
    drafters = {}
    for name, data in labels.items():
        # Same initial weights for every drafter: they differ only in what they were distilled on.
        drafter = new_model(profile.drafter, tokenizer, profile.context, profile.seed + 1)
        distill_drafter(drafter, data, profile.drafter_steps, profile.drafter_batch, profile.drafter_lr,
                        profile.seed, f"distill {name}", progress)
        drafters[name] = drafter
    return drafters


def _write_prompts(corpora: dict[str, DomainCorpus], prompts_dir: Path, seed: int) -> dict[str, Path]:
    prompts_dir.mkdir(parents=True)
    files = {}
    for domain, corpus in corpora.items():
        files[domain] = _write_jsonl(prompts_dir / f"{domain}.jsonl",
                                     [{"prompt": prompt, "domain": domain} for prompt in corpus.prompts])
    mixed = [{"prompt": prompt, "domain": domain} for domain, corpus in corpora.items() for prompt in corpus.prompts]
    random.Random(seed).shuffle(mixed)
    files["mixed"] = _write_jsonl(prompts_dir / "mixed.jsonl", mixed)
    return files


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def _eval_set(tokenizer, corpus: DomainCorpus, profile: Profile) -> DomainEvalSet:
    prompt_room = profile.context - profile.eval_new_tokens
    prompts = [encoding.ids for encoding in
               tokenizer.backend_tokenizer.encode_batch(corpus.prompts[:profile.eval_prompts_per_domain])]
    # Keep BOS and the end of an overlong prompt, so that prompt and continuation fit the trained context.
    prompts = [ids if len(ids) <= prompt_room else ids[:1] + ids[1 - prompt_room:] for ids in prompts]
    heldout = pack(encode_documents(tokenizer, corpus.heldout))
    return DomainEvalSet(prompts, consecutive_windows(heldout, profile.context, profile.eval_loss_windows))


def _clear_outputs(out_dir: Path) -> None:
    # The manifest goes first, so that an interrupted build is never mistaken for a finished one.
    (out_dir / MANIFEST).unlink(missing_ok=True)
    for name in _OWNED_OUTPUTS:
        path = out_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)


@contextmanager
def _torch_threads(count: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _versions() -> dict[str, str]:
    # The Python version also pins the standard library the code domain is read from.
    return {"python": sys.version, "torch": torch.__version__, "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__}
