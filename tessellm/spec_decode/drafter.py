"""What the draft-model and EAGLE proposers share: K greedy draft steps over their own KV cache.

After the first forward of a step (each proposer feeds it its own way) every proposing request
has its first draft ``d0`` (from the last row of its run, at position ``base``). The next draft
steps are decodes, one token per request, batched::

    step j = 1 .. k-1:  input d[j-1] at position base + j   ->  d[j]
                        (EAGLE also feeds the previous step's hidden state)

The ids never visit the host between steps (each step's argmax is the next step's input); the
drafts are read once at the end. Requests whose blocks or context run out drop out of the
later steps (fewer drafts), never write outside their slots.

Where the backend has a graph runner (CUDA graphs), the draft steps replay graphs captured per
batch-size bucket (forward + argmax, padded rows write nothing); the first forward of a step
(variable query lengths) runs eagerly.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from tessellm.core.attention_batch import AttentionBatch
from tessellm.core.sampler import upload, upload_tensor
from tessellm.spec_decode.draft_batch import decode_arrays, decode_batch
from tessellm.spec_decode.proposer import Proposer

logger = logging.getLogger(__name__)


class KVDrafter(Proposer):
    """Base of proposers that run a model with a KV cache (draft model, EAGLE heads).

    Subclasses set ``model`` / ``kernel`` in ``load_weights`` and implement ``step`` (one
    forward: ``(ids, positions, metadata, hidden) -> (states, next hidden)``; hidden None for a
    draft model) and ``to_tokens`` (states -> greedy draft ids in the target's vocabulary)."""

    hidden_size: Optional[int] = None  # width of the hidden state fed between draft steps
    # a vocabulary of the drafter's own, smaller than the target's (EAGLE-3's draft_vocab_size:
    # its LM head's rows, mapped to target ids by d2t); None: the target's
    draft_vocab_size: Optional[int] = None

    def __init__(self, ctx):
        super().__init__(ctx)
        self.k = self.config.num_speculative_tokens
        self.num_lookahead_tokens = self.k
        self.model = None
        self.kernel = None
        self.graph_runner = None
        self._capture_tried = False

    def attention_layers(self) -> list:
        return self.model.attention_layers()

    def step(self, ids, positions, metadata, hidden):
        raise NotImplementedError

    def to_tokens(self, states: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def draft_steps(self, first: torch.Tensor, hidden: Optional[torch.Tensor], bases: list[int],
                    blocks: list[list[int]], counts: list[int]) -> list[list[int]]:
        """Drafts per proposing request: ``first`` [P] holds each one's d0 (device), ``hidden``
        the hidden state its last row left (EAGLE; None for a draft model), ``bases`` the
        position d0 was predicted at, ``counts`` how many drafts each may have (>= 1)."""
        if not self._capture_tried:
            self.capture_graphs()
        p, kmax = len(bases), max(counts)
        device = first.device
        drafts = torch.full((p, kmax), -1, dtype=torch.int64, device=device)
        drafts[:, 0] = first
        active = list(range(p))
        tokens = first
        for j in range(1, kmax):
            keep = [i for i, a in enumerate(active) if counts[a] > j]
            if not keep:
                break
            if len(keep) < len(active):
                index = upload(keep, device)
                tokens = tokens[index]
                hidden = hidden[index] if hidden is not None else None
                active = [active[i] for i in keep]
            tokens, hidden = self._decode(tokens, hidden, [bases[a] + j for a in active],
                                          [blocks[a] for a in active])
            drafts[upload(active, device), j] = tokens
        rows = drafts.tolist()  # the one host sync of the proposal
        return [row[:counts[i]] for i, row in enumerate(rows)]

    def _decode(self, tokens, hidden, positions: list[int], blocks: list[list[int]]):
        """One draft step for ``len(positions)`` requests: a graph replay, else eager."""
        n = len(positions)
        size = self.graph_runner.padded_size(n) if self.graph_runner is not None else None
        if size is None:
            pos, attn = decode_batch(positions, blocks, self.ctx.block_size, self.ctx.device)
            states, hidden = self.step(tokens, pos, self.kernel.build_metadata(attn), hidden)
            return self.to_tokens(states), hidden
        *host, table = decode_arrays(positions, blocks, self.ctx.block_size, size)
        inputs = [_pad(tokens, size)] + [upload_tensor(torch.from_numpy(a), self.ctx.device) for a in host]
        if hidden is not None:
            inputs.append(_pad(hidden, size))
        inputs.append(upload_tensor(torch.from_numpy(table), self.ctx.device))  # last, as graph runners expect
        out = self.graph_runner.run(inputs)
        return out[0][:n], (out[1][:n] if hidden is not None else None)

    # -- graphs ----------------------------------------------------------------------------

    def capture_graphs(self) -> None:
        """Capture the draft step per batch size with the backend's graph runner (none on the
        cpu, or with enforce_eager). Needs the KV cache: called once it exists."""
        self._capture_tried = True
        ctx = self.ctx
        runner = self._make_graph_runner()
        if runner is None:
            return
        width = -(-(ctx.max_model_len + self.k) // ctx.block_size)
        dev = ctx.device
        self._arange = torch.arange(max(runner.capture_sizes) + 1, dtype=torch.int32, device=dev)

        def make_inputs(n: int):
            inputs = [torch.zeros(n, dtype=torch.int64, device=dev), torch.zeros(n, dtype=torch.int64, device=dev),
                      torch.full((n,), -1, dtype=torch.int64, device=dev), torch.ones(n, dtype=torch.int32, device=dev)]
            if self.hidden_size is not None:
                inputs.append(torch.zeros((n, self.hidden_size), dtype=ctx.dtype, device=dev))
            inputs.append(torch.zeros((n, width), dtype=torch.int32, device=dev))  # block table
            return tuple(inputs)

        with torch.inference_mode():
            runner.capture(self._graph_step, make_inputs)
        self.graph_runner = runner
        logger.info("Speculative decoding: captured the %s draft step for batch sizes %s",
                    self.config.method, runner.capture_sizes)

    def _make_graph_runner(self):
        """The backend's graph runner for the draft steps (uncaptured), or None: none on this
        backend (the cpu, enforce_eager), a kernel that cannot be captured, no bucket below the
        load policy's batch cut-off."""
        from tessellm.backends.spec import GraphSpec
        from tessellm.spec_decode.verify_graphs import capture_sizes

        ctx, args = self.ctx, self.ctx.engine_args
        eager = bool(getattr(args, "enforce_eager", False)) or getattr(ctx.backend, "emulated", False)
        if ctx.registry is None or not getattr(self.kernel, "supports_graph_capture", False):
            return None
        # Drafts happen below the load policy's batch cut-off: capture those buckets only.
        sizes = capture_sizes(ctx.max_num_seqs, self.config.disable_by_batch_size)
        if not sizes:
            return None
        return ctx.registry.graph_runner(ctx.backend, GraphSpec(max(sizes), eager, sizes, ctx.dtype))

    def graph_memory_estimate(self, logits_row_bytes: int, step_bytes_per_token: float) -> int:
        """``draft_graph_memory_estimate`` over the sizes ``capture_graphs`` will capture; the
        outputs a row: the draft id and, for an EAGLE head, its hidden state; the logits a row
        ``draft_logits_row_bytes``."""
        from tessellm.core.memory_profile import draft_graph_memory_estimate

        runner = self._make_graph_runner()
        if runner is None:
            return 0
        row = 8 + (self.hidden_size or 0) * torch.empty((), dtype=self.ctx.dtype).element_size()
        return draft_graph_memory_estimate(getattr(runner, "capture_sizes", ()), row,
                                           self.draft_logits_row_bytes(logits_row_bytes),
                                           step_bytes_per_token)

    def draft_logits_row_bytes(self, logits_row_bytes: int) -> int:
        """One row of the draft step's logits, from the target's ``logits_row_bytes`` (the same
        tokenizer and dtype): scaled to ``draft_vocab_size`` where the drafter has one."""
        vocab = self.ctx.vocab_size
        if not self.draft_vocab_size or not vocab or self.draft_vocab_size >= vocab:
            return logits_row_bytes
        return -(-logits_row_bytes * self.draft_vocab_size // vocab)

    def profile(self, inp) -> None:
        """``propose`` with every step eager (the graphs come after the cache); the profile's
        requests forgotten after it."""
        tried, runner = self._capture_tried, self.graph_runner
        self._capture_tried, self.graph_runner = True, None
        try:
            self.propose(inp)
        finally:
            self._capture_tried, self.graph_runner = tried, runner
            self.remove_requests(inp.order)

    def _graph_step(self, ids, positions, slots, seq_lens, *rest):
        """``rest``: (hidden, block table) for EAGLE, (block table,) for a draft model."""
        hidden, tables = (rest[0] if len(rest) == 2 else None), rest[-1]
        n = ids.shape[0]
        batch = AttentionBatch(num_tokens=n, num_seqs=n, num_decodes=n,
                               query_start_loc=self._arange[:n + 1], seq_lens=seq_lens,
                               block_tables=tables, slot_mapping=slots, max_query_len=1,
                               max_seq_len=self.ctx.max_model_len, query_start_loc_host=[],
                               seq_lens_host=[])
        states, hidden = self.step(ids, positions, self.kernel.build_metadata(batch), hidden)
        return (self.to_tokens(states), hidden) if hidden is not None else (self.to_tokens(states),)

    def max_position(self) -> int:
        """Positions the drafter may write: below its rotary table's length (yarn's extended
        length included: ``rope_max_positions``, as its ``RotaryEmbedding`` is built) and the
        context (a captured step's attention reads at most ``max_model_len`` keys)."""
        from tessellm.layers.rope_config import rope_max_positions

        config = self.model_config()
        limit = (rope_max_positions(config) if getattr(config, "max_position_embeddings", None)
                 else self.ctx.max_model_len)
        return min(limit, self.ctx.max_model_len)

    def model_config(self):
        return self.model.config


def _pad(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[0] == size:
        return x
    out = x.new_zeros((size,) + tuple(x.shape[1:]))
    out[:x.shape[0]] = x
    return out
