"""What the draft-model and EAGLE proposers share: K greedy draft steps over their own KV cache.

After the first forward of a step (each proposer feeds it its own way) every proposing request
has its first draft ``d0`` (from the last row of its run, at position ``base``). The next draft
steps are decodes, one token per request, batched::

    step j = 1 .. k-1:  input d[j-1] at position base + j   ->  d[j]
                        (EAGLE also feeds the previous step's hidden state)

The ids never visit the host between steps (each step's argmax is the next step's input); the
drafts are read once at the end. Requests whose blocks or context run out drop out of the
later steps (fewer drafts), never write outside their slots.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from tessellm.spec_decode.draft_batch import decode_batch
from tessellm.spec_decode.proposer import Proposer

# (input ids [P], positions [P], metadata, hidden [P, H] or None) -> (states, next hidden)
StepFn = Callable[[torch.Tensor, torch.Tensor, object, Optional[torch.Tensor]], tuple]


class KVDrafter(Proposer):
    """Base of proposers that run a model with a KV cache (draft model, EAGLE heads)."""

    def __init__(self, ctx):
        super().__init__(ctx)
        self.k = self.config.num_speculative_tokens
        self.num_lookahead_tokens = self.k
        self.model = None
        self.kernel = None

    def attention_layers(self) -> list:
        return self.model.attention_layers()

    def draft_steps(self, first: torch.Tensor, hidden: Optional[torch.Tensor], bases: list[int],
                    blocks: list[list[int]], counts: list[int], step: StepFn,
                    to_tokens: Callable[[torch.Tensor], torch.Tensor]) -> list[list[int]]:
        """Drafts per proposing request: ``first`` [P] holds each one's d0 (device), ``hidden``
        the hidden state its last row left (EAGLE; None for a draft model), ``bases`` the
        position d0 was predicted at, ``counts`` how many drafts each may have (>= 1)."""
        p, kmax = len(bases), max(counts)
        drafts = torch.full((p, kmax), -1, dtype=torch.int64, device=first.device)
        drafts[:, 0] = first
        active = list(range(p))
        tokens = first
        for j in range(1, kmax):
            keep = [i for i, a in enumerate(active) if counts[a] > j]
            if len(keep) < len(active):
                if not keep:
                    break
                index = torch.tensor(keep, device=first.device)
                tokens = tokens[index]
                hidden = hidden[index] if hidden is not None else None
                active = [active[i] for i in keep]
            positions, attn = decode_batch([bases[a] + j for a in active], [blocks[a] for a in active],
                                           self.ctx.block_size, self.ctx.device)
            states, hidden = step(tokens, positions, self.kernel.build_metadata(attn), hidden)
            tokens = to_tokens(states)
            drafts[torch.tensor(active, device=first.device), j] = tokens
        rows = drafts.tolist()  # the one host sync of the proposal
        return [row[:counts[i]] for i, row in enumerate(rows)]

    def max_position(self) -> int:
        """Positions the drafter may write: its rotary table's length and the context."""
        limit = getattr(self.model_config(), "max_position_embeddings", None) or self.ctx.max_model_len
        return min(limit, self.ctx.max_model_len + self.k)

    def model_config(self):
        return self.model.config
