"""Sampling on the device: every SamplingParams field, per row, in one batch.

Order of operations (vLLM's): logit bias and min-tokens masking, then penalties, on the raw
logits; greedy rows take the argmax there. Random rows then divide by temperature, drop tokens
under min_p, apply top-k and top-p, and sample with the exponential trick
(``argmax(p / q)``, ``q ~ Exp(1)``), which needs no host sync. Logprobs are the log-softmax of
the *raw* logits (before any processing), as vLLM reports them.

Seeded rows draw their noise from a generator seeded with (seed, output position), so a seeded
request gives the same tokens whatever else is in the batch and after a preemption.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

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
    # (row, token ids) banned this step (EOS / stop ids before min_tokens).
    banned: Optional[list[tuple[int, list[int]]]] = None
    seeds: Optional[list[tuple[int, int]]] = None  # (row, seed mixed with output position)
    max_num_logprobs: Optional[int] = None  # top-k logprobs to return; None: none
    # The largest top_k when every row has one (host int, no device sync): top-k/top-p then
    # look at that many candidates (``topk``) instead of sorting the whole vocabulary.
    top_k_max: Optional[int] = None


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # int64 [B], one per sampled row
    # With logprobs: the sampled token's logprob [B], its rank [B], and the top-k ids/logprobs.
    sampled_logprob: Optional[torch.Tensor] = None
    sampled_rank: Optional[torch.Tensor] = None
    topk_ids: Optional[torch.Tensor] = None
    topk_logprobs: Optional[torch.Tensor] = None


def seed_for_position(seed: int, position: int) -> int:
    return (seed * _SEED_MIX + position) & 0x7FFF_FFFF_FFFF_FFFF


def torch_argmax(x: torch.Tensor, divisor: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(x / divisor).argmax(-1)``: the default of ``LogitsOps.argmax`` (backends/spec.py)."""
    return (x if divisor is None else x / divisor).argmax(dim=-1)


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0, argmax=None):
        self.device = device
        self.argmax = argmax or torch_argmax  # the backend's LogitsOps.argmax when it has one
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        if batch.all_greedy and batch.max_num_logprobs is None and not _has_edits(batch):
            return SamplerOutput(self.argmax(logits))  # exact in any float dtype; no copies
        logits = logits.float()
        raw = logits
        logits = self._edit_logits(logits.clone(), batch)
        if batch.all_greedy:
            tokens = self.argmax(logits)
        else:
            tokens = self._sample(logits, batch)
        out = SamplerOutput(tokens)
        if batch.max_num_logprobs is not None:
            self._logprobs(raw, tokens, batch.max_num_logprobs, out)
        return out

    def _edit_logits(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        for row, ids, values in batch.logit_bias or ():
            idx = torch.tensor(ids, device=logits.device)
            logits[row, idx] += torch.tensor(values, device=logits.device)
        for row, ids in batch.banned or ():
            logits[row, torch.tensor(ids, device=logits.device)] = -float("inf")
        if batch.repetition is not None:
            seen = batch.prompt_mask | (batch.output_counts > 0)
            rep = batch.repetition[:, None]
            penalised = torch.where(logits > 0, logits / rep, logits * rep)
            logits = torch.where(seen, penalised, logits)
            logits = logits - batch.frequency[:, None] * batch.output_counts
            logits = logits - batch.presence[:, None] * (batch.output_counts > 0).float()
        return logits

    @torch.no_grad()
    def verify(self, logits: torch.Tensor, batch: SamplingBatch, draft_ids: torch.Tensor,
               draft_probs: Optional[torch.Tensor] = None,
               has_draft_probs: Optional[torch.Tensor] = None) -> SamplerOutput:
        """Rejection-sample the rows of a step that verifies drafts from a proposer with a
        draft distribution (``tessellm.spec_decode.rejection``); logprobs as ``__call__``'s."""
        from tessellm.spec_decode.rejection import rejection_sample

        raw = logits.float()
        tokens = rejection_sample(self.target_probs(raw, batch), draft_ids, draft_probs,
                                  has_draft_probs, self.generator, batch.seeds)
        out = SamplerOutput(tokens)
        if batch.max_num_logprobs is not None:
            self._logprobs(raw, tokens, batch.max_num_logprobs, out)
        return out

    def target_probs(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """float32 [B, V]: the distribution each row samples from (greedy rows: a point mass)."""
        logits = self._edit_logits(logits.float().clone(), batch)
        greedy = torch.nn.functional.one_hot(self.argmax(logits), logits.shape[-1]).float()
        if batch.all_greedy:
            return greedy
        return torch.where((batch.temperature == 0)[:, None], greedy, self._probs(logits, batch))

    @staticmethod
    def _probs(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        greedy_rows = batch.temperature == 0
        temp = torch.where(greedy_rows, torch.ones_like(batch.temperature), batch.temperature)
        logits = logits / temp[:, None]
        if batch.top_k is not None or batch.top_p is not None:
            logits = _top_k_top_p(logits, batch.top_k, batch.top_p, batch.top_k_max)
        probs = torch.softmax(logits, dim=-1)
        if batch.min_p is not None:
            threshold = batch.min_p[:, None] * probs.max(dim=-1, keepdim=True).values
            probs = probs.masked_fill(probs < threshold, 0.0)
        return probs

    def _sample(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        greedy_tokens = self.argmax(logits)
        greedy_rows = batch.temperature == 0
        probs = self._probs(logits, batch)
        q = torch.empty_like(probs).exponential_(generator=self.generator)
        for row, seed in batch.seeds or ():
            gen = torch.Generator(device=probs.device).manual_seed(seed)
            q[row].exponential_(generator=gen)
        sampled = self.argmax(probs, q)
        return torch.where(greedy_rows, greedy_tokens, sampled)

    @staticmethod
    def _logprobs(raw: torch.Tensor, tokens: torch.Tensor, k: int, out: SamplerOutput) -> None:
        logprobs = torch.log_softmax(raw, dim=-1)
        chosen = logprobs.gather(-1, tokens[:, None])
        out.sampled_logprob = chosen.squeeze(-1)
        out.sampled_rank = (logprobs > chosen).sum(dim=-1) + 1
        if k > 0:
            out.topk_logprobs, out.topk_ids = logprobs.topk(k, dim=-1)


def _has_edits(batch: SamplingBatch) -> bool:
    return bool(batch.logit_bias or batch.banned or batch.repetition is not None)


def _top_k_top_p(logits: torch.Tensor, top_k: Optional[torch.Tensor],
                 top_p: Optional[torch.Tensor], k_max: Optional[int] = None) -> torch.Tensor:
    """Mask logits outside each row's top-k and top-p sets with -inf. With ``k_max`` (every
    row has a top-k of at most that) only the ``k_max`` largest are sorted (a full-vocabulary
    sort is ~44 ms a row on 2 CPU cores): every other token is masked whatever top-p says."""
    vocab = logits.shape[-1]
    if top_k is not None and k_max is not None and k_max < vocab:
        cand, idx = logits.topk(k_max, dim=-1)  # sorted, descending
        kept = _top_k_top_p(cand, top_k, top_p)
        return torch.full_like(logits, -float("inf")).scatter_(-1, idx, kept)
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    mask = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if top_k is not None:
        ranks = torch.arange(vocab, device=logits.device)[None, :]
        mask |= ranks >= top_k[:, None]
    if top_p is not None:
        probs = torch.softmax(sorted_logits.masked_fill(mask, -float("inf")), dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass strictly before this token
        mask |= before >= top_p[:, None]
    mask[:, 0] = False  # always keep the most likely token
    sorted_logits = sorted_logits.masked_fill(mask, -float("inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)
