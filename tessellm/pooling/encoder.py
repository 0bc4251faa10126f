"""Encoder-only models (BERT, XLM-RoBERTa: ``tessellm.models.bert``) on the paged engine.

Their attention is bidirectional over each sequence. The engine serves that through the
plugin contract's key limits (API 8: ``AttentionSpec.prefill_key_limits``,
``AttentionBatch.key_limits``): every row of a sequence sees keys up to the sequence's last::

    step rows      a0 a1 a2 | b0 b1 | c0
    positions       0  1  2 |  0  1 |  0
    key limits      2  2  2 |  1  1 |  0      (causal would be the positions)

Invariant: a step computes each encoder request whole, from token 0 to its last, so every key
a row may see is written to the cache in that same step. The engine keeps it by running these
models without chunked prefill and without prefix caching (a cached prefix's keys would have
been computed without the later tokens), with a step budget that holds the longest prompt
(``encoder_args``); a step that breaks it is a scheduling bug, raised here rather than attended
causally. A request needs no KV cache after its step: it ends with its prompt (pooling), and
its blocks go back to the pool.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Sequence

import numpy as np

logger = logging.getLogger(__name__)


def encoder_key_limits(states: Sequence, counts: Sequence[int]) -> np.ndarray:
    """int32 ``[T]``: per row of the step, its sequence's last position (picture above)."""
    for st, n in zip(states, counts):
        if st.num_computed_tokens != 0 or n != st.num_prompt_tokens:
            raise RuntimeError(f"A step computes tokens {st.num_computed_tokens}.."
                               f"{st.num_computed_tokens + n - 1} of encoder request "
                               f"{st.request_id}'s {st.num_prompt_tokens}; bidirectional attention "
                               "needs the whole prompt in one step (chunked prefill and prefix "
                               "caching are off for encoder models).")
    counts = np.asarray(counts, dtype=np.int64)
    return np.repeat(counts - 1, counts).astype(np.int32)


def encoder_args(args, max_model_len: int, default_budget: int):
    """``args`` for an encoder model: chunked prefill off (a prompt runs whole), and a step
    budget of at least ``max_model_len`` tokens when none was given; ValueError when the one
    given cannot hold the longest prompt."""
    budget = args.max_num_batched_tokens
    if budget is not None and budget < max_model_len:
        raise ValueError(f"This encoder model attends both ways over the whole prompt, so a prompt "
                         f"runs in one step: max_num_batched_tokens ({budget}) must be at least "
                         f"max_model_len ({max_model_len}); raise it, or lower max_model_len.")
    if args.enable_chunked_prefill:
        logger.info("Encoder model: chunked prefill is off (bidirectional attention needs each "
                    "prompt whole in one step).")
    return dataclasses.replace(args, enable_chunked_prefill=False,
                               max_num_batched_tokens=budget or max(default_budget, max_model_len))


def is_encoder(hf_config) -> bool:
    """Whether the model tessellm builds for this config attends both ways (``bidirectional``)."""
    from tessellm.models.registry import model_class

    try:
        return bool(getattr(model_class(hf_config, pooling=True), "bidirectional", False))
    except ValueError:  # not a supported architecture: refused when the model is built
        return False


def pair_separator_config(config, source, tokenizer_dir) -> None:
    """A BERT cross-encoder derives its token types from the ``[SEP]`` of the pair
    (``models/bert.py``): config.json seldom names it, so the tokenizer's ``sep_token_id`` goes
    on the config (every process that builds the model calls this, through ``model_source``)."""
    archs = list(getattr(config, "architectures", None) or [])
    if ("BertForSequenceClassification" not in archs or int(getattr(config, "type_vocab_size", 1)) < 2
            or getattr(config, "sep_token_id", None) is not None):
        return
    from tessellm.loader.model_loader import load_tokenizer

    try:
        tokenizer = load_tokenizer(source.path, source.kind, tokenizer_dir)
    except Exception:  # noqa: BLE001 - no tokenizer files: token ids only, token types stay 0
        tokenizer = None
    sep = getattr(tokenizer, "sep_token_id", None)
    if sep is None:
        logger.warning("BERT classifier at %s: no sep_token_id in config.json or its tokenizer; "
                       "a text pair's second segment gets token type 0, unlike HF's 1.", source.path)
        return
    config.sep_token_id = int(sep)
