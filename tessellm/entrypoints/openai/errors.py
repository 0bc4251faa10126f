"""Errors in the OpenAI shape: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import json
from typing import Optional, Union

from fastapi.responses import JSONResponse
from pydantic import ValidationError

from tessellm.core.scheduler_config import ContextLengthError
from tessellm.entrypoints.openai.protocol_responses import ErrorInfo, ErrorResponse

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          405: "invalid_request_error", 413: "invalid_request_error", 500: "server_error", 503: "server_error"}


class OpenAIError(Exception):
    """Raised anywhere in request handling; becomes an error response with this status."""

    def __init__(self, message: str, status: int = 400, param: Optional[str] = None,
                 code: Optional[Union[str, int]] = None, type: Optional[str] = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error")

    def body(self) -> dict:
        info = ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code)
        return ErrorResponse(error=info).model_dump()

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)

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
