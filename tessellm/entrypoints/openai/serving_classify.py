"""POST /classify on a sequence classifier (``*ForSequenceClassification``, ``--runner pooling``;
docs/pooling.md), vLLM's request and response: ``input`` as /v1/embeddings takes it (a text, a
list of texts, token ids, a list of those), each one engine request, or chat ``messages``
rendered by the chat template (one request); ``data[i]`` holds input i's
probabilities (softmax over the labels, sigmoid for one; logits with ``use_activation: false``),
``num_classes`` and ``label``, config.json's ``id2label`` of the most probable class.
Bad input is a 400 naming the field; an embedding model's server answers /classify with a 400
naming what it serves instead.
"""

from __future__ import annotations

import time

import numpy as np
from fastapi import Request

from tessellm.entrypoints.async_llm import AsyncLLM
from tessellm.entrypoints.openai.errors import bad_request
from tessellm.entrypoints.openai.protocol_classify import (ClassificationChatRequest, ClassificationData,
                                                           ClassificationRequest, ClassificationResponse)
from tessellm.entrypoints.openai.protocol_responses import UsageInfo
from tessellm.entrypoints.openai.sampling import check_model
from tessellm.entrypoints.openai.server_config import ServerConfig
from tessellm.entrypoints.openai.serving import parse_request, response_id
from tessellm.entrypoints.openai.serving_embedding import run_pooling
from tessellm.pooling.front import resolve_pooling_params
from tessellm.pooling.params import PoolingParams


def classify_params(engine: AsyncLLM, req) -> PoolingParams:
    """The request's PoolingParams for the classify path, or a 400 naming the problem."""
    try:
        return resolve_pooling_params(PoolingParams(truncate_prompt_tokens=req.truncate_prompt_tokens,
                                                    use_activation=req.activation_wanted(), task="classify"),
                                      engine.info)
    except ValueError as exc:
        raise bad_request(str(exc), getattr(exc, "param", None)) from None


async def create_classification(engine: AsyncLLM, config: ServerConfig, body, http_request: Request):
    is_chat = isinstance(body, dict) and "messages" in body
    req = parse_request(ClassificationChatRequest if is_chat else ClassificationRequest, body)
    lora = check_model(req.model, config)
    params = classify_params(engine, req)
    request_id, outputs, num_tokens = await run_pooling(engine, config, req, is_chat, params, lora,
                                                        "classify", http_request)
    labels = engine.info.pooling["labels"]
    return ClassificationResponse(
        id=response_id("classify", req, request_id), created=int(time.time()),
        model=lora.lora_name if lora else config.model_name,
        data=[ClassificationData(index=i, label=labels[int(np.argmax(o.outputs.data.numpy()))],
                                 probs=o.outputs.data.tolist(), num_classes=len(labels))
              for i, o in enumerate(outputs)],
        usage=UsageInfo(prompt_tokens=num_tokens, total_tokens=num_tokens))
