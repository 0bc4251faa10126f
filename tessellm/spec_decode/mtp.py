"""MTP proposer: the target checkpoint's own multi-token-prediction layer drafts K tokens.

The MTP module (``tessellm.models.mtp``) reads what an EAGLE-1 head reads, the target's final
hidden state at ``p`` and the token at ``p + 1``, so the EAGLE proposer's feeding, draft steps,
graphs and KV bookkeeping serve it unchanged (``spec_decode/eagle.py``); only the head is
built differently: from the target's directory and the target's own layer class, with an
attention kernel of the target's kind (MLA for DeepSeek) made for it alone.
"""

from __future__ import annotations

import os

from tessellm.spec_decode.eagle import EagleProposer


class MTPProposer(EagleProposer):
    method = "mtp"

    def load_weights(self) -> None:
        from tessellm.models.mtp import build_mtp_head
        from tessellm.pooling.convert import model_source

        ctx, args = self.ctx, self.ctx.engine_args
        given = self.config.model
        if given and os.path.realpath(given) != os.path.realpath(args.model):
            raise ValueError(f"speculative_config method 'mtp' drafts with the target "
                             f"checkpoint's own MTP layers, but model {given!r} is another "
                             "directory; drop \"model\" (or use method draft_model for a "
                             "separate draft model).")
        load_format = "dummy" if "dummy" in (self.config.draft_load_format,
                                             getattr(args, "load_format", "auto")) else "auto"
        self.model, self.kernel = build_mtp_head(
            ctx.target, model_source(args), ctx.registry, ctx.backend, ctx.block_size,
            getattr(args, "kv_cache_dtype", "auto"), load_format, getattr(args, "seed", 0),
            max_model_len=ctx.max_model_len + self.k, max_num_seqs=ctx.max_num_seqs)
        self.head_config = self.model.config
        self.hidden_size = self.head_config.hidden_size
        self.aux_hidden_layers = ()
