"""The demo model zoo builder, exercised on its tiny profile (built once per session)."""
from __future__ import annotations

import ast
import dataclasses
import json
import re
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cosine.zoo import DOMAINS, PROFILES, build_zoo, check_compatible, read_manifest
from cosine.zoo.corpus import _with_canonical_locals, build_corpora
from cosine.zoo.evaluation import accepted_per_round, greedy_continuations
from cosine.zoo.tokenizer import encode_documents, train_tokenizer

PROFILE = PROFILES["tiny"]


@pytest.fixture(scope="session")
def zoo(tiny_zoo) -> tuple[Path, dict]:
    """The session's tiny zoo (conftest) and its manifest."""
    return tiny_zoo, read_manifest(tiny_zoo)


def checkpoint_dirs(out_dir: Path, manifest: dict) -> dict[str, Path]:
    dirs = {"target": out_dir / manifest["target"]["path"]}
    dirs.update({name: out_dir / info["path"] for name, info in manifest["drafters"].items()})
    return dirs


def drafter_dirs(out_dir: Path, manifest: dict) -> dict[str, Path]:
    return {name: out_dir / info["path"] for name, info in manifest["drafters"].items()}


def file_mtimes(root: Path) -> dict[str, int]:
    return {str(path.relative_to(root)): path.stat().st_mtime_ns for path in root.rglob("*") if path.is_file()}


def test_manifest_lists_every_output(zoo):
    out_dir, manifest = zoo
    assert manifest["profile"] == "tiny"
    assert manifest["domains"] == list(DOMAINS)
    assert set(manifest["drafters"]) == {*DOMAINS, "general"}
    assert set(manifest["prompts"]) == {*DOMAINS, "mixed"}
    assert manifest["target"]["parameters"] > max(info["parameters"] for info in manifest["drafters"].values())
    for relative in [manifest["tokenizer"], manifest["quality_report"], manifest["quality_plot"],
                     *manifest["prompts"].values(), *(info["path"] for info in manifest["drafters"].values())]:
        assert (out_dir / relative).exists(), relative
    assert read_manifest(out_dir) == manifest


@pytest.mark.parametrize("name", ["target", *DOMAINS, "general"])
def test_checkpoint_loads_on_its_own(zoo, name):
    directory = checkpoint_dirs(*zoo)[name]
    model = AutoModelForCausalLM.from_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert model.config.model_type == "llama"
    assert model.dtype == torch.float32
    assert model.config.vocab_size == len(tokenizer)
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    ids = tokenizer("def main():\n", return_tensors="pt").input_ids
    assert model(ids).logits.shape == (1, ids.shape[1], len(tokenizer))


def test_tokenizer_round_trips_any_utf8(zoo):
    tokenizer = AutoTokenizer.from_pretrained(zoo[0] / "tokenizer")
    text = "héllo 🌍 中文\n\tcafé ∑ x² — ünïcödé  \r\n"
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert {tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token} == {"<|bos|>", "<|eos|>", "<|pad|>"}


def test_training_documents_end_with_eos(zoo):
    tokenizer = AutoTokenizer.from_pretrained(zoo[0] / "tokenizer")
    (encoded,) = encode_documents(tokenizer, ["Q: What is 2 + 2?\nA: 4\n"])
    assert encoded[0] == tokenizer.bos_token_id and encoded[-1] == tokenizer.eos_token_id


def test_second_build_is_a_cache_hit(zoo):
    out_dir, manifest = zoo
    before = file_mtimes(out_dir)
    assert build_zoo(out_dir, "tiny", progress=False) == manifest
    assert file_mtimes(out_dir) == before  # nothing was rebuilt


# The tiny profile with a few steps of each training and evaluation stage: the same corpora, tokenizer, model shapes,
# batches and windows, so every stage runs as in `tiny`, in a fraction of its time (the determinism test builds twice).
SHORT = dataclasses.replace(PROFILE, name="tiny-short", target_steps=4, drafter_steps=4, distill_windows_per_domain=4,
                            distill_generated_per_domain=1, distill_prefix=PROFILE.context - 16,
                            eval_prompts_per_domain=1, eval_new_tokens=4, eval_loss_windows=1, step_cost_steps=2)


def test_changed_input_hash_rebuilds_deterministically(tmp_path, monkeypatch):
    from cosine.zoo import build

    monkeypatch.setitem(build.PROFILES, SHORT.name, SHORT)
    out_dir = tmp_path / "first"
    manifest = build_zoo(out_dir, SHORT.name, progress=False)
    copy = tmp_path / "zoo"
    shutil.copytree(out_dir, copy)
    stale = dict(manifest, input_hash="stale")
    (copy / "manifest.json").write_text(json.dumps(stale))
    before = file_mtimes(copy)
    rebuilt = build_zoo(copy, SHORT.name, progress=False)
    assert rebuilt["input_hash"] == manifest["input_hash"]
    outputs = ["target/model.safetensors", "drafters/code/model.safetensors", "tokenizer/tokenizer.json",
               "prompts/mixed.jsonl"]
    for relative in outputs:
        assert file_mtimes(copy)[relative] != before[relative], f"{relative} was not rebuilt"
        assert (copy / relative).read_bytes() == (out_dir / relative).read_bytes(), relative


def read_prompts(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_prompt_files_per_domain_and_mixed(zoo):
    out_dir, manifest = zoo
    per_domain = []
    for domain in DOMAINS:
        rows = read_prompts(out_dir / manifest["prompts"][domain])
        assert len(rows) == PROFILE.prompts_per_domain
        assert all(row["domain"] == domain and row["prompt"].strip() for row in rows)
        per_domain += rows
    mixed = read_prompts(out_dir / manifest["prompts"]["mixed"])
    assert sorted(map(json.dumps, mixed)) == sorted(map(json.dumps, per_domain))


def test_prompts_never_occur_in_training_text(zoo):
    out_dir, manifest = zoo
    corpora = build_corpora(PROFILE.train_chars_per_domain, PROFILE.prompts_per_domain, PROFILE.seed,
                            progress=False)
    for domain in DOMAINS:
        train_text = "\n".join(corpora[domain].train)
        assert not set(corpora[domain].heldout) & set(corpora[domain].train)
        for row in read_prompts(out_dir / manifest["prompts"][domain]):
            assert row["prompt"] not in train_text


def test_code_corpus_renames_locals_without_changing_behaviour():
    source = textwrap.dedent("""
        def tally(self, words, scale=2):
            global counter
            counter += 1
            totals = {word: len(word) * scale for word in words}
            self.append(sorted(totals.items()))
            return max(totals.values()) + counter
    """)
    (function,) = ast.parse(source).body
    renamed = ast.unparse(_with_canonical_locals(function))
    assert renamed.startswith("def tally(self, a, b=2):")
    assert "global counter" in renamed and "self.append(sorted(" in renamed
    assert not {"words", "scale", "totals", "word"} & set(re.findall(r"\w+", renamed))
    results = []
    for code in (source, renamed):
        scope = {"counter": 10}
        exec(code, scope)
        log = []
        results.append((scope["tally"](log, ["ab", "abcd"]), log, scope["counter"]))
    assert results[0] == results[1] == (19, [[("ab", 4), ("abcd", 8)]], 11)


def test_quality_report_covers_every_drafter_and_domain(zoo):
    out_dir, manifest = zoo
    report = json.loads((out_dir / manifest["quality_report"]).read_text())
    assert set(report["target_heldout_loss"]) == set(DOMAINS)
    for name in manifest["drafters"]:
        assert set(report["mean_accepted"][name]) == set(DOMAINS)
        assert all(0 <= value <= report["draft_length"] for value in report["mean_accepted"][name].values())
        assert report["step_cost_ratio"][name] > 0
    assert report["step_cost_ms"]["target"] > 0
    assert report["bars"]
    assert (out_dir / manifest["quality_plot"]).read_bytes().startswith(b"\x89PNG")


def explicit_speculative_decoding(target, drafter, prompt: list[int], new_tokens: int, k: int):
    """The textbook loop: draft k tokens greedily, keep the prefix the target agrees with, add the target's token."""
    sequence, rounds = list(prompt), []
    with torch.inference_mode():
        while len(sequence) - len(prompt) < new_tokens:
            draft = []
            for _ in range(k):
                draft.append(int(drafter(torch.tensor([sequence + draft])).logits[0, -1].argmax()))
            choices = target(torch.tensor([sequence + draft])).logits[0, len(sequence) - 1:].argmax(-1).tolist()
            accepted = 0
            while accepted < k and draft[accepted] == choices[accepted]:
                accepted += 1
            rounds.append(accepted)
            sequence += draft[:accepted] + [choices[accepted]]
    return rounds, sequence[len(prompt):]


def test_acceptance_shortcut_matches_explicit_speculative_loop(zoo):
    out_dir, manifest = zoo
    target = AutoModelForCausalLM.from_pretrained(out_dir / "target").eval()
    drafter = AutoModelForCausalLM.from_pretrained(out_dir / "drafters" / "general").eval()
    tokenizer = AutoTokenizer.from_pretrained(out_dir / "tokenizer")
    prompts = [row["prompt"] for row in read_prompts(out_dir / manifest["prompts"]["mixed"])[:3]]
    for prompt in prompts:
        ids = tokenizer(prompt).input_ids[-48:]
        rounds, output = explicit_speculative_decoding(target, drafter, ids, new_tokens=16, k=4)
        assert accepted_per_round(drafter, ids, output, 4) == rounds
        # Greedy speculation reproduces the target's own greedy output.
        (reference,) = greedy_continuations(target, [ids], len(output))
        assert output[:len(reference)] == reference


def test_check_compatible_accepts_the_zoo(zoo):
    out_dir, manifest = zoo
    check_compatible(out_dir / "target", drafter_dirs(out_dir, manifest))


def test_check_compatible_rejects_retrained_tokenizer(zoo, tmp_path):
    out_dir, _ = zoo
    drafter = tmp_path / "code"
    shutil.copytree(out_dir / "drafters" / "code", drafter)
    train_tokenizer(["some other corpus entirely " * 50, "with its own merges"], PROFILE.vocab_size - 100,
                    PROFILE.context, drafter, progress=False)
    with pytest.raises(ValueError, match=r"drafter 'code': tokenizer\.json differs from target's \(vocab: \d+ vs"):
        check_compatible(out_dir / "target", {"code": drafter})


def test_check_compatible_rejects_changed_special_token(zoo, tmp_path):
    out_dir, _ = zoo
    drafter = tmp_path / "math"
    shutil.copytree(out_dir / "drafters" / "math", drafter)
    config = json.loads((drafter / "tokenizer_config.json").read_text())
    config["eos_token"] = "<|pad|>"
    (drafter / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"drafter 'math': tokenizer_config\.json differs .*eos_token"):
        check_compatible(out_dir / "target", {"math": drafter})


def test_check_compatible_rejects_other_vocab_size(zoo, tmp_path):
    out_dir, _ = zoo
    drafter = tmp_path / "records"
    shutil.copytree(out_dir / "drafters" / "records", drafter)
    config = json.loads((drafter / "config.json").read_text())
    config["vocab_size"] += 64
    (drafter / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"drafter 'records': config\.json differs .*vocab_size"):
        check_compatible(out_dir / "target", {"records": drafter})


def test_a_profile_change_invalidates_only_that_profile(monkeypatch):
    from cosine.zoo import build

    before = {name: build.build_input_hash(name) for name in ("demo", "tiny")}
    monkeypatch.setitem(build.PROFILES, "tiny", dataclasses.replace(build.PROFILES["tiny"], drafter_steps=41))
    assert build.build_input_hash("demo") == before["demo"]
    assert build.build_input_hash("tiny") != before["tiny"]
