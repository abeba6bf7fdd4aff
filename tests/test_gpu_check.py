"""gpu_check's exactness checks and the in-process references, on CPU (the scaling table is left to the GPU)."""
from cosine.engine.checkpoint import load_causal_lm
from cosine_client import gpu_check
from cosine_client.references import assisted_generation_rate, engine_decode_rate, transformers_decode_rate


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


def test_the_sampled_chain_check_fails_when_the_verifier_ignores_q(tmp_path, monkeypatch):
    model = load_causal_lm(gpu_check.random_checkpoint(tmp_path / "tiny", **gpu_check.TINY))
    prompt = list(range(3, 43))
    assert gpu_check.check_sampled_chain(model, prompt, 8) == []
    step = gpu_check.StepRequest
    monkeypatch.setattr(gpu_check, "StepRequest", lambda *args, draft_q=None, **kwargs: step(*args, **kwargs))
    assert gpu_check.check_sampled_chain(model, prompt, 8)  # drafts taken as deterministic: cut at once
