"""gpu_check's exactness checks and the in-process references, on CPU (the scaling table is left to the GPU)."""
from cosine.engine.checkpoint import load_causal_lm
from cosine_client import gpu_check, references
from cosine_client.references import (assisted_generation_rate, engine_decode_rate, engine_generate,
                                      engine_serving_rate, engine_speculation, transformers_decode_rate)


def test_exactness_checks_pass_and_catch_a_wrong_model(tmp_path):
    checkpoint = gpu_check.random_checkpoint(tmp_path / "tiny", **gpu_check.TINY)
    assert gpu_check.exactness_checks(checkpoint, "cpu") == []
    # the checks are not vacuous: greedy outputs of another random model differ from this one's
    other = load_causal_lm(gpu_check.random_checkpoint(tmp_path / "other", seed=1, **gpu_check.TINY))
    model = load_causal_lm(checkpoint)
    prompts = [[5, 6, 7], [9] * 10]
    assert gpu_check.transformers_greedy(model, prompts, 8) != gpu_check.transformers_greedy(other, prompts, 8)


def test_reference_rates(tmp_path):
    model = load_causal_lm(gpu_check.random_checkpoint(tmp_path / "tiny", **gpu_check.TINY))
    assert engine_decode_rate(model, batch=2, new_tokens=6, prompt_len=4) > 0
    assert transformers_decode_rate(model, batch=2, new_tokens=6, prompt_len=4) > 0
    assert assisted_generation_rate(model, model, [[1, 2, 3], [4, 5]], new_tokens=6) > 0


def test_the_engines_serving_rate_times_each_prefill_with_its_decode(tmp_path, monkeypatch):
    """With a clock that moves one second per engine call: one request at a time, one token a call, a request of n
    tokens (its prefill and n - 1 decode steps) takes n seconds: 1 token/s exactly, where timing the decode steps alone
    would give more. In a closed loop of 3 with 3 steps a call, 4 requests of 7 tokens take 6 calls: 3 admitted in the
    first, ended in the third, the 4th admitted in the fourth."""
    from types import SimpleNamespace

    from cosine.engine.engine import CausalLMEngine

    model = load_causal_lm(gpu_check.random_checkpoint(tmp_path / "tiny", **gpu_check.TINY))
    clock, batches = [0.0], []

    def ticking(self, requests, step=CausalLMEngine.step):
        clock[0] += 1.0
        batches.append(len(requests))
        return step(self, requests)
    monkeypatch.setattr(CausalLMEngine, "step", ticking)
    monkeypatch.setattr(references, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    assert engine_serving_rate(model, [[1, 2, 3], [4, 5], [6] * 20], new_tokens=7) == 1.0
    batches.clear()
    assert engine_serving_rate(model, [[1, 2, 3], [4, 5], [6] * 20, [7, 8]], new_tokens=7, concurrency=3,
                               steps_per_call=3) == 28 / 6
    assert max(batches) == 3


def test_the_engines_speculation_reference_is_exact_and_keeps_the_drafters_cache_in_step(tmp_path):
    """Its output is the target's greedy output whatever the drafter; a drafter equal to the target has every draft
    accepted whole, which it is only if the drafter's cache follows the context round after round."""
    from cosine.engine.engine import CausalLMEngine

    checkpoint = gpu_check.random_checkpoint(tmp_path / "tiny", **gpu_check.TINY)
    other = gpu_check.random_checkpoint(tmp_path / "other", seed=1, **gpu_check.TINY)
    prompt, new_tokens, k = list(range(3, 20)), 23, 4
    engine = lambda path: CausalLMEngine(load_causal_lm(path), kv_cache_tokens=1024)  # noqa: E731
    (greedy,), _ = engine_generate(engine(checkpoint), [prompt], new_tokens)
    target = engine(checkpoint)
    steps = []  # the target's steps in one speculation: its prefill, then a verification per round

    def counted(requests):
        steps.append(requests)
        return step(requests)
    step, target.step = target.step, counted

    def rounds(drafter) -> int:
        steps.clear()
        assert engine_speculation(target, drafter, prompt, new_tokens, k) == greedy
        return len(steps) - 1
    assert rounds(engine(other)) > rounds(engine(checkpoint)) == -(-(new_tokens - 1) // (k + 1))


def test_the_sampled_chain_check_fails_when_the_verifier_ignores_q(tmp_path, monkeypatch):
    model = load_causal_lm(gpu_check.random_checkpoint(tmp_path / "tiny", **gpu_check.TINY))
    prompt = list(range(3, 43))
    assert gpu_check.check_sampled_chain(model, prompt, 8) == []
    step = gpu_check.StepRequest
    monkeypatch.setattr(gpu_check, "StepRequest", lambda *args, draft_q=None, **kwargs: step(*args, **kwargs))
    assert gpu_check.check_sampled_chain(model, prompt, 8)  # drafts taken as deterministic: cut at once


def test_deployment_references_measure_each_reference_where_it_applies(tmp_path, llama, tiny_dir):
    """From a deployment spec: one replica's threads, the speculative references at c1 only, transformers on every
    core where the replicas together use more cores than one replica's threads; means over the measurements."""
    import torch
    import yaml

    from cosine.deploy.spec import load_spec
    from cosine_client.references import DeploymentReferences
    engine = {"kv_cache_tokens": 4096, "num_threads": 1}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump({
        "target": dict(engine, checkpoint=str(llama), replicas=2),
        "drafters": {"general": dict(engine, checkpoint=str(tiny_dir / "unrelated"))},
        "general_drafter": "general"}))
    references = DeploymentReferences(tmp_path / "spec.yaml")
    spec = load_spec(tmp_path / "spec.yaml")
    assert spec.plain_decode_steps_alone != spec.plain_decode_steps
    assert (references.steps_per_call(1), references.steps_per_call(2)) == (spec.plain_decode_steps_alone,
                                                                            spec.plain_decode_steps)
    threads = torch.get_num_threads()
    prompts = ["def main():", "import json and parse the file"]
    references.measure(1, prompts, max_tokens=6, domains=["general", "unknown"])
    for _ in range(2):
        references.measure(2, prompts, max_tokens=6)
    assert torch.get_num_threads() == threads  # restored after each measurement
    summary = references.summary()
    assert summary["threads"] == 1 and summary["replicas"] == 2 and summary["measurements"] == {1: 1, 2: 2}
    assert set(summary["decode"][1]) == {"transformers", "engine", "engine_serving", "assisted_generation",
                                         "engine_speculation"}
    assert set(summary["decode"][2]) == {"transformers", "engine", "engine_serving", "transformers_all_cores"}
    assert all(rate > 0 for rates in summary["decode"].values() for rate in rates.values())
    assert len(references.rates[2]["engine"]) == 2


def test_the_served_gpu_check_runs_on_a_cpu():
    """make gpu-serve-check, with the engines on the CPU: every mode's greedy output matches transformers, and sampled
    rounds in the target accept the target's own draft tokens."""
    import gpu_serve_check
    assert gpu_serve_check.main("cpu") == 0
