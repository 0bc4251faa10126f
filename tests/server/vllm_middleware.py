"""A middleware for ``--middleware tests.server.vllm_middleware.tag`` (test_vllm_server_flags.py)."""


async def tag(request, call_next):
    response = await call_next(request)
    response.headers["x-tagged-by"] = "vllm-middleware"
    return response
