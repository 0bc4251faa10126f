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

    def drop(self, request_ids: Iterable[str]) -> None:
        for rid in request_ids:
            self.partial.pop(rid, None)

    def __call__(self, hidden: torch.Tensor, query_start_loc: np.ndarray, states, counts) -> dict[str, list[float]]:
        """Pool one step. ``states``: the runner's requests in row order, their computed counts
        before this step; ``counts``: their tokens this step. Returns request id -> pooled
        vector (float32 values) for each request whose prompt ends in this step."""
        kind = self.config.pooling_type
        starts = query_start_loc[:-1].tolist()
        final = [i for i, (st, n) in enumerate(zip(states, counts))
                 if st.num_computed_tokens + n >= st.num_prompt_tokens]
        ends = set(final)
        if kind == "LAST":
            rows = [starts[i] + counts[i] - 1 for i in final]
            return self._emit(states, final, hidden[rows].float() if rows else None)
        if kind == "CLS":
            for i, st in enumerate(states):
                if st.num_computed_tokens == 0:
                    self.partial[st.request_id] = hidden[starts[i]].float()
            vectors = [self._take(states[i]) for i in final]
            return self._emit(states, final, torch.stack(vectors) if vectors else None)
        # MEAN: one segment sum over the step's rows, added to each request's running sum
        segment = torch.from_numpy(np.repeat(np.arange(len(counts)), counts)).to(hidden.device)
        sums = torch.zeros(len(counts), hidden.shape[-1], dtype=torch.float32, device=hidden.device)
        sums.index_add_(0, segment, hidden[:len(segment)].float())
        vectors = []
        for i, st in enumerate(states):
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
