"""The portable engine: batched, stateful steps of many sequences over one HF causal LM (Llama/Mistral/Qwen2).

One step takes, per sequence, the tokens to append (a prompt, or the token emitted last time) and optionally a draft
token tree grown from the last of them. All sequences' new tokens run through the model in ONE forward pass:
projections and MLPs over the concatenated tokens, attention per sequence against its own KV cache (tree mask,
positions = depth). The engine then accepts part of each tree, keeps only the accepted path in the cache and returns
accepted tokens + one token of its own. Logits never leave the engine.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from ..speculation.acceptance import accept
from ..speculation.tree import DraftTree
from .checkpoint import max_context_tokens
from .kv_cache import AdmissionError, KVCachePool, SequenceCache
from .sampling import InvalidParameter, SamplingParams, probabilities


class StepError(ValueError):
    """A request of the batch is malformed; the message names the input. Other requests go on."""


@dataclass
class Admission:
    max_new_tokens: int
    params: SamplingParams
    end_id: int | None = None
    min_length: int = 0  # end_id is banned until this many tokens follow the admitted input


@dataclass
class StepRequest:
    sequence_id: int
    input_ids: list[int] = field(default_factory=list)
    draft: DraftTree = field(default_factory=DraftTree)
    admission: Admission | None = None  # on a sequence's first step
    keep_length: int | None = None  # roll the cache back to this many tokens before appending
    extra_tokens: int = 0  # autoregressive tokens after the step's own (drafting)
    candidates: int = 0  # top candidates to report per emitted position
    score_input: bool = False  # report the mean log-probability of input_ids[1:]


@dataclass
class StepResult:
    tokens: list[int]
    probs: list[float]  # of each token under the distribution it was drawn from
    top_ids: list[list[int]]  # per emitted position, `candidates` most likely tokens
    top_probs: list[list[float]]
    input_logprob: float = 0.0

    def extend(self, other: "StepResult") -> None:
        self.tokens += other.tokens
        self.probs += other.probs
        self.top_ids += other.top_ids
        self.top_probs += other.top_probs


@dataclass
class _Sequence:
    cache: SequenceCache
    params: SamplingParams
    generator: torch.Generator
    end_id: int | None = None
    min_end_position: int = 0  # end_id may not be emitted at positions before this


@dataclass
class _Work:
    """One sequence's share of a batched forward."""
    request: StepRequest
    sequence: _Sequence
    offset: int  # first row of this sequence in the flattened batch
    mask: torch.Tensor | None  # [new, cached + new] bool, None when a single token sees everything

    @property
    def count(self) -> int:
        return len(self.request.input_ids) + len(self.request.draft)


class CausalLMEngine:
    def __init__(self, model, kv_cache_tokens: int, max_draft_tokens: int = 64, idle_timeout_s: float = 600.0):
        self.model = model
        config = model.config
        self.vocab_size = config.vocab_size
        self.max_context = max_context_tokens(config.to_dict())
        self.max_draft_tokens = max_draft_tokens
        self.idle_timeout_s = idle_timeout_s
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        param = next(model.parameters())
        self.kv = KVCachePool(config.num_hidden_layers, config.num_key_value_heads, head_dim, kv_cache_tokens,
                              param.dtype, param.device)
        self.sequences: dict[int, _Sequence] = {}

    # ---- lifecycle -------------------------------------------------------------------------------------------
    @property
    def active_sequences(self) -> int:
        return len(self.sequences)

    def release(self, sequence_id: int) -> bool:
        self.sequences.pop(sequence_id, None)
        return self.kv.release(sequence_id)

    def reclaim_idle(self) -> list[int]:
        stale = self.kv.reclaim_idle(self.idle_timeout_s)
        for sequence_id in stale:
            self.sequences.pop(sequence_id, None)
        return stale

    def _admit(self, request: StepRequest) -> _Sequence:
        admission = request.admission
        if admission.max_new_tokens <= 0:
            raise StepError(f"max_new_tokens must be > 0, got {admission.max_new_tokens}")
        needed = len(request.input_ids) + admission.max_new_tokens
        if needed > self.max_context:
            raise StepError(f"prompt ({len(request.input_ids)} tokens) + max_new_tokens ({admission.max_new_tokens}) "
                            f"exceeds the model's context of {self.max_context} tokens")
        try:
            admission.params.validate()
        except InvalidParameter as error:
            raise StepError(str(error)) from None
        cache = self.kv.admit(request.sequence_id, needed + self.max_draft_tokens)
        sequence = _Sequence(cache, admission.params, admission.params.generator(), admission.end_id,
                             len(request.input_ids) + admission.min_length)
        self.sequences[request.sequence_id] = sequence
        return sequence

    def _check(self, request: StepRequest, sequence: _Sequence) -> None:
        cache = sequence.cache
        if request.keep_length is not None and request.admission is None:
            if not 0 <= request.keep_length <= cache.length:
                raise StepError(f"keep_length {request.keep_length} is outside the {cache.length} cached tokens")
            cache.length = request.keep_length
        if not 0 <= request.extra_tokens <= self.max_draft_tokens:
            raise StepError(f"extra_tokens must be in [0, {self.max_draft_tokens}], got {request.extra_tokens}")
        if not 0 <= request.candidates <= self.vocab_size:
            raise StepError(f"num_candidates must be in [0, {self.vocab_size}], got {request.candidates}")
        if not request.input_ids:
            raise StepError("input_ids is empty: a step appends at least one token (the tree grows from it)")
        try:
            request.draft.validate()
        except ValueError as error:
            raise StepError(str(error)) from None
        if len(request.draft) > self.max_draft_tokens:
            raise StepError(f"draft_ids has {len(request.draft)} tokens; this engine verifies at most "
                            f"{self.max_draft_tokens}")
        tokens = list(request.input_ids) + list(request.draft.tokens)
        if min(tokens) < 0 or max(tokens) >= self.vocab_size:
            raise StepError(f"input_ids/draft_ids: token ids must be in [0, {self.vocab_size})")
        if cache.length + len(tokens) + request.extra_tokens > cache.capacity:
            raise StepError(f"sequence {request.sequence_id} would exceed its reserved KV cache "
                            f"({cache.capacity} tokens): more tokens than max_new_tokens allowed")

    # ---- one batched step ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, requests: list[StepRequest]) -> list[StepResult | Exception]:
        """Returns, per request in order, what it emitted or the exception that failed it (others unaffected)."""
        self.reclaim_idle()
        results: list = [None] * len(requests)
        work: list[tuple[int, _Work]] = []
        offset = 0
        in_batch = set()
        for index, request in enumerate(requests):
            try:
                if request.sequence_id in in_batch:
                    raise StepError(f"sequence {request.sequence_id} appears twice in one batch")
                if request.admission is not None:
                    sequence = self._admit(request)
                elif request.sequence_id in self.sequences:
                    sequence = self.sequences[request.sequence_id]
                    self.kv.get(request.sequence_id)  # marks it used
                else:
                    raise StepError(f"sequence {request.sequence_id} is not active (finished, released or reclaimed)")
                self._check(request, sequence)
            except (StepError, AdmissionError) as error:
                if request.admission is not None and not isinstance(error, AdmissionError):
                    self.release(request.sequence_id)
                results[index] = error
                continue
            in_batch.add(request.sequence_id)
            item = _Work(request, sequence, offset, self._mask(request, sequence.cache.length))
            work.append((index, item))
            offset += item.count
        for index, result in self._run(work):
            results[index] = result
        self._draft_extra_tokens(work, results)
        return results

    def _run(self, work: list[tuple[int, _Work]]):
        """One forward for the whole batch, one lm_head over the rows that need logits; yields (index, result)."""
        if not work:
            return
        hidden = self._forward([item for _, item in work])
        # per sequence: the root (its last input) and every draft node
        spans = [(item.offset + len(item.request.input_ids) - 1, item.offset + item.count) for _, item in work]
        logits = self.model.lm_head(hidden[torch.cat([torch.arange(a, b) for a, b in spans])])
        start = 0
        for (index, item), (a, b) in zip(work, spans):
            yield index, self._finish(item, hidden, logits[start:start + b - a])
            start += b - a

    def _draft_extra_tokens(self, work: list[tuple[int, _Work]], results: list) -> None:
        """Feeds sequences their last emitted token until each has emitted its extra_tokens; one forward per token
        position for all of them."""
        remaining = {index: item for index, item in work if item.request.extra_tokens}
        for position in range(max((item.request.extra_tokens for item in remaining.values()), default=0)):
            batch, offset = [], 0
            for index, item in remaining.items():
                if position < item.request.extra_tokens:
                    request = StepRequest(item.request.sequence_id, results[index].tokens[-1:],
                                          candidates=item.request.candidates)
                    batch.append((index, _Work(request, item.sequence, offset, None)))
                    offset += 1
            for index, result in self._run(batch):
                results[index].extend(result)

    @staticmethod
    def _mask(request: StepRequest, cached: int) -> torch.Tensor | None:
        n_in, n_draft = len(request.input_ids), len(request.draft)
        if n_in + n_draft == 1:
            return None
        new = n_in + n_draft
        mask = torch.ones(new, cached + new, dtype=torch.bool)
        mask[:, cached:] = torch.ones(new, new, dtype=torch.bool).tril()  # inputs: causal; tree sees all inputs
        if n_draft:
            mask[n_in:, cached + n_in:] = request.draft.ancestor_mask()
        return mask

    def _positions(self, item: _Work) -> list[int]:
        start = item.sequence.cache.length
        n_in = len(item.request.input_ids)
        root = start + n_in - 1
        return list(range(start, start + n_in)) + [root + depth for depth in item.request.draft.depths()]

    def _forward(self, batch: list[_Work]) -> torch.Tensor:
        """Final hidden states [total new tokens, hidden] of every sequence's new tokens; writes their K/V."""
        model = self.model.model
        ids = torch.tensor([t for w in batch for t in (*w.request.input_ids, *w.request.draft.tokens)])
        positions = torch.tensor([p for w in batch for p in self._positions(w)])
        device = self.kv.device
        x = model.embed_tokens(ids.to(device))[None]
        cos, sin = model.rotary_emb(x, positions.to(device)[None])
        total = ids.numel()
        for layer_index, layer in enumerate(model.layers):
            attention = layer.self_attn
            h = layer.input_layernorm(x)
            q, k, v = (proj(h).view(1, total, -1, attention.head_dim).transpose(1, 2)
                       for proj in (attention.q_proj, attention.k_proj, attention.v_proj))
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            outputs = []
            for w in batch:
                rows = slice(w.offset, w.offset + w.count)
                cache, start = w.sequence.cache, w.sequence.cache.length
                end = start + w.count
                cache.keys[layer_index, :, start:end] = k[0, :, rows]
                cache.values[layer_index, :, start:end] = v[0, :, rows]
                mask = None if w.mask is None else w.mask.to(device)
                outputs.append(F.scaled_dot_product_attention(
                    q[:, :, rows], cache.keys[None, layer_index, :, :end], cache.values[None, layer_index, :, :end],
                    attn_mask=mask, scale=attention.scaling, enable_gqa=True))
            attended = torch.cat(outputs, dim=2).transpose(1, 2).reshape(1, total, -1)
            x = x + attention.o_proj(attended)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return model.norm(x)[0]

    def _finish(self, item: _Work, hidden: torch.Tensor, logits: torch.Tensor) -> StepResult:
        """Accepts part of the draft, keeps the accepted path's K/V, returns what was emitted.

        logits: the sequence's rows for its root and then every draft node."""
        request, sequence = item.request, item.sequence
        n_in = len(request.input_ids)
        root_row = item.offset + n_in - 1
        input_logprob = self._input_logprob(request, hidden[item.offset:root_row]) if request.score_input else 0.0
        if sequence.end_id is not None and 0 <= sequence.end_id < logits.shape[-1]:
            # row i predicts the token at position predicted[i]; min_length bans end_id there (as HF does)
            root_position = sequence.cache.length + n_in - 1
            predicted = torch.tensor([root_position + 1] + [root_position + 1 + d for d in request.draft.depths()])
            logits[predicted < sequence.min_end_position, sequence.end_id] = float("-inf")
        probs = probabilities(logits, sequence.params)
        tokens, path = accept(probs, request.draft, sequence.generator)
        cache = sequence.cache
        cache.keep_path(cache.length + n_in, path)  # draft node j was written at slot start + j
        rows = probs[[0] + [node + 1 for node in path]]  # the distribution each emitted token was drawn from
        chosen = rows.gather(1, torch.tensor(tokens)[:, None])[:, 0]
        top = rows.topk(request.candidates, dim=-1)
        return StepResult(tokens, chosen.tolist(), top.indices.tolist(), top.values.tolist(), input_logprob)

    def _input_logprob(self, request: StepRequest, hidden: torch.Tensor) -> float:
        if len(request.input_ids) < 2:
            return 0.0
        logprobs = torch.log_softmax(self.model.lm_head(hidden).float(), dim=-1)
        targets = torch.tensor(request.input_ids[1:], device=logprobs.device)
        return logprobs.gather(1, targets[:, None]).mean().item()

