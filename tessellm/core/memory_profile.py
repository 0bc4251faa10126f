"""The memory profile: the step the KV cache is sized after, and what it cannot see.

On an accelerator the worker runs one profile step (``ModelRunner.profile_run``) before it
sizes the KV cache: the caching allocator keeps every block that step allocated, so
``memory_info``'s free bytes afterwards exclude its peak, and the cache gets what is left under
``gpu_memory_utilization``. The step must therefore allocate at least what any real step will:

* tokens: the step budget (``max_num_batched_tokens``), prompts of at most ``max_model_len``;
* rows: ``max_num_seqs`` of them, decodes first (one token each, the split-KV decode path and
  its workspace), the rest of the budget over as few prefill rows as fit the context (the
  chunked-prefill path), as a mixed step of a full batch is;
* sampled rows: one per row, ``num_speculative_tokens + 1`` per row that verifies drafts with
  speculative decoding (at most the budget; only the requests of a step that drafted verify,
  fewer than ``disable_by_batch_size``: ``SpeculativeConfig.max_verifying_seqs``); their logits go through the sampler's widest path (temperature, top-p
  over the whole sorted vocabulary, min-p, penalties, logit bias, allowed tokens, min_tokens
  bans, top logprobs);
* prompt logprobs: a step computes them ``prompt_logprob_chunk(max_num_seqs)`` rows of logits
  at a time (``runner_output.prompt_logprobs``: at least ``PROMPT_LOGPROB_MIN_ROWS``, so a small
  ``max_num_seqs`` does not cost a logits call per prompt token); the profile step runs one
  such chunk (``ProfileShape.prompt_logprob_rows``: fewer only where no step holds that many
  prompt rows) beside the step's hidden states, as a real step does before its sampled rows.

Speculative decoding, beyond the ``k + 1`` sampled rows: after the sampler, the step runs what a
verifying step runs next (``SpecDecodeRunner.profile``). A proposer whose drafts carry their
distribution (``Proposer.draft_distributions``) has every sampled row verified by the rejection
sampler (``Sampler.verify``: target and draft probabilities, noise, residual, each ``[rows,
vocab]``, beside the drafts' distributions the requests hold); greedy drafts (every built-in
proposer) never reach it, their rows go through the sampler above. A drafter with a model of
its own (draft model, EAGLE / EAGLE-3 head, MTP layer: ``spec_decode/drafter.py``) then runs
its eager first forward over the step's rows and its ``k - 1`` draft decode steps, beside the
target's hidden states an EAGLE head reads; its peak is the step's too where larger.

What the step cannot see, it reserves: the captured graphs' logits buffer (one for every decode
and verify graph: each writes its logits into its first rows, ``core/runner_graphs.py``), their
pool (the largest graph's activations and logits are its transient) and their warm-ups on the
capture stream, all allocated after the cache (``graph_memory_estimate``); and a drafter's own
draft-step graphs, in a pool of their own (``draft_graph_memory_estimate``, the worker adds it).

Why the first real run grew the allocator (H100, workload F: +2.56 GiB in 9 new segments in run
1, none in run 2): torch's CUDA graph context empties the caching allocator before every
capture (an ``empty_cache`` in its ``__enter__``), so the blocks the profile step left cached,
counted as used when the cache was sized, were given back to the driver before run 1, which then
allocated them again. The cuda graph runner now allocates them once more after its captures,
segment for segment (``backends/cuda/graph_runner.py``), so the first run finds them cached;
and the CUDA KV cache is one allocation, so no per-layer tensor takes one of them first
(``runner_kv_cache.kv_cache_tensors``).
And the profile's own KV cache (2 GiB for 16384 tokens of Llama-8B, freed and kept in 32 MiB
pieces no activation fits) was counted as used, 1024 blocks the cache did not get: the profile
now writes its K/V into one block per layer (the values do not matter, the shapes do).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from tessellm.core.sampling_params import SamplingParams

# Top logprobs the profile's sampler returns (the server's ``max_logprobs`` default).
PROFILE_LOGPROBS = 20
# The allocator's granularity for blocks of 1 MiB and more (CUDA's caching allocator rounds a
# large allocation up to 2 MiB), and a graph's few small buffers beside its logits.
_LARGE_ROUND = 2 << 20
_SPECIALISE = 16  # Triton's integer specialisation (divisible by 16 or not)
# The fewest rows of logits prompt logprobs take at a time (a larger ``max_num_seqs`` raises it).
PROMPT_LOGPROB_MIN_ROWS = 64


def prompt_logprob_chunk(max_num_seqs: int) -> int:
    """Rows of logits a step's prompt logprobs take at a time: ``max_num_seqs`` (the sampler's
    rows, which the profile covers anyway), at least ``PROMPT_LOGPROB_MIN_ROWS``."""
    return max(max_num_seqs, PROMPT_LOGPROB_MIN_ROWS)


@dataclass(frozen=True)
class ProfileShape:
    """The profile step: ``counts[i]`` query tokens of row i (decodes first), how many
    rows (from the last token back) it samples, and the rows of one prompt-logprob chunk."""

    counts: tuple[int, ...]
    sampled_rows: int
    # rows of logits one prompt-logprob chunk takes: the chunk, or the most prompt rows a step
    # holds where fewer (one prompt of at most max_model_len within the step's tokens)
    prompt_logprob_rows: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(self.counts)

    @property
    def num_decodes(self) -> int:
        return sum(1 for n in self.counts if n == 1)


def profile_shape(num_tokens: int, max_num_seqs: int, max_model_len: int,
                  spec_tokens: int = 0, spec_seqs: Optional[int] = None) -> ProfileShape:
    """The worst step the scheduler can send under these limits (see the module docstring):
    ``min(max_num_seqs, num_tokens)`` rows, the fewest prefill rows (each at most
    ``max_model_len`` tokens, at least 2) holding what the decode rows leave of ``num_tokens``
    (at most what ``max_num_seqs`` prompts of ``max_model_len`` hold: no step has more).
    Sampled: a row each, and ``spec_tokens`` more for each of at most ``spec_seqs`` rows
    verifying drafts (None: every row)."""
    if num_tokens < 1 or max_num_seqs < 1 or max_model_len < 1:
        raise ValueError(f"profile_shape needs positive limits, got num_tokens={num_tokens}, "
                         f"max_num_seqs={max_num_seqs}, max_model_len={max_model_len}.")
    num_tokens = min(num_tokens, max_num_seqs * max_model_len)
    rows = min(max_num_seqs, num_tokens)
    prefills = 0
    while num_tokens - (rows - prefills) > prefills * max_model_len:
        prefills += 1
    decodes = rows - prefills
    # Triton specialises an int argument on its divisibility by 16: the prefill kernel's
    # ``seq_offset`` (the decodes before it) keeps the class of 0, as the profile step's had
    # before it had decodes, where a few decode rows can become 2-token prefills instead.
    short = decodes % _SPECIALISE if decodes >= _SPECIALISE and prefills else 0
    if num_tokens - decodes - short < 2 * prefills:
        short = 0
    decodes -= short
    rest = num_tokens - decodes - 2 * short
    base, extra = divmod(rest, prefills) if prefills else (0, 0)
    counts = [1] * decodes + [2] * short + sorted(base + (i < extra) for i in range(prefills))
    verifying = rows if spec_seqs is None else min(rows, spec_seqs)
    sampled = min(num_tokens, rows + verifying * spec_tokens)
    logprob_rows = min(prompt_logprob_chunk(max_num_seqs), num_tokens, max_model_len)
    return ProfileShape(tuple(counts), sampled, logprob_rows)


def profile_sampling_params(vocab_size: int) -> SamplingParams:
    """Every sampler feature that allocates ``[rows, vocab]`` tensors, in one request: random
    sampling with top-p over the whole sorted vocabulary (no top-k: that path sorts only the
    top k), min-p, the three penalties, a logit bias, allowed tokens, min_tokens' EOS bans, and
    top logprobs (at most the vocabulary: requests are held to it, and a larger top-k fails)."""
    return SamplingParams(temperature=1.0, top_p=0.9, min_p=0.01, presence_penalty=0.1,
                          frequency_penalty=0.1, repetition_penalty=1.1, logit_bias={0: 1.0},
                          allowed_token_ids=list(range(min(vocab_size, 2))), min_tokens=1,
                          logprobs=min(PROFILE_LOGPROBS, vocab_size), max_tokens=2)


def graph_memory_estimate(capture_sizes: Sequence[int], logits_row_bytes: int,
                          step_bytes_per_token: float, verify_rows: Sequence[Sequence[int]] = (),
                          shared_logits: bool = True) -> int:
    """Bytes the captured graphs take after the cache is allocated. Per graph runner (the
    decode graphs' ``capture_sizes``; speculative decoding's verify runners, one per q, their
    graphs' token rows ``S * q`` in ``verify_rows``), in its pool: the largest graph's
    transient activations and logits (``[rows, vocab]``; every smaller graph reuses them) and a
    2 MiB allowance per graph for its few small buffers; beside the pools, the warm-up runs
    before a capture on its capture stream: the largest step's activations and logits once
    more, counted once for every runner (each capture empties the allocator's cache first, so
    a warm-up's blocks are gone before the next runner's warm-up: at most one is held at a
    time, beside the pools captured so far). And the logits the graphs keep: with ``shared_logits`` (a runner
    with ``static_outputs``) one buffer of the most rows of any graph, rounded up to the
    allocator's 2 MiB; else each graph's own output, each rounded so.
    ``step_bytes_per_token``: the profile step's peak over its tokens (an upper bound per decode
    token)."""
    runners = [tuple(r) for r in (capture_sizes, *verify_rows) if len(r)]
    if not runners:
        return 0
    kept = ([max(max(r) for r in runners)] if shared_logits
            else [n for r in runners for n in r])
    logits = sum(_rounded(n * logits_row_bytes) for n in kept)
    small = _LARGE_ROUND * sum(len(r) for r in runners)
    transient = [int(step_bytes_per_token * max(r)) + max(r) * logits_row_bytes for r in runners]
    return logits + small + sum(transient) + max(transient)


def _rounded(nbytes: int) -> int:
    """``nbytes`` as the caching allocator holds a large block: in whole 2 MiB."""
    return -(-nbytes // _LARGE_ROUND) * _LARGE_ROUND


def draft_graph_memory_estimate(capture_sizes: Sequence[int], output_row_bytes: int,
                                logits_row_bytes: int, step_bytes_per_token: float) -> int:
    """Bytes a drafter's captured draft steps take after the cache
    (``KVDrafter.capture_graphs``: one graph per size in a pool of their own, each keeping its
    outputs, ``output_row_bytes`` a row: the draft id, and an EAGLE head's hidden state): each
    graph's outputs rounded up to the allocator's 2 MiB, the largest graph's transient (its
    activations, ``step_bytes_per_token`` a row: the drafter's profile forward's peak over its
    tokens, and its logits, which the graph's argmax reads), and that once more for the
    warm-ups on the capture stream."""
    if not capture_sizes:
        return 0
    largest = max(capture_sizes)
    outputs = sum(_rounded(n * output_row_bytes) for n in capture_sizes)
    transient = int(step_bytes_per_token * largest) + largest * logits_row_bytes
    return outputs + 2 * transient
