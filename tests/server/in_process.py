"""The OpenAI app over a real AsyncLLM and engine core process, in process (httpx over ASGI):
no port, no server process, the engine's own core process behind it."""

from __future__ import annotations

from tessellm.config import EngineArgs


async def serve(args: EngineArgs, scenario, with_engine: bool = False, config=None):
    """Starts the engine, runs ``scenario(client)`` (``scenario(client, engine)`` with
    ``with_engine``) against the app, shuts the engine down; ``config``: the app's
    ``ServerConfig`` (default: one model named "m")."""
    import httpx

    from tessellm.entrypoints.async_llm import AsyncLLM
    from tessellm.entrypoints.openai.api_server import build_app
    from tessellm.entrypoints.openai.server_config import ServerConfig

    engine = AsyncLLM(args)
    try:
        engine.start()
        app = build_app(engine, config or ServerConfig(["m"]))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t",
                                     timeout=120) as c:
            return await (scenario(c, engine) if with_engine else scenario(c))
    finally:
        await engine.shutdown()
