"""Scoring pairs of texts (``LLM.score``, ``/score``, ``/rerank``), the two ways vLLM does it.

* A cross-encoder: a sequence classifier with ``num_labels == 1`` (a reranker such as
  bge-reranker or a Qwen3 reranker converted to ``*ForSequenceClassification``). Each pair is
  one prompt, the tokenizer's text pair (``tokenizer(text=q, text_pair=d)``: a decoder-only
  tokenizer joins the two with its special tokens), or, when config.json says
  ``use_sep_token: false`` (vLLM's switch for an LLM used as a reranker), the one text ``q + d``;
  ``truncate_prompt_tokens`` truncates as vLLM's pooling tokenizer does (``truncation=True,
  max_length=k`` with ``truncation_side="right"``: the longer text loses its last tokens
  first). The score is the sigmoid of its one logit (the classify path with ``use_activation``).
* An embedding model: both sides are embedded (each cut to its first k tokens), and the score
  is the cosine similarity of the two vectors.

A classifier with more than one label has no score (vLLM's rule too): refused by name.

A score template (vLLM's: ``LLM.score(..., chat_template=...)``, ``--chat-template`` at the
server) formats a cross-encoder's pair instead: a chat template rendered over the messages
``[{"role": "query", "content": q}, {"role": "document", "content": d}]`` (an LLM reranker's
prompt, e.g. Qwen3-Reranker's, examples/score_templates/qwen3_reranker.jinja), tokenized without
adding special tokens (the template places them)::

    ("what is a cat?", "a small feline")  --template-->  "<|im_start|>system ... <Query>: what is
    a cat?\n<Document>: a small feline<|im_end|>\n<|im_start|>assistant\n..."  -->  token ids

Pairs are formed as vLLM forms them::

    text_1 = "q",        text_2 = ["d0", "d1"]  ->  (q, d0), (q, d1)
    text_1 = ["q0","q1"], text_2 = ["d0", "d1"]  ->  (q0, d0), (q1, d1)
    text_1 = ["q0","q1"], text_2 = ["d0"]        ->  error: lengths differ
"""

from __future__ import annotations

from typing import Optional, Union

import numpy as np

from tessellm.core.prompt_truncation import cut_ids
from tessellm.core.scheduler_config import RequestParamError
from tessellm.pooling.front import RunnerMismatchError

Texts = Union[str, list[str]]


def score_mode(info) -> str:
    """``cross`` (a one-label classifier) or ``embed`` (cosine of embeddings) for this engine."""
    if getattr(info, "runner", "generate") != "pooling":
        raise RunnerMismatchError(
            "This engine generates text (runner='generate'): it cannot score pairs. Start a "
            "cross-encoder (*ForSequenceClassification with num_labels=1) or an embedding model "
            "with runner='pooling'.")
    if info.pooling.get("task") != "classify":
        return "embed"
    if info.pooling["num_labels"] != 1:
        raise RunnerMismatchError(
            f"This model is a classifier with {info.pooling['num_labels']} labels; scoring and "
            "reranking need a cross-encoder (num_labels == 1) or an embedding model. Use "
            "LLM.classify / POST /classify for its labels.")
    return "cross"


def form_pairs(text_1: Texts, text_2: Texts, names: tuple[str, str] = ("text_1", "text_2")) -> list[tuple[str, str]]:
    """The (query, document) pairs to score, in output order; RequestParamError when the two
    sides cannot pair up."""
    side_1 = [text_1] if isinstance(text_1, str) else list(text_1)
    side_2 = [text_2] if isinstance(text_2, str) else list(text_2)
    for name, side in zip(names, (side_1, side_2)):
        if not side:
            raise RequestParamError(f"{name} is empty; give a string or a non-empty list of strings.", name)
        for i, t in enumerate(side):
            if not isinstance(t, str):
                raise RequestParamError(f"{name}[{i}] is a {type(t).__name__}; give text.", name)
            if not t:
                raise RequestParamError(f"{name}[{i}] is an empty string; give at least one character.", name)
    if len(side_1) == 1:
        side_1 = side_1 * len(side_2)
    if len(side_1) != len(side_2):
        raise RequestParamError(
            f"{names[0]} has {len(side_1)} texts and {names[1]} has {len(side_2)}; give one "
            f"{names[0]} for any number of {names[1]}, or lists of the same length.", names[1])
    return list(zip(side_1, side_2))


def pair_prompt(inputs, query: str, document: str, sep: bool = True, max_length=None,
                template: Optional[str] = None) -> dict:
    """A cross-encoder's prompt for one pair: the score ``template`` rendered (special tokens
    as it places them), else the tokenizer's text pair (``sep``) or the text ``query +
    document``, special tokens included; cut to ``max_length`` tokens if given by the
    tokenizer's truncation on the pooling side, ``right`` (``inputs``: the engine's
    ``InputProcessor``, its tokenizer and ``truncator``): a pair's longer text loses its end
    first, a rendered template or a joined text its end, as in vLLM."""
    tokenizer = inputs.tokenizer
    if tokenizer is None:
        raise ValueError("This model has no tokenizer files; scoring needs one to join the pair.")
    kwargs = {"add_special_tokens": template is None}
    if template is not None:
        pair = {"text": render_score_template(tokenizer, template, query, document)}
    else:
        pair = {"text": query, "text_pair": document} if sep else {"text": query + document}
    if max_length is None:
        return {"prompt_token_ids": list(tokenizer(**pair, **kwargs)["input_ids"])}
    ids = inputs.truncator.tokenize(tokenizer, max_length, **pair, **kwargs)["input_ids"]
    return {"prompt_token_ids": cut_ids(ids, max_length, inputs.truncator.side)}


def render_score_template(tokenizer, template: str, query: str, document: str) -> str:
    """The pair's text through a score template (vLLM's roles ``query`` and ``document``)."""
    import jinja2

    messages = [{"role": "query", "content": query}, {"role": "document", "content": document}]
    try:
        text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=False)
    except jinja2.TemplateError as exc:
        raise ValueError(f"The score template failed on this pair: {exc}") from None
    if not text:
        raise ValueError("The score template rendered an empty prompt; it should place the messages "
                         "with roles query and document.")
    return text


def pair_max_length(truncate_prompt_tokens, info):
    """``truncate_prompt_tokens`` as the tokenizer's ``max_length`` (-1: the context length)."""
    if truncate_prompt_tokens is None:
        return None
    return info.max_model_len if truncate_prompt_tokens == -1 else truncate_prompt_tokens


def cosine(a, b) -> float:
    """Cosine similarity of two vectors, in float64."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))


def run_score(llm, data_1: Texts, data_2: Texts, truncate_prompt_tokens, use_tqdm: bool,
              pooling_params, lora_request, chat_template: Optional[str] = None) -> list:
    """``LLM.score``: the pairs through the cross-encoder (formatted by ``chat_template``, a
    score template, if given), or both sides through ``LLM.embed``."""
    from dataclasses import replace

    from tessellm.pooling.outputs import ScoringOutput, ScoringRequestOutput
    from tessellm.pooling.params import PoolingParams

    info = llm.engine.info
    mode = score_mode(info)
    pairs = form_pairs(data_1, data_2)
    if mode == "cross":
        sep = info.pooling["use_sep_token"]
        length = pair_max_length(truncate_prompt_tokens, info)
        prompts = [pair_prompt(llm.engine.inputs, q, d, sep, length, chat_template) for q, d in pairs]
        outs = llm.classify(prompts, pooling_params, None, use_tqdm, lora_request)
        return [ScoringRequestOutput(o.request_id, ScoringOutput(o.outputs.probs[0]), o.prompt_token_ids,
                                     o.finished) for o in outs]
    if chat_template is not None:
        raise ValueError("chat_template (a score template) formats a cross-encoder's pair; this "
                         "embedding model embeds each text alone and scores by cosine similarity.")
    if pooling_params is not None and pooling_params.use_activation is not None:
        pooling_params = replace(pooling_params, use_activation=None)  # cosine needs no activation
    queries = list(dict.fromkeys(q for q, _ in pairs))  # each distinct text embedded once
    docs = [d for _, d in pairs]
    outs = llm.embed(queries + docs, pooling_params or PoolingParams(), truncate_prompt_tokens, use_tqdm,
                     lora_request)
    by_query = dict(zip(queries, outs[:len(queries)]))
    pad = getattr(llm.engine.tokenizer, "pad_token_id", None)
    between = [] if pad is None else [pad]  # vLLM's prompt_token_ids of an embedding score
    return [ScoringRequestOutput(f"score-{d_out.request_id}",
                                 ScoringOutput(cosine(by_query[q].outputs.embedding, d_out.outputs.embedding)),
                                 by_query[q].prompt_token_ids + between + d_out.prompt_token_ids, True)
            for (q, _), d_out in zip(pairs, outs[len(queries):])]
