"""POST /v1/embeddings on a pooling engine (``--runner pooling``; docs/pooling.md).

``input`` is one text, a list of texts, one token-id list or a list of them (OpenAI), or
``messages`` rendered by the chat template (vLLM); each becomes one pooling request, and
``data[i]`` is input i's embedding (a float list, or base64 of its little-endian float32
bytes with ``encoding_format: "base64"``, as the OpenAI SDK asks for by default). Bad input is
a 400 naming the field: a generating engine, ``dimensions`` over the embedding size, an input
over the context (unless ``truncate_prompt_tokens`` cuts it), an empty input.
"""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Optional, Union

import numpy as np
from fastapi import Request

from tessellm.core.scheduler_config import prompt_tokens_to_keep
from tessellm.entrypoints.async_llm import AsyncLLM
from tessellm.entrypoints.openai.errors import bad_request, prompt_error
from tessellm.entrypoints.openai.protocol_embedding import (EmbeddingChatRequest,
                                                            EmbeddingCompletionRequest, EmbeddingData,
                                                            EmbeddingResponse)
from tessellm.entrypoints.openai.protocol_responses import UsageInfo
from tessellm.entrypoints.openai.sampling import check_model
from tessellm.entrypoints.openai.server_config import ServerConfig
from tessellm.entrypoints.openai.serving import (Submitted, collect, engine_error, parse_request,
                                                 random_id, response_id)
from tessellm.pooling.front import POOLING_SAMPLING, resolve_pooling_params
from tessellm.pooling.params import PoolingParams

MAX_INPUTS = 2048  # inputs in one request at most: OpenAI's limit (--max-prompts is completions')


async def create_embedding(engine: AsyncLLM, config: ServerConfig, body, http_request: Request):
    is_chat = isinstance(body, dict) and "messages" in body
    req = parse_request(EmbeddingChatRequest if is_chat else EmbeddingCompletionRequest, body)
    lora = check_model(req.model, config)
    try:
        params = resolve_pooling_params(PoolingParams(req.dimensions, req.normalize, req.truncate_prompt_tokens,
                                                      task="embed"), engine.info)
    except ValueError as exc:
        raise bad_request(str(exc), getattr(exc, "param", None)) from None
    request_id, outputs, num_tokens = await run_pooling(engine, config, req, is_chat, params, lora,
                                                        "embd", http_request)
    return EmbeddingResponse(
        id=response_id("embd", req, request_id), created=int(time.time()),
        model=lora.lora_name if lora else config.model_name,
        data=[EmbeddingData(index=i, embedding=_encode(o.outputs.data.numpy(), req.encoding_format))
              for i, o in enumerate(outputs)],
        usage=UsageInfo(prompt_tokens=num_tokens, total_tokens=num_tokens))


async def run_pooling(engine: AsyncLLM, config: ServerConfig, req, is_chat: bool,
                      params: PoolingParams, lora, prefix: str, http_request: Request):
    """A pooling endpoint's request run to the end: ``(request_id, outputs, prompt tokens)``,
    one output per prompt (``request_prompts``) in order."""
    prompts = await request_prompts(engine, config, req, is_chat, params.truncate_prompt_tokens)
    request_id = random_id(prefix)
    outputs = await collect(engine, _submit(engine, request_id, prompts, params, lora), http_request,
                            config.sse_keepalive_s)
    return request_id, outputs, sum(len(o.prompt_token_ids) for o in outputs)


async def request_prompts(engine: AsyncLLM, config: ServerConfig, req, is_chat: bool,
                          truncate: Optional[int]) -> list:
    """A pooling request's prompts (``/v1/embeddings``, ``/classify``): its chat ``messages`` as
    one prompt, else one per ``input`` item."""
    if is_chat:
        return [await _chat_prompt(engine, config, req, truncate)]
    return [await _input_prompt(engine, req, x, truncate, i, n) for i, x, n in _inputs(req.input)]


def _inputs(value) -> list[tuple[int, Union[str, list[int]], int]]:
    """str | [str] | [int] | [[int]] -> (index, text or ids, count) per input."""
    if isinstance(value, str):
        items = [value]
    elif value and all(isinstance(t, int) for t in value):
        items = [list(value)]
    else:
        items = list(value)
    if not items:
        raise bad_request("input is empty; give a string, a list of strings or token ids.", "input")
    if len(items) > MAX_INPUTS:
        raise bad_request(f"The request has {len(items)} inputs, over the limit of {MAX_INPUTS} "
                          "per request; send them in several requests.", "input")
    return [(i, x, len(items)) for i, x in enumerate(items)]


async def _input_prompt(engine: AsyncLLM, req: EmbeddingCompletionRequest, item, truncate: Optional[int],
                        index: int, count: int):
    try:
        if isinstance(item, str):
            if not item:
                raise ValueError("The input is empty; give at least one character.")
            if engine.tokenizer is None:
                raise ValueError("This model has no tokenizer files; give the input as token ids.")
            if truncate is None:
                engine.check_text_fits(len(item), "The input")
            ids = await engine.run_off_loop(  # cut as the engine cuts text: special tokens kept
                lambda: engine.inputs.encode_text(item, truncate, req.add_special_tokens))
            prompt = {"prompt": item, "prompt_token_ids": ids}
        else:
            prompt = {"prompt_token_ids": item}
        return await engine.run_off_loop(engine.inputs.process_prompt, prompt, truncate)
    except ValueError as exc:
        raise prompt_error(exc, "input", None if count == 1 else f"input {index}: {exc}") from None


async def _chat_prompt(engine: AsyncLLM, config: ServerConfig, req: EmbeddingChatRequest,
                       truncate: Optional[int]):
    from tessellm.entrypoints.openai.serving_chat import render_messages

    try:  # the cut's token count (a text cut by the tokenizer keeps its special tokens)
        keep = prompt_tokens_to_keep(truncate, engine.info.max_model_len, engine.inputs.room)
    except ValueError as exc:
        raise prompt_error(exc, "truncate_prompt_tokens") from None
    ids = await render_messages(engine, req.messages, req.add_generation_prompt, config.chat_template,
                                continue_final_message=req.continue_final_message,
                                template_kwargs=req.chat_template_kwargs, check_fits=truncate is None,
                                add_special_tokens=req.add_special_tokens,
                                content_format=config.chat_template_content_format, keep=keep)
    try:
        return await engine.run_off_loop(engine.inputs.process_prompt, {"prompt_token_ids": ids}, truncate)
    except ValueError as exc:
        raise prompt_error(exc, "messages") from None


def _submit(engine: AsyncLLM, base_id: str, prompts, params: PoolingParams, lora) -> Submitted:
    sub = Submitted([], [], asyncio.Event(), prompts)
    try:
        for i, prompt in enumerate(prompts):
            rid = f"{base_id}-{i}"
            sub.streams.append(engine.add_request(rid, prompt, POOLING_SAMPLING, sub.event, lora,
                                                  pooling=params))
            sub.request_ids.append(rid)
    except BaseException as exc:
        sub.abort(engine)
        if isinstance(exc, ValueError):
            raise engine_error(exc) from None
        raise
    return sub


def _encode(vector: np.ndarray, encoding_format: str) -> Union[list[float], str]:
    if encoding_format == "base64":
        return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector.tolist()
