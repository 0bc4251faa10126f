"""M-RoPE positions (Qwen2-VL): each token's (temporal, height, width) rotary positions, per
request, for the runner of a model that declares ``uses_mrope``.

A prompt's positions, computed once from its token count and its images' spans and grids::

    tokens:    t0 t1 t2 [ image: 2 x 3 merged grid ] t9 t10
    temporal:  0  1  2   3  3  3  3  3  3            6  7
    height:    0  1  2   3  3  3  4  4  4            6  7
    width:     0  1  2   3  4  5  3  4  5            6  7
                                                     ^ max + 1 = 3 + max(t, h, w)

    delta = (max position + 1) - prompt length   (here 8 - 11 = -3; <= 0)

Every token after the prompt (generated ones, and prompt text past the last image) sits at
``sequence position + delta`` on all three axes, so the runner keeps only the prompt's image
region as a table and the delta as a number. The KV cache's slots stay those of the sequence
position: only the rotation sees these.

A video (Qwen2-VL family) is a grid of ``t`` temporal steps (two frames each): its temporal
axis counts the steps (Qwen2-VL) or the steps times ``time_interval`` (Qwen2.5-VL: 2 per second
at 2 fps, ``tokens_per_second * seconds per step``); the text after a video continues at its
largest position + 1, as Qwen's reference and vLLM do. (transformers 5 continues at the
video's start + max(h, w) instead, which differs only when the temporal positions run past
the spatial ones.)

Invariant: for a fixed prompt (token ids and images) the positions are fixed, so prefix-cache
hits, chunked prefill and preemption (recomputed on resume) see the same rotation HF's
``get_rope_index`` gives the whole prompt.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np


def prompt_positions(num_tokens: int, features: Sequence, merge: int) -> tuple[np.ndarray, int]:
    """(``[3, end of the last image]`` int64 positions of the prompt up to its last image's
    end, the delta). ``features``: the prompt's images (offset, length, grid_thw)."""
    end = max(f.end for f in features)
    out = np.empty((3, end), dtype=np.int64)
    nxt, i = 0, 0  # next free position; next prompt index
    for f in sorted(features, key=lambda f: f.offset):
        out[:, i:f.offset] = nxt + np.arange(f.offset - i)
        nxt += f.offset - i
        t, h, w = (int(v) for v in f.grid_thw)
        h, w = h // merge, w // merge
        if t * h * w != f.length:
            raise ValueError(f"An image of grid {list(f.grid_thw)} has {t * h * w} merged patches "
                             f"but {f.length} placeholder tokens; preprocess it with the model's "
                             "image processor.")
        times = _temporal(t, getattr(f, "time_interval", None))
        grid = np.stack(np.meshgrid(times, np.arange(h), np.arange(w), indexing="ij"))
        out[:, f.offset:f.end] = nxt + grid.reshape(3, -1)
        nxt += max(int(times[-1]) + 1, h, w)  # the text after it: its largest position + 1
        i = f.end
    return out, nxt + (num_tokens - end) - num_tokens


def _temporal(t: int, interval) -> np.ndarray:
    """A grid's temporal positions: 0..t-1 (an image; Qwen2-VL's video), or a video's grid
    steps times its ``time_interval`` rounded down (Qwen2.5-VL: tokens_per_second * seconds
    per grid step, e.g. 2 * 1.0 -> 0 2 4 ...), as HF's ``get_vision_position_ids``."""
    if interval is None:
        return np.arange(t)
    return (np.arange(t, dtype=np.float64) * interval).astype(np.int64)


class MRopePositions:
    """Per running request: its prompt table (None without images), delta (0 without) and the
    table's end. The runner calls ``drop`` with the requests it forgets (finished, preempted)
    and ``positions`` once per step."""

    def __init__(self, merge: int):
        self.merge = merge
        self.prompts: dict[str, tuple] = {}  # request id -> (table or None, delta, table end)

    def drop(self, request_ids: Iterable[str]) -> None:
        for rid in request_ids:
            self.prompts.pop(rid, None)

    def _add(self, state) -> tuple:
        entry = (None, 0, 0)
        if state.mm_features:
            table, delta = prompt_positions(state.num_prompt_tokens, state.mm_features, self.merge)
            entry = (table, delta, table.shape[1])
        self.prompts[state.request_id] = entry
        return entry

    def positions(self, states: Sequence, counts: Sequence[int], seq_positions: np.ndarray,
                  query_start_loc: np.ndarray) -> np.ndarray:
        """The step's rotary positions: ``[3, T]`` when a row of the step is an image token
        (exactly the steps the encoder cache gives image features to), else ``[T]``."""
        get = self.prompts.get
        entries = [get(st.request_id) or self._add(st) for st in states]
        s = len(states)
        deltas = np.fromiter((e[1] for e in entries), dtype=np.int64, count=s)
        if not deltas.any():  # text only, or images whose delta is 0 (still table rows below)
            flat = seq_positions
        else:
            flat = seq_positions + (deltas if len(seq_positions) == s else np.repeat(deltas, counts))
        ends = np.fromiter((e[2] for e in entries), dtype=np.int64, count=s)
        firsts = seq_positions[query_start_loc[:-1]]  # each request's first position this step
        inside = np.flatnonzero(firsts < ends)  # requests computing rows of their prompt table
        if not len(inside):
            return flat
        out = np.repeat(flat[None], 3, axis=0)
        images = False  # some row of the step is an image token (else t = h = w everywhere)
        for i in inside.tolist():
            table, c = entries[i][0], int(firsts[i])
            n = min(c + counts[i], table.shape[1]) - c
            row = int(query_start_loc[i])
            out[:, row:row + n] = table[:, c:c + n]
            images = images or any(f.offset < c + n and c < f.end for f in states[i].mm_features)
        return out if images else out[0].copy()
