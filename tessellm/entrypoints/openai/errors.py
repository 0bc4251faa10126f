"""Errors in the OpenAI shape: ``{"error": {"message", "type", "param", "code"}}``.

The type follows the status: a 4xx is OpenAI's ``invalid_request_error``; a 500 (the server
failed: an exception in handling, or a request the engine failed, finish reason "error") is
vLLM's ``InternalServerError`` with code 500, whatever raised it, so a client tells every
internal failure by one object; another 5xx (502, 503: the engine or a replica unreachable,
asleep, shutting down) is ``server_error`` with a code naming why where there is one.

A refusal that lasts a moment (a tokenizer loading, a server shutting down, replicas at their
queue limit) carries ``retry_after``: the seconds a client should wait, sent as the
``Retry-After`` header beside the same error object body.
"""

from __future__ import annotations

import json
from typing import Optional, Union

from fastapi.responses import JSONResponse
from pydantic import ValidationError

from tessellm.core.scheduler_config import ContextLengthError
from tessellm.entrypoints.openai.protocol_responses import ErrorInfo, ErrorResponse

_INTERNAL = 500  # vLLM's object for it: type "InternalServerError", code 500


def _type(status: int) -> str:
    if status == _INTERNAL:
        return "InternalServerError"
    return "server_error" if status >= 500 else "invalid_request_error"


class OpenAIError(Exception):
    """Raised anywhere in request handling; becomes an error response with this status."""

    def __init__(self, message: str, status: int = 400, param: Optional[str] = None,
                 code: Optional[Union[str, int]] = None, type: Optional[str] = None,
                 retry_after: Optional[int] = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code if code is not None or status != _INTERNAL else _INTERNAL
        self.type = type or _type(status)
        self.retry_after = retry_after  # seconds: a transient refusal's Retry-After header

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}

    def body(self) -> dict:
        info = ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code)
        return ErrorResponse(error=info).model_dump()

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers())

    def sse_event(self) -> str:
        return f"data: {json.dumps(self.body())}\n\n"


def bad_request(message: str, param: Optional[str] = None, code: Optional[str] = None) -> OpenAIError:
    return OpenAIError(message, 400, param, code)


def prompt_error(exc: ValueError, param: str, message: Optional[str] = None) -> OpenAIError:
    """A prompt the engine refused; over the context length it carries OpenAI's code."""
    code = "context_length_exceeded" if isinstance(exc, ContextLengthError) else None
    return bad_request(message or str(exc), param, code)


def from_validation_error(exc: ValidationError | list) -> OpenAIError:
    """The first problem pydantic found, as a 400 naming the field (never FastAPI's 422)."""
    errors = exc.errors() if isinstance(exc, ValidationError) else list(exc)
    if not errors:
        return bad_request("The request body is invalid.")
    err = errors[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body" and not _is_union_tag(p)]
    param = ".".join(loc) or None
    if err.get("type") == "extra_forbidden":
        return bad_request(f"Unrecognized request argument supplied: '{param}'. tessellm does not "
                           "support it; remove it from the request.", param, "unsupported_parameter")
    if err.get("type") == "missing":
        return bad_request(f"Missing required parameter: '{param}'.", param, "missing_required_parameter")
    return bad_request(f"Invalid value for '{param}': {err.get('msg', 'invalid')}.", param, "invalid_value")


def _is_union_tag(part) -> bool:
    """pydantic names the union member in an error's path ("prompt.list[int]"): drop it."""
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool"))
