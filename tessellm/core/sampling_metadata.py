"""Builds the sampler's per-row inputs (``SamplingBatch``) for one step's sampled rows.

A row is one sampled token: a request sampling k+1 rows (k drafts) gives k+1 rows with the
same parameters, each at its own output position (seeds and min_tokens follow the position)::

    rows:        A0   B0   B1   B2        (A samples 1 row, B verifies 2 drafts)
    out_pos:     7    3    4    5         output index of the token each row samples

Per-step Python work is per row (one per request without drafts), never per vocabulary entry.
Every host list reaches the device through ``sampler.upload`` (pinned, non-blocking on CUDA):
building a batch queues copies behind the step's forward and never waits for it.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from tessellm.core.input_batch import RunnerRequest
from tessellm.core.sampler import SamplingBatch, seed_for_position, upload, upload_tensor
from tessellm.reasoning.budget import forced_token


def build_sampling_batch(rows: Sequence[RunnerRequest], out_pos: Callable[[int], int], device: torch.device,
                         vocab_size: int, eos_token_ids: tuple[int, ...], budgets: bool = True,
                         id_logprobs: bool = True) -> SamplingBatch:
    """``rows[i]`` samples the token at output index ``out_pos(i)`` (0 = first output token);
    asked only for rows with a seed, ``min_tokens``, bad words or a thinking budget.
    ``budgets`` / ``id_logprobs`` False: no row has a thinking budget / logprob_token_ids (the
    runner knows it from ``InputBatch.with_budget`` / ``with_id_logprobs``), so their rows are
    not looked at: a batch without them pays nothing per row for them."""
    params = [r.params for r in rows]
    all_greedy = all(p.is_greedy for p in params)
    f32 = torch.float32
    temperature = None if all_greedy else upload(
        [0.0 if p.is_greedy else p.temperature for p in params], device, f32)
    top_k = top_p = min_p = None
    if not all_greedy:
        if any(p.top_k > 0 for p in params):
            top_k = upload([p.top_k or vocab_size for p in params], device)
        if any(p.top_p < 1.0 for p in params):
            top_p = upload([p.top_p for p in params], device, f32)
        if any(p.min_p > 0 for p in params):
            min_p = upload([p.min_p for p in params], device, f32)
    batch = SamplingBatch(temperature, all_greedy, top_p, top_k, min_p)
    if top_k is not None and all(p.top_k > 0 or p.is_greedy for p in params):
        batch.top_k_max = max(p.top_k for p in params)  # greedy rows take the argmax anyway
    if any(p.needs_penalties for p in params):
        _add_penalties(batch, rows, device, vocab_size)
    batch.logit_bias = [(i, list(p.logit_bias), list(p.logit_bias.values()))
                        for i, p in enumerate(params) if p.logit_bias] or None
    batch.banned = _banned(rows, out_pos, eos_token_ids) or None
    batch.forced = _forced(rows, out_pos) if budgets else None
    allowed = [i for i, p in enumerate(params) if p.allowed_token_ids]
    if allowed:
        batch.allowed_rows = allowed
        batch.allowed_masks = [_disallowed(rows[i], device, vocab_size) for i in allowed]
    batch.seeds = [(i, seed_for_position(p.seed, out_pos(i))) for i, p in enumerate(params)
                   if p.seed is not None and not p.is_greedy] or None
    _add_logprobs(batch, params, vocab_size, device, id_logprobs)
    return batch


def _add_logprobs(batch: SamplingBatch, params: list, vocab_size: int, device: torch.device,
                  id_logprobs: bool = True) -> None:
    """Rows asking the whole vocabulary (logprobs=-1, made ``vocab_size`` by the front end) go
    to ``full_logprob_rows``; ``max_num_logprobs`` is the others' largest count. Rows with
    ``logprob_token_ids`` ask no top k: their ids go to ``id_logprob_ids``, one padded row each
    (one host-to-device copy of ``rows x max ids`` ints a step)."""
    with_ids = [(i, p.logprob_token_ids) for i, p in enumerate(params) if p.logprob_token_ids] if id_logprobs else ()
    wanted = [(i, p.logprobs) for i, p in enumerate(params)
              if p.logprobs is not None and not p.logprob_token_ids]
    if not wanted and not with_ids:
        return
    full = [(i, k) for i, k in wanted if k >= vocab_size]
    batch.max_num_logprobs = max((k for _, k in wanted if k < vocab_size), default=0)
    if full:
        batch.full_logprob_rows = [i for i, _ in full]
        batch.full_num_logprobs = max(k for _, k in full)
    if with_ids:
        width = max(len(ids) for _, ids in with_ids)
        batch.id_logprob_rows = [i for i, _ in with_ids]
        batch.id_logprob_ids = upload([ids + [0] * (width - len(ids)) for _, ids in with_ids], device)


def _add_penalties(batch: SamplingBatch, rows: Sequence[RunnerRequest], device: torch.device,
                   vocab: int) -> None:
    """Penalties read each request's whole history on the host (the runner resolves every step
    in flight first). Requests with penalties verify no drafts (the scheduler sends none). The
    output and prompt ids of every row go up as two flat (row, token) uploads, scattered on
    the device::

        row 0 output [4 4 7], row 1 output [2]  ->  rows [0 0 0 1], tokens [4 4 7 2]
        counts[rows, tokens] += 1 (accumulate)      counts[0, 4] == 2
    """
    counts = torch.zeros(len(rows), vocab, dtype=torch.float32, device=device)
    prompt = torch.zeros(len(rows), vocab, dtype=torch.bool, device=device)
    out_rows, out_ids, prompt_rows, prompt_ids = [], [], [], []
    for i, r in enumerate(rows):
        out = r.token_ids[r.num_prompt_tokens:]
        out_rows += [i] * len(out)
        out_ids += out
        if not r.embeds_prompt:  # an embeddings prompt has no tokens (HF: inputs_embeds)
            prompt_rows += [i] * r.num_prompt_tokens
            prompt_ids += r.token_ids[:r.num_prompt_tokens]
    if out_ids:
        counts.index_put_((upload(out_rows, device), upload(out_ids, device)),
                          counts.new_ones(()), accumulate=True)
    if prompt_ids:
        prompt.index_put_((upload(prompt_rows, device), upload(prompt_ids, device)), prompt.new_ones(()))
    ps = [r.params for r in rows]
    batch.presence = upload([p.presence_penalty for p in ps], device, torch.float32)
    batch.frequency = upload([p.frequency_penalty for p in ps], device, torch.float32)
    batch.repetition = upload([p.repetition_penalty for p in ps], device, torch.float32)
    batch.output_counts, batch.prompt_mask = counts, prompt


def _banned(rows: Sequence[RunnerRequest], out_pos, eos_token_ids) -> list[tuple[int, list[int]]]:
    """Per row the ids it may not sample: EOS and stop ids before ``min_tokens``, and the last
    token of every bad word whose other tokens end the output so far."""
    banned = []
    for i, r in enumerate(rows):
        p = r.params
        ids = set()
        if p.min_tokens and out_pos(i) < p.min_tokens:
            ids |= set(p.stop_token_ids) | set(eos_token_ids)
        if p.bad_words_token_ids:
            ids |= bad_word_bans(r, out_pos(i))
        if ids:
            banned.append((i, sorted(ids)))
    return banned


def _forced(rows: Sequence[RunnerRequest], out_pos) -> Optional[tuple[list[int], list[int]]]:
    """``(rows, token ids)`` a thinking budget forces this step (the end marker's next token)."""
    forced_rows, tokens = [], []
    for i, r in enumerate(rows):
        if r.params.thinking_token_budget is not None:
            token = forced_token(r, out_pos(i))
            if token is not None:
                forced_rows.append(i)
                tokens.append(token)
    return (forced_rows, tokens) if forced_rows else None


def bad_word_bans(r: RunnerRequest, pos: int) -> set[int]:
    """The bad words' last tokens banned at output index ``pos``: those whose other tokens are
    the last ones of the output before ``pos``. The output is the accepted tokens followed by
    the drafts this step verifies (a row verifying draft j sees drafts 0..j-1), so a verified
    row is masked as the same token would be without speculation::

        token_ids[num_prompt:] = [a b c]   spec_token_ids = [d e]   pos 4 -> history [a b c d]
    """
    words = r.params.bad_words_token_ids
    longest = max(len(w) for w in words) - 1
    start = r.num_prompt_tokens
    num_out = len(r.token_ids) - start
    tail = [r.token_ids[start + j] if j < num_out else r.spec_token_ids[j - num_out]
            for j in range(max(0, pos - longest), pos)]
    bans = set()
    for word in words:
        k = len(word) - 1
        if k <= len(tail) and tail[len(tail) - k:] == word[:-1]:
            bans.add(word[-1])
    return bans


def _disallowed(r: RunnerRequest, device: torch.device, vocab: int) -> torch.Tensor:
    """bool [vocab], True outside ``allowed_token_ids``; made once per running request (and
    put on the device without waiting: ``upload_tensor``)."""
    if r.disallowed is None:
        mask = torch.ones(vocab, dtype=torch.bool)
        mask[torch.tensor(r.params.allowed_token_ids)] = False
        r.disallowed = upload_tensor(mask, device)
    return r.disallowed
