"""The ENGINE contract's codec: a batch of engine steps <-> a few flat arrays, and their results back.

Both sides of a call use it (the `cosine` process packs steps and unpacks results, the engine model the reverse),
so the flattening is written once. Arrays carry no batch dimension here; the transport adds it."""
from __future__ import annotations

import numpy as np
import torch

from ..contract import (ENGINE, ENGINE_ERRORS, ENGINE_RESULT_FIELDS, ENGINE_RESULT_REALS, ENGINE_RESULT_SECTIONS,
                        ENGINE_STEP_FIELDS, ENGINE_STEP_KEYS, ENGINE_STEP_REALS, ENGINE_STEP_SECTIONS)
from ..engine.engine import Admission, StepRequest, StepResult
from ..engine.kv_cache import AdmissionError
from ..engine.sampling import SamplingParams
from ..speculation.tree import DraftTree
from .errors import ServingError

NO_VALUE = -1  # keep_length: keep everything; end_id: none
_DTYPES = {t.name: t.numpy_dtype for t in (*ENGINE.inputs, *ENGINE.outputs)}


def _packed(tensor: str, fields: tuple[str, ...], rows: list[dict], order: tuple[str, ...], **sections) -> np.ndarray:
    """A contract tensor: the header (each row's `fields`, row-major), then the sections in the contract's order."""
    dtype = _DTYPES[tensor]
    assert not rows or rows[0].keys() == set(fields), (tensor, rows[0].keys())
    assert sections.keys() <= set(order), (tensor, sections.keys())
    header = np.array([[row[name] for name in fields] for row in rows], dtype).reshape(-1)
    return np.concatenate([header, *(np.asarray(sections[name], dtype).reshape(-1) for name in order
                                     if name in sections)])


class _Reader:
    """Reads a contract tensor front to back: its header, then its sections; errors name the tensor and the part."""

    def __init__(self, tensor: str, arrays: dict[str, np.ndarray]):
        self.tensor, self.flat, self.at = tensor, np.asarray(arrays[tensor]).reshape(-1), 0

    def header(self, n: int, fields: tuple[str, ...]) -> dict[str, np.ndarray]:
        """Per field its column [n]."""
        rows = self.take("header", n * len(fields)).reshape(n, len(fields))
        return {name: rows[:, i] for i, name in enumerate(fields)}

    def take(self, part: str, count) -> np.ndarray:
        count = int(count)
        if self.at + count > len(self.flat):
            raise ValueError(f"{self.tensor}: {part}: {count} values expected, {len(self.flat) - self.at} left")
        self.at += count
        return self.flat[self.at - count:self.at]

    def split(self, part: str, lengths: np.ndarray) -> list[np.ndarray]:
        """The section `part`, cut per sequence."""
        return np.split(self.take(part, lengths.sum()), np.cumsum(lengths)[:-1]) if len(lengths) else []

    def end(self) -> None:
        if self.at != len(self.flat):
            raise ValueError(f"{self.tensor}: {len(self.flat) - self.at} values past its last section")


def _lengths(tensor: str, header: dict[str, np.ndarray], name: str) -> np.ndarray:
    lengths = header[name].astype(np.int64)
    if (lengths < 0).any():
        raise ValueError(f"{tensor}: {name} must be >= 0, got {lengths.min()}")
    return lengths


def _sparse_q(q: list[torch.Tensor | None]) -> tuple[list[int], np.ndarray, np.ndarray, np.ndarray]:
    """Per sequence its q ([rows, vocab], or None) as (per sequence its vocabulary size or 0, per row its entries,
    the entries' token ids, their values): a sampled q is zero outside its top-k / top-p support, so only that travels
    (lossless)."""
    present = [rows for rows in q if rows is not None]
    dense = torch.cat(present) if present else torch.zeros(0, 0)
    row, column = dense.nonzero(as_tuple=True)  # row-major: each row's entries together, in order
    return ([0 if rows is None else rows.shape[1] for rows in q], torch.bincount(row, minlength=len(dense)).numpy(),
            column.numpy(), dense[row, column].numpy())


def _dense_q(vocab: np.ndarray, rows: np.ndarray, ints: _Reader, reals: _Reader,
             sections: tuple[str, str, str]) -> list[torch.Tensor | None]:
    """The inverse of _sparse_q, read off the tensors' sections (counts, ids, probs), given each sequence's vocabulary
    size and row count; raises ValueError naming the section."""
    counts_name, ids_name, probs_name = sections
    rows = np.where(vocab > 0, rows, 0).astype(np.int64)
    counts = ints.take(counts_name, rows.sum()).astype(np.int64)
    if (counts < 0).any():
        raise ValueError(f"{ints.tensor}: {counts_name} must be >= 0")
    ids = ints.take(ids_name, counts.sum()).astype(np.int64)
    probs = reals.take(probs_name, counts.sum()).astype(np.float32)
    row_of_entry = np.repeat(np.arange(len(counts)), counts)
    width_of_row = np.repeat(vocab, rows)
    if len(ids) and not ((ids >= 0) & (ids < width_of_row[row_of_entry])).all():
        raise ValueError(f"{ints.tensor}: {ids_name}: token ids must be in [0, the sequence's q vocabulary)")
    # every sequence's rows in one tensor, as wide as the widest vocabulary; each takes its rows and columns
    dense = torch.zeros(len(counts), int(vocab.max(initial=0)))
    dense[torch.from_numpy(row_of_entry), torch.from_numpy(ids)] = torch.from_numpy(probs)
    blocks = iter(dense.split(rows[rows > 0].tolist()))
    return [next(blocks)[:, :width] if n else None for n, width in zip(rows.tolist(), vocab.tolist())]


def pack_steps(steps: list[StepRequest]) -> dict[str, np.ndarray]:
    admissions = [step.admission for step in steps]
    params = [a.params if a else SamplingParams() for a in admissions]
    q_vocab, q_counts, q_ids, q_probs = _sparse_q([s.draft_q for s in steps])
    fields = [dict(input_length=len(s.input_ids), draft_length=len(s.draft),
                   keep_length=NO_VALUE if s.keep_length is None else s.keep_length, extra_tokens=s.extra_tokens,
                   num_candidates=s.candidates, score_input=s.score_input, release=s.release, return_q=s.return_q,
                   draft_q_vocab=vocab, max_new_tokens=a.max_new_tokens if a else 0, top_k=p.top_k,
                   end_id=NO_VALUE if a is None or a.end_id is None else a.end_id, min_length=a.min_length if a else 0)
              for s, a, p, vocab in zip(steps, admissions, params, q_vocab)]
    return {
        "step_keys": _packed("step_keys", ENGINE_STEP_KEYS, [dict(sequence_id=s.sequence_id, random_seed=p.seed or 0)
                                                             for s, p in zip(steps, params)], ()),
        "step_ints": _packed("step_ints", ENGINE_STEP_FIELDS, fields, ENGINE_STEP_SECTIONS,
                             input_ids=[t for s in steps for t in s.input_ids],
                             draft_ids=[t for s in steps for t in s.draft.tokens],
                             draft_parents=[p for s in steps for p in s.draft.parents],
                             draft_q_counts=q_counts, draft_q_ids=q_ids),
        "step_reals": _packed("step_reals", ENGINE_STEP_REALS,
                              [dict(temperature=p.temperature, top_p=p.top_p) for p in params], ("draft_q_probs",),
                              draft_q_probs=q_probs),
    }


def unpack_steps(arrays: dict[str, np.ndarray]) -> list[StepRequest]:
    """Raises ValueError naming the tensor and the part of it when the arrays do not describe a batch of steps."""
    keys = np.asarray(arrays["step_keys"]).reshape(-1)
    if len(keys) % len(ENGINE_STEP_KEYS):
        raise ValueError(f"step_keys: expected {len(ENGINE_STEP_KEYS)} values per sequence, got {len(keys)} values")
    n = len(keys) // len(ENGINE_STEP_KEYS)
    keys = keys.reshape(n, len(ENGINE_STEP_KEYS))
    ints, reals = _Reader("step_ints", arrays), _Reader("step_reals", arrays)
    fields, params = ints.header(n, ENGINE_STEP_FIELDS), reals.header(n, ENGINE_STEP_REALS)
    input_lengths = _lengths("step_ints", fields, "input_length")
    draft_lengths = _lengths("step_ints", fields, "draft_length")
    inputs = ints.split("input_ids", input_lengths)
    draft_ids = ints.split("draft_ids", draft_lengths)
    draft_parents = ints.split("draft_parents", draft_lengths)
    draft_q = _dense_q(fields["draft_q_vocab"], draft_lengths, ints, reals,
                       ("draft_q_counts", "draft_q_ids", "draft_q_probs"))
    ints.end()
    reals.end()
    steps = []
    for i in range(n):
        admission = None
        if fields["max_new_tokens"][i] > 0:
            sampling = SamplingParams(float(params["temperature"][i]), int(fields["top_k"][i]),
                                      float(params["top_p"][i]), int(keys[i, 1]))
            end_id = int(fields["end_id"][i])
            admission = Admission(int(fields["max_new_tokens"][i]), sampling, None if end_id == NO_VALUE else end_id,
                                  int(fields["min_length"][i]))
        keep = int(fields["keep_length"][i])
        steps.append(StepRequest(
            int(keys[i, 0]), inputs[i].tolist(),
            DraftTree(tuple(draft_ids[i].tolist()), tuple(draft_parents[i].tolist())), admission,
            keep_length=None if keep == NO_VALUE else keep, extra_tokens=int(fields["extra_tokens"][i]),
            candidates=int(fields["num_candidates"][i]), score_input=bool(fields["score_input"][i]),
            release=bool(fields["release"][i]), draft_q=draft_q[i], return_q=bool(fields["return_q"][i])))
    return steps


def error_kind(error: Exception) -> str:
    if isinstance(error, AdmissionError):
        return ServingError.UNAVAILABLE if error.retryable else ServingError.INVALID
    if isinstance(error, ValueError):  # StepError: the request is malformed
        return ServingError.INVALID
    return getattr(error, "kind", ServingError.INTERNAL)


def pack_results(results: list[StepResult | Exception]) -> dict[str, np.ndarray]:
    done = [r if isinstance(r, StepResult) else StepResult([], [], [], []) for r in results]
    q_vocab, q_counts, q_ids, q_probs = _sparse_q([r.q for r in done])
    fields = [dict(output_length=len(r.tokens), q_rows=0 if r.q is None else len(r.q), q_vocab=vocab)
              for r, vocab in zip(done, q_vocab)]
    errors = [("", "") if isinstance(r, StepResult) else (error_kind(r), str(r)) for r in results]
    return {
        "result_ints": _packed("result_ints", ENGINE_RESULT_FIELDS, fields, ENGINE_RESULT_SECTIONS,
                               output_ids=[t for r in done for t in r.tokens],
                               top_ids=[t for r in done for row in r.top_ids for t in row],
                               output_q_counts=q_counts, output_q_ids=q_ids),
        "result_reals": _packed("result_reals", (), [], ENGINE_RESULT_REALS,
                                output_probs=[p for r in done for p in r.probs],
                                top_probs=[p for r in done for row in r.top_probs for p in row],
                                input_logprob=[r.input_logprob for r in done], output_q_probs=q_probs),
        "result_errors": np.array([text.encode() for error in errors for text in error], np.object_),
    }


def unpack_results(arrays: dict[str, np.ndarray], steps: list[StepRequest],
                   engine_name: str) -> list[StepResult | ServingError]:
    n = len(steps)
    ints, reals = _Reader("result_ints", arrays), _Reader("result_reals", arrays)
    fields = ints.header(n, ENGINE_RESULT_FIELDS)
    lengths = _lengths("result_ints", fields, "output_length")
    widths = np.array([s.candidates for s in steps], np.int64)
    tokens, top_ids = ints.split("output_ids", lengths), ints.split("top_ids", lengths * widths)
    probs, top_probs = reals.split("output_probs", lengths), reals.split("top_probs", lengths * widths)
    input_logprob = reals.take("input_logprob", n)
    q = _dense_q(fields["q_vocab"], fields["q_rows"], ints, reals,
                 ("output_q_counts", "output_q_ids", "output_q_probs"))
    errors = np.asarray(arrays["result_errors"]).reshape(n, len(ENGINE_ERRORS))
    results = []
    for i, step in enumerate(steps):
        kind, message = (text.decode() if isinstance(text, bytes) else str(text) for text in errors[i])
        if kind:
            results.append(ServingError(f"{engine_name}: {message}", kind))
            continue
        n_i = int(lengths[i])
        results.append(StepResult(tokens[i].tolist(), probs[i].tolist(), top_ids[i].reshape(n_i, widths[i]).tolist(),
                                  top_probs[i].reshape(n_i, widths[i]).tolist(), float(input_logprob[i]), q[i]))
    return results
