"""EAGLE / EAGLE-3 proposers: a one-layer head over the target's hidden states drafts K tokens.

The head's K/V at position ``p`` comes from ``(t[p+1], h[p])``: the next token and the
target's hidden state at ``p`` (``tessellm.models.eagle``). So each step feeds the head the
rows the target computed *and kept*: for a prefill chunk all of them (the next token is the
next prompt token); for a verifying request the rows up to its last accepted token, whose
hidden states the rejected drafts did not touch::

    target rows     t9  d0  d1  d2        (verifying [d0 d1 d2] after t9; accepts d0 and x)
    positions       9   10  11  12
    kept rows       9   10                 (their inputs t9, d0 were right)
    head inputs     (d0, h9) (x, h10)      -> the last row predicts d0' (position 12)
    draft steps     (d0', g) at 11 -> d1', (d1', g') at 12 -> d2'   (g: the head's own hidden)

The guesses the draft steps write (positions L-1 ..) are rewritten with the target's hidden
states the next step, as those rows are computed. Positions the head never saw (a step that
did not call the proposer) keep stale K/V, and so does a prefix-cache hit's last position (its
K/V saw the next token of the request that computed the block): only the acceptance rate can
suffer, never the output.
"""

from __future__ import annotations

import numpy as np
import torch

from tessellm.core.sampler import upload, upload_tensor
from tessellm.spec_decode.draft_batch import Run, build_draft_batch, room
from tessellm.spec_decode.drafter import KVDrafter
from tessellm.spec_decode.proposer import Proposal, ProposeInput


class EagleProposer(KVDrafter):
    needs_step_tensors = True
    needs_hidden_states = True
    method = "eagle"

    def load_weights(self) -> None:
        from tessellm.models.eagle import head_config, load_eagle_head

        ctx = self.ctx
        self.head_config = head_config(self.config.model, self.method)
        load_format = "dummy" if self.config.draft_load_format == "dummy" else "auto"
        self.model = load_eagle_head(self.config.model, self.method, ctx.target, self._model_context(),
                                     load_format, getattr(ctx.engine_args, "seed", 0))
        self.aux_hidden_layers = self.target_layers()
        self.hidden_size = self.head_config.hidden_size
        self.draft_vocab_size = getattr(self.head_config, "draft_vocab_size", None)

    def _model_context(self):
        """The head's layers get the backend's fused ops, an attention kernel for its shape
        (this rank's heads) and the target's tensor-parallel group."""
        from tessellm.backends.reference.ops import ReferenceOps
        from tessellm.backends.spec import AttentionSpec, OpsSpec
        from tessellm.distributed.parallel_state import TensorParallel
        from tessellm.layers.context import ModelContext
        from tessellm.models.decoder import shard_heads

        ctx, cfg = self.ctx, self.head_config
        tp = ctx.tp or TensorParallel()
        heads = cfg.num_attention_heads
        try:
            local_heads, local_kv_heads, _ = shard_heads(
                heads, getattr(cfg, "num_key_value_heads", None) or heads, tp.rank, tp.size)
        except ValueError as e:
            raise ValueError(f"The {self.method} head at {self.config.model} cannot run with "
                             f"this tensor_parallel_size: {e}") from None
        spec = AttentionSpec(num_heads=local_heads, num_kv_heads=local_kv_heads,
                             head_size=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
                             dtype=ctx.dtype, block_size=ctx.block_size,
                             kv_cache_dtype=getattr(ctx.engine_args, "kv_cache_dtype", "auto"),
                             sliding_window=None, max_model_len=ctx.max_model_len + self.k,
                             max_num_seqs=ctx.max_num_seqs)
        self.kernel = ctx.registry.attention_kernel(ctx.backend, spec)
        if self.kernel is None:
            raise RuntimeError(f"No plugin provides an attention kernel for backend "
                               f"{ctx.backend.name!r} with {spec} (the {self.method} head).")
        ops = ctx.registry.fused_ops(ctx.backend, OpsSpec(ctx.dtype)) or ReferenceOps()
        return ModelContext(ops=ops, dtype=ctx.dtype, device=ctx.device,
                            make_attention_kernel=lambda window, logit_softcap=None: self.kernel,
                            tp=tp, max_positions=ctx.max_model_len + self.k)

    def target_layers(self) -> tuple[int, ...]:
        return ()

    def model_config(self):
        return self.head_config

    def step(self, ids, positions, metadata, hidden):
        return self.model(ids, positions, metadata, hidden)

    def to_tokens(self, states: torch.Tensor) -> torch.Tensor:
        return self.model.draft_tokens(states)

    @torch.inference_mode()
    def propose(self, inp: ProposeInput) -> Proposal:
        if inp.tensors is None:  # no hidden states this step (never expected): no drafts
            return Proposal()
        runs, rows, proposing = [], [], []
        k = min(self.k, inp.max_drafts)
        row0 = 0
        for rid, st, n in zip(inp.order, inp.states, inp.num_scheduled):
            start = st.num_computed_tokens - n
            end = len(st.token_ids) - 1 if rid in inp.sampled else start + n
            end = min(end, len(st.token_ids) - 1, len(st.block_ids) * self.ctx.block_size)
            if start < end:
                runs.append(Run(st.token_ids[start + 1:end + 1], start, st.block_ids))
                rows.append(np.arange(row0, row0 + end - start))
                if k and rid in inp.sampled and end == len(st.token_ids) - 1:
                    proposing.append((len(runs) - 1, rid, st))
            row0 += n
        out = Proposal()
        if not runs:
            return out
        fed = self._first_forward(runs, rows, inp.tensors, [i for i, _, _ in proposing])
        if fed is None:
            return out
        first, hidden = fed
        bases = [len(st.token_ids) - 2 for _, _, st in proposing]
        counts = [1 + room(len(st.block_ids), self.ctx.block_size, b + 1, k - 1, self.max_position())
                  for (_, _, st), b in zip(proposing, bases)]
        drafts = self.draft_steps(first, hidden, bases, [st.block_ids for _, _, st in proposing], counts)
        for (_, rid, _), d in zip(proposing, drafts):
            out.token_ids[rid] = d
        return out

    def _first_forward(self, runs: list[Run], rows: list, tensors, proposing: list[int]):
        """Feed the runs with the target's hidden states of their rows; (first drafts, the
        head's hidden states) of the proposing runs (device), or None. One row per run (the
        usual decode after a rejection): a draft step, graph-captured; else a flat eager
        forward."""
        device = self.ctx.device
        pick = upload(proposing, device)
        if all(len(r.token_ids) == 1 for r in runs):
            if not self._capture_tried:
                self.capture_graphs()
            index = upload_tensor(torch.from_numpy(np.concatenate(rows)), device)
            ids = upload([r.token_ids[0] for r in runs], device)
            hidden = self.model.combine(self.target_hidden(tensors, index))
            tokens, hidden = self._decode(ids, hidden, [r.start for r in runs], [r.block_ids for r in runs])
            return (tokens[pick], hidden[pick]) if proposing else None
        batch = build_draft_batch(runs, self.ctx.block_size, device)
        index = upload_tensor(torch.from_numpy(np.concatenate([rows[i] for i in batch.order])), device)
        hidden = self.model.combine(self.target_hidden(tensors, index))
        states, hidden = self.model(batch.input_ids, batch.positions,
                                    self.kernel.build_metadata(batch.attention), hidden)
        if not proposing:
            return None
        last = batch.last_rows[pick]
        return self.model.draft_tokens(states[last]), hidden[last]

    def target_hidden(self, tensors, index: torch.Tensor) -> torch.Tensor:
        return tensors.hidden_states[index]


class Eagle3Proposer(EagleProposer):
    needs_hidden_states = False
    method = "eagle3"

    def target_layers(self) -> tuple[int, ...]:
        """The low, middle and high layers whose inputs EAGLE-3 reads (as trained: 2, N/2, N-3)."""
        n = self.ctx.target.config.num_hidden_layers
        layers = getattr(self.head_config, "eagle_aux_hidden_state_layer_ids", None)
        layers = tuple(layers) if layers else (2, n // 2, n - 3)
        if len(set(layers)) != 3 or sorted(layers) != list(layers) or not 0 <= layers[0] < layers[-1] < n:
            raise ValueError(f"EAGLE-3 reads the inputs of three distinct target layers in order, "
                             f"but {list(layers)} does not fit the target's {n} layers; set "
                             "eagle_aux_hidden_state_layer_ids in the head's config.json.")
        return layers

    def target_hidden(self, tensors, index: torch.Tensor) -> torch.Tensor:
        return torch.cat([h[index] for h in tensors.aux_hidden_states], dim=-1)
