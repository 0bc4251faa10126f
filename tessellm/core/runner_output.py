"""From a resolved step's sampled ids to the runner's output: draft acceptance, logprobs,
prompt logprobs.

Verification of k drafts (rows r0..rk, sampled by the target model at each draft's position)::

    drafts:   d0  d1  d2
    sampled:  d0  d1  x   y      -> accepted [d0, d1, x]: drafts while they equal the target's
                                    sample, then the target's own token (x); y is dropped

Each row is the target's sample given the accepted prefix, so accepted tokens follow the
target's distribution exactly (greedy: its argmax). The K/V of rejected drafts sits in slots
past the accepted length: the scheduler frees their blocks (``BlockManager.truncate``) and
tells the runner with its next step (``SchedulerOutput.kept_blocks``, ``InputBatch.apply``).
"""

from __future__ import annotations

from typing import Optional

import torch

from tessellm.core.sampler import upload
from tessellm.core.step_pipeline import StepHandle


def accept(drafts: list[int], sampled: list[int], force: bool = False) -> list[int]:
    """The accepted tokens of one request: matching drafts, then the target's next token.
    ``force`` (the replay proposer's benchmark mode ``force_accept``): every draft, then the
    target's token after the last one, whatever the target sampled at the drafts' rows."""
    if force:
        return list(drafts) + [sampled[len(drafts)]]
    for j, draft in enumerate(drafts):
        if sampled[j] != draft:
            return sampled[:j + 1]
    return sampled[:len(drafts) + 1]


def collect(handle: StepHandle, tokens: list[int], force_accept: bool = False) -> None:
    """Put a resolved step's tokens into the requests' states and its output. ``force_accept``:
    every draft is accepted (``accept``; benchmark mode of replay)."""
    result, out, start = handle.sampled, handle.out, handle.sample_start
    lp = _host_logprobs(result)
    nans = result.num_nans.tolist() if result.num_nans is not None else None
    for i, state in enumerate(handle.states):
        first, end = start[i], start[i + 1]
        if nans is not None and any(nans[first:end]):
            out.num_nans_in_logits[state.request_id] = sum(nans[first:end])
        if end - first == 1:
            accepted = [tokens[first]]
        else:
            accepted = accept(state.spec_token_ids, tokens[first:end], force_accept)
            state.spec_token_ids = []
        state.token_ids.extend(accepted)
        out.sampled[state.request_id] = accepted
        if lp is not None:  # some row asked logprobs (None: a batch without them looks at none)
            k, ids = state.params.logprobs, state.params.logprob_token_ids
            if k is not None or ids:
                out.logprobs[state.request_id] = [(tok, lp[0][r], lp[1][r],
                                                   _ids_top(lp, r, ids) if ids else _top(lp, r, k))
                                                  for r, tok in zip(range(first, end), accepted)]
        if state.prompt_logprobs and len(state.prompt_logprobs) == state.num_prompt_tokens - 1:
            out.prompt_logprobs[state.request_id] = [None] + state.prompt_logprobs
            state.prompt_logprobs = []
        if state.prompt_id_rows and len(state.prompt_id_rows) == num_scored_rows(state):
            out.prompt_token_id_logprobs[state.request_id] = state.prompt_id_rows
            state.prompt_id_rows = []


def _host_logprobs(result) -> Optional[tuple]:
    """The step's logprobs as host lists: sampled logprobs, ranks, the top-k ids and values
    (None: no row asked a top k), and {row: (ids, values)} of the whole-vocabulary rows."""
    if result.sampled_logprob is None:
        return None
    full = {}
    if result.full_rows:
        full = dict(zip(result.full_rows, zip(result.full_ids.tolist(), result.full_logprobs.tolist())))
    ids = {}
    if result.id_rows:
        ids = dict(zip(result.id_rows, result.id_logprobs.tolist()))
    return (result.sampled_logprob.tolist(), result.sampled_rank.tolist(),
            result.topk_ids.tolist() if result.topk_ids is not None else None,
            result.topk_logprobs.tolist() if result.topk_logprobs is not None else None, full, ids)


def _ids_top(lp: tuple, row: int, ids: list[int]) -> list:
    """Row ``row``'s (id, logprob) pairs of the request's ``logprob_token_ids``, in its order."""
    return list(zip(ids, lp[5][row]))  # zip stops at len(ids): the padding is dropped


def _top(lp: tuple, row: int, k: int) -> list:
    """Row ``row``'s top ``k`` (id, logprob) pairs, best first."""
    if row in lp[4]:
        ids, values = lp[4][row]
        return list(zip(ids[:k], values[:k]))
    return list(zip(lp[2][row][:k], lp[3][row][:k])) if k and lp[2] is not None else []


def prompt_logprobs(model, hidden: torch.Tensor, rows: list, chunk: int = 256) -> None:
    """Logprobs of each prompt token given the ones before it, accumulated over steps; at most
    ``chunk`` rows of logits at a time (``[rows, vocab]`` float32 twice over: a 16384-token
    prompt chunk of a 128k vocabulary would take ~20 GiB at once; the memory profile covers
    the sampler at ``chunk`` rows, core/memory_profile.py)."""
    chunk = max(1, chunk)
    for state, row0, start, n in rows:
        for i in range(0, n, chunk):
            _prompt_logprobs(model, hidden, state, row0 + i, start + i, min(chunk, n - i))


def _prompt_logprobs(model, hidden: torch.Tensor, state, row0: int, start: int, n: int) -> None:
    """``n`` prompt rows from ``row0`` (prompt positions from ``start``) into ``state``: the
    prompt logprobs (``state.prompt_logprobs``) and the prefill scores of
    ``prompt_logprob_token_ids`` at positions from ``prompt_logprob_start`` (one gather,
    ``state.prompt_id_rows``)."""
    params = state.params
    logits = model.compute_logits(hidden[row0:row0 + n]).float()
    logprobs = torch.log_softmax(logits, dim=-1)
    if params.prompt_logprob_token_ids is not None:
        first = params.prompt_logprob_start or 0
        skip = max(0, first - start)
        if skip < n:
            state.prompt_id_rows.extend(_gather_ids(logprobs[skip:], params, start + skip - first))
    k = params.prompt_logprobs
    if k is None:
        return
    targets = state.token_ids[start + 1:start + 1 + n]  # on the host already
    chosen = logprobs.gather(-1, upload(targets, logits.device)[:, None])
    ranks = ((logprobs > chosen).sum(-1) + 1).tolist()  # one read per chunk for each result,
    values = chosen[:, 0].tolist()  # not one per row and field
    top_lp, top_ids = logprobs.topk(k, dim=-1) if k else (None, None)
    top_lp, top_ids = (top_lp.tolist(), top_ids.tolist()) if k else ([[]] * n, [[]] * n)
    for j in range(n):
        state.prompt_logprobs.append((targets[j], values[j], ranks[j], list(zip(top_ids[j], top_lp[j]))))


def _gather_ids(logprobs: torch.Tensor, params, row: int) -> list:
    """The logprobs of ``prompt_logprob_token_ids`` at these rows, scored row ``row`` first:
    one id list for every row, or (per row) each row's own ids, -1 padding scoring -inf."""
    ids = params.prompt_logprob_token_ids
    if not params.prompt_ids_per_row:
        return logprobs[:, upload(ids, logprobs.device)].tolist()
    ids = upload(ids[row:row + logprobs.shape[0]], logprobs.device)
    picked = logprobs.gather(1, ids.clamp(min=0))
    return picked.masked_fill(ids < 0, float("-inf")).tolist()


def num_scored_rows(state) -> int:
    """The prompt rows ``prompt_logprob_token_ids`` scores: ``prompt_logprob_start`` to the row
    before the last (row i predicts prompt token i + 1; the last row predicts the output)::

        prompt:  t0 t1 t2 t3 t4      start = 2
        rows:          r2 r3         -> 2 rows, scoring t3 and t4
    """
    if state.params.prompt_logprob_token_ids is None:
        return 0
    return max(0, state.num_prompt_tokens - 1 - (state.params.prompt_logprob_start or 0))
