"""The OpenAI app over a real AsyncLLM and engine core process, in process (httpx over ASGI),
and the chat request bodies the image serving tests send."""

from __future__ import annotations

from tests.server.in_process import serve  # noqa: F401 (the image serving tests' entry)

MAX_NEW = 6


def chat_body(*parts, **extra) -> dict:
    """A greedy /v1/chat/completions body: one user message of ``parts``, MAX_NEW tokens."""
    return {"model": "m", "messages": [{"role": "user", "content": list(parts)}], "temperature": 0,
            "max_tokens": MAX_NEW, "min_tokens": MAX_NEW, "ignore_eos": True, **extra}


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}
