"""A Responses request as the chat request it means, so /v1/responses runs the chat path
(template, sampling, structured output, tool-call and reasoning parsers) unchanged.

``input`` items, in order, become chat messages:

- a string: one user message; ``instructions``: a system message before everything;
- ``{"role", "content"}`` (``type`` "message" or none): content a string or a list of
  ``input_text`` / ``output_text`` parts (joined) and ``input_image`` parts (``image_url``);
- ``function_call`` items: an assistant message's ``tool_calls`` (consecutive calls, and calls
  right after an assistant message, join that message);
- ``function_call_output``: a ``tool`` message answering ``call_id``;
- ``reasoning`` items: the next assistant message's earlier thinking (the template decides
  whether to show it); one with no assistant message after it is an assistant message of its own
  (vLLM's);
- a last assistant ``message`` (or ``reasoning`` item) whose ``status`` is ``in_progress`` or
  ``incomplete`` is continued, not closed (vLLM's partial completion: ``continue_final_message``).

``truncation: "auto"`` cuts the rendered prompt's start to leave ``max_output_tokens`` (at least
one token) of the context: vLLM's ``truncate_prompt_tokens`` -1.

Errors raised on the chat path name chat fields; ``rename_error`` says them in this API's words.
"""

from __future__ import annotations

import re
from typing import Any, Optional

from pydantic import BaseModel, ValidationError

from tessellm.entrypoints.openai.errors import OpenAIError, bad_request, from_validation_error
from tessellm.entrypoints.openai.protocol import (ChatCompletionRequest, ChatMessage, ChatTool, ContentPart,
                                                  FunctionDefinition, JsonSchemaFormat, ResponseFormat)
from tessellm.entrypoints.openai.protocol_responses import FunctionCall, ToolCall
from tessellm.entrypoints.openai.responses.protocol import (INCLUDE_ACCEPTED, LOGPROBS, UNSUPPORTED,
                                                            VLLM_EXTRAS, FunctionTool, ResponsesRequest)

_ROLES = ("user", "assistant", "system", "developer")
_TEXT_PARTS = ("input_text", "output_text")


def check_unsupported(req: ResponsesRequest) -> None:
    for name, (neutral, fix) in UNSUPPORTED.items():
        if getattr(req, name) not in neutral:
            raise bad_request(f"'{name}' is not supported by tessellm's /v1/responses: {fix}.", name,
                              "unsupported_parameter")
    for value in req.include or []:
        if value not in INCLUDE_ACCEPTED:
            raise bad_request(f"include value {value!r} is not supported by tessellm; accepted: "
                              f"{', '.join(sorted(INCLUDE_ACCEPTED))}.", "include", "unsupported_parameter")
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed when stream is true.", "stream_options")
    if req.text is not None and req.text.verbosity not in (None, "medium"):
        raise bad_request("text.verbosity other than 'medium' is not supported by tessellm; remove it.",
                          "text.verbosity", "unsupported_parameter")
    # reasoning.effort: every value the chat path's reasoning_effort takes (sampling.py's
    # reasoning_template_kwargs, which refuses gpt-oss's missing levels as reasoning.effort)


def input_items(req: ResponsesRequest) -> list[dict]:
    """This turn's input as items (a string is one user message)."""
    if isinstance(req.input, str):
        return [{"role": "user", "content": req.input}]
    if not req.input:
        raise bad_request("input is an empty list; give a string or at least one item.", "input")
    return req.input


def to_chat_request(req: ResponsesRequest, history: list[dict] = (),
                    max_model_len: Optional[int] = None) -> ChatCompletionRequest:
    """``history``: the earlier turns' items (a stored ``previous_response_id`` chain), before
    this turn's input; ``instructions`` are this request's only (as OpenAI's). ``max_model_len``:
    the context, for ``truncation: "auto"``."""
    messages = [ChatMessage(role="system", content=req.instructions)] if req.instructions else []
    items = [*history, *input_items(req)]
    messages += _messages(items, -len(history))
    partial = _continues(items)
    tools = [_tool(i, t) for i, t in enumerate(req.tools or [])] or None
    fmt = req.text.format if req.text is not None else None
    effort = req.reasoning.effort if req.reasoning is not None else None
    extras = {name: getattr(req, name) for name in VLLM_EXTRAS if name in req.model_fields_set}
    logprobs = LOGPROBS in (req.include or ())  # the message's tokens (a single message: serving.py)
    try:
        return ChatCompletionRequest(
            model=req.model, messages=messages, max_completion_tokens=req.max_output_tokens,
            temperature=req.temperature, top_p=req.top_p, tools=tools,
            tool_choice=_tool_choice(req.tool_choice, bool(tools)),
            parallel_tool_calls=req.parallel_tool_calls, response_format=_response_format(fmt),
            reasoning_effort=effort, stream=bool(req.stream), user=req.user, logprobs=logprobs,
            top_logprobs=(req.top_logprobs or 0) if logprobs else None,
            add_generation_prompt=not partial, continue_final_message=partial,
            truncate_prompt_tokens=_keep(req, max_model_len), **extras)
    except ValidationError as exc:  # a vLLM extra out of range: the chat request's check, same name
        raise from_validation_error(exc) from None


def _continues(items: list) -> bool:
    """The last item is a partial assistant message or reasoning item: continue it."""
    last = items[-1] if items else None
    if not isinstance(last, dict) or last.get("status") not in ("in_progress", "incomplete"):
        return False
    kind = last.get("type", "message" if "role" in last else None)
    return kind == "reasoning" or (kind == "message" and last.get("role") == "assistant")


def _keep(req: ResponsesRequest, max_model_len: Optional[int]) -> Optional[int]:
    """``truncation: "auto"``: the prompt tokens to keep (-1: the context less one token)."""
    if req.truncation != "auto":
        return None
    budget = req.max_output_tokens
    if max_model_len is None or budget is None or budget >= max_model_len:
        return -1  # an over-long max_output_tokens is the chat path's 400, naming it
    return max_model_len - budget


def _parse(cls: type[BaseModel], data: Any, where: tuple) -> BaseModel:
    """``data`` as ``cls``; a problem is a 400 naming ``where`` + the field."""
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise from_validation_error([{**e, "loc": (*where, *e["loc"])} for e in exc.errors()]) from None


def _tool(i: int, tool: dict) -> ChatTool:
    if tool.get("type") != "function":
        raise bad_request(f"tools[{i}] has type {tool.get('type')!r}; tessellm serves function tools only "
                          '({"type": "function", "name", "description", "parameters"}).', f"tools.{i}.type",
                          "unsupported_parameter")
    if "function" in tool:
        raise bad_request(f"tools[{i}] is in the chat shape; /v1/responses takes name, description and "
                          "parameters at the top level of the tool.", f"tools.{i}.function")
    t = _parse(FunctionTool, tool, ("tools", i))
    return ChatTool(function=FunctionDefinition(name=t.name, description=t.description,
                                                parameters=t.parameters, strict=t.strict))


def _tool_choice(choice, has_tools: bool):
    """``"auto"`` with no tools is ``"none"`` (vLLM's; a chat request's is a 400)."""
    if choice == "auto" and not has_tools:
        return None
    if choice is None or isinstance(choice, str):
        return choice
    if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
        raise bad_request('tool_choice must be "none", "auto", "required" or {"type": "function", "name": '
                          "...}; hosted tools are not served by tessellm.", "tool_choice")
    return {"type": "function", "function": {"name": choice["name"]}}


def _response_format(fmt) -> Optional[ResponseFormat]:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return ResponseFormat(type="json_object")
    if fmt.json_schema is None:
        raise bad_request("text.format of type 'json_schema' needs a schema.", "text.format.schema")
    schema = JsonSchemaFormat(name=fmt.name, description=fmt.description, strict=fmt.strict,
                              schema=fmt.json_schema)
    return ResponseFormat(type="json_schema", json_schema=schema)


def _messages(items: list, first: int = 0) -> list[ChatMessage]:
    """``first``: the first item's index in error messages (earlier turns' items count below 0)."""
    messages: list[ChatMessage] = []
    thinking: Optional[str] = None  # a reasoning item's text, for the next assistant message
    for i, item in enumerate(items, first):
        if not isinstance(item, dict):
            raise bad_request(f"input[{i}] must be an object (a message or an item).", f"input.{i}")
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            message = _message(i, item)
            if message.role == "assistant" and thinking is not None:
                message.reasoning, thinking = thinking, None
            elif thinking is not None:  # reasoning before a user turn: an assistant message of its own
                messages.append(ChatMessage(role="assistant", content="", reasoning=thinking))
                thinking = None
            messages.append(message)
        elif kind == "function_call":
            call = _function_call(i, item)
            last = messages[-1] if messages else None
            if last is not None and last.role == "assistant" and thinking is None:
                last.tool_calls = [*(last.tool_calls or []), call]
            else:
                messages.append(ChatMessage(role="assistant", content="", tool_calls=[call], reasoning=thinking))
                thinking = None
        elif kind == "function_call_output":
            if thinking is not None:
                messages.append(ChatMessage(role="assistant", content="", reasoning=thinking))
                thinking = None
            messages.append(_call_output(i, item))
        elif kind == "reasoning":
            if thinking is not None:  # two in a row: the first is a message of its own (vLLM's)
                messages.append(ChatMessage(role="assistant", content="", reasoning=thinking))
            thinking = _reasoning(i, item)
        else:
            raise bad_request(f"input[{i}] has type {kind!r}; tessellm takes messages, function_call, "
                              "function_call_output and reasoning items (item references need a stored "
                              "response, which tessellm does not keep).", f"input.{i}.type",
                              "unsupported_parameter")
    if thinking is not None:  # reasoning with no assistant message after it: its own (vLLM's)
        messages.append(ChatMessage(role="assistant", content="", reasoning=thinking))
    return messages


def _message(i: int, item: dict) -> ChatMessage:
    extra = set(item) - {"type", "role", "content", "id", "status", "phase"}
    if extra:
        raise bad_request(f"input[{i}] has unknown field '{sorted(extra)[0]}'; remove it.",
                          f"input.{i}.{sorted(extra)[0]}", "unsupported_parameter")
    role = item.get("role")
    if role not in _ROLES:
        raise bad_request(f"input[{i}].role is {role!r}; use one of {', '.join(_ROLES)}.", f"input.{i}.role")
    content = item.get("content")
    if isinstance(content, str):
        return ChatMessage(role=role, content=content)
    if not isinstance(content, list):
        raise bad_request(f"input[{i}].content must be a string or a list of content parts.",
                          f"input.{i}.content")
    parts = [_part(i, j, p) for j, p in enumerate(content)]
    if all(p.type == "text" for p in parts):  # as the chat path joins a text-only message's parts
        return ChatMessage(role=role, content="\n".join(p.text for p in parts))
    return ChatMessage(role=role, content=parts)


def _part(i: int, j: int, part) -> ContentPart:
    where = f"input.{i}.content.{j}"
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in _TEXT_PARTS and isinstance(part.get("text"), str):
        return ContentPart(type="text", text=part["text"])
    if kind == "input_image":
        if part.get("file_id") is not None or not isinstance(part.get("image_url"), str):
            raise bad_request(f"input[{i}].content[{j}] is an input_image without image_url; give the "
                              "image as image_url (a URL or a data: URL; file_id is not supported).",
                              f"{where}.image_url")
        return ContentPart(type="image_url", image_url={"url": part["image_url"]})
    if kind == "refusal":
        return ContentPart(type="text", text=part.get("refusal") or "")
    raise bad_request(f"input[{i}].content[{j}] has type {kind!r}; tessellm takes input_text, "
                      "output_text and input_image parts.", f"{where}.type", "unsupported_parameter")


def _function_call(i: int, item: dict) -> ToolCall:
    for name in ("call_id", "name", "arguments"):
        if not isinstance(item.get(name), str):
            raise bad_request(f"input[{i}] is a function_call without a string '{name}'.", f"input.{i}.{name}",
                              "missing_required_parameter")
    return ToolCall(id=item["call_id"], function=FunctionCall(name=item["name"], arguments=item["arguments"]))


def _call_output(i: int, item: dict) -> ChatMessage:
    call_id, output = item.get("call_id"), item.get("output")
    if not isinstance(call_id, str) or not call_id:
        raise bad_request(f"input[{i}] is a function_call_output without call_id; give the call_id of the "
                          "function_call it answers.", f"input.{i}.call_id", "missing_required_parameter")
    if isinstance(output, list):  # content parts: their text
        output = "\n".join(_part(i, j, p).text or "" for j, p in enumerate(output))
    if not isinstance(output, str):
        raise bad_request(f"input[{i}].output must be a string (the function's result).", f"input.{i}.output")
    return ChatMessage(role="tool", content=output, tool_call_id=call_id)


def _reasoning(i: int, item: dict) -> str:
    if item.get("encrypted_content") is not None:
        raise bad_request(f"input[{i}] is a reasoning item with encrypted_content, which tessellm cannot "
                          "read (its reasoning comes back as text, never encrypted); send the item's "
                          "reasoning text in content instead.", f"input.{i}.encrypted_content",
                          "unsupported_parameter")
    texts = []
    for name in ("content", "summary"):  # the reasoning text, else (only a summary was kept) the summary
        parts = item.get(name) or []
        if not isinstance(parts, list) or not all(isinstance(p, dict) and isinstance(p.get("text"), str)
                                                  for p in parts):
            raise bad_request(f"input[{i}].{name} must be a list of parts with text (a reasoning item's "
                              f"{'reasoning_text' if name == 'content' else 'summary_text'} parts).",
                              f"input.{i}.{name}")
        texts = texts or [p["text"] for p in parts]
    return "\n".join(texts)


# chat field -> this API's, longest first (so "response_format.json_schema.schema" wins)
_RENAMES = [(r"response_format\.json_schema\.schema", "text.format.schema"),
            (r"response_format(\.json_schema)?", "text.format"),
            (r"max_completion_tokens", "max_output_tokens"), (r"reasoning_effort", "reasoning.effort"),
            (r"messages(\[\d+\]|\.\d+)?", "input"),  # messages no longer line up with input items
            (r"(tools(\[\d+\]|\.\d+))\.function\.parameters", r"\1.parameters")]


def rename_error(exc: OpenAIError) -> OpenAIError:
    """A chat-path error in this API's field names."""
    message, param = exc.message, exc.param
    for old, new in _RENAMES:
        message = re.sub(old, new, message)
        param = re.sub(old, new, param) if param is not None else None
    return OpenAIError(message, exc.status, param, exc.code, exc.type, exc.retry_after)
