"""Serving a checkpoint as another kind of model: ``hf_overrides`` and ``convert``, as vLLM does.

* ``hf_overrides`` (a dict or its JSON): config.json values laid over the checkpoint's, e.g.
  ``{"architectures": ["Qwen3ForSequenceClassification"], "classifier_from_token": ["no",
  "yes"], "is_original_qwen3_reranker": true}``: how vLLM serves Qwen3-Reranker unconverted.
* ``convert="classify"``: a ``*ForCausalLM`` runs as its family's ``*ForSequenceClassification``
  (vLLM's ``as_seq_cls_model``); ``convert="embed"`` runs it as an embedding model (the runner
  alone decides that: ``tessellm.pooling.config``).

Where a converted classifier's ``score`` head comes from (``tessellm.models.seq_cls``)::

    the checkpoint has score.weight              -> it (a checkpoint HF saved as a classifier)
    classifier_from_token [t0, t1] + method
      from_2_way_softmax                         -> W[t1] - W[t0]          (1 label)
      no_post_processing                         -> W[t0], W[t1], ...      (a label per token)
    neither                                      -> refused when loading, by name

``W`` is the LM head (the input embeddings when they are tied). With ``from_2_way_softmax`` the
one logit is ``logit(t1) - logit(t0)`` of the causal LM at the last token, so its sigmoid is
the softmax of the two tokens' logits: P("yes") of a yes/no reranker prompt. Tokens are vocabulary
strings (looked up with the tokenizer, as vLLM does) or ids; the ids go on the config as
``classifier_from_token_ids`` for the model to read. Such an LLM reranker scores a pair as the
one text ``query + document`` (``use_sep_token`` false), unless config.json says otherwise.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from tessellm.config import ModelSource, resolve_model
from tessellm.json_arg import json_object_arg

CONVERTS = ("auto", "none", "embed", "classify")
FROM_TOKEN_METHODS = ("from_2_way_softmax", "no_post_processing")


def model_source(args) -> ModelSource:
    """The model as this engine serves it: ``args.model`` resolved, ``hf_overrides`` laid on its
    config, ``convert="classify"`` and a from-token head applied. Every process that builds the
    model (the engine core, each worker) calls this, so they agree."""
    source = resolve_model(args.model)
    config = source.hf_config
    for key, value in parse_hf_overrides(getattr(args, "hf_overrides", None)).items():
        setattr(config, key, value)  # a PretrainedConfig's num_labels setter redoes id2label
    from tessellm.multimodal.text_only import images_off, text_only_config

    if images_off(config, getattr(args, "limit_mm_per_prompt", None)):  # the language model alone
        source = dataclasses.replace(source, hf_config=text_only_config(config))
        config = source.hf_config
    if getattr(args, "convert", "auto") == "classify":
        _as_classifier(config)
    if _from_token_method(config) is not None:
        _from_token_config(config, source, getattr(args, "tokenizer", None))
    from tessellm.pooling.encoder import pair_separator_config

    pair_separator_config(config, source, getattr(args, "tokenizer", None))  # BERT pairs' token types
    return source


def parse_hf_overrides(value) -> dict:
    """``hf_overrides`` as a dict (given as one or as its JSON)."""
    return json_object_arg(value, "hf_overrides", '{"architectures": ["Qwen3ForSequenceClassification"]}')


def _as_classifier(config) -> None:
    """``*ForCausalLM`` -> the family's ``*ForSequenceClassification`` (vLLM's as_seq_cls_model)."""
    from tessellm.models.registry import supported_architectures

    archs = list(getattr(config, "architectures", None) or [])
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return
    converted = [a[:-len("ForCausalLM")] + "ForSequenceClassification" for a in archs
                 if a.endswith("ForCausalLM")]
    known = [a for a in converted if a in supported_architectures()]
    if not known:
        families = sorted(a for a in supported_architectures() if a.endswith("ForSequenceClassification"))
        raise ValueError(f"convert='classify' turns a *ForCausalLM into its family's "
                         f"*ForSequenceClassification; {archs or 'this model'} has none tessellm runs "
                         f"(it runs {', '.join(families)}).")
    config.architectures = known[:1]


def _from_token_method(config) -> Optional[str]:
    """The from-token method the config asks for (None: the head comes from ``score.weight``)."""
    method = getattr(config, "method", None)
    if getattr(config, "is_original_qwen3_reranker", False):
        method = method or "from_2_way_softmax"  # vLLM's switch for Qwen3-Reranker
    tokens = getattr(config, "classifier_from_token", None)
    if method is None and tokens is None:
        return None
    if method not in FROM_TOKEN_METHODS:
        raise ValueError(f"classifier_from_token needs method {' or '.join(FROM_TOKEN_METHODS)} "
                         f"(hf_overrides), got {method!r}.")
    return method


def _from_token_config(config, source: ModelSource, tokenizer_dir: Optional[str]) -> None:
    """num_labels, the token ids and the pair format of a from-token classifier."""
    method = _from_token_method(config)
    tokens = list(getattr(config, "classifier_from_token", None) or [])
    if method == "from_2_way_softmax" and len(tokens) != 2:
        raise ValueError("method from_2_way_softmax needs classifier_from_token with two tokens, "
                         f"[false, true] (e.g. [\"no\", \"yes\"]), got {tokens!r}.")
    if not tokens:
        raise ValueError(f"method {method} needs classifier_from_token: the tokens whose LM-head rows "
                         "make the score head, e.g. [\"no\", \"yes\"].")
    if not any(a.endswith("ForSequenceClassification") for a in getattr(config, "architectures", None) or []):
        raise ValueError("classifier_from_token builds a classifier's score head; give convert='classify' "
                         "(--convert classify) or hf_overrides architectures *ForSequenceClassification.")
    config.classifier_from_token_ids = token_ids(tokens, source, tokenizer_dir, config.vocab_size)
    config.method = method
    config.num_labels = 1 if method == "from_2_way_softmax" else len(tokens)
    if getattr(config, "use_sep_token", None) is None and getattr(config, "use_pad_token", None) is None:
        config.use_sep_token = False  # an LLM reranker reads query + document as one text


def token_ids(tokens: list, source: ModelSource, tokenizer_dir: Optional[str], vocab_size: int) -> list[int]:
    """Vocabulary ids of ``tokens`` (strings looked up as vLLM does, or ids as given)."""
    tokenizer = None
    ids = []
    for token in tokens:
        if isinstance(token, int) and not isinstance(token, bool):
            token_id = token
        elif isinstance(token, str):
            if tokenizer is None:
                from tessellm.loader.model_loader import load_tokenizer

                tokenizer = load_tokenizer(source.path, source.kind, tokenizer_dir)
            token_id = tokenizer.convert_tokens_to_ids(token)
            if token_id is None or tokenizer.convert_ids_to_tokens(token_id) != token:
                raise ValueError(f"classifier_from_token {token!r} is not one token of this model's "
                                 "vocabulary; give a vocabulary string (as tokenizer.convert_tokens_to_ids "
                                 "takes it) or a token id.")
        else:
            raise ValueError(f"classifier_from_token holds {token!r}; give token strings or ids.")
        if not 0 <= token_id < vocab_size:
            raise ValueError(f"classifier_from_token id {token_id} is outside the vocabulary (0..{vocab_size - 1}).")
        ids.append(int(token_id))
    return ids
