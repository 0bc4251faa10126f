"""/v1/chat/completions with image_url parts, in process (the app over a real AsyncLLM and
engine core process): a base64 data URL's greedy tokens equal HF transformers'; bad images,
too many images, URLs the server will not read, and images sent to a text-only model are
each a 400 that names the problem, and the server goes on serving."""

from __future__ import annotations

import asyncio
import base64

import httpx

from tessellm.config import EngineArgs
from tests.multimodal.tiny_llava import FEATURES, data_url, hf_chat_prompt, hf_greedy, image

MAX_NEW = 6


def _body(*parts, **extra):
    return {"model": "m", "messages": [{"role": "user", "content": list(parts)}], "temperature": 0,
            "max_tokens": MAX_NEW, "min_tokens": MAX_NEW, "ignore_eos": True, **extra}


def _img(url):
    return {"type": "image_url", "image_url": {"url": url}}


TEXT = {"type": "text", "text": "What is this?"}


async def _serve(args: EngineArgs, scenario):
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


async def _llava_requests(c):
    png = await c.post("/v1/chat/completions", json=_body(_img(data_url(image(40))), TEXT,
                                                          return_token_ids=True))
    jpeg = await c.post("/v1/chat/completions", json=_body(_img(data_url(image(41), "JPEG")), TEXT))
    bad = {
        "base64": await c.post("/v1/chat/completions", json=_body(_img("data:image/png;base64,#!"), TEXT)),
        "not_image": await c.post("/v1/chat/completions", json=_body(
            _img("data:image/png;base64," + base64.b64encode(b"plain text").decode()), TEXT)),
        # refused by the allow-list (127.0.0.1) before any fetch: no network is reached
        "http": await c.post("/v1/chat/completions", json=_body(_img("http://example.com/a.png"), TEXT)),
        "file": await c.post("/v1/chat/completions", json=_body(_img("file:///etc/hostname"), TEXT)),
        "two": await c.post("/v1/chat/completions", json=_body(
            _img(data_url(image(42))), _img(data_url(image(43))), TEXT)),
        "no_url": await c.post("/v1/chat/completions", json=_body({"type": "image_url"}, TEXT)),
    }
    after = await c.post("/v1/chat/completions", json=_body(_img(data_url(image(40))), TEXT,
                                                            return_token_ids=True))
    stream = await c.post("/v1/chat/completions", json=_body(_img(data_url(image(40))), TEXT, stream=True))
    tokenized = await c.post("/tokenize", json={"model": "m", "messages": _body(_img(data_url(image(40))),
                                                                                 TEXT)["messages"]})
    return png, jpeg, bad, after, stream, tokenized


def _streamed_text(r: httpx.Response) -> str:
    import json

    text = ""
    for line in r.text.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            for choice in json.loads(line[len("data: "):])["choices"]:
                text += choice["delta"].get("content") or ""
    return text


def test_chat_with_images_over_http(llava_dir):
    args = EngineArgs(model=llava_dir, dtype="float32", num_kv_blocks=64, block_size=4,
                      allowed_media_domains=["127.0.0.1"])
    png, jpeg, bad, after, stream, tokenized = asyncio.run(_serve(args, _llava_requests))
    assert png.status_code == 200, png.text
    choice = png.json()["choices"][0]
    want = hf_greedy(llava_dir, [hf_chat_prompt(llava_dir, "What is this?")], [image(40)], MAX_NEW)[0]
    assert choice["token_ids"] == want
    assert png.json()["prompt_token_ids"].count(3) == FEATURES
    assert jpeg.status_code == 200 and jpeg.json()["usage"]["completion_tokens"] == MAX_NEW
    expect = {"base64": "not valid base64", "not_image": "not an image Pillow can read",
              "http": "http://example.com/a.png is on host 'example.com', which is not in "
                      "--allowed-media-domains", "file": "--allowed-local-media-path",
              "two": "over the limit of 1 per prompt", "no_url": "no image_url"}
    for name, match in expect.items():
        r = bad[name]
        assert r.status_code == 400, (name, r.text)
        assert match in r.json()["error"]["message"], (name, r.json())
    assert after.status_code == 200 and after.json()["choices"][0]["token_ids"] == want  # prefix hit, same
    assert stream.status_code == 200 and _streamed_text(stream) == choice["message"]["content"]
    assert tokenized.json()["tokens"] == png.json()["prompt_token_ids"]  # placeholders expanded


async def _text_model_request(c):
    return await c.post("/v1/chat/completions", json=_body(_img(data_url(image(44))), TEXT))


def test_text_only_model_answers_400_to_an_image():
    r = asyncio.run(_serve(EngineArgs(max_model_len=256, num_kv_blocks=64, max_num_seqs=8),
                           _text_model_request))
    assert r.status_code == 400, r.text
    assert "text-only: it does not take images" in r.json()["error"]["message"]


def test_chat_with_an_http_image_url(llava_dir):
    """The image from a local http.server: the same greedy tokens as HF on that image; a URL
    that answers 404 is a 400 naming it, and the server goes on serving."""
    import base64
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    png = base64.b64decode(data_url(image(45)).split(",", 1)[1])

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            found = self.path == "/img.png"
            self.send_response(200 if found else 404)
            body = png if found else b"missing"
            self.send_header("Content-Type", "image/png" if found else "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"

    async def requests(c):
        missing = await c.post("/v1/chat/completions", json=_body(_img(f"{base}/gone.png"), TEXT))
        ok = await c.post("/v1/chat/completions", json=_body(_img(f"{base}/img.png"), TEXT,
                                                             return_token_ids=True))
        return missing, ok

    try:
        args = EngineArgs(model=llava_dir, dtype="float32", num_kv_blocks=64, block_size=4)
        missing, ok = asyncio.run(_serve(args, requests))
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert missing.status_code == 400
    assert missing.json()["error"]["message"].endswith(f"The image URL {base}/gone.png answered HTTP "
                                                       "404 (Not Found).")
    assert ok.status_code == 200, ok.text
    want = hf_greedy(llava_dir, [hf_chat_prompt(llava_dir, "What is this?")], [image(45)], MAX_NEW)[0]
    assert ok.json()["choices"][0]["token_ids"] == want
