"""The ENGINE contract's codec: a batch of engine steps <-> flat arrays, and their results back.

Both sides of a call use it (the `cosine` process packs steps and unpacks results, the engine model the reverse),
so the flattening is written once. Arrays carry no batch dimension here; the transport adds it."""
from __future__ import annotations

import numpy as np
import torch

from ..contract import DEPLOYMENT_SECRET, ENGINE
from ..engine.engine import Admission, StepRequest, StepResult
from ..engine.kv_cache import AdmissionError
from ..engine.sampling import SamplingParams
from ..speculation.tree import DraftTree
from .errors import ServingError

NO_VALUE = -1  # keep_length: keep everything; end_id: none
STEP_INPUTS = tuple(t.name for t in ENGINE.inputs if t.name != DEPLOYMENT_SECRET)  # the secret is the caller's


def _array(name: str, values) -> np.ndarray:
    spec = next(t for t in (*ENGINE.inputs, *ENGINE.outputs) if t.name == name)
    return np.asarray(values, dtype=spec.numpy_dtype).reshape(-1)


def _split(flat: np.ndarray, lengths) -> list[np.ndarray]:
    return np.split(flat, np.cumsum(lengths)[:-1]) if len(lengths) else []


def _sparse_q(prefix: str, q: list[torch.Tensor | None]) -> dict[str, np.ndarray]:
    """Per sequence its q ([rows, vocab], or None) as the contract's sparse arrays `<prefix>_vocab`, `_counts`,
    `_ids`, `_probs`: a sampled q is zero outside its top-k / top-p support, so only that travels (lossless)."""
    present = [rows for rows in q if rows is not None]
    dense = torch.cat(present) if present else torch.zeros(0, 0)
    row, column = dense.nonzero(as_tuple=True)  # row-major: each row's entries together, in order
    return {f"{prefix}_vocab": _array(f"{prefix}_vocab", [0 if rows is None else rows.shape[1] for rows in q]),
            f"{prefix}_counts": _array(f"{prefix}_counts", torch.bincount(row, minlength=len(dense))),
            f"{prefix}_ids": _array(f"{prefix}_ids", column),
            f"{prefix}_probs": _array(f"{prefix}_probs", dense[row, column])}


def _dense_q(values: dict[str, np.ndarray], prefix: str, rows: np.ndarray) -> list[torch.Tensor | None]:
    """The inverse of _sparse_q, given each sequence's row count; raises ValueError naming the array."""
    vocab, counts = values[f"{prefix}_vocab"], values[f"{prefix}_counts"]
    ids, probs = values[f"{prefix}_ids"].astype(np.int64), values[f"{prefix}_probs"].astype(np.float32)
    rows = np.where(vocab > 0, rows, 0)
    if len(counts) != rows.sum() or (counts < 0).any():
        raise ValueError(f"{prefix}_counts: expected one count per q row ({rows.sum()}), got {len(counts)}")
    if not len(ids) == len(probs) == counts.sum():
        raise ValueError(f"{prefix}_ids, {prefix}_probs: {len(ids)} and {len(probs)} entries where "
                         f"{prefix}_counts sums to {counts.sum()}")
    row_of_entry = np.repeat(np.arange(len(counts)), counts)
    width_of_row = np.repeat(vocab, rows)
    if len(ids) and not ((ids >= 0) & (ids < width_of_row[row_of_entry])).all():
        raise ValueError(f"{prefix}_ids: token ids must be in [0, the sequence's {prefix}_vocab)")
    # every sequence's rows in one tensor, as wide as the widest vocabulary; each takes its rows and columns
    dense = torch.zeros(len(counts), int(vocab.max(initial=0)))
    dense[torch.from_numpy(row_of_entry), torch.from_numpy(ids)] = torch.from_numpy(probs)
    blocks = iter(dense.split(rows[rows > 0].tolist()))
    return [next(blocks)[:, :width] if n else None for n, width in zip(rows.tolist(), vocab.tolist())]


def pack_steps(steps: list[StepRequest]) -> dict[str, np.ndarray]:
    admissions = [step.admission for step in steps]
    params = [a.params if a else SamplingParams() for a in admissions]
    return {
        "sequence_id": _array("sequence_id", [s.sequence_id for s in steps]),
        "input_ids": _array("input_ids", [t for s in steps for t in s.input_ids]),
        "input_lengths": _array("input_lengths", [len(s.input_ids) for s in steps]),
        "draft_ids": _array("draft_ids", [t for s in steps for t in s.draft.tokens]),
        "draft_parents": _array("draft_parents", [p for s in steps for p in s.draft.parents]),
        "draft_lengths": _array("draft_lengths", [len(s.draft) for s in steps]),
        "keep_length": _array("keep_length", [NO_VALUE if s.keep_length is None else s.keep_length for s in steps]),
        "extra_tokens": _array("extra_tokens", [s.extra_tokens for s in steps]),
        "num_candidates": _array("num_candidates", [s.candidates for s in steps]),
        "score_input": _array("score_input", [s.score_input for s in steps]),
        "max_new_tokens": _array("max_new_tokens", [a.max_new_tokens if a else 0 for a in admissions]),
        "temperature": _array("temperature", [p.temperature for p in params]),
        "top_k": _array("top_k", [p.top_k for p in params]),
        "top_p": _array("top_p", [p.top_p for p in params]),
        "random_seed": _array("random_seed", [p.seed or 0 for p in params]),
        "end_id": _array("end_id", [NO_VALUE if a is None or a.end_id is None else a.end_id for a in admissions]),
        "min_length": _array("min_length", [a.min_length if a else 0 for a in admissions]),
        "release": _array("release", [s.release for s in steps]),
        **_sparse_q("draft_q", [s.draft_q for s in steps]),
        "return_q": _array("return_q", [s.return_q for s in steps]),
    }


def unpack_steps(arrays: dict[str, np.ndarray]) -> list[StepRequest]:
    """Raises ValueError naming the input when the arrays do not describe a batch of steps."""
    values = {name: np.asarray(arrays[name]).reshape(-1) for name in STEP_INPUTS}
    n = len(values["sequence_id"])
    for name, array in values.items():
        if name not in ("input_ids", "draft_ids", "draft_parents", "draft_q_counts", "draft_q_ids",
                        "draft_q_probs") and len(array) != n:
            raise ValueError(f"{name}: expected one value per sequence ({n}), got {len(array)}")
    for flat, lengths in (("input_ids", "input_lengths"), ("draft_ids", "draft_lengths"),
                          ("draft_parents", "draft_lengths")):
        if (values[lengths] < 0).any() or values[lengths].sum() != len(values[flat]):
            raise ValueError(f"{flat}: {len(values[flat])} values but {lengths} sums to {values[lengths].sum()}")
    draft_q = _dense_q(values, "draft_q", values["draft_lengths"])
    inputs = _split(values["input_ids"], values["input_lengths"])
    draft_ids = _split(values["draft_ids"], values["draft_lengths"])
    draft_parents = _split(values["draft_parents"], values["draft_lengths"])
    steps = []
    for i in range(n):
        admission = None
        if values["max_new_tokens"][i] > 0:
            params = SamplingParams(float(values["temperature"][i]), int(values["top_k"][i]),
                                    float(values["top_p"][i]), int(values["random_seed"][i]))
            end_id = int(values["end_id"][i])
            admission = Admission(int(values["max_new_tokens"][i]), params, None if end_id == NO_VALUE else end_id,
                                  int(values["min_length"][i]))
        keep = int(values["keep_length"][i])
        steps.append(StepRequest(
            int(values["sequence_id"][i]), inputs[i].tolist(),
            DraftTree(tuple(draft_ids[i].tolist()), tuple(draft_parents[i].tolist())), admission,
            keep_length=None if keep == NO_VALUE else keep, extra_tokens=int(values["extra_tokens"][i]),
            candidates=int(values["num_candidates"][i]), score_input=bool(values["score_input"][i]),
            release=bool(values["release"][i]),
            draft_q=draft_q[i],
            return_q=bool(values["return_q"][i])))
    return steps


def error_kind(error: Exception) -> str:
    if isinstance(error, AdmissionError):
        return ServingError.UNAVAILABLE if error.retryable else ServingError.INVALID
    if isinstance(error, ValueError):  # StepError: the request is malformed
        return ServingError.INVALID
    return getattr(error, "kind", ServingError.INTERNAL)


def pack_results(results: list[StepResult | Exception]) -> dict[str, np.ndarray]:
    done = [r if isinstance(r, StepResult) else StepResult([], [], [], []) for r in results]
    return {
        "output_ids": _array("output_ids", [t for r in done for t in r.tokens]),
        "output_lengths": _array("output_lengths", [len(r.tokens) for r in done]),
        "output_probs": _array("output_probs", [p for r in done for p in r.probs]),
        "top_ids": _array("top_ids", [t for r in done for row in r.top_ids for t in row]),
        "top_probs": _array("top_probs", [p for r in done for row in r.top_probs for p in row]),
        "input_logprob": _array("input_logprob", [r.input_logprob for r in done]),
        "output_q_rows": _array("output_q_rows", [0 if r.q is None else len(r.q) for r in done]),
        **_sparse_q("output_q", [r.q for r in done]),
        "error_kind": np.array([b"" if isinstance(r, StepResult) else error_kind(r).encode() for r in results],
                               np.object_),
        "error_message": np.array([b"" if isinstance(r, StepResult) else str(r).encode() for r in results],
                                  np.object_),
    }


def unpack_results(arrays: dict[str, np.ndarray], steps: list[StepRequest],
                   engine_name: str) -> list[StepResult | ServingError]:
    values = {name: np.asarray(array).reshape(-1) for name, array in arrays.items()}
    lengths = values["output_lengths"]
    widths = [s.candidates for s in steps]
    tokens = _split(values["output_ids"], lengths)
    probs = _split(values["output_probs"], lengths)
    top_ids = _split(values["top_ids"], [n * w for n, w in zip(lengths, widths)])
    top_probs = _split(values["top_probs"], [n * w for n, w in zip(lengths, widths)])
    q = _dense_q(values, "output_q", values["output_q_rows"])
    results = []
    for i, step in enumerate(steps):
        kind = values["error_kind"][i]
        kind = kind.decode() if isinstance(kind, bytes) else str(kind)
        if kind:
            message = values["error_message"][i]
            message = message.decode() if isinstance(message, bytes) else str(message)
            results.append(ServingError(f"{engine_name}: {message}", kind))
            continue
        n = int(lengths[i])
        results.append(StepResult(tokens[i].tolist(), probs[i].tolist(),
                                  top_ids[i].reshape(n, widths[i]).tolist(),
                                  top_probs[i].reshape(n, widths[i]).tolist(), float(values["input_logprob"][i]),
                                  q[i]))
    return results
