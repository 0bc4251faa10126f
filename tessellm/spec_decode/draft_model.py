"""Draft-model proposer: a smaller model of the same tokenizer drafts K tokens greedily.

The draft model (any architecture tessellm loads) keeps its own paged KV cache over the
target's block ids. Invariant: for each request, the draft's K/V is valid for positions
``0 .. valid - 1`` (``valid`` tracked here). Each step feeds it the tokens past ``valid`` it
has not seen, then it drafts from the last one::

    before the step   tokens t0 .. t9 (L = 10); the draft wrote 0..9 and its guesses d0 d1 at
                      10 11 (written = 12) while proposing [d0 d1 d2]
    the target        verifies [t9 d0 d1 d2], accepts d0 and its own x (a = 2): L = 12
    valid             min(written, L_before + accepted drafts) = min(12, 10 + 1) = 11
    first forward     feeds t11 = x at 11 (a prefill chunk: its whole new chunk) -> d0'
    draft steps       d0' at 12 -> d1', d1' at 13 -> d2'       written = 14

Prefill chunks are fed in the step that computes them, beside the target; a prefix-cache hit
counts as valid (the draft cache holds the blocks' K/V from the request that computed them).
Drafts are greedy (the verifier treats them as point masses); the target's verification keeps
the output exact whatever the draft proposes.
"""

from __future__ import annotations

import torch

from tessellm.core.sampler import upload
from tessellm.spec_decode.draft_batch import Run, build_draft_batch, room
from tessellm.spec_decode.drafter import KVDrafter
from tessellm.spec_decode.proposer import Proposal, ProposeInput


class DraftModelProposer(KVDrafter):
    def __init__(self, ctx):
        super().__init__(ctx)
        self.valid: dict[str, int] = {}  # request id -> positions with valid draft K/V

    def load_weights(self) -> None:
        from tessellm.config import resolve_model
        from tessellm.loader.model_loader import build_model

        ctx, path = self.ctx, self.config.model
        try:
            source = resolve_model(path)
        except (FileNotFoundError, OSError) as e:
            raise ValueError(f"speculative_config model {path!r} cannot be loaded as a draft "
                             f"model: {e}") from None
        draft_vocab = getattr(source.hf_config, "vocab_size", None)
        if draft_vocab != ctx.vocab_size:
            raise ValueError(f"The draft model {path} has vocab_size {draft_vocab} but the target "
                             f"has {ctx.vocab_size}; use a draft model with the target's tokenizer.")
        from tessellm.models.state_space import has_recurrent_state

        if has_recurrent_state(source.hf_config):
            raise ValueError(f"The draft model {path} keeps a per-request recurrent state "
                             f"({', '.join(source.hf_config.architectures)}), which a draft "
                             "model may not yet (its rejected guesses would stay in it); use "
                             "an attention-only draft model, or method ngram.")
        args = ctx.engine_args
        load_format = self.config.draft_load_format
        if load_format == "auto":
            load_format = source.kind
        self.model, self.kernel = build_model(
            source, load_format, ctx.registry, ctx.backend, ctx.dtype, ctx.device, ctx.block_size,
            getattr(args, "kv_cache_dtype", "auto"), getattr(args, "seed", 0), tp=ctx.tp,
            max_positions=ctx.max_model_len + self.k, max_model_len=ctx.max_model_len + self.k,
            max_num_seqs=ctx.max_num_seqs)

    @torch.inference_mode()
    def propose(self, inp: ProposeInput) -> Proposal:
        runs, proposing = [], []
        k = min(self.k, inp.max_drafts)
        for rid, st, n in zip(inp.order, inp.states, inp.num_scheduled):
            first, end = self._span(rid, st, n, inp)
            end = min(end, len(st.block_ids) * self.ctx.block_size)
            if first < end:
                runs.append(Run(st.token_ids[first:end], first, st.block_ids))
                if k and rid in inp.sampled and end == len(st.token_ids):
                    proposing.append((len(runs) - 1, rid, st))
            self.valid[rid] = max(first, end)
        out = Proposal()
        if not runs:
            return out
        first = self._first_forward(runs, [i for i, _, _ in proposing])
        if first is None:
            return out
        limit = self.max_position()
        bases = [len(st.token_ids) - 1 for _, _, st in proposing]
        counts = [1 + room(len(st.block_ids), self.ctx.block_size, b + 1, k - 1, limit)
                  for (_, _, st), b in zip(proposing, bases)]
        drafts = self.draft_steps(first, None, bases, [st.block_ids for _, _, st in proposing], counts)
        for (_, rid, st), d in zip(proposing, drafts):
            out.token_ids[rid] = d
            self.valid[rid] = len(st.token_ids) + len(d) - 1  # its guesses at L .. L+k-2
        return out

    def _first_forward(self, runs: list[Run], proposing: list[int]):
        """Feed the runs; the first draft of each proposing run (device), or None. One token
        per run (the usual decode after a rejection): a draft step, graph-captured; else a
        flat eager forward."""
        device = self.ctx.device
        if all(len(r.token_ids) == 1 for r in runs):
            if not self._capture_tried:
                self.capture_graphs()
            ids = upload([r.token_ids[0] for r in runs], device)
            tokens, _ = self._decode(ids, None, [r.start for r in runs], [r.block_ids for r in runs])
            return tokens[upload(proposing, device)] if proposing else None
        batch = build_draft_batch(runs, self.ctx.block_size, device)
        hidden = self.model(batch.input_ids, batch.positions, self.kernel.build_metadata(batch.attention))
        if not proposing:
            return None
        return self.to_tokens(hidden[batch.last_rows[upload(proposing, device)]])

    def _span(self, rid: str, st, n: int, inp: ProposeInput) -> tuple[int, int]:
        """Positions ``[first, end)`` to feed the draft this step."""
        valid = self.valid.get(rid)
        if valid is None:  # new (or back after preemption): valid up to the step's start
            valid = st.num_computed_tokens - n
        new = inp.sampled.get(rid)
        if not new:  # a prefill chunk: the tokens the target computed
            return valid, st.num_computed_tokens
        before = len(st.token_ids) - len(new)
        accepted_drafts = len(new) - 1 if rid in inp.verified_drafts else 0
        return min(valid, before + accepted_drafts), len(st.token_ids)

    def step(self, ids, positions, metadata, hidden):
        return self.model(ids, positions, metadata), None

    def to_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.compute_logits(hidden).argmax(dim=-1)

    def remove_requests(self, request_ids) -> None:
        for rid in request_ids:
            self.valid.pop(rid, None)
