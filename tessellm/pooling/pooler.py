"""The runner side of pooling: a step's final hidden states -> pooled vectors.

A pooling request is a prompt only: the scheduler runs it in chunks like any prefill, and the
step holding its last prompt token finishes it. Per request of a step (rows laid out as the
runner's flat batch, ``query_start_loc``)::

    request   computed  this step          rows of hidden    pooled
    A         0         a0..a3 (whole)     0..3              LAST: row 3; MEAN: sum(0..3)/4; CLS: row 0
    B         0         b0..b4 (chunk 1/2) 4..8              MEAN keeps sum(4..8); CLS keeps row 4
    B (next)  5         b5..b6 (chunk 2/2) 0..1 of its step  MEAN: (kept + sum)/7; CLS: the kept row

Invariants: a request's partial state (a running float32 sum, or the first token's row) lives
here from its first chunk to its last, and goes when the scheduler drops the request
(finished, aborted, preempted: a preempted one restarts from token 0, since MEAN and CLS run
without prefix caching, ``PoolerConfig.prefix_caching_ok``). Plain torch on the hidden states'
device: no backend op is needed. A classifier's ``head`` (the model's ``classify``: its score
linear) maps the pooled rows of the finished requests to logits before they leave the device.

Per-token tasks (``token_embed``, ``token_classify``: vLLM's ALL pooling) keep a row per prompt
token instead. Each step copies a request's rows to the host (float32; through the head first
for ``token_classify``, so a row is ``num_labels`` wide), and the step with its last prompt token
joins them and sends them as bytes (``pack_rows``)::

    request   this step          host chunks kept         sent
    T         t0..t4 (chunk 1)   [rows 0..4]              -
    T (next)  t5..t6 (chunk 2)   [rows 0..4, rows 5..6]   {"shape": [7, width], "data": ...}

Host memory, not device memory: a long prompt's rows (tokens x hidden x 4 bytes) would crowd
the KV cache. Such a request never reads the prefix cache (``Request.computes_every_prompt_token``),
so its rows start at token 0; they go when it ends, is aborted or preempted, as a partial sum does.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import numpy as np
import torch

from tessellm.pooling.config import PoolerConfig


class Pooler:
    def __init__(self, config: PoolerConfig, head: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        self.config = config
        self.head = head  # classify: pooled [B, H] -> logits [B, num_labels]; None: embeddings
        self.partial: dict[str, torch.Tensor] = {}  # request id -> MEAN's running sum / CLS's row
        self.token_rows: dict[str, list[torch.Tensor]] = {}  # per-token task: host chunks so far

    def drop(self, request_ids: Iterable[str]) -> None:
        for rid in request_ids:
            self.partial.pop(rid, None)
            self.token_rows.pop(rid, None)

    def __call__(self, hidden: torch.Tensor, query_start_loc: np.ndarray, states, counts) -> dict:
        """Pool one step. ``states``: the runner's requests in row order, their computed counts
        before this step; ``counts``: their tokens this step. Returns request id -> pooled
        vector (float32 values) for each request whose prompt ends in this step, or its rows
        (``pack_rows``) for a per-token task."""
        starts = query_start_loc[:-1].tolist()
        per_token = [i for i, st in enumerate(states) if is_token_task(st.pooling_task)]
        out = self._token_rows(hidden, starts, states, counts, per_token) if per_token else {}
        if len(per_token) == len(states):
            return out
        return {**out, **self._pool_sequences(hidden, starts, states, counts, set(per_token))}

    def _token_rows(self, hidden, starts, states, counts, which: list[int]) -> dict:
        """Every prompt row of the per-token requests ``which``; packed at their last chunk."""
        rows = [hidden[starts[i]:starts[i] + counts[i]].float() for i in which]
        if self.head is not None:  # token_classify: the score head on each row, on the device
            rows = list(torch.split(self.head(torch.cat(rows)), [counts[i] for i in which]))
        host = torch.cat(rows).cpu().split([counts[i] for i in which])  # the step's one copy
        out = {}
        for i, chunk in zip(which, host):
            st = states[i]
            kept = self.token_rows.pop(st.request_id, [])
            if len(kept) == 0 and st.num_computed_tokens != 0:
                raise RuntimeError(f"Per-token pooling of request {st.request_id!r} starts at token "
                                   f"{st.num_computed_tokens}, not 0; its first rows were never computed.")
            if st.num_computed_tokens + counts[i] >= st.num_prompt_tokens:
                out[st.request_id] = pack_rows(torch.cat(kept + [chunk]) if kept else chunk)
            else:  # its own copy: a view would keep the whole step's rows alive
                self.token_rows[st.request_id] = kept + [chunk.clone()]
        return out

    def _pool_sequences(self, hidden, starts, states, counts, skip: set[int]) -> dict[str, list[float]]:
        """LAST / MEAN / CLS for the requests not in ``skip`` (the per-token ones)."""
        kind = self.config.pooling_type
        final = [i for i, (st, n) in enumerate(zip(states, counts))
                 if i not in skip and st.num_computed_tokens + n >= st.num_prompt_tokens]
        ends = set(final)
        if kind == "LAST":
            rows = [starts[i] + counts[i] - 1 for i in final]
            return self._emit(states, final, hidden[rows].float() if rows else None)
        if kind == "CLS":
            for i, st in enumerate(states):
                if st.num_computed_tokens == 0 and i not in skip:
                    self.partial[st.request_id] = hidden[starts[i]].float()
            vectors = [self._take(states[i]) for i in final]
            return self._emit(states, final, torch.stack(vectors) if vectors else None)
        # MEAN: one segment sum over the step's rows, added to each request's running sum
        segment = torch.from_numpy(np.repeat(np.arange(len(counts)), counts)).to(hidden.device)
        sums = torch.zeros(len(counts), hidden.shape[-1], dtype=torch.float32, device=hidden.device)
        sums.index_add_(0, segment, hidden[:len(segment)].float())
        vectors = []
        for i, st in enumerate(states):
            if i in skip:
                continue
            total = sums[i] if st.num_computed_tokens == 0 else self._take(st) + sums[i]
            if i in ends:
                vectors.append(total / st.num_prompt_tokens)
            else:
                self.partial[st.request_id] = total
        return self._emit(states, final, torch.stack(vectors) if vectors else None)

    def _take(self, st) -> torch.Tensor:
        value = self.partial.pop(st.request_id, None)
        if value is None:  # its first rows were never seen here (a prefix-cache hit)
            raise RuntimeError(f"{self.config.pooling_type} pooling of request {st.request_id!r} "
                               f"starts at token {st.num_computed_tokens}, not 0; it needs every "
                               "prompt token computed (prefix caching must be off).")
        return value

    def _emit(self, states, final: list[int], vectors) -> dict[str, list[float]]:
        if vectors is None:
            return {}
        if self.head is not None:
            vectors = self.head(vectors)
        host = vectors.cpu().tolist()  # the step's one host sync, for the finished requests
        return {states[i].request_id: v for i, v in zip(final, host)}


def is_token_task(task) -> bool:
    """``token_embed`` / ``token_classify``: a row per prompt token, not one vector."""
    return task is not None and task.startswith("token_")


def pack_rows(rows: torch.Tensor) -> dict:
    """A per-token result for the step boundary (msgpack-safe): float32 bytes and their shape."""
    array = rows.numpy().astype("<f4", copy=False)
    return {"shape": list(array.shape), "data": array.tobytes()}


def unpack_rows(packed: dict) -> np.ndarray:
    """``pack_rows``' inverse: a float32 array [tokens, width]."""
    return np.frombuffer(packed["data"], dtype="<f4").reshape(packed["shape"])
