"""The OpenAI app over a real AsyncLLM and engine core process, in process (httpx over ASGI),
and the chat request bodies the image serving tests send."""

from __future__ import annotations

from tessellm.config import EngineArgs

MAX_NEW = 6


def chat_body(*parts, **extra) -> dict:
    """A greedy /v1/chat/completions body: one user message of ``parts``, MAX_NEW tokens."""
    return {"model": "m", "messages": [{"role": "user", "content": list(parts)}], "temperature": 0,
            "max_tokens": MAX_NEW, "min_tokens": MAX_NEW, "ignore_eos": True, **extra}


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


async def serve(args: EngineArgs, scenario):
    """Starts the engine, runs ``scenario(client)`` against the app, shuts the engine down."""
    import httpx

    from tessellm.entrypoints.async_llm import AsyncLLM
    from tessellm.entrypoints.openai.api_server import build_app
    from tessellm.entrypoints.openai.server_config import ServerConfig

    engine = AsyncLLM(args)
    try:
        engine.start()
        app = build_app(engine, ServerConfig(["m"]))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t",
                                     timeout=120) as c:
            return await scenario(c)
    finally:
        await engine.shutdown()
