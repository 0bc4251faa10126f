"""A disaggregated-prefill proxy for tessellm (xPyD), in the spirit of vLLM's NIXL
``toy_proxy_server.py``: each request is prefilled on one of several prefill engines (round
robin), then decoded on one of several decode engines, which fetches the prompt's KV blocks
from the prefill engine that computed them (``ZmqPeerConnector``, docs/kv_transfer.md).

    # two prefill engines (ZmqPeerConnector kv_producer, kv_port 14579 and 14589) on :8100
    # and :8101, one decode engine (kv_consumer, no kv_peer needed; its allowed_producers
    # lists the prefill engines' hosts, ["10.0.0.5", "10.0.0.6"]) on :8200, then:
    python examples/disagg_proxy.py --prefill http://10.0.0.5:8100 http://10.0.0.6:8101 \\
        --decode http://10.0.0.7:8200 --port 8000
    curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"prompt": "Explain KV caches", "max_tokens": 64}'

Per request (``/v1/completions`` and ``/v1/chat/completions``):

1. to the next prefill engine: the request with ``max_tokens: 1``, not streamed, and
   ``kv_transfer_params: {"do_remote_decode": true}``; its response comes once the prompt's
   blocks are in that engine's store, and carries ``kv_transfer_params`` naming it
   (``remote_host``, ``remote_port``...);
2. to the next decode engine: the original request (streamed if it asked) with those
   ``kv_transfer_params`` (a client's own are dropped: only a prefill engine names a producer): the decode engine loads the blocks from that prefill engine (or,
   if it is gone or evicted them, recomputes the prompt: same tokens) and answers the client.
   A decode engine fetches only from the producers its ``allowed_producers`` lists (a prefill
   engine it does not list: a 400 naming the setting, passed back to the client).

The client's ``Authorization`` header is passed on to both engines. Needs ``fastapi``,
``httpx`` and ``uvicorn`` (tessellm's server dependencies).
"""

from __future__ import annotations

import argparse
import itertools
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

PREFILL_PARAMS = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                  "remote_block_ids": None, "remote_host": None, "remote_port": None}


def prefill_body(body: dict) -> dict:
    """The prefill engine's request: one token, not streamed, its blocks saved for a decode."""
    body = {**body, "kv_transfer_params": PREFILL_PARAMS, "max_tokens": 1, "stream": False}
    if "max_completion_tokens" in body:
        body["max_completion_tokens"] = 1
    for key in ("stream_options", "min_tokens"):  # a one-token request has no use for these
        body.pop(key, None)
    return body


def decode_body(body: dict, params) -> dict:
    """The decode engine's request: the client's, with the prefill engine's
    ``kv_transfer_params`` (or none: a client's own never names a producer for it to reach)."""
    body = {k: v for k, v in body.items() if k != "kv_transfer_params"}
    return {**body, "kv_transfer_params": params} if params else body


def build_app(prefill_urls: list[str], decode_urls: list[str], timeout: float = 600.0) -> FastAPI:
    """The proxy over these engines' base URLs (``http://host:port``), round robin on each side."""
    if not prefill_urls or not decode_urls:
        raise ValueError("give at least one --prefill and one --decode engine URL")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        app.state.prefill = [httpx.AsyncClient(base_url=u, timeout=timeout, limits=limits)
                             for u in prefill_urls]
        app.state.decode = [httpx.AsyncClient(base_url=u, timeout=timeout, limits=limits)
                            for u in decode_urls]
        app.state.next_prefill = itertools.cycle(app.state.prefill)
        app.state.next_decode = itertools.cycle(app.state.decode)
        yield
        for client in app.state.prefill + app.state.decode:
            await client.aclose()

    app = FastAPI(lifespan=lifespan)

    async def proxy(path: str, request: Request):
        body = await request.json()
        headers = {k: v for k, v in request.headers.items() if k.lower() == "authorization"}
        prefill = next(request.app.state.next_prefill)
        first = await prefill.post(path, json=prefill_body(body), headers=headers)
        if first.status_code != 200:  # a bad request: the client gets the engine's error
            return JSONResponse(first.json(), status_code=first.status_code)
        body = decode_body(body, first.json().get("kv_transfer_params"))
        decode = next(request.app.state.next_decode)
        if not body.get("stream"):
            r = await decode.post(path, json=body, headers=headers)
            return JSONResponse(r.json(), status_code=r.status_code)
        upstream = await decode.send(decode.build_request("POST", path, json=body, headers=headers),
                                     stream=True)

        async def relay():
            try:
                async for chunk in upstream.aiter_raw():
                    yield chunk
            finally:
                await upstream.aclose()

        return StreamingResponse(relay(), status_code=upstream.status_code,
                                 media_type=upstream.headers.get("content-type"))

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await proxy("/v1/completions", request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await proxy("/v1/chat/completions", request)

    @app.get("/health")
    async def health():
        return {"prefill": prefill_urls, "decode": decode_urls}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefill", nargs="+", required=True, help="prefill engines' base URLs")
    parser.add_argument("--decode", nargs="+", required=True, help="decode engines' base URLs")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    import uvicorn

    uvicorn.run(build_app(args.prefill, args.decode), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
