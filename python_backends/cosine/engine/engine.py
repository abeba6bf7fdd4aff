"""The portable engine: batched, stateful steps of many sequences over one HF causal LM (Llama/Mistral/Qwen2).

One step takes, per sequence, the tokens to append (a prompt, or the token emitted last time) and optionally a draft
token tree grown from the last of them. The whole batch is tensor operations on the model's device: projections
and MLPs over the concatenated new tokens; attention over each sequence's paged K/V gathered into a padded batch with
a causal + tree mask (positions = depth); acceptance, sampling and drafting's extra tokens over all rows at once; one
host synchronisation at the end of the step (narrowing a sampling drafter's q rows to their supports before it takes
one or two more). Only the accepted path stays in the cache. Logits never leave it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..speculation.acceptance import FlatDrafts, accept
from ..speculation.tree import DraftTree
from .checkpoint import max_context_tokens
from .kv_cache import AdmissionError, KVCachePool, SequenceCache
from .sampling import (InvalidParameter, SamplingParams, SparseDistributions, draw, on_supports, probabilities,
                       proposal)


def use_step_attention(device: torch.device | str) -> None:
    """SDPA kernels for steps whose key length changes every call, process-wide: not cuDNN's (torch's first pick
    for half precision on Hopper), which builds a plan per new shape and so made every bfloat16 decode step 3-10x
    slower on an H100 until each length had been seen (measured with `make gpu-check`). A no-op off CUDA."""
    if torch.device(device).type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)


# RoPE types whose frequencies depend on the step's longest position (transformers' dynamic_rope_update): their
# cos/sin are computed per step; every other type's come from a table computed once
DYNAMIC_ROPE = ("dynamic", "longrope")
# Sequences appending more tokens than this (prefills) attend in a group of their own, so that a prompt does not
# pad every decoding sequence's queries to its length.
LONG_QUERY = 16
MIN_BUCKET = 8  # fewer sequences than this share a bucket whatever their lengths: a group costs calls per layer
# Drafting lays out its positions' attention masks ahead, up to this many bytes at a time: at once at short contexts
# (a call per position saved), in slices at long ones (all 12 positions of 64 sequences at 32k keys: 100 MB)
MASK_LAYOUT_BYTES = 16 << 20


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    """[rows] each row's argmax, first on ties like argmax: max(-1) is 2.5x faster than argmax on a CPU (9 rows of
    2,048 logits: 11 against 28 us)."""
    return logits.max(-1).indices


class StepError(ValueError):
    """A request of the batch is malformed; the message names the input. Other requests go on."""


@dataclass
class Admission:
    max_new_tokens: int
    params: SamplingParams
    end_id: int | None = None
    min_length: int = 0  # end_id is banned until this many tokens follow the admitted input


@dataclass(frozen=True)
class Rounds:
    """Speculation rounds a target with drafters of its own runs in one call (serving.rounds): each round its
    drafter drafts a chain of `draft_tokens` from the context so far and the target verifies it."""
    drafter: int  # the index of the drafter among the target's
    draft_tokens: int  # k
    count: int  # at most this many rounds (fewer where the sequence ends)


class RoundOutcome(NamedTuple):
    """One round of Rounds."""
    draft: list[int]
    accepted: int  # draft tokens the target accepted
    # positions the target settled where the drafter's top token is the emitted one: what the router compares
    # drafters by (accepted, for a greedy draft of top tokens)
    matched: int

    @property
    def settled(self) -> int:
        """Draft positions the target settled: each emitted token's, up to the draft's length."""
        return min(len(self.draft), self.accepted + 1)


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
    release: bool = False  # free the sequence instead (everything else is ignored)
    # one row per draft node: the distribution it was sampled from (None: the draft is deterministic)
    draft_q: SparseDistributions | None = None
    return_q: bool = False  # a sampling drafter: also return the distribution each emitted token was drawn from
    rounds: Rounds | None = None  # whole speculation rounds in this call (serving.rounds), by the target's drafter


@dataclass
class StepResult:
    tokens: list[int]
    probs: list[float]  # of each token under the distribution it was drawn from
    top_ids: list[list[int]]  # per emitted position, `candidates` most likely tokens (untempered softmax)
    top_probs: list[list[float]]
    input_logprob: float = 0.0
    q: SparseDistributions | None = None  # one row per emitted token, on the host: when return_q and it samples
    rounds: list[RoundOutcome] = field(default_factory=list)  # per round of Rounds


@dataclass
class _Sequence:
    cache: SequenceCache
    params: SamplingParams
    generator: torch.Generator  # host generator: draws the request's uniforms, whatever else is in the batch
    end_id: int | None = None
    min_end_position: int = 0  # end_id may not be emitted at positions before this
    # the cached length once max_new_tokens are emitted (every emitted token but the last is fed back)
    final_length: int = 0


@dataclass
class _Projection:
    """x @ W.T + b for a [tokens, in] x, with W kept transposed ([in, out], contiguous): against that layout MKL's
    matmul of a step's few rows is 1.6-1.9x faster than F.linear's against [out, in] (this CPU, AVX-512: 9 rows
    through the demo target's 2,048 x 192 head 76 against 115 us). Several projections of one input become one
    matmul; the modules' weights become views of it, so the model keeps one copy and its own forward still works."""
    weight: torch.Tensor  # [in, out]
    bias: torch.Tensor | None  # [out]

    @classmethod
    def fuse(cls, *modules: torch.nn.Linear) -> "_Projection":
        weight = torch.cat([module.weight for module in modules]).t().contiguous()
        has_bias = modules[0].bias is not None
        bias = torch.cat([module.bias for module in modules]) if has_bias else None
        sizes = [module.weight.shape[0] for module in modules]
        for module, view in zip(modules, weight.split(sizes, 1)):
            module.weight.data = view.t()
        if has_bias:
            for module, view in zip(modules, bias.split(sizes)):
                module.bias.data = view
        return cls(weight, bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.mm(x, self.weight) if self.bias is None else torch.addmm(self.bias, x, self.weight)


@dataclass
class _Norm:
    """transformers' RMSNorm (Llama, Mistral, Qwen2) as it computes it, without a module call (F.rms_norm was no
    faster in the step on a CPU: one A/B a decode step 4.5 against 3.7 ms, another within noise)."""
    weight: torch.Tensor
    eps: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        wide = x.float()
        return self.weight * (wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    @classmethod
    def of(cls, module) -> "_Norm":
        return cls(module.weight, module.variance_epsilon)


@dataclass
class _Layer:
    """A decoder layer as a step runs it: q/k/v one projection, gate/up one projection, norms as functions."""
    input_norm: _Norm
    qkv: _Projection
    heads: int  # query heads
    kv_heads: int
    scaling: float
    output: _Projection
    post_attention_norm: _Norm
    gate_up: _Projection
    down: _Projection
    act_fn: object

    @classmethod
    def fuse(cls, layer) -> "_Layer":
        attention, mlp = layer.self_attn, layer.mlp
        head_dim = attention.head_dim
        return cls(_Norm.of(layer.input_layernorm),
                   _Projection.fuse(attention.q_proj, attention.k_proj, attention.v_proj),
                   attention.q_proj.weight.shape[0] // head_dim, attention.k_proj.weight.shape[0] // head_dim,
                   attention.scaling, _Projection.fuse(attention.o_proj), _Norm.of(layer.post_attention_layernorm),
                   _Projection.fuse(mlp.gate_proj, mlp.up_proj), _Projection.fuse(mlp.down_proj), mlp.act_fn)


@dataclass
class _AttentionGroup:
    """Sequences whose queries are padded to one [B, Q] batch against their keys gathered to [B, L]."""
    token_rows: torch.Tensor | None  # [Tg] the group's new tokens, as rows of the step's flat token batch
    query_index: torch.Tensor | None  # [Tg] where each of them sits in the flattened [B * Q] padded queries
    key_slots: torch.Tensor  # [B, L] pool slot of every key position (padding: masked out)
    mask: torch.Tensor  # [B, 1, Q, L] additive: 0 where the query may attend the key, -inf elsewhere
    batch: int
    queries: int

    @property
    def dense(self) -> bool:
        """Every step token is in this group, in padded order without padding (decoding): no scatter needed."""
        return self.token_rows is None


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
        self.device = param.device
        use_step_attention(self.device)
        self.kv = KVCachePool(config.num_hidden_layers, config.num_key_value_heads, head_dim, kv_cache_tokens,
                              param.dtype, param.device)
        self.layers = [_Layer.fuse(layer) for layer in model.model.layers]
        self.final_norm = _Norm.of(model.model.norm)
        # positions stay below a sequence's reserved capacity: the context plus one draft, in whole blocks
        positions = torch.arange(self.max_context + max_draft_tokens + self.kv.block_size, device=self.device)
        self.rotary_table = None if getattr(model.model.rotary_emb, "rope_type", "default") in DYNAMIC_ROPE \
            else self._rotary(positions)
        head = model.get_output_embeddings()
        # a head tied to the embeddings stays [vocab, hidden]: the embedding lookup reads its rows
        tied = head.weight is model.get_input_embeddings().weight
        self.lm_head = (lambda hidden: F.linear(hidden, head.weight)) if tied else _Projection.fuse(head)
        self.sequences: dict[int, _Sequence] = {}

    # ---- lifecycle -------------------------------------------------------------------------------------------
    @property
    def active_sequences(self) -> int:
        return len(self.sequences)

    def release(self, sequence_id: int) -> bool:
        self.sequences.pop(sequence_id, None)
        return self.kv.release(sequence_id)

    def tokens_left(self, sequence_id: int) -> int:
        """How many of its max_new_tokens the sequence has yet to emit."""
        sequence = self.sequences[sequence_id]
        return sequence.final_length - sequence.cache.length

    def snapshot(self, sequence_id: int) -> tuple:
        """What steps change in a sequence (its cached length, its random state), for restore() to undo them."""
        sequence = self.sequences[sequence_id]
        return sequence_id, sequence.cache.length, sequence.generator.get_state()

    def restore(self, snapshot: tuple) -> None:
        """Undoes the sequence's steps since the snapshot (a no-op once it was released or reclaimed): their K/V
        stay in its slots past its length, overwritten by its next step."""
        sequence_id, length, random_state = snapshot
        sequence = self.sequences.get(sequence_id)
        if sequence is not None:
            sequence.cache.length = length
            sequence.generator.set_state(random_state)

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
                             len(request.input_ids) + admission.min_length,
                             len(request.input_ids) + admission.max_new_tokens - 1)
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
        q = request.draft_q
        if q is not None and (len(q), q.vocab) != (len(request.draft), self.vocab_size):
            raise StepError(f"draft_q: expected {len(request.draft)} rows over {self.vocab_size} tokens, got "
                            f"{len(q)} over {q.vocab}")
        if request.return_q and len(request.draft):
            raise StepError("return_q: only for drafting steps (no draft_ids)")
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
        work: list[tuple[int, StepRequest, _Sequence]] = []
        in_batch = set()
        for index, request in enumerate(requests):
            if request.release:
                self.release(request.sequence_id)
                results[index] = StepResult([], [], [], [])
                continue
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
            work.append((index, request, sequence))
        if work:
            for (index, _, _), result in zip(work, self._run([(r, s) for _, r, s in work])):
                results[index] = result
        return results

    def _run(self, batch: list[tuple[StepRequest, _Sequence]]) -> list[StepResult]:
        device, kv = self.device, self.kv
        caches = [sequence.cache for _, sequence in batch]
        table = kv.block_table(caches)
        starts = [cache.length for cache in caches]
        # ---- host-side layout: flat new tokens; logits rows (each root, then its draft nodes); flat draft nodes
        ids, positions, store = [], [], []  # per new token: id, rotary position, position in the cache
        token_sequence, row_tokens = [], []  # row_tokens: each row's token, rows as FlatDrafts lays them out
        for b, ((request, _), start) in enumerate(zip(batch, starts)):
            n_in, tree = len(request.input_ids), request.draft
            base = len(ids)
            ids += request.input_ids + list(tree.tokens)
            positions += list(range(start, start + n_in)) + [start + n_in - 1 + d for d in tree.depths()]
            store += range(start, start + n_in + len(tree))
            token_sequence += [b] * (n_in + len(tree))
            row_tokens += range(base + n_in - 1, base + n_in + len(tree))
        long_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
        rows = long_tensor(row_tokens)
        store_slots = kv.slots(table, long_tensor(token_sequence), long_tensor(store))
        groups = self._groups(batch, starts, table)
        hidden = self._forward(long_tensor(ids), long_tensor(positions), store_slots, groups)

        # ---- distributions of every row, acceptance over the batch
        row_sequence = [token_sequence[t] for t in row_tokens]
        logits = self._logits(hidden[rows], self._end_bans([batch[b][1] for b in row_sequence]),
                              long_tensor([positions[t] + 1 for t in row_tokens]))
        drafts = FlatDrafts.from_trees([request.draft for request, _ in batch], device)
        uniforms = self._uniforms(batch)
        sampled = [not batch[b][1].params.greedy for b in row_sequence]
        sampled_rows = torch.tensor(sampled, device=device)
        probs = probabilities(logits, *self._sampling_parameters([batch[b][1].params for b in row_sequence])) \
            if any(sampled) else None
        node_uniforms = torch.cat([u[0] for u in uniforms]).to(device)
        row_uniforms = torch.cat([u[1] for u in uniforms]).to(device)
        node_q, has_q = self._draft_q(batch, logits.shape[-1]) if probs is not None else (None, None)
        verdict = accept(drafts, _argmax(logits), sampled_rows, probs, node_uniforms, row_uniforms, node_q, has_q)
        candidates = max(request.candidates for request, _ in batch)
        top = torch.softmax(logits.float(), -1).topk(candidates) if candidates else None
        if drafts.max_depth:  # the accepted path moves next to the prefix; rejected nodes' K/V go to the trash slot
            seq = drafts.sequence
            roots = long_tensor([start + len(request.input_ids) - 1 for (request, _), start in zip(batch, starts)])
            target = roots[seq] + drafts.depth
            source = store_slots[rows[drafts.node_row]]
            destination = torch.where(verdict.accepted, kv.slots(table, seq, target), kv.trash_slot)
            kv.keys[:, destination] = kv.keys[:, source]
            kv.values[:, destination] = kv.values[:, source]
        score = self._input_logprobs(batch, hidden, ids)
        lengths = long_tensor([start + len(r.input_ids) for (r, _), start in zip(batch, starts)])
        lengths = lengths + verdict.accepted_count
        returning_q = [b for b, (request, sequence) in enumerate(batch)
                       if request.return_q and not sequence.params.greedy]
        extra, extra_q = self._draft_extra_tokens(batch, table, verdict.bonus, lengths, [u[2] for u in uniforms],
                                                  candidates, returning_q)

        # ---- one host synchronisation: everything the results need, in one transfer
        parts = [verdict.accepted, verdict.accepted_count, verdict.tip_row, verdict.bonus, verdict.bonus_prob,
                 verdict.node_prob, score]
        if top is not None:
            parts += [top.indices, top.values]
        parts += extra
        q_parts = len(parts)
        # (each row's sequence, ids or None, probs) of the bonus's distributions, then of the drafting positions', as
        # held: each sequence's rows in emission order once grouped by owner
        q_blocks = []
        if returning_q:
            q_blocks.append((returning_q, *on_supports(verdict.bonus_distribution[returning_q])))
            if extra_q:
                q_blocks.append(([b for members, *_ in extra_q for b in members], *self._drafted_q(extra_q)))
            parts += [part for _, *held in q_blocks for part in held if part is not None]
        host = torch.cat([part.double().reshape(-1) for part in parts]).cpu()
        sizes = [part.numel() for part in parts]
        values = host.split(sizes)
        accepted, accepted_count, tip_row, bonus, bonus_prob, node_prob, score = (
            values[i].tolist() for i in range(7))
        top_ids = values[7].view(-1, candidates).long().tolist() if top is not None else None
        top_probs = values[8].view(-1, candidates).tolist() if top is not None else None
        extra_host = [values[i] for i in range(9 if top is not None else 7, q_parts)]
        q_by_sequence = self._returned_q(q_blocks, values[q_parts:], logits.shape[-1])

        results = []
        first_node, root_row = 0, 0
        for b, ((request, sequence), start) in enumerate(zip(batch, starts)):
            tree = request.draft
            path = [node for node in range(len(tree)) if accepted[first_node + node]]
            tokens = [tree.tokens[node] for node in path] + [int(bonus[b])]
            probs_out = [node_prob[first_node + node] for node in path] + [bonus_prob[b]]
            emitted_rows = [root_row + 1 + tree.parents[node] for node in path] + [int(tip_row[b])]
            first_node += len(tree)
            root_row += 1 + len(tree)
            c = request.candidates
            result = StepResult(tokens, probs_out, [top_ids[r][:c] if c else [] for r in emitted_rows],
                                [top_probs[r][:c] if c else [] for r in emitted_rows], score[b])
            sequence.cache.length = start + len(request.input_ids) + int(accepted_count[b]) + request.extra_tokens
            result.q = q_by_sequence.get(b)
            results.append(result)
        self._add_extra_tokens(batch, results, extra_host, candidates)
        return results

    def _drafted_q(self, extra_q) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The drafting positions' q rows in one block, on the device, as held: [rows, width] ids (None when every row
        holds the vocabulary in id order) and [rows, width] probabilities, narrower rows padded with probability 0."""
        width = max(q.shape[1] for *_, q in extra_q)
        widened = lambda t: t if t.shape[1] == width else F.pad(t, (0, width - t.shape[1]))  # noqa: E731
        probs = torch.cat([widened(q) for *_, q in extra_q])
        if all(ids is None for _, ids, _ in extra_q):
            return on_supports(probs)
        in_order = torch.arange(self.vocab_size, device=self.device)
        return torch.cat([widened(in_order.expand(len(q), -1) if ids is None else ids) for _, ids, q in extra_q]), probs

    @staticmethod
    def _returned_q(q_blocks: list, values: list[torch.Tensor], vocab: int) -> dict[int, SparseDistributions]:
        """Per returning sequence its q, one row per emitted token, from the host's copy of the step's q blocks
        (as `_run` lays them out: (each row's sequence, ids or None, probs), ids sent only where not None)."""
        if not q_blocks:
            return {}
        values = iter(values)
        rows, owners = [], []
        for block_owners, ids, _ in q_blocks:
            ids = None if ids is None else next(values).long().view(len(block_owners), -1)
            probs = next(values).view(len(block_owners), -1)
            rows.append(SparseDistributions.over_vocabulary(probs) if ids is None
                        else SparseDistributions.held(vocab, ids, probs))
            owners += block_owners
        returning = q_blocks[0][0]
        q, owner = SparseDistributions.cat(rows), torch.tensor(owners)
        if len(returning) > 1:  # each sequence's rows together, in emission order: a stable sort by owner
            q = q.take(owner.argsort(stable=True))
        return dict(zip(returning, q.split(torch.bincount(owner, minlength=returning[-1] + 1)[returning].tolist())))

    def _groups(self, batch, starts: list[int], table: torch.Tensor) -> list[_AttentionGroup]:
        """Attention groups: long queries (prefills) apart; short ones (decoding, verification) in buckets of
        similar length, since every sequence of a group gathers and attends over the group's longest keys."""
        counts = [len(request.input_ids) + len(request.draft) for request, _ in batch]
        lengths = [start + n for start, n in zip(starts, counts)]
        short = sorted((b for b, n in enumerate(counts) if n <= LONG_QUERY), key=lengths.__getitem__)
        members = [[b for b, n in enumerate(counts) if n > LONG_QUERY]]
        for b in short:  # a new bucket once padding to this length would waste a third of the bucket's keys
            bucket = members[-1] if len(members) > 1 else None
            if bucket and (len(bucket) < MIN_BUCKET or lengths[bucket[0]] * 3 >= lengths[b] * 2):
                bucket.append(b)
            else:
                members.append([b])
        offsets = [0]
        for n in counts:
            offsets.append(offsets[-1] + n)
        groups = []
        for group in filter(None, members):
            queries = max(counts[b] for b in group)
            keys = max(starts[b] + counts[b] for b in group)
            token_rows, query_index, limits = [], [], []
            for g, b in enumerate(group):
                token_rows += range(offsets[b], offsets[b + 1])
                query_index += range(g * queries, g * queries + counts[b])
                n_in = len(batch[b][0].input_ids)
                # inputs see the prefix up to themselves; draft nodes all inputs (plus their ancestors, below);
                # padded queries key 0 only (an all-masked row would be NaN)
                limits.append([starts[b] + i + 1 for i in range(n_in)] + [starts[b] + n_in] * (counts[b] - n_in)
                              + [1] * (queries - counts[b]))
            limit = torch.tensor(limits, device=self.device)
            mask = torch.arange(keys, device=self.device) < limit[:, :, None]
            for g, b in enumerate(group):
                request = batch[b][0]
                if len(request.draft):
                    n_in, start = len(request.input_ids), starts[b]
                    mask[g, n_in:counts[b], start + n_in:start + counts[b]] = \
                        request.draft.ancestor_mask().to(self.device)
            member_rows = torch.tensor(group, device=self.device)
            key_slots = self.kv.slots(table, member_rows[:, None], torch.arange(keys, device=self.device)[None])
            dense = token_rows == query_index == list(range(offsets[-1])) == list(range(len(group) * queries))
            groups.append(_AttentionGroup(None if dense else torch.tensor(token_rows, device=self.device),
                                          None if dense else torch.tensor(query_index, device=self.device),
                                          key_slots, self._additive(mask[:, None]), len(group), queries))
        return groups

    def _additive(self, mask: torch.Tensor) -> torch.Tensor:
        """A boolean attention mask as SDPA's additive one, built once per step rather than converted per layer."""
        return torch.zeros(mask.shape, dtype=self.kv.dtype, device=self.device).masked_fill(~mask, float("-inf"))

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, store_slots: torch.Tensor,
                 groups: list[_AttentionGroup]) -> torch.Tensor:
        """Final hidden states [tokens, hidden] of the new tokens; writes their K/V to store_slots first."""
        model = self.model.model
        x = model.embed_tokens(ids)
        tokens, head_dim = ids.numel(), self.kv.keys.shape[-1]
        half = head_dim // 2
        rotary = self._rotary(positions) if self.rotary_table is None else self.rotary_table[positions]
        cos, sin = rotary[:, None, 0], rotary[:, None, 1]  # [tokens, 1, head_dim]
        for index, layer in enumerate(self.layers):
            rotated = layer.heads + layer.kv_heads
            qkv = layer.qkv(layer.input_norm(x)).view(tokens, -1, head_dim)
            qk = qkv[:, :rotated]
            qkv[:, :rotated] = torch.addcmul(qk * cos, qk.roll(half, -1), sin)
            q, k, v = qkv.split([layer.heads, layer.kv_heads, layer.kv_heads], 1)
            keys, values = self.kv.keys[index], self.kv.values[index]
            keys.index_copy_(0, store_slots, k)
            values.index_copy_(0, store_slots, v)
            attended = x.new_empty(tokens, layer.heads * head_dim)
            for group in groups:
                if group.dense:
                    padded = q
                else:
                    padded = q.new_zeros(group.batch * group.queries, layer.heads, head_dim)
                    padded[group.query_index] = q[group.token_rows]
                slots = group.key_slots.view(-1)
                shape = (group.batch, -1, *keys.shape[1:])
                out = F.scaled_dot_product_attention(
                    padded.view(group.batch, group.queries, -1, head_dim).transpose(1, 2),
                    keys.index_select(0, slots).view(shape).transpose(1, 2),
                    values.index_select(0, slots).view(shape).transpose(1, 2),
                    attn_mask=group.mask, scale=layer.scaling, enable_gqa=True)
                out = out.transpose(1, 2).reshape(group.batch * group.queries, -1)
                if group.dense:
                    attended = out
                else:
                    attended[group.token_rows] = out[group.query_index]
            x = x + layer.output(attended)
            gate, up = layer.gate_up(layer.post_attention_norm(x)).chunk(2, -1)
            x = x + layer.down(layer.act_fn(gate) * up)
        return self.final_norm(x)

    def _rotary(self, positions: torch.Tensor) -> torch.Tensor:
        """[positions, 2, head_dim]: cos, and sin with its first half negated, since rotate_half(x) * sin equals
        roll(x, half) * [-sin, sin]: queries and keys are rotated by one expression."""
        # transformers' rotary_emb takes a tensor for its dtype and device only: an empty slice of the cache's
        cos, sin = (t[0] for t in self.model.model.rotary_emb(self.kv.keys[:0], positions[None]))
        half = sin.shape[-1] // 2
        return torch.stack([cos, torch.cat([-sin[:, :half], sin[:, half:]], -1)], 1)

    def _end_bans(self, sequences: list[_Sequence]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per sequence (end_id or -1, the first position it may be emitted at); None when no row of the step can be
        banned (a step's rows predict positions past the sequence's cached length: past min_length, nothing to ban)."""
        vocab = self.vocab_size
        end_ids = [s.end_id if s.end_id is not None and 0 <= s.end_id < vocab
                   and s.min_end_position > s.cache.length + 1 else -1 for s in sequences]
        if max(end_ids, default=-1) < 0:
            return None
        return (torch.tensor(end_ids, device=self.device),
                torch.tensor([s.min_end_position for s in sequences], device=self.device))

    def _logits(self, hidden: torch.Tensor, bans: tuple[torch.Tensor, torch.Tensor] | None,
                predicted: torch.Tensor) -> torch.Tensor:
        """lm_head over the rows, with end_id banned where a row predicts a position before min_length allows.
        bans: per row, what _end_bans gives per sequence."""
        logits = self.lm_head(hidden).float()
        if bans is not None:
            end, min_end_position = bans
            banned = (end >= 0) & (predicted < min_end_position)
            column = end.clamp(min=0)[:, None]
            logits.scatter_(1, column, torch.where(banned[:, None], float("-inf"), logits.gather(1, column)))
        return logits

    def _sampling_parameters(self, params: list[SamplingParams]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per row (temperature, top_k, top_p) for `probabilities`; greedy rows get temperature 1 (computed, never
        used)."""
        tensor = lambda values, dtype=torch.float32: torch.tensor(values, dtype=dtype, device=self.device)  # noqa
        return (tensor([p.temperature if not p.greedy else 1.0 for p in params]),
                tensor([p.top_k for p in params], torch.long), tensor([p.top_p for p in params]))

    def _draft_q(self, batch, vocab: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """([nodes, vocab] each node's q, [nodes] whether it has one), or (None, None) when no draft has q."""
        if all(request.draft_q is None for request, _ in batch):
            return None, None
        rows = [request.draft_q if request.draft_q is not None  # else rows without entries
                else SparseDistributions.held(vocab, torch.zeros(len(request.draft), 0, dtype=torch.long),
                                              torch.zeros(len(request.draft), 0))
                for request, _ in batch]
        has_q = [request.draft_q is not None for request, _ in batch for _ in range(len(request.draft))]
        return SparseDistributions.cat(rows).dense(self.device), torch.tensor(has_q, device=self.device)

    @staticmethod
    def _uniforms(batch) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per sequence (node, row, extra-token) uniforms from its own generator; greedy sequences draw nothing
        (zeros: a greedy child is accepted iff 0 < [child is the argmax])."""
        out = []
        for request, sequence in batch:
            nodes = len(request.draft)
            sizes = (nodes, nodes + 1, request.extra_tokens)
            if sequence.params.greedy:
                out.append(tuple(torch.zeros(n) for n in sizes))
            else:
                out.append(tuple(torch.rand(sum(sizes), generator=sequence.generator, dtype=torch.float64)
                                 .float().split(sizes)))
        return out

    def _input_logprobs(self, batch, hidden: torch.Tensor, ids: list[int]) -> torch.Tensor:
        """[sequences] mean log-probability of input_ids[1:] for sequences that asked (score_input), else 0."""
        rows, owners, offset = [], [], 0
        for b, (request, _) in enumerate(batch):
            n_in = len(request.input_ids)
            if request.score_input and n_in > 1:
                rows += range(offset, offset + n_in - 1)
                owners += [b] * (n_in - 1)
            offset += n_in + len(request.draft)
        score = torch.zeros(len(batch), device=self.device)
        if rows:
            index = torch.tensor(rows, device=self.device)
            logprobs = torch.log_softmax(self.lm_head(hidden[index]).float(), -1)
            picked = logprobs.gather(1, torch.tensor(ids, device=self.device)[index + 1][:, None])[:, 0]
            owner = torch.tensor(owners, device=self.device)
            score.index_add_(0, owner, picked)
            score /= torch.bincount(owner, minlength=len(batch)).clamp(min=1)
        return score

    def _draft_extra_tokens(self, batch, table: torch.Tensor, last: torch.Tensor, lengths: torch.Tensor,
                            uniforms: list[torch.Tensor], candidates: int, returning_q: list[int]):
        """Feeds drafting sequences their last emitted token until each has emitted its extra_tokens: one forward
        per position for all of them, tokens staying on the device. What does not change from one position to the
        next (key slots, sampling parameters, end bans, uniforms) is laid out once. Returns, per position, [tokens,
        probs] (+ [top ids, top probs]) of the sequences still drafting there, and per position (the `returning_q`
        sequences drafting there, the distributions they drew from as `proposal` holds them: [those, width] ids, None
        for the vocabulary in order, and [those, width] probabilities)."""
        drafting = [b for b, (request, _) in enumerate(batch) if request.extra_tokens]  # "members", in this order
        out, q_out = [], []
        if not drafting:
            return out, q_out
        device = self.device
        members = torch.tensor(drafting, device=device)
        requests, sequences = zip(*(batch[b] for b in drafting))
        counts = [request.extra_tokens for request in requests]  # per member
        returning = {i for i, b in enumerate(drafting) if b in returning_q}  # members that return q
        last = last[members]  # [members] each one's next input token
        # [members, keys] pool slots of every key a position may see: the step's tokens all kept, then the extra ones
        keys = max(sequence.cache.length + len(request.input_ids) + len(request.draft) + count
                   for request, sequence, count in zip(requests, sequences, counts))
        # [members, positions] where each member's input token sits at each position of the loop; a member that has
        # drafted all it asked for stays at its last key (never read: only active members are picked)
        input_positions = (lengths[members, None] + torch.arange(max(counts), device=device)).clamp(max=keys - 1)
        key_positions = torch.arange(keys, device=device)
        key_slots = self.kv.slots(table, members[:, None], key_positions[None])
        store_slots = key_slots.gather(1, input_positions)  # [members, positions]
        # [members, positions laid out, 1, 1, keys] each position's additive mask (its prefix), laid out for as many
        # positions at a time as MASK_LAYOUT_BYTES allows: all of them at the demo's lengths, fewer at long contexts
        per_position = len(drafting) * keys * self.kv.keys.element_size()
        laid_out = max(1, min(max(counts), MASK_LAYOUT_BYTES // per_position))
        step_uniforms = torch.nn.utils.rnn.pad_sequence([uniforms[b] for b in drafting], batch_first=True).to(device)
        sampled = [not sequence.params.greedy for sequence in sequences]
        sampled_rows = torch.tensor(sampled, device=device)
        sampling = self._sampling_parameters([sequence.params for sequence in sequences]) if any(sampled) else None
        bans = self._end_bans(sequences)
        active = list(range(len(drafting)))  # members drafting at this position
        rows = slice(None)
        pick = lambda tensor: tensor  # noqa: E731  (rows of the active members)
        for position in range(max(counts)):
            if position in counts:  # some drafted all they asked for
                active = [i for i in active if counts[i] > position]
                rows = torch.tensor(active, device=device)
                pick = lambda tensor: tensor[rows]  # noqa: E731
            if position % laid_out == 0:
                masks = self._additive(key_positions <= input_positions[:, position:position + laid_out, None])
            length = pick(input_positions[:, position])
            mask = masks[:, position % laid_out, None, None]
            group = _AttentionGroup(None, None, pick(key_slots), pick(mask), len(active), 1)
            hidden = self._forward(pick(last), length, pick(store_slots[:, position]), [group])
            logits = self._logits(hidden, bans and tuple(map(pick, bans)), length + 1)
            chosen = _argmax(logits)
            chosen_prob = torch.ones(chosen.shape, device=device)  # a greedy token's distribution is one-hot
            if any(sampled[i] for i in active):  # drawn from the request's distribution, held on its support
                ids, q = proposal(logits, *map(pick, sampling))
                drawn, drawn_prob = draw(ids, q, pick(step_uniforms[:, position]))
                chosen = torch.where(pick(sampled_rows), drawn, chosen)
                chosen_prob = torch.where(pick(sampled_rows), drawn_prob, chosen_prob)
                owners = [k for k, i in enumerate(active) if i in returning]
                if len(owners) < len(active):
                    ids, q = None if ids is None else ids[owners], q[owners]
                if owners:
                    q_out.append(([drafting[active[k]] for k in owners], ids, q))
            out += [chosen, chosen_prob]
            if candidates:
                top = torch.softmax(logits, -1).topk(candidates)
                out += [top.indices, top.values]
            last[rows] = chosen  # in place: `chosen` is in `out`, never overwritten
        return out, q_out

    @staticmethod
    def _add_extra_tokens(batch, results: list[StepResult], extra: list[torch.Tensor], candidates: int) -> None:
        per_position = 4 if candidates else 2
        for position in range(len(extra) // per_position):
            parts = extra[position * per_position:(position + 1) * per_position]
            active = [b for b, (request, _) in enumerate(batch) if request.extra_tokens > position]
            tokens, probs = parts[0].long().tolist(), parts[1].tolist()
            top_ids = parts[2].view(len(active), -1).long().tolist() if candidates else None
            top_probs = parts[3].view(len(active), -1).tolist() if candidates else None
            for i, b in enumerate(active):
                c = batch[b][0].candidates
                result = results[b]
                result.tokens.append(tokens[i])
                result.probs.append(probs[i])
                result.top_ids.append(top_ids[i][:c] if c else [])
                result.top_probs.append(top_probs[i][:c] if c else [])
