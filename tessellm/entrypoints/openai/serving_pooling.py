"""POST /pooling (vLLM's generic pooling endpoint; docs/pooling.md): what ``LLM.encode`` returns,
over HTTP. ``task`` picks the output: ``embed`` / ``classify`` (one vector per input, what the
model does by default) or ``token_embed`` / ``token_classify`` (one row per prompt token);
``data[i]`` is input i's as a float list, a list of rows, or base64 of its float32 bytes. Bad
input is a 400 naming the field: a task this model does not do (``task``), a param of the other
kind of model (``dimensions`` / ``normalize`` on a classifier, ``use_activation`` on an
embedding model), an input over the context.
"""

from __future__ import annotations

import time

from fastapi import Request

from tessellm.entrypoints.async_llm import AsyncLLM
from tessellm.entrypoints.openai.errors import bad_request
from tessellm.entrypoints.openai.protocol_pooling import (PoolingChatRequest, PoolingCompletionRequest,
                                                          PoolingResponse, PoolingResponseData)
from tessellm.entrypoints.openai.protocol_responses import UsageInfo
from tessellm.entrypoints.openai.sampling import check_model
from tessellm.entrypoints.openai.server_config import ServerConfig
from tessellm.entrypoints.openai.serving import parse_request, response_id
from tessellm.entrypoints.openai.serving_embedding import _encode, run_pooling
from tessellm.pooling.front import RunnerMismatchError, resolve_pooling_params
from tessellm.pooling.params import PoolingParams


def pooling_params(engine: AsyncLLM, req) -> PoolingParams:
    """The request's PoolingParams, checked against the engine, or a 400 naming the field."""
    try:
        return resolve_pooling_params(PoolingParams(req.dimensions, req.normalize, req.truncate_prompt_tokens,
                                                    req.activation_wanted(), req.task), engine.info)
    except RunnerMismatchError as exc:
        raise bad_request(str(exc), "task" if req.task is not None else None, "wrong_runner") from None
    except ValueError as exc:
        raise bad_request(str(exc), getattr(exc, "param", None)) from None


async def create_pooling(engine: AsyncLLM, config: ServerConfig, body, http_request: Request):
    is_chat = isinstance(body, dict) and "messages" in body
    req = parse_request(PoolingChatRequest if is_chat else PoolingCompletionRequest, body)
    lora = check_model(req.model, config)
    params = pooling_params(engine, req)
    request_id, outputs, num_tokens = await run_pooling(engine, config, req, is_chat, params, lora,
                                                        "pool", http_request)
    return PoolingResponse(
        id=response_id("pool", req, request_id), created=int(time.time()),
        model=lora.lora_name if lora else config.model_name,
        data=[PoolingResponseData(index=i, data=_encode(o.outputs.data.numpy(), req.encoding_format))
              for i, o in enumerate(outputs)],
        usage=UsageInfo(prompt_tokens=num_tokens, total_tokens=num_tokens))
