"""The ENGINE contract's codec: a batch of engine steps <-> a few flat arrays, and their results back.

Both sides of a call use it (the `cosine` process packs steps and unpacks results, the engine model the reverse),
so the flattening is written once. Arrays carry no batch dimension here; the transport adds it."""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ..contract import (ENGINE, RESULT_ERRORS, RESULT_INTS, RESULT_REALS, STEP_INTS, STEP_KEYS, STEP_REALS,
                        PackedTensor)
from ..engine.engine import Admission, RoundOutcome, Rounds, StepRequest, StepResult
from ..engine.kv_cache import AdmissionError
from ..engine.sampling import SamplingParams, SparseDistributions
from ..speculation.tree import DraftTree
from .errors import ServingError

NO_VALUE = -1  # keep_length: keep everything; end_id: none
_DTYPES = {t.name: t.numpy_dtype for t in (*ENGINE.inputs, *ENGINE.outputs)}


def _packed(layout: PackedTensor, rows: list[dict], **sections) -> np.ndarray:
    """The tensor `layout` describes: each row's fields (the header), then every section, in the contract's order."""
    assert not rows or rows[0].keys() == set(layout.fields), (layout.name, rows[0].keys())
    assert sections.keys() == set(layout.sections), (layout.name, sections.keys())
    dtype = _DTYPES[layout.name]
    header = np.array([[row[name] for name in layout.fields] for row in rows], dtype).reshape(-1)
    return np.concatenate([header, *(np.asarray(sections[name], dtype).reshape(-1) for name in layout.sections)])


class _Reader:
    """Reads the tensor `layout` describes front to back, its sections in the contract's order; errors name the
    tensor and the part."""

    def __init__(self, layout: PackedTensor, arrays: dict[str, np.ndarray]):
        self.tensor, self.flat, self.at = layout.name, np.asarray(arrays[layout.name]).reshape(-1), 0
        self.fields, self.sections = layout.fields, iter(layout.sections)

    def header(self, n: int) -> dict[str, np.ndarray]:
        """Per field its column [n]."""
        rows = self._take("header", n * len(self.fields)).reshape(n, len(self.fields))
        return {name: rows[:, i] for i, name in enumerate(self.fields)}

    def take(self, section: str, count) -> np.ndarray:
        """The next section, which must be `section`: `count` values."""
        expected = next(self.sections, None)
        assert section == expected, (self.tensor, section, expected)
        return self._take(section, count)

    def _take(self, part: str, count) -> np.ndarray:
        count = int(count)
        if self.at + count > len(self.flat):
            raise ValueError(f"{self.tensor}: {part}: {count} values expected, {len(self.flat) - self.at} left")
        self.at += count
        return self.flat[self.at - count:self.at]

    def split(self, part: str, lengths: np.ndarray) -> list[np.ndarray]:
        """The section `part`, cut per sequence."""
        return np.split(self.take(part, lengths.sum()), np.cumsum(lengths)[:-1]) if len(lengths) else []

    def end(self) -> None:
        assert next(self.sections, None) is None, self.tensor  # every section read
        if self.at != len(self.flat):
            raise ValueError(f"{self.tensor}: {len(self.flat) - self.at} values past its last section")


def _lengths(reader: _Reader, header: dict[str, np.ndarray], name: str) -> np.ndarray:
    lengths = header[name].astype(np.int64)
    if (lengths < 0).any():
        raise ValueError(f"{reader.tensor}: {name} must be >= 0, got {lengths.min()}")
    return lengths


def _flat_q(q: list[SparseDistributions | None]) -> tuple[list[int], np.ndarray, np.ndarray, np.ndarray]:
    """Per sequence its q (or None) as (per sequence its vocabulary size or 0, per row its entries, the entries'
    token ids, their values)."""
    present = [rows for rows in q if rows is not None]
    if not present:  # greedy: no tensor operations (their fixed cost is on every call's path)
        return [0] * len(q), np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    flat = SparseDistributions.cat(present)
    return [0 if rows is None else rows.vocab for rows in q], flat.counts.numpy(), flat.ids.numpy(), flat.probs.numpy()


def _read_q(vocab: np.ndarray, rows: np.ndarray, ints: _Reader, reals: _Reader,
            sections: tuple[str, str, str]) -> list[SparseDistributions | None]:
    """The inverse of _flat_q, read off the tensors' sections (counts, ids, probs), given each sequence's vocabulary
    size and row count; raises ValueError naming the section."""
    counts_name, ids_name, probs_name = sections
    rows = np.where(vocab > 0, rows, 0).astype(np.int64)
    counts = ints.take(counts_name, rows.sum()).astype(np.int64)
    if (counts < 0).any():
        raise ValueError(f"{ints.tensor}: {counts_name} must be >= 0")
    ids = ints.take(ids_name, counts.sum()).astype(np.int64)
    probs = reals.take(probs_name, counts.sum()).astype(np.float32)
    if not len(counts):
        return [None] * len(vocab)
    row_of_entry = np.repeat(np.arange(len(counts)), counts)
    width_of_row = np.repeat(vocab, rows)
    if len(ids) and not ((ids >= 0) & (ids < width_of_row[row_of_entry])).all():
        raise ValueError(f"{ints.tensor}: {ids_name}: token ids must be in [0, the sequence's q vocabulary)")
    parts = SparseDistributions(0, *map(torch.from_numpy, (counts, ids, probs))).split(rows.tolist())
    return [dataclasses.replace(part, vocab=width) if n else None
            for part, n, width in zip(parts, rows.tolist(), vocab.tolist())]


def pack_steps(steps: list[StepRequest]) -> dict[str, np.ndarray]:
    admissions = [step.admission for step in steps]
    params = [a.params if a else SamplingParams() for a in admissions]
    q_vocab, q_counts, q_ids, q_probs = _flat_q([s.draft_q for s in steps])
    fields = [dict(input_length=len(s.input_ids), draft_length=len(s.draft),
                   keep_length=NO_VALUE if s.keep_length is None else s.keep_length, extra_tokens=s.extra_tokens,
                   num_candidates=s.candidates, score_input=s.score_input, release=s.release, return_q=s.return_q,
                   draft_q_vocab=vocab, max_new_tokens=a.max_new_tokens if a else 0, top_k=p.top_k,
                   end_id=NO_VALUE if a is None or a.end_id is None else a.end_id, min_length=a.min_length if a else 0,
                   rounds_drafter=NO_VALUE if s.rounds is None else s.rounds.drafter,
                   rounds_draft_tokens=s.rounds.draft_tokens if s.rounds else 0,
                   rounds_count=s.rounds.count if s.rounds else 0)
              for s, a, p, vocab in zip(steps, admissions, params, q_vocab)]
    return {
        STEP_KEYS.name: _packed(STEP_KEYS, [dict(sequence_id=s.sequence_id, random_seed=p.seed or 0)
                                            for s, p in zip(steps, params)]),
        STEP_INTS.name: _packed(STEP_INTS, fields, input_ids=[t for s in steps for t in s.input_ids],
                                draft_ids=[t for s in steps for t in s.draft.tokens],
                                draft_parents=[p for s in steps for p in s.draft.parents],
                                draft_q_counts=q_counts, draft_q_ids=q_ids),
        STEP_REALS.name: _packed(STEP_REALS, [dict(temperature=p.temperature, top_p=p.top_p) for p in params],
                                 draft_q_probs=q_probs),
    }


def unpack_steps(arrays: dict[str, np.ndarray]) -> list[StepRequest]:
    """Raises ValueError naming the tensor and the part of it when the arrays do not describe a batch of steps."""
    keys = _Reader(STEP_KEYS, arrays)
    width = len(STEP_KEYS.fields)
    if len(keys.flat) % width:
        raise ValueError(f"{keys.tensor}: expected {width} values per sequence, got {len(keys.flat)} values")
    n = len(keys.flat) // width
    ints, reals = _Reader(STEP_INTS, arrays), _Reader(STEP_REALS, arrays)
    keys, fields, params = keys.header(n), ints.header(n), reals.header(n)
    input_lengths = _lengths(ints, fields, "input_length")
    draft_lengths = _lengths(ints, fields, "draft_length")
    inputs = ints.split("input_ids", input_lengths)
    draft_ids = ints.split("draft_ids", draft_lengths)
    draft_parents = ints.split("draft_parents", draft_lengths)
    draft_q = _read_q(fields["draft_q_vocab"], draft_lengths, ints, reals,
                      ("draft_q_counts", "draft_q_ids", "draft_q_probs"))
    ints.end()
    reals.end()
    steps = []
    for i in range(n):
        admission = None
        if fields["max_new_tokens"][i] > 0:
            sampling = SamplingParams(float(params["temperature"][i]), int(fields["top_k"][i]),
                                      float(params["top_p"][i]), int(keys["random_seed"][i]))
            end_id = int(fields["end_id"][i])
            admission = Admission(int(fields["max_new_tokens"][i]), sampling, None if end_id == NO_VALUE else end_id,
                                  int(fields["min_length"][i]))
        keep, drafter = int(fields["keep_length"][i]), int(fields["rounds_drafter"][i])
        rounds = None if drafter == NO_VALUE else Rounds(drafter, int(fields["rounds_draft_tokens"][i]),
                                                           int(fields["rounds_count"][i]))
        steps.append(StepRequest(
            int(keys["sequence_id"][i]), inputs[i].tolist(),
            DraftTree(tuple(draft_ids[i].tolist()), tuple(draft_parents[i].tolist())), admission,
            keep_length=None if keep == NO_VALUE else keep, extra_tokens=int(fields["extra_tokens"][i]),
            candidates=int(fields["num_candidates"][i]), score_input=bool(fields["score_input"][i]),
            release=bool(fields["release"][i]), draft_q=draft_q[i], return_q=bool(fields["return_q"][i]),
            rounds=rounds))
    return steps


def error_kind(error: Exception) -> str:
    if isinstance(error, AdmissionError):
        return ServingError.UNAVAILABLE if error.retryable else ServingError.INVALID
    if isinstance(error, ValueError):  # StepError: the request is malformed
        return ServingError.INVALID
    return getattr(error, "kind", ServingError.INTERNAL)


def pack_results(results: list[StepResult | Exception]) -> dict[str, np.ndarray]:
    done = [r if isinstance(r, StepResult) else StepResult([], [], [], []) for r in results]
    q_vocab, q_counts, q_ids, q_probs = _flat_q([r.q for r in done])
    fields = [dict(output_length=len(r.tokens), q_rows=0 if r.q is None else len(r.q), q_vocab=vocab,
                   rounds=len(r.rounds)) for r, vocab in zip(done, q_vocab)]
    errors = [("", "") if isinstance(r, StepResult) else (error_kind(r), str(r)) for r in results]
    return {
        RESULT_INTS.name: _packed(RESULT_INTS, fields, output_ids=[t for r in done for t in r.tokens],
                                  top_ids=[t for r in done for row in r.top_ids for t in row],
                                  output_q_counts=q_counts, output_q_ids=q_ids,
                                  round_drafted=[len(round.draft) for r in done for round in r.rounds],
                                  round_accepted=[round.accepted for r in done for round in r.rounds],
                                  round_matched=[round.matched for r in done for round in r.rounds],
                                  round_draft_ids=[t for r in done for round in r.rounds for t in round.draft]),
        RESULT_REALS.name: _packed(RESULT_REALS, [], output_probs=[p for r in done for p in r.probs],
                                   top_probs=[p for r in done for row in r.top_probs for p in row],
                                   input_logprob=[r.input_logprob for r in done], output_q_probs=q_probs),
        RESULT_ERRORS.name: np.array([text.encode() for error in errors for text in error], np.object_),
    }


def unpack_results(arrays: dict[str, np.ndarray], steps: list[StepRequest],
                   engine_name: str) -> list[StepResult | ServingError]:
    n = len(steps)
    ints, reals = _Reader(RESULT_INTS, arrays), _Reader(RESULT_REALS, arrays)
    fields = ints.header(n)
    lengths = _lengths(ints, fields, "output_length")
    widths = np.array([s.candidates for s in steps], np.int64)
    tokens, top_ids = ints.split("output_ids", lengths), ints.split("top_ids", lengths * widths)
    probs, top_probs = reals.split("output_probs", lengths), reals.split("top_probs", lengths * widths)
    input_logprob = reals.take("input_logprob", n)
    q = _read_q(fields["q_vocab"], fields["q_rows"], ints, reals,
                ("output_q_counts", "output_q_ids", "output_q_probs"))
    round_counts = _lengths(ints, fields, "rounds")
    drafted, accepted = ints.split("round_drafted", round_counts), ints.split("round_accepted", round_counts)
    matched = ints.split("round_matched", round_counts)
    draft_ids = ints.split("round_draft_ids", np.array([lengths.sum() for lengths in drafted], np.int64))
    ints.end()
    reals.end()
    errors = _Reader(RESULT_ERRORS, arrays).header(n)
    results = []
    for i in range(n):
        kind, message = (text.decode() if isinstance(text, bytes) else str(text)
                         for text in (errors["error_kind"][i], errors["error_message"][i]))
        if kind:
            results.append(ServingError(f"{engine_name}: {message}", kind))
            continue
        n_i = int(lengths[i])
        results.append(StepResult(tokens[i].tolist(), probs[i].tolist(), top_ids[i].reshape(n_i, widths[i]).tolist(),
                                  top_probs[i].reshape(n_i, widths[i]).tolist(), float(input_logprob[i]), q[i],
                                  [RoundOutcome(draft.tolist(), int(count), int(matches)) for draft, count, matches
                                   in zip(np.split(draft_ids[i], np.cumsum(drafted[i])[:-1]), accepted[i],
                                          matched[i])]))
    return results
