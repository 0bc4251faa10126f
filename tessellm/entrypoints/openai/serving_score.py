"""POST /score and /rerank on a pooling engine (docs/pooling.md), vLLM's shapes.

Which path a server takes follows the model (``tessellm.pooling.score``): a cross-encoder
(a one-label ``*ForSequenceClassification``) runs each (query, document) pair as one prompt and
scores it by the sigmoid of its logit (the pair formatted by ``--chat-template``, the score
template, when the server has one); an embedding model embeds each distinct text once and
scores the cosine similarity. ``/score`` pairs ``text_1`` with ``text_2`` (one against many, or
list against list); ``/rerank`` scores ``documents`` against ``query`` and returns them most
relevant first (``top_n`` of them, 0: all). Bad input is a 400 naming the field: mismatched
lengths, an empty list or text, a classifier with several labels, a generating engine.
"""

from __future__ import annotations

import time
from typing import Optional

from fastapi import Request

from tessellm.entrypoints.async_llm import AsyncLLM
from tessellm.entrypoints.openai.errors import bad_request, prompt_error
from tessellm.entrypoints.openai.protocol_classify import (RerankDocument, RerankRequest, RerankResponse,
                                                           RerankResult, RerankUsage, ScoreData,
                                                           ScoreRequest, ScoreResponse)
from tessellm.entrypoints.openai.protocol_responses import UsageInfo
from tessellm.entrypoints.openai.sampling import check_model
from tessellm.entrypoints.openai.server_config import ServerConfig
from tessellm.entrypoints.openai.serving import collect, parse_request, random_id, response_id
from tessellm.entrypoints.openai.serving_classify import classify_params
from tessellm.entrypoints.openai.serving_embedding import MAX_INPUTS, _submit
from tessellm.pooling.front import resolve_pooling_params
from tessellm.pooling.params import PoolingParams
from tessellm.pooling.score import cosine, form_pairs, pair_max_length, pair_prompt, score_mode


async def create_score(engine: AsyncLLM, config: ServerConfig, body, http_request: Request):
    req = parse_request(ScoreRequest, body)
    lora = check_model(req.model, config)
    scores, tokens, request_id = await _score(engine, config, req, req.text_1, req.text_2,
                                              ("text_1", "text_2"), lora, http_request, "score")
    return ScoreResponse(id=response_id("score", req, request_id), created=int(time.time()),
                         model=lora.lora_name if lora else config.model_name,
                         data=[ScoreData(index=i, score=s) for i, s in enumerate(scores)],
                         usage=UsageInfo(prompt_tokens=tokens, total_tokens=tokens))


async def create_rerank(engine: AsyncLLM, config: ServerConfig, body, http_request: Request):
    req = parse_request(RerankRequest, body)
    lora = check_model(req.model, config)
    scores, tokens, request_id = await _score(engine, config, req, req.query, req.documents,
                                              ("query", "documents"), lora, http_request, "rerank")
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    if req.top_n:
        order = order[:req.top_n]
    return RerankResponse(
        id=response_id("rerank", req, request_id), model=lora.lora_name if lora else config.model_name,
        usage=RerankUsage(total_tokens=tokens),
        results=[RerankResult(index=i, relevance_score=scores[i],
                              document=RerankDocument(text=req.documents[i]) if req.return_documents else None)
                 for i in order])


async def _score(engine: AsyncLLM, config: ServerConfig, req, side_1, side_2, names, lora,
                 http_request: Request, kind: str) -> tuple[list[float], int, str]:
    """The scores of the pairs, in pair order; the prompt tokens used; the engine's request id
    (``{kind}-...``: ``score`` or ``rerank``, vLLM's response id prefixes)."""
    try:
        mode = score_mode(engine.info)
        pairs = form_pairs(side_1, side_2, names)
    except ValueError as exc:
        raise bad_request(str(exc), getattr(exc, "param", names[1])) from None
    if len(pairs) > MAX_INPUTS:
        raise bad_request(f"The request has {len(pairs)} pairs, over the limit of {MAX_INPUTS} per "
                          "request; send them in several requests.", names[1])
    request_id = random_id(kind)
    if mode == "cross":
        params = classify_params(engine, req)
        sep = engine.info.pooling["use_sep_token"]
        length = pair_max_length(params.truncate_prompt_tokens, engine.info)
        template = config.chat_template  # --chat-template: the score template (vLLM's)
        prompts = [await _prompt(engine, lambda q=q, d=d: pair_prompt(engine.inputs, q, d, sep, length, template),
                                 None, names[1]) for q, d in pairs]
        outs = await collect(engine, _submit(engine, request_id, prompts, params, lora), http_request,
                             config.sse_keepalive_s)
        return [float(o.outputs.data[0]) for o in outs], sum(len(o.prompt_token_ids) for o in outs), request_id
    if req.activation_wanted() is not None:
        raise bad_request("use_activation applies to a cross-encoder's logit; this embedding model "
                          "scores by cosine similarity.", "use_activation")
    try:
        params = resolve_pooling_params(PoolingParams(truncate_prompt_tokens=req.truncate_prompt_tokens),
                                        engine.info)
    except ValueError as exc:
        raise bad_request(str(exc), getattr(exc, "param", None)) from None
    queries = {q for q, _ in pairs}
    texts = list(dict.fromkeys([q for q, _ in pairs] + [d for _, d in pairs]))  # each embedded once
    prompts = [await _prompt(engine, lambda t=t: _text_prompt(engine, t, params.truncate_prompt_tokens),
                             params.truncate_prompt_tokens,
                             names[0] if t in queries else names[1]) for t in texts]
    outs = await collect(engine, _submit(engine, request_id, prompts, params, lora), http_request,
                         config.sse_keepalive_s)
    vectors = {t: o.outputs.data.numpy() for t, o in zip(texts, outs)}
    return ([cosine(vectors[q], vectors[d]) for q, d in pairs], sum(len(o.prompt_token_ids) for o in outs),
            request_id)


def _text_prompt(engine: AsyncLLM, text: str, truncate: Optional[int]) -> dict:
    """One side's text, encoded and cut as the engine cuts text (its first tokens kept)."""
    if engine.tokenizer is None:
        raise ValueError("This model has no tokenizer files; scoring takes text.")
    return {"prompt": text, "prompt_token_ids": engine.inputs.encode_text(text, truncate)}


async def _prompt(engine: AsyncLLM, make, truncate, param: str):
    """Tokenize and check one prompt off the event loop; a 400 naming ``param`` when refused."""
    try:
        prompt = await engine.run_off_loop(make)
        return await engine.run_off_loop(engine.inputs.process_prompt, prompt, truncate)
    except ValueError as exc:
        raise prompt_error(exc, param) from None
