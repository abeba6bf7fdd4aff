"""Sampling parameters and the logits -> distribution transform shared by target and drafters."""
from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass

import torch


class InvalidParameter(ValueError):
    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field, self.reason = field_name, message


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def validate(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidParameter("temperature", f"must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise InvalidParameter("top_k", f"must be >= 0 (0 = disabled), got {self.top_k}")
        if not (math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise InvalidParameter("top_p", f"must be in (0, 1], got {self.top_p}")

    def seeded(self) -> "SamplingParams":
        """These parameters with a seed: a fresh random one when the request named none (an engine always gets one,
        so a request's rounds draw from its own stream)."""
        return self if self.seed is not None else dataclasses.replace(self, seed=random.getrandbits(63))

    def generator(self) -> torch.Generator:
        generator = torch.Generator()
        if self.seed is None:
            generator.seed()
        else:
            generator.manual_seed(self.seed)
        return generator


@dataclass(frozen=True)
class SparseDistributions:
    """Rows of distributions over a vocabulary, held on their supports: a sampled draft's q as it goes from the
    drafter's step to the target's acceptance (a top-k / top-p distribution is zero elsewhere; 12 positions of q
    over 151,936 tokens are 14.6 MB dense in float64). Row r holds probs at ids in entries [offsets[r],
    offsets[r + 1]), offsets the cumulative counts; an entry's probability may be 0."""
    vocab: int
    counts: torch.Tensor  # [rows] int64: entries per row
    ids: torch.Tensor  # [entries] int64 token ids in [0, vocab)
    probs: torch.Tensor  # [entries] float32

    def __len__(self) -> int:
        return len(self.counts)

    @classmethod
    def held(cls, vocab: int, ids: torch.Tensor, probs: torch.Tensor) -> "SparseDistributions":
        """From [rows, width] ids and probabilities (a `proposal`'s), without the zero entries."""
        kept = probs > 0
        return cls(vocab, kept.sum(1), ids[kept], probs[kept].float())

    @classmethod
    def over_vocabulary(cls, probs: torch.Tensor) -> "SparseDistributions":
        """From [rows, vocab] probabilities in id order, zero entries dropped if there are any (a distribution without
        top-k or top-p has none: checking costs less than picking the rest)."""
        rows, vocab = probs.shape
        ids = torch.arange(vocab, device=probs.device)
        if bool((probs > 0).all()):
            return cls(vocab, torch.full((rows,), vocab), ids.repeat(rows), probs.float().reshape(-1))
        return cls.held(vocab, ids.expand_as(probs), probs)

    @classmethod
    def cat(cls, parts: list["SparseDistributions"]) -> "SparseDistributions":
        """The rows of every part, in order (all over one vocabulary)."""
        return cls(parts[0].vocab, *(torch.cat([getattr(part, name) for part in parts])
                                     for name in ("counts", "ids", "probs")))

    def __getitem__(self, rows: slice) -> "SparseDistributions":
        start, stop, _ = rows.indices(len(self))
        offsets = self.counts[:stop].cumsum(0).tolist()
        first, last = (offsets[start - 1] if start else 0), (offsets[-1] if stop else 0)
        return SparseDistributions(self.vocab, self.counts[start:stop], self.ids[first:last], self.probs[first:last])

    def take(self, rows: torch.Tensor) -> "SparseDistributions":
        """These rows ([n] int64 indices), in that order."""
        counts = self.counts[rows]
        # entry e of the taken rows is entry e - (its row's start among them) + (that row's start here)
        shift = self.counts.cumsum(0)[rows] - counts - (counts.cumsum(0) - counts)
        entries = torch.arange(int(counts.sum())) + torch.repeat_interleave(shift, counts)
        return SparseDistributions(self.vocab, counts, self.ids[entries], self.probs[entries])

    def split(self, rows: list[int]) -> list["SparseDistributions"]:
        """Consecutive parts of these many rows each."""
        entries = [int(part.sum()) for part in self.counts.split(rows)]
        return [SparseDistributions(self.vocab, *parts) for parts in zip(
            self.counts.split(rows), self.ids.split(entries), self.probs.split(entries))]

    def dense(self, device=None) -> torch.Tensor:
        """[rows, vocab] float32."""
        out = torch.zeros(len(self), self.vocab, device=device)
        rows = torch.repeat_interleave(torch.arange(len(self), device=device), self.counts.to(device))
        out[rows, self.ids.to(device)] = self.probs.to(device)
        return out


CANDIDATES = 64  # the most likely tokens of a row that a CPU sorts before its whole vocabulary
WIDENING = 8  # rows whose top-p support is beyond CANDIDATES try this many times as many, twice, before sorting all


def _widths(vocab: int) -> list[int]:
    """The candidate counts a CPU tries for a row's support, the last its whole vocabulary. One row of 151,936
    logits: its top 64 / 512 / 4,096 take 0.34 / 0.54 / 1.4 ms, a sort 9.2 ms."""
    return [width for width in (CANDIDATES, CANDIDATES * WIDENING, CANDIDATES * WIDENING ** 2) if width < vocab] + [
        vocab]


def probabilities(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                  top_p: torch.Tensor) -> torch.Tensor:
    """`proposal`'s distributions laid over the vocabulary: [rows, vocab]. Arguments as `proposal`'s."""
    ids, probs = proposal(logits, temperature, top_k, top_p)
    # past a row's support its held entries have probability 0 and any id: adding them changes nothing
    return probs if ids is None else torch.zeros(len(probs), logits.shape[-1], device=probs.device).scatter_add_(
        -1, ids, probs)


def proposal(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
             top_p: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The distributions sampling draws from, one row per logits row with that row's parameters: temperature, then
    top-k, then top-p (rows of greedy requests are not meant to come here: they compare argmaxes). Held so that a
    draw from a row depends on that row alone, not on the rows batched beside it: ([rows, width] token ids, or None
    for every row's vocabulary in id order, and [rows, width] their probabilities). A row with top-k or top-p holds
    its support in descending order; a row without either holds its vocabulary in id order (unsorted). Past a row's
    support its entries have probability 0 and any id.
    Sorting the vocabulary is what costs on a CPU (2,048 logits: 58 us a row). So a row is computed from its
    CANDIDATES most likely tokens when its top-k / top-p support lies within them (a top_k up to that, or a top_p
    those tokens reach: 90% of the demo target's rows at temperature 0.8, top_p 0.95), else from WIDENING times as
    many (99.5%), then as many again (`_widths`), and only the rest sort the whole vocabulary. On the demo models'
    rows, with the normaliser in `_truncated`: a drafting position's row 108 -> 95 us, a verification's 13 rows 0.93
    -> 0.68 ms against sorting every row beyond 64. On a GPU every row holds the vocabulary in id order: a sort is
    cheap there, and the host synchronisation that choosing the width takes is not.
    A drafting position draws from this and reports it without laying the vocabulary out: one row with its draw took
    0.91x the time of laying it over the vocabulary and drawing there at 2,048 tokens, 0.74x at 32,000 and 0.66x at
    151,936 (T 0.8, top_p 0.95), 0.35-0.46x without top-k or top-p (the two interleaved, medians of 400, one thread,
    this CPU).

    logits: [rows, vocab]; temperature, top_p: [rows] float; top_k: [rows] int64, 0 = no filter."""
    tempered, bounded_top_k = _tempered(logits, temperature, top_k)
    rows, vocab = tempered.shape
    if tempered.is_cuda:
        ids, probs, _ = _from_candidates(tempered, vocab, bounded_top_k, top_p)
        return None, torch.zeros_like(tempered).scatter_(-1, ids, probs)
    unfiltered = (bounded_top_k == vocab) & (top_p >= 1.0)  # the support is the vocabulary
    if bool(unfiltered.all()):
        return None, torch.softmax(tempered, dim=-1)
    mixed = bool(unfiltered.any())
    pending = (~unfiltered).nonzero()[:, 0] if mixed else None  # rows still to hold; None: every row
    stages = []  # (rows, their ids, their probabilities)
    for width in _widths(vocab):
        part = slice(None) if pending is None else pending
        ids, probs, exact = _from_candidates(tempered[part], width, bounded_top_k[part], top_p[part])
        if pending is None and bool(exact.all()):
            return ids, probs
        if pending is None:
            pending = torch.arange(rows)
        stages.append((pending[exact], ids[exact], probs[exact]))
        pending = pending[~exact]
        if not pending.numel():
            break
    width = vocab if mixed else stages[-1][1].shape[1]
    held_ids = torch.zeros(rows, width, dtype=torch.long)
    held = torch.zeros(rows, width)
    if mixed:
        held_ids[unfiltered] = torch.arange(vocab)
        held[unfiltered] = torch.softmax(tempered[unfiltered], dim=-1)
    for stage_rows, ids, probs in stages:
        held_ids[stage_rows, :ids.shape[1]] = ids
        held[stage_rows, :ids.shape[1]] = probs
    return held_ids, held


def on_supports(probs: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """[rows, vocab] distributions held as `proposal` holds them, as narrow as the widest row's support: ([rows,
    width] token ids, [rows, width] their probabilities), or (None, probs) where no row has a zero. How a step's q rows
    cross to the host: over the vocabulary (a GPU's rows hold it), 12 drafted positions of 64 sequences over 151,936
    tokens are 0.9 GB in float64, their top-p supports a few MB. Costs a host synchronisation."""
    width = int((probs > 0).sum(-1).max())
    if width == probs.shape[-1]:
        return None, probs
    probs, ids = probs.topk(width, dim=-1)
    return ids, probs


def draw(ids: torch.Tensor | None, probs: torch.Tensor,
         uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of a `proposal` (ids, probs) and its probability ([rows] each)."""
    index = sample(probs, uniforms)[:, None]
    return (index if ids is None else ids.gather(1, index))[:, 0], probs.gather(1, index)[:, 0]


def _tempered(logits: torch.Tensor, temperature: torch.Tensor,
              top_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, vocab] logits / temperature, and top_k in [1, vocab] (0: the vocabulary)."""
    vocab = logits.shape[-1]
    return logits.float() / temperature[:, None], torch.where(top_k > 0, top_k, vocab).clamp(max=vocab)


def _from_candidates(scaled: torch.Tensor, candidates: int, top_k: torch.Tensor,
                     top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's distribution from its `candidates` most likely tokens (the whole vocabulary sorted when that is
    all of it): ([rows, c] their ids, [rows, c] their probabilities), and [rows] whether that is exact: top-k keeps
    none beyond them, or top-p keeps only some of them."""
    vocab = scaled.shape[-1]
    if candidates >= vocab:
        values, ids = scaled.sort(dim=-1, descending=True)
        probs, _ = _truncated(scaled, values, top_k, top_p)
        return ids, probs, torch.ones(scaled.shape[0], dtype=torch.bool, device=scaled.device)
    values, ids = scaled.topk(candidates, dim=-1)
    probs, mass = _truncated(scaled, values, top_k, top_p)
    return ids, probs, (top_k <= candidates) | ((top_k == vocab) & (top_p < 1.0) & (mass >= top_p))


def _truncated(scaled: torch.Tensor, values: torch.Tensor, top_k: torch.Tensor,
               top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k then top-p over each row's c most likely tokens, which must hold its support where top_k < vocab:
    ([rows, c] their probabilities, [rows] the mass those c tokens have under the top-k distribution).
    scaled: [rows, vocab] tempered logits; values: [rows, c] its c largest in descending order; top_k: [rows] in
    [1, vocab]; top_p: [rows]."""
    candidates = values.shape[-1]
    outside = torch.arange(candidates, device=values.device) >= top_k[:, None]
    # exp relative to the row's largest logit, normalised over the top-k set: the candidates where it lies within
    # them, else (top_k = vocab) the whole vocabulary. Four ops, where softmax + logsumexp took 12.
    weights = (values - values[:, :1]).exp_().masked_fill_(outside, 0.0)
    total = weights.sum(-1)
    if candidates < scaled.shape[-1]:
        total = torch.where(top_k <= candidates, total, (scaled - values[:, :1]).exp_().sum(-1))
    sorted_probs = weights / total[:, None]
    mass = sorted_probs.cumsum(-1)
    # keep the smallest prefix whose mass reaches top_p (the token crossing the threshold stays)
    outside |= (mass - sorted_probs >= top_p[:, None]) & (top_p[:, None] < 1.0)
    sorted_probs = sorted_probs.masked_fill_(outside, 0.0)
    return sorted_probs / sorted_probs.sum(-1, keepdim=True), mass[:, -1]


def sample(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row of (unnormalised) probs by inverse CDF: uniforms [rows] in [0, 1) come from each
    request's own seeded generator, so a request's draws do not depend on what else is in the batch."""
    cdf = probs.double().cumsum(-1)
    index = (cdf < uniforms.double()[:, None] * cdf[:, -1:]).sum(-1)
    return index.clamp(max=probs.shape[-1] - 1)
