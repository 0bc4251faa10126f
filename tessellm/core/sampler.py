"""Sampling on the device: every SamplingParams field, per row, in one batch.

Order of operations (vLLM's): allowed_token_ids, then bad words, logit bias and min-tokens
masking, then custom logits processors that change the argmax, then penalties, then the token a
thinking budget forces (every other token of that row -inf), on the raw logits; greedy rows take
the argmax there. Random rows then divide by temperature, drop tokens under min_p (of the whole
vocabulary's softmax: vLLM's built-in argmax-invariant processor, the first of them), go through
the argmax-invariant custom processors, apply top-k and top-p (top-p's mass counted over what
min_p left), and sample with the exponential trick (``argmax(p / q)``, ``q ~ Exp(1)``), which
needs no host sync. Logprobs are the log-softmax of the *raw* logits
(before any processing), as vLLM reports them.

A filtered row samples from its *candidates* (``sampling_filters``): the tokens top-k, top-p or
min-p leave it, found without sorting the vocabulary where that gives the reference's set, and
the noise is drawn for those columns only (a 49k-row of ``exponential_`` costs ~1 ms on a CPU
core). Rows without a filter race over the whole vocabulary; on the host an unseeded one takes
one uniform through its cumulative distribution instead (``inverse_cdf``).

Seeded rows draw their noise from a generator seeded with (seed, output position), one draw per
vocabulary entry in token order whatever the candidates, so a seeded request gives the same
tokens whatever else is in the batch and after a preemption.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from tessellm.core.sampling_filters import (Candidates, filter_candidates, filter_dense,
                                            filter_top_k)

_SEED_MIX = 0x9E3779B97F4A7C15


@dataclass
class SamplingBatch:
    """Per-row sampling inputs for one step, built by ``sampling_metadata.build_sampling_batch``.

    A row is one sampled token, ``[num_sampled_tokens]`` of them (``B`` below): a request that
    verifies k drafts owns k+1 consecutive rows (at its offset, ``StepHandle.sample_start``),
    one without drafts owns one. Every row is sampled independently from its own logits.
    """

    temperature: Optional[torch.Tensor]  # float32 [B]; 0 for greedy rows; None if all greedy
    all_greedy: bool
    top_p: Optional[torch.Tensor]  # float32 [B], None when no row uses it
    top_k: Optional[torch.Tensor]  # int64 [B] (vocab size when off), None when no row uses it
    min_p: Optional[torch.Tensor]  # float32 [B], None when no row uses it
    # Penalties, None when no row uses them.
    presence: Optional[torch.Tensor] = None  # float32 [B]
    frequency: Optional[torch.Tensor] = None  # float32 [B]
    repetition: Optional[torch.Tensor] = None  # float32 [B]
    output_counts: Optional[torch.Tensor] = None  # float32 [B, V]: occurrences in the output
    prompt_mask: Optional[torch.Tensor] = None  # bool [B, V]: token appears in the prompt
    # Sparse per-row edits: (row, token ids, values) added to the logits.
    logit_bias: Optional[list[tuple[int, list[int], list[float]]]] = None
    # (row, token ids) banned this step (EOS / stop ids before min_tokens, bad words' last tokens).
    banned: Optional[list[tuple[int, list[int]]]] = None
    # allowed_token_ids: the rows that have them and their bool [V] masks (True: banned).
    allowed_rows: Optional[list[int]] = None
    allowed_masks: Optional[list[torch.Tensor]] = None
    seeds: Optional[list[tuple[int, int]]] = None  # (row, seed mixed with output position)
    # top-k logprobs of the rows asking fewer than the whole vocabulary (0: none of them);
    # None: no row asks logprobs
    max_num_logprobs: Optional[int] = None
    # Rows asking the whole vocabulary (logprobs=-1) and that count: sorted on their own, so
    # the other rows keep their small top-k and host copy. None: no such row.
    full_logprob_rows: Optional[list[int]] = None
    full_num_logprobs: int = 0
    # Rows asking logprob_token_ids (no top k for them) and their ids, int64 [R, W] (W: the
    # longest list; shorter ones padded with 0, cut off on the host). None: no such row.
    id_logprob_rows: Optional[list[int]] = None
    id_logprob_ids: Optional[torch.Tensor] = None
    # The largest top_k when every row has one (host int, no device sync): top-k/top-p then
    # look at that many candidates (``topk``) instead of sorting the whole vocabulary.
    top_k_max: Optional[int] = None
    # Rows a thinking budget forces (tessellm/reasoning/budget.py) and the token each must take:
    # after every other edit, the row is -inf but for that token. None: no row is forced.
    forced: Optional[tuple[list[int], list[int]]] = None
    # Custom logits processors (tessellm.sample.logits_processor.state.LogitsProcessors), their
    # batch already updated to these rows; None: none configured (nothing per step).
    processors: Optional[object] = None


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # int64 [B], one per sampled row
    # With logprobs: the sampled token's logprob [B], its rank [B], and the top-k ids/logprobs.
    sampled_logprob: Optional[torch.Tensor] = None
    sampled_rank: Optional[torch.Tensor] = None
    topk_ids: Optional[torch.Tensor] = None
    topk_logprobs: Optional[torch.Tensor] = None
    # The whole-vocabulary rows' (SamplingBatch.full_logprob_rows) logprobs sorted descending,
    # ids and values [F, V], row i of them for batch row full_logprob_rows[i].
    full_ids: Optional[torch.Tensor] = None
    full_logprobs: Optional[torch.Tensor] = None
    full_rows: Optional[list[int]] = None
    # The logprob_token_ids rows' (SamplingBatch.id_logprob_rows) logprobs of their ids [R, W].
    id_logprobs: Optional[torch.Tensor] = None
    id_rows: Optional[list[int]] = None
    # int64 [B]: NaN logits per row (the model's, or a custom processor's), with compute_nans
    # (TESSELLM_COMPUTE_NANS_IN_LOGITS); None when not counted.
    num_nans: Optional[torch.Tensor] = None


def upload(values, device, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """A small host list (row numbers, token ids, per-row parameters) on ``device`` with no
    host sync: on CUDA through pinned memory, queued on the stream (``torch.tensor(values,
    device="cuda")`` copies from pageable memory and waits for every kernel queued before it:
    the step's forward); on the CPU a plain tensor (nothing to copy, nothing to pin); on other
    devices (xla, xpu) the plain copy, as before.

    The pinned block comes from torch's caching host allocator, which records the copy's stream
    event on it and hands it out again only once that copy has run: a block is never rewritten
    under a copy still in flight, however many steps are queued (the reuse hazard a persistent
    pinned buffer has to guard with a ring or an event, as ``step_pipeline.Staging`` does)."""
    return upload_tensor(torch.tensor(values, dtype=dtype), device)


def upload_tensor(host: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on ``device`` as ``upload`` puts a list there: pinned and non-blocking on
    CUDA, itself on the CPU."""
    device = torch.device(device)
    if device.type == "cpu":
        return host
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def seed_for_position(seed: int, position: int) -> int:
    return (seed * _SEED_MIX + position) & 0x7FFF_FFFF_FFFF_FFFF


def torch_argmax(x: torch.Tensor, divisor: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(x / divisor).argmax(-1)``: the default of ``LogitsOps.argmax`` (backends/spec.py)."""
    return (x if divisor is None else x / divisor).argmax(dim=-1)


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0, argmax=None, compute_nans: bool = False):
        self.device = device
        self.compute_nans = compute_nans  # count NaN logits per row (SamplerOutput.num_nans)
        self.argmax = argmax or torch_argmax  # the backend's LogitsOps.argmax when it has one
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        # Host-resident logits (cpu, and xla, which samples on the host): reading a tensor to
        # choose a path (which rows need a wider candidate set, whether the sampled token is in
        # the top logprobs) costs nothing there; on an accelerator it would stall the step on a
        # sync, so the sampler takes the sync-free forms.
        self.on_host = torch.device(device).type == "cpu"

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        if batch.all_greedy and batch.max_num_logprobs is None and not _has_edits(batch):
            out = SamplerOutput(self.argmax(logits))  # exact in any float dtype; no copies
            if self.compute_nans:
                out.num_nans = count_nans(logits)
            return out
        raw = logits.float()
        logits = self._edit_logits(raw, batch)
        scaled = point = None  # the sampled rows' logits (_scaled), the rows taking the argmax
        if batch.all_greedy:
            tokens = self.argmax(logits)
        else:
            tokens, scaled, point = self._sample(logits, batch)
        out = SamplerOutput(tokens)
        if self.compute_nans:
            out.num_nans = count_nans(raw, logits, scaled, point)
        del scaled, point  # [B, V] float32: not held through the logprobs (peak memory)
        if batch.max_num_logprobs is not None:
            self._logprobs(raw, tokens, batch, out)
        return out

    @staticmethod
    def _edit_logits(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """The logits with bias, bans, custom processors that change the argmax, and penalties
        applied; ``logits`` itself is not written."""
        processors = batch.processors is not None and batch.processors.changes_argmax
        edited = _keep_allowed(logits, batch)  # first, as vLLM
        if (batch.logit_bias or batch.banned or processors or batch.forced) and edited is logits:
            edited = logits.clone()
        logits = edited
        if batch.logit_bias:  # one index_put for every row: three non-blocking uploads a step
            rows, ids, values = _flatten(batch.logit_bias)
            logits.index_put_((upload(rows, logits.device), upload(ids, logits.device)),
                              upload(values, logits.device, torch.float32), accumulate=True)
        if batch.banned:
            rows, ids = _flatten(batch.banned)
            logits.index_put_((upload(rows, logits.device), upload(ids, logits.device)),
                              logits.new_full((), -float("inf")))  # a fill: no copy
        if processors:  # after the built-in edits, before penalties: vLLM's order
            logits = batch.processors.apply(logits, argmax_invariant=False)
        if batch.repetition is not None:
            seen = batch.prompt_mask | (batch.output_counts > 0)
            rep = batch.repetition[:, None]
            penalised = torch.where(logits > 0, logits / rep, logits * rep)
            logits = torch.where(seen, penalised, logits)
            logits = logits - batch.frequency[:, None] * batch.output_counts
            logits = logits - batch.presence[:, None] * (batch.output_counts > 0).float()
        if batch.forced is not None:  # last, as vLLM applies its thinking budget after penalties
            rows, tokens = (upload(x, logits.device) for x in batch.forced)
            logits[rows] = -float("inf")
            logits[rows, tokens] = 0.0
        return logits

    @torch.no_grad()
    def verify(self, logits: torch.Tensor, batch: SamplingBatch, draft_ids: torch.Tensor,
               draft_probs: Optional[torch.Tensor] = None,
               has_draft_probs: Optional[torch.Tensor] = None) -> SamplerOutput:
        """Rejection-sample the rows of a step that verifies drafts from a proposer with a
        draft distribution (``tessellm.spec_decode.rejection``); logprobs as ``__call__``'s."""
        from tessellm.spec_decode.rejection import rejection_sample

        raw = logits.float()
        edited = self._edit_logits(raw, batch)  # once: custom processors apply once a step
        target, scaled, point = self._target_probs(edited, batch)
        if self.compute_nans:
            num_nans = count_nans(raw, edited, scaled, point)
        del scaled, point  # [B, V] float32: not held through rejection sampling and the logprobs
        tokens = rejection_sample(target, draft_ids, draft_probs, has_draft_probs, self.generator,
                                  batch.seeds)
        out = SamplerOutput(tokens)
        if self.compute_nans:
            out.num_nans = num_nans
        if batch.max_num_logprobs is not None:
            self._logprobs(raw, tokens, batch, out)
        return out

    def target_probs(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """float32 [B, V]: the distribution each row samples from (greedy rows: a point mass)."""
        return self._target_probs(self._edit_logits(logits.float(), batch), batch)[0]

    def _target_probs(self, logits: torch.Tensor, batch: SamplingBatch) -> tuple:
        """``(target_probs, scaled, point rows)`` of logits already edited (``_edit_logits``);
        ``scaled`` (``_scaled``) and the rows taking the argmax are None for an all-greedy batch."""
        greedy = torch.nn.functional.one_hot(self.argmax(logits), logits.shape[-1]).float()
        if batch.all_greedy:
            return greedy, None, None
        point = self._point_rows(logits, batch)
        scaled = self._scaled(logits, batch, point)
        probs = self._probs(scaled, batch, point).dense(logits.shape[-1], 0.0)
        return torch.where(point[:, None], greedy, probs), scaled, point

    @staticmethod
    def _point_rows(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """bool [B]: rows that take their argmax: greedy ones, and, when masks apply, any whose
        every token is masked (allowed_token_ids all banned by bad words, min_tokens or a
        grammar): nothing is left to sample, so such a row takes the argmax (token 0) as a
        greedy row does, rather than a NaN distribution failing the whole batch."""
        rows = batch.temperature == 0
        if batch.allowed_rows or batch.banned or batch.logit_bias or batch.processors is not None:
            rows = rows | torch.isneginf(logits.amax(dim=-1))
        return rows

    @staticmethod
    def _scaled(logits: torch.Tensor, batch: SamplingBatch, greedy_rows: torch.Tensor) -> torch.Tensor:
        """The logits a sampled row draws from: temperature-scaled (``greedy_rows``, which take
        the argmax anyway, by 1), min-p, then the custom processors that keep the argmax."""
        temp = torch.where(greedy_rows, torch.ones_like(batch.temperature), batch.temperature)
        scaled = logits / temp[:, None]
        if batch.min_p is not None:  # vLLM's order: min-p, custom processors, top-k/top-p
            scaled = _drop_below_min_p(scaled, batch.min_p)
        if batch.processors is not None and batch.processors.keeps_argmax:  # vLLM: after temperature
            scaled = batch.processors.apply(scaled, argmax_invariant=True)
        return scaled

    def _probs(self, scaled: torch.Tensor, batch: SamplingBatch, greedy_rows: torch.Tensor) -> Candidates:
        """Each row's sampling distribution over its candidates (0 where filtered out), from its
        ``_scaled`` logits; ``greedy_rows`` (``_point_rows``) take the argmax anyway."""
        cand = self._filter(scaled, batch, greedy_rows)
        probs = torch.softmax(cand.values, dim=-1)
        if batch.min_p is not None and cand.ids is None and self.on_host:
            return _nonzero_columns(probs, greedy_rows)
        return Candidates(probs, cand.ids)

    def _filter(self, scaled: torch.Tensor, batch: SamplingBatch, greedy_rows: torch.Tensor) -> Candidates:
        top_k, top_p = batch.top_k, batch.top_p
        if top_k is None and top_p is None:
            return Candidates(scaled)
        if batch.top_k_max is not None and batch.top_k_max < scaled.shape[-1]:
            return filter_top_k(scaled, top_k, top_p, batch.top_k_max)
        if self.on_host:
            return filter_candidates(scaled, top_k, top_p, skip=greedy_rows)
        return Candidates(filter_dense(scaled, top_k, top_p))

    def _sample(self, logits: torch.Tensor, batch: SamplingBatch) -> tuple:
        """``(tokens, the scaled logits sampled from, the rows that took the argmax)``."""
        greedy_rows = self._point_rows(logits, batch)
        scaled = self._scaled(logits, batch, greedy_rows)
        probs = self._probs(scaled, batch, greedy_rows)
        if probs.ids is None and self.on_host:
            sampled = self._invert(probs.values, batch.seeds)
        else:
            pick = self.argmax(probs.values, self._noise(probs, batch.seeds, logits.shape[-1]))
            sampled = pick if probs.ids is None else probs.ids.gather(-1, pick[:, None]).squeeze(-1)
        if self.on_host and not bool(greedy_rows.any()):
            return sampled, scaled, greedy_rows
        return torch.where(greedy_rows, self.argmax(logits), sampled), scaled, greedy_rows

    def _noise(self, probs: Candidates, seeds: Optional[list[tuple[int, int]]], vocab: int) -> torch.Tensor:
        """Exp(1) noise for every candidate column. A seeded row's generator draws one value
        per vocabulary entry, in token order, and the row reads its candidates' entries."""
        q = torch.empty_like(probs.values).exponential_(generator=self.generator)
        for row, seed in seeds or ():
            gen = torch.Generator(device=q.device).manual_seed(seed)
            if probs.ids is None:
                q[row].exponential_(generator=gen)
            else:
                full = torch.empty(vocab, device=q.device).exponential_(generator=gen)
                q[row] = full[probs.ids[row]]
        return q

    def _invert(self, probs: torch.Tensor, seeds: Optional[list[tuple[int, int]]]) -> torch.Tensor:
        """Whole-vocabulary rows on the host. An unseeded row takes one uniform through its
        cumulative distribution (``inverse_cdf``: torch.multinomial's method, in float64), where
        the race would draw V exponentials (a serial ~1 ms a row of 49k); a seeded row keeps the
        race over its own generator's noise, so its tokens are unchanged."""
        u = torch.rand(probs.shape[0], dtype=torch.float64, generator=self.generator)
        tokens = inverse_cdf(probs, u)
        if seeds:
            rows = torch.tensor([row for row, _ in seeds])
            q = torch.stack([torch.empty(probs.shape[-1]).exponential_(generator=torch.Generator().manual_seed(seed))
                             for _, seed in seeds])
            tokens[rows] = self.argmax(probs[rows], q)
        return tokens

    def _logprobs(self, raw: torch.Tensor, tokens: torch.Tensor, batch: SamplingBatch,
                  out: SamplerOutput) -> None:
        """The sampled token's logprob and rank for every row; the top ``max_num_logprobs``
        for all rows, and the whole vocabulary sorted for ``full_logprob_rows`` only (a batch
        of 64 with one logprobs=-1 request sorts and copies one vocabulary row, not 64)."""
        logprobs = torch.log_softmax(raw, dim=-1)
        chosen = logprobs.gather(-1, tokens[:, None])
        out.sampled_logprob = chosen.squeeze(-1)
        if batch.max_num_logprobs:
            out.topk_logprobs, out.topk_ids = logprobs.topk(batch.max_num_logprobs, dim=-1)
        out.sampled_rank = self._rank(logprobs, chosen, out.topk_logprobs) + 1
        if batch.full_logprob_rows:
            rows = upload(batch.full_logprob_rows, logprobs.device)
            out.full_logprobs, out.full_ids = logprobs[rows].topk(batch.full_num_logprobs, dim=-1)
            out.full_rows = batch.full_logprob_rows
        if batch.id_logprob_rows:  # one gather: [R, W] of the [B, V] logprobs
            rows = upload(batch.id_logprob_rows, logprobs.device)
            out.id_logprobs = logprobs[rows].gather(-1, batch.id_logprob_ids)
            out.id_rows = batch.id_logprob_rows

    def _rank(self, logprobs: torch.Tensor, chosen: torch.Tensor, top: Optional[torch.Tensor]) -> torch.Tensor:
        """int64 [B]: how many tokens have a larger logprob than the sampled one (``chosen``
        [B, 1]). On the host, counted among the ``top`` logprobs (descending; the row maximum
        without them) for rows whose sampled token is at least the smallest of them (nothing
        outside ``top`` is then larger), over the vocabulary for the others only."""
        if not self.on_host:
            return (logprobs > chosen).sum(dim=-1)
        if top is None:
            top = logprobs.amax(dim=-1, keepdim=True)
        ahead = (top > chosen).sum(dim=-1)
        outside = (chosen[:, 0] < top[:, -1]).nonzero()[:, 0]
        if len(outside):
            ahead[outside] = (logprobs[outside] > chosen[outside]).sum(dim=-1)
        return ahead


def count_nans(raw: torch.Tensor, edited: Optional[torch.Tensor] = None,
               scaled: Optional[torch.Tensor] = None, point_rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """int64 [B]: NaN entries per row of the logits the sampler reads, an entry NaN in several
    counted once: the model's (``raw``), the edited ones (``edited``: the built-in edits and the
    custom processors that change the argmax) and a sampled row's scaled ones (``scaled``:
    temperature, min-p and the custom processors that keep the argmax; not read for
    ``point_rows``, which take the argmax of ``edited``). vLLM's ``num_nans_in_logits``. On the
    device: no sync."""
    nans = raw.isnan()
    if edited is not None and edited is not raw:
        nans = nans | edited.isnan()
    if scaled is not None:
        sampled = scaled.isnan()
        nans = nans | (sampled if point_rows is None else sampled & ~point_rows[:, None])
    return nans.sum(dim=-1)


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """int64 [B]: per row the first token whose float64 cumulative probability exceeds
    ``u * total`` (``u`` float64 [B] in [0, 1)): token ``i`` with probability ``p_i / total``
    to ~1e-16, a zero-probability token never (its interval is empty)::

        probs  [0  .2  0  .5  .3]    cdf [0 .2 .2 .7 1.0]    u * total = .45 -> token 3
    """
    cdf = probs.cumsum(dim=-1, dtype=torch.float64)
    total = cdf[:, -1:]
    # u * total may round up to total (u = 1 - 2^-53): kept below it, so some token exceeds it.
    x = torch.minimum(u[:, None] * total, total * (1.0 - 2.0 ** -52))
    return torch.searchsorted(cdf, x, right=True).squeeze(-1)


def _keep_allowed(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """-inf outside each row's allowed_token_ids: a new tensor when some row has them, else
    ``logits`` itself. Every row (a batch of one kind): one masked_fill; some: row by row."""
    rows, masks = batch.allowed_rows, batch.allowed_masks
    if not rows:
        return logits
    if len(rows) == logits.shape[0]:
        return logits.masked_fill(torch.stack(masks), -float("inf"))
    out = logits.clone()
    for row, mask in zip(rows, masks):
        out[row].masked_fill_(mask, -float("inf"))
    return out


def _drop_below_min_p(scaled: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """-inf where a token's probability (softmax of the temperature-scaled row, the whole
    vocabulary) is under ``min_p`` times the row's largest: vLLM's ``MinPLogitsProcessor``."""
    probs = torch.softmax(scaled, dim=-1)
    threshold = min_p[:, None] * probs.amax(dim=-1, keepdim=True)
    return scaled.masked_fill(probs < threshold, -float("inf"))


def _flatten(per_row: list[tuple]) -> tuple[list, ...]:
    """``[(row, ids, *values)]`` as flat lists ``(rows, ids, *values)``, a row repeated per id::

        [(0, [5, 9]), (2, [7])]  ->  rows [0, 0, 2], ids [5, 9, 7]
    """
    rows = [row for row, ids, *_ in per_row for _ in ids]
    columns = [[x for entry in per_row for x in entry[k]] for k in range(1, len(per_row[0]))]
    return (rows, *columns)


def _has_edits(batch: SamplingBatch) -> bool:
    return bool(batch.logit_bias or batch.banned or batch.forced or batch.allowed_rows
                or batch.repetition is not None
                or (batch.processors is not None and batch.processors.changes_argmax))


def _nonzero_columns(probs: torch.Tensor, skip: torch.Tensor) -> Candidates:
    """Dense probabilities as the columns of each row's nonzero ones (host tensors), when that
    is at most half the vocabulary: a zero never wins the race, so only these need noise.
    ``skip`` rows (greedy: their token is the argmax) do not widen the columns."""
    width = max(1, int(torch.count_nonzero(probs, dim=-1).masked_fill_(skip, 1).max()))
    if 2 * width > probs.shape[-1]:
        return Candidates(probs)
    values, ids = probs.topk(width, dim=-1)
    return Candidates(values, ids)
