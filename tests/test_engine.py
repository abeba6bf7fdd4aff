"""The portable engine on its own: exactness against transformers, batching, KV budget, tree verification."""
import time

import pytest
import torch
from tiny_models import PROMPTS, make_checkpoint, reference_generate
from transformers import AutoTokenizer

from cosine.engine.checkpoint import CheckpointError, load_causal_lm, read_config
from cosine.engine.engine import Admission, CausalLMEngine, StepError, StepRequest, StepResult
from cosine.engine.kv_cache import AdmissionError
from cosine.engine import engine as engine_module, sampling
from cosine.engine.sampling import SamplingParams, SparseDistributions
from cosine.speculation.tree import DraftTree


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral"])
def checkpoint(request, tiny_dir):
    path = tiny_dir / request.param
    if not path.exists():
        make_checkpoint(path, tiny_dir / "tokenizer", request.param, seed=1)
    return path


def run(engine, prompts, max_new, params=SamplingParams(), first_id=0):
    """Decodes all prompts together, one batched step per round; returns their generated tokens."""
    ids = range(first_id, first_id + len(prompts))
    results = engine.step([StepRequest(i, p, admission=Admission(max_new, params)) for i, p in zip(ids, prompts)])
    outputs = [r.tokens for r in results]
    for _ in range(max_new - 1):
        results = engine.step([StepRequest(i, [out[-1]]) for i, out in zip(ids, outputs)])
        for out, r in zip(outputs, results):
            out += r.tokens
    for i in ids:
        engine.release(i)
    return outputs


def encode(checkpoint, prompts):
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    return [tokenizer.encode(p) for p in prompts]


def test_greedy_equals_transformers_alone_and_batched(checkpoint):
    engine = CausalLMEngine(load_causal_lm(checkpoint), kv_cache_tokens=8192)
    prompts = encode(checkpoint, PROMPTS)
    batched = run(engine, prompts, 20)
    alone = [run(engine, [p], 20)[0] for p in prompts]
    assert batched == alone
    for prompt, out in zip(PROMPTS[:3], batched):
        assert out == reference_generate(checkpoint, prompt, 20)
    assert engine.active_sequences == 0 and engine.kv.reserved_tokens == 0


@pytest.mark.parametrize("rope_type", ["linear", "dynamic"])
def test_scaled_rope_equals_transformers(rope_type, tiny_dir, tmp_path):
    """A static RoPE type's cos/sin come from the engine's table, a dynamic one's are computed per step."""
    path = make_checkpoint(tmp_path / rope_type, tiny_dir / "tokenizer", seed=2, rope_parameters={
        "rope_type": rope_type, "factor": 4.0, "rope_theta": 10000.0})
    engine = CausalLMEngine(load_causal_lm(path), kv_cache_tokens=4096)
    assert (engine.rotary_table is None) == (rope_type == "dynamic")
    for prompt, out in zip(PROMPTS[:2], run(engine, encode(path, PROMPTS[:2]), 20)):
        assert out == reference_generate(path, prompt, 20)


def test_head_tied_to_the_embeddings_equals_transformers(tiny_dir, tmp_path):
    """A tied head is one tensor with the embeddings: the engine reads it in place, as the embedding lookup does."""
    path = make_checkpoint(tmp_path / "tied", tiny_dir / "tokenizer", seed=3, tie_word_embeddings=True)
    model = load_causal_lm(path)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    engine = CausalLMEngine(model, kv_cache_tokens=4096)
    for prompt, out in zip(PROMPTS[:2], run(engine, encode(path, PROMPTS[:2]), 20)):
        assert out == reference_generate(path, prompt, 20)


def test_tree_sibling_is_accepted_and_cache_equals_fresh_prefill(llama):
    model = load_causal_lm(llama)
    prompt = encode(llama, [PROMPTS[0]])[0]
    truth = run(CausalLMEngine(model, 4096), [prompt], 6)[0]
    engine = CausalLMEngine(model, 4096)
    first = engine.step([StepRequest(1, prompt, admission=Admission(10, SamplingParams()))])[0]
    assert first.tokens == truth[:1]
    wrong = (truth[1] + 1) % model.config.vocab_size
    # root -> {wrong, truth[1]}; truth[1] -> {truth[2]} -> {wrong}; wrong -> {truth[2]}
    tree = DraftTree((wrong, truth[1], truth[2], wrong, truth[2]), (-1, -1, 1, 2, 0))
    emitted = engine.step([StepRequest(1, [truth[0]], tree)])[0].tokens
    assert emitted == truth[1:4]  # sibling truth[1] and its child accepted, then the target's own token
    cache = engine.kv.get(1)
    fresh = CausalLMEngine(model, 4096)
    fresh.step([StepRequest(2, prompt + truth[:3], admission=Admission(10, SamplingParams()))])
    reference = fresh.kv.get(2)
    assert cache.length == reference.length == len(prompt) + 3
    for ours, theirs in zip(engine.kv.contents(cache), fresh.kv.contents(reference)):
        torch.testing.assert_close(ours, theirs)
    # decoding goes on exactly from the compacted cache
    assert engine.step([StepRequest(1, [truth[3]])])[0].tokens == truth[4:5]


def test_kv_budget_admission_and_release(llama):
    engine = CausalLMEngine(load_causal_lm(llama), kv_cache_tokens=200, max_draft_tokens=8)
    params = SamplingParams()
    too_big, first, second = engine.step([
        StepRequest(1, [5, 6], admission=Admission(500, params)),
        StepRequest(2, [5, 6], admission=Admission(100, params)),
        StepRequest(3, [5, 6], admission=Admission(100, params)),
    ])
    assert isinstance(too_big, StepError) or (isinstance(too_big, AdmissionError) and not too_big.retryable)
    assert first.tokens and isinstance(second, AdmissionError) and second.retryable
    block = engine.kv.block_size  # reservations are whole blocks
    assert engine.kv.reserved_tokens == -(-(2 + 100 + 8) // block) * block
    engine.release(2)
    assert engine.kv.reserved_tokens == 0
    assert engine.step([StepRequest(3, [5, 6], admission=Admission(100, params))])[0].tokens


def test_idle_sequences_are_reclaimed(llama):
    engine = CausalLMEngine(load_causal_lm(llama), kv_cache_tokens=1000, idle_timeout_s=0.2)
    engine.step([StepRequest(1, [5, 6], admission=Admission(10, SamplingParams()))])
    assert engine.active_sequences == 1
    time.sleep(0.3)
    engine.step([])
    assert engine.active_sequences == 0 and engine.kv.reserved_tokens == 0


def test_bad_steps_fail_alone(llama):
    engine = CausalLMEngine(load_causal_lm(llama), kv_cache_tokens=1000, max_draft_tokens=4)
    vocab = engine.vocab_size
    params = SamplingParams()
    results = engine.step([
        StepRequest(1, [5, 6], admission=Admission(10, params)),
        StepRequest(2, [vocab + 3], admission=Admission(10, params)),
        StepRequest(3, [], admission=Admission(10, params)),
        StepRequest(4, [5], DraftTree((1, 2), (-1, 5)), admission=Admission(10, params)),
        StepRequest(5, [5], DraftTree.chain(range(9)), admission=Admission(10, params)),
        StepRequest(6, [5], admission=Admission(10, SamplingParams(temperature=float("nan")))),
        StepRequest(7, [5]),
        StepRequest(8, [5], DraftTree.chain([1, 2]), admission=Admission(10, SamplingParams(1.0)),
                    draft_q=SparseDistributions.over_vocabulary(torch.ones(2, 7) / 7)),
    ])
    assert results[0].tokens
    messages = [str(r) for r in results[1:]]
    assert len(messages) == 7
    for message, expected in zip(messages, ["input_ids", "input_ids", "draft_parents", "draft_ids", "temperature",
                                            "not active", "draft_q"]):
        assert expected in message
    assert engine.active_sequences == 1


def test_seeded_sampling_is_reproducible_and_batch_independent(llama):
    engine = CausalLMEngine(load_causal_lm(llama), kv_cache_tokens=8192)
    prompts = encode(llama, PROMPTS[:4])
    params = SamplingParams(temperature=1.0, top_k=40, top_p=0.95, seed=123)
    together = run(engine, prompts, 15, params)
    alone = [run(engine, [p], 15, params)[0] for p in prompts]
    assert together == alone
    other_seed = run(engine, prompts[:1], 15, SamplingParams(1.0, 40, 0.95, seed=124))[0]
    assert other_seed != alone[0]


def test_unsupported_checkpoint_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(CheckpointError, match="gpt2"):
        read_config(tmp_path)


def test_drafting_extra_tokens_matches_step_by_step_and_rolls_back(llama):
    model = load_causal_lm(llama)
    prompts = encode(llama, PROMPTS[:3])
    truth = run(CausalLMEngine(model, 8192), prompts, 9)
    engine = CausalLMEngine(model, 8192)
    drafted = engine.step([StepRequest(i, p, admission=Admission(20, SamplingParams()), extra_tokens=4, candidates=3)
                           for i, p in enumerate(prompts)])
    for result, expected in zip(drafted, truth):
        assert isinstance(result, StepResult)
        assert result.tokens == expected[:5]
        assert [top[0] for top in result.top_ids] == result.tokens  # greedy: the top candidate is the token
        assert all(p == 1.0 for p in result.probs) and len(result.top_probs[0]) == 3
        # confidences are the untempered softmax, not the greedy one-hot: ordered, below 1, summing below 1
        for confidences in result.top_probs:
            assert 1.0 > confidences[0] >= confidences[1] >= confidences[2] > 0.0 and sum(confidences) <= 1.0
    # roll back to the prompt + 2 tokens (as if only 2 of the draft were accepted), then continue exactly
    again = engine.step([StepRequest(i, expected[2:3], keep_length=len(p) + 2, extra_tokens=3)
                         for i, (p, expected) in enumerate(zip(prompts, truth))])
    for result, expected in zip(again, truth):
        assert result.tokens == expected[3:7]
    bad = engine.step([StepRequest(0, [1], keep_length=10_000)])[0]
    assert "keep_length" in str(bad)


@pytest.mark.parametrize("masks_laid_out", [None, 1, 2])
def test_sequences_drafting_unequal_lengths_in_one_step_draft_what_each_drafts_alone(llama, monkeypatch,
                                                                                     masks_laid_out):
    """One step where sequences draft 2, 5, 0 and 3 extra tokens (a greedy one, two sampling ones returning q, one
    over the vocabulary, one held on its top-p candidates): the drafting loop drops each sequence once it has drafted
    its tokens, and nobody's tokens, probabilities or q change (the q rows come back grouped by sequence). The
    longest prompt drafts fewest: the loop must not lay out its positions past its own keys. masks_laid_out: the
    positions whose attention masks the step lays out at a time (None: as many as the default budget allows, all)."""
    model = load_causal_lm(llama)
    prompts = encode(llama, [PROMPTS[0] * 4, *PROMPTS[1:4]])
    params = [SamplingParams(), SamplingParams(1.0, seed=5), SamplingParams(), SamplingParams(0.8, top_p=0.5, seed=6)]
    extras = [2, 5, 0, 3]
    if masks_laid_out:  # the step's mask bytes per position: 3 drafting sequences x its keys x 4 bytes
        keys = max(len(prompt) + extra for prompt, extra in zip(prompts, extras) if extra)
        monkeypatch.setattr(engine_module, "MASK_LAYOUT_BYTES", masks_laid_out * 3 * keys * 4)
    laid_out = []  # positions per drafting mask layout ([members, positions, keys]; verification's masks are 4-D)
    additive = CausalLMEngine._additive

    def recording(engine, mask):
        if mask.dim() == 3:
            laid_out.append(mask.shape[1])
        return additive(engine, mask)
    monkeypatch.setattr(CausalLMEngine, "_additive", recording)

    def step(indices):
        return CausalLMEngine(model, 8192).step([
            StepRequest(i, prompts[i], admission=Admission(20, params[i]), extra_tokens=extras[i], candidates=2,
                        return_q=True) for i in indices])

    together = step(range(4))
    assert max(laid_out) == (masks_laid_out or max(extras))  # the layout the budget asked for happened
    for i, result in enumerate(together):
        alone = step([i])[0]
        assert len(result.tokens) == 1 + extras[i] and result.tokens == alone.tokens
        assert result.probs == pytest.approx(alone.probs, rel=1e-4) and result.top_ids == alone.top_ids
        if params[i].greedy:
            assert result.q is None
        else:
            assert (len(result.q), result.q.vocab) == (1 + extras[i], model.config.vocab_size)
            assert torch.allclose(result.q.dense(), alone.q.dense(), atol=1e-6)


def test_q_rows_held_over_the_vocabulary_cross_to_the_host_narrowed_to_their_supports(llama, monkeypatch):
    """A GPU's drafting positions hold q over the whole vocabulary (`proposal`'s CUDA branch): the step narrows them
    (and the bonus rows, over the vocabulary on any device) to their widest top-p support before the transfer, and
    returns the same q as without narrowing."""
    model = load_causal_lm(llama)
    prompts = encode(llama, PROMPTS[:2])
    params = [SamplingParams(0.8, top_p=0.5, seed=6), SamplingParams(1.0, top_p=0.9, seed=7)]
    real_proposal, real_on_supports = engine_module.proposal, engine_module.on_supports

    def over_vocabulary(logits, *parameters):  # as proposal's CUDA branch returns them
        ids, probs = real_proposal(logits, *parameters)
        return None, torch.zeros(logits.shape).scatter_add_(-1, ids, probs)  # entries past a support: 0, any id
    monkeypatch.setattr(engine_module, "proposal", over_vocabulary)

    def step(narrow):
        crossing = []  # the width of each block of q rows that crosses to the host

        def recorded(probs):
            ids, kept = real_on_supports(probs) if narrow else (None, probs)
            crossing.append(kept.shape[-1])
            return ids, kept
        monkeypatch.setattr(engine_module, "on_supports", recorded)
        return CausalLMEngine(model, 8192).step([
            StepRequest(i, prompt, admission=Admission(20, params[i]), extra_tokens=4, return_q=True)
            for i, prompt in enumerate(prompts)]), crossing

    (dense, dense_widths), (narrowed, narrowed_widths) = step(narrow=False), step(narrow=True)
    for a, b in zip(dense, narrowed):
        assert a.tokens == b.tokens and a.probs == pytest.approx(b.probs, rel=1e-5)
        assert torch.allclose(a.q.dense(), b.q.dense(), atol=1e-6)
    vocab = model.config.vocab_size
    assert dense_widths == [vocab, vocab] and max(narrowed_widths) < vocab, narrowed_widths  # both blocks narrowed


def test_min_length_bans_the_end_token_like_transformers(llama):
    model = load_causal_lm(llama)
    prompt = encode(llama, [PROMPTS[2]])[0]
    free = run(CausalLMEngine(model, 4096), [prompt], 8)[0]
    end_id = free[2]  # a token greedy decoding emits early
    engine = CausalLMEngine(model, 4096)
    first = engine.step([StepRequest(1, prompt, admission=Admission(8, SamplingParams(), end_id, min_length=6))])
    out = first[0].tokens
    while len(out) < 8:
        out += engine.step([StepRequest(1, out[-1:])])[0].tokens
    assert end_id not in out[:6] and out[:2] == free[:2]
    reference = model.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=6, do_sample=False,
                               eos_token_id=end_id, pad_token_id=0)[0, len(prompt):].tolist()
    assert out[:len(reference)] == reference


def test_a_sampling_drafter_returns_its_q_and_the_target_accepts_with_it(llama):
    """drafter == target at temperature 1, drafting 6 tokens with their q: min(1, p/q) = 1, so all are accepted."""
    prompt = encode(llama, [PROMPTS[1]])[0]
    drafter, target = CausalLMEngine(load_causal_lm(llama), 4096), CausalLMEngine(load_causal_lm(llama), 4096)
    vocab = target.vocab_size
    context = prompt + target.step([StepRequest(1, prompt, admission=Admission(40, SamplingParams(1.0, seed=3)))])[
        0].tokens
    drafter.step([StepRequest(1, context[:-1], admission=Admission(60, SamplingParams(1.0, seed=9)))])
    cached, accepted, drafted = context[:-1], 0, 0
    for _ in range(4):
        keep = next((i for i, (a, b) in enumerate(zip(cached, context)) if a != b), min(len(cached), len(context)))
        draft = drafter.step([StepRequest(1, context[keep:], keep_length=keep, extra_tokens=5, return_q=True)])[0]
        q = draft.q.dense()
        assert q.shape == (6, vocab) and torch.allclose(q.sum(-1), torch.ones(6))
        assert [float(q[i, t]) for i, t in enumerate(draft.tokens)] == pytest.approx(draft.probs)
        emitted = target.step([StepRequest(1, context[-1:], DraftTree.chain(draft.tokens), draft_q=draft.q)])[
            0].tokens
        cached = context + draft.tokens[:-1]
        context = context + emitted
        accepted, drafted = accepted + len(emitted) - 1, drafted + len(draft.tokens)
    assert accepted / drafted >= 0.95


def test_sequences_of_unequal_step_sizes_batch_exactly(llama):
    """A tree step beside a plain step (queries padded to the longest) gives what each gives alone."""
    model = load_causal_lm(llama)
    prompts = encode(llama, PROMPTS[:2])
    truth = run(CausalLMEngine(model, 8192), prompts, 8)
    engine = CausalLMEngine(model, 8192)
    firsts = engine.step([StepRequest(i, p, admission=Admission(20, SamplingParams())) for i, p in enumerate(prompts)])
    assert [f.tokens for f in firsts] == [t[:1] for t in truth]
    both = engine.step([StepRequest(0, truth[0][:1], DraftTree.chain(truth[0][1:4])),  # 4 queries
                        StepRequest(1, truth[1][:1])])  # 1 query
    assert both[0].tokens == truth[0][1:5] and both[1].tokens == truth[1][1:2]


@pytest.mark.parametrize("widening", [2, sampling.WIDENING])
def test_sampling_distributions_equal_transformers_warpers_on_every_path(monkeypatch, widening):
    """Temperature, top-k, top-p as transformers' generate applies them, row by row, for rows computed from their
    most likely tokens (top_k within them, top_p they reach), from WIDENING times as many, and for rows that sort the
    whole vocabulary, alone and batched."""
    monkeypatch.setattr(sampling, "WIDENING", widening)
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    generator = torch.Generator().manual_seed(0)
    vocab, candidates = 300, sampling.CANDIDATES
    settings = [(t, k, p) for t in (0.5, 1.0, 1.7) for k in (0, 1, 7, candidates, candidates + 36, vocab)
                for p in (1.0, 0.5, 0.9, 0.999)]
    # peaked rows put top_p within the candidates, flat ones beyond them
    logits = torch.randn(len(settings), vocab, generator=generator) * torch.linspace(0.2, 12, len(settings))[:, None]
    # and a top_k beyond the candidates, whose top_p they reach only under the whole vocabulary's mass: the first 64
    # tokens hold 0.55 of it, the next 36 0.05, so top-k leaves them 0.92 and top-p 0.5 keeps 37 of them (not 59)
    masses = torch.cat([torch.full((64,), 0.55 / 64), torch.full((36,), 0.05 / 36), torch.full((200,), 0.4 / 200)])
    # and a row whose top_p 0.9 needs 95 tokens: within twice the candidates, beyond the candidates
    widened = torch.cat([torch.full((100,), 0.95 / 100), torch.full((200,), 0.05 / 200)])
    logits = torch.cat([logits, torch.stack([masses, widened]).log() - torch.linspace(0, 1e-3, vocab)])
    settings += [(1.0, candidates + 36, 0.5), (1.0, 0, 0.9)]
    temperature, top_k, top_p = (torch.tensor(column) for column in zip(*settings))

    def reference(row, t, k, p):
        scores = TemperatureLogitsWarper(t)(None, row[None])
        scores = TopKLogitsWarper(k)(None, scores) if k else scores
        return torch.softmax(TopPLogitsWarper(p)(None, scores) if p < 1 else scores, -1)[0]
    expected = torch.stack([reference(row, *setting) for row, setting in zip(logits, settings)])
    batched = sampling.probabilities(logits, temperature, top_k, top_p)
    alone = torch.cat([sampling.probabilities(logits[i:i + 1], temperature[i:i + 1], top_k[i:i + 1], top_p[i:i + 1])
                       for i in range(len(settings))])
    def proposed(rows):  # a drafter's: the same, held on each row's support
        ids, held = sampling.proposal(logits[rows], temperature[rows], top_k[rows], top_p[rows])
        return (SparseDistributions.over_vocabulary(held) if ids is None
                else SparseDistributions.held(vocab, ids, held)).dense()
    proposed_alone = torch.cat([proposed(slice(i, i + 1)) for i in range(len(settings))])
    # a drafter's draw depends on its row alone (the token for a uniform, not only its distribution)
    uniforms = torch.rand(len(settings), generator=generator)
    drawn = sampling.draw(*sampling.proposal(logits, temperature, top_k, top_p), uniforms)[0]
    for i in range(len(settings)):
        row = slice(i, i + 1)
        assert drawn[i] == sampling.draw(*sampling.proposal(logits[row], temperature[row], top_k[row], top_p[row]),
                                         uniforms[row])[0]
    for probs in (batched, alone, proposed(slice(None)), proposed_alone):
        assert torch.equal(probs > 0, expected > 0)
        torch.testing.assert_close(probs, expected, atol=1e-6, rtol=1e-5)
    # every path was taken: some rows' top-p support is within the candidates, some within the widened ones (with
    # widening 2: 128 of the 300 tokens; with 8 that is all of them, sorted), some beyond
    support = (expected > 0).sum(-1)[top_k == 0]
    assert (support <= candidates).any() and (support > candidates).any()
    assert ((support > candidates) & (support <= 2 * candidates)).any() and (support > 2 * candidates).any()


def test_a_drafting_draw_follows_the_distribution_it_reports():
    """20,000 draws from one row's proposal (top-p support of 50 tokens): each token's frequency is its
    probability, within 5 standard errors, and the probability reported with a draw is the drawn token's."""
    generator = torch.Generator().manual_seed(1)
    draws = 20_000
    logits = (torch.randn(1, 300, generator=generator) * 2).repeat(draws, 1)
    ids, probs = sampling.proposal(logits, torch.full((draws,), 0.8), torch.zeros(draws, dtype=torch.long),
                                   torch.full((draws,), 0.9))
    tokens, token_probs = sampling.draw(ids, probs, torch.rand(draws, generator=generator))
    q = torch.zeros(300).scatter_(0, ids[0], probs[0])
    assert 10 < int((q > 0).sum()) < sampling.CANDIDATES
    assert torch.equal(token_probs, q[tokens])
    frequency = torch.bincount(tokens, minlength=300) / draws
    assert ((frequency - q).abs() <= 5 * (q * (1 - q) / draws).sqrt() + 1e-9).all()
