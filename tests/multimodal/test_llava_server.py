"""/v1/chat/completions with image_url parts, in process (the app over a real AsyncLLM and
engine core process): a base64 data URL's greedy tokens equal HF transformers'; bad images,
too many images, URLs the server will not read, and images sent to a text-only model are
each a 400 that names the problem, and the server goes on serving."""

from __future__ import annotations

import asyncio
import base64
import contextlib

import httpx

from tessellm.config import EngineArgs
from tests.multimodal.serve_app import MAX_NEW, chat_body as _body, image_part as _img, serve as _serve
from tests.multimodal.tiny_llava import FEATURES, data_url, hf_chat_prompt, hf_greedy, image

TEXT = {"type": "text", "text": "What is this?"}


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


@contextlib.contextmanager
def _png_server(png: bytes, before=lambda path: 200):
    """A local http.server in a thread: GET answers ``png`` when ``before(path)`` (which may
    wait) gives 200, else that status; yields its base URL."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            code = before(self.path)
            body = png if code == 200 else b"missing"
            self.send_response(code)
            self.send_header("Content-Type", "image/png" if code == 200 else "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def _png(img) -> bytes:
    return base64.b64decode(data_url(img).split(",", 1)[1])


def test_chat_with_an_http_image_url(llava_dir):
    """The image from a local http.server: the same greedy tokens as HF on that image; a URL
    that answers 404 is a 400 naming it, and the server goes on serving."""

    async def requests(c):
        missing = await c.post("/v1/chat/completions", json=_body(_img(f"{base}/gone.png"), TEXT))
        ok = await c.post("/v1/chat/completions", json=_body(_img(f"{base}/img.png"), TEXT,
                                                             return_token_ids=True))
        return missing, ok

    with _png_server(_png(image(45)), lambda path: 200 if path == "/img.png" else 404) as base:
        args = EngineArgs(model=llava_dir, dtype="float32", num_kv_blocks=64, block_size=4)
        missing, ok = asyncio.run(_serve(args, requests))
    assert missing.status_code == 400
    assert missing.json()["error"]["message"].endswith(f"The image URL {base}/gone.png answered HTTP "
                                                       "404 (Not Found).")
    assert ok.status_code == 200, ok.text
    want = hf_greedy(llava_dir, [hf_chat_prompt(llava_dir, "What is this?")], [image(45)], MAX_NEW)[0]
    assert ok.json()["choices"][0]["token_ids"] == want


def test_http_images_are_fetched_concurrently_off_the_tokenizer_threads(llava_dir, monkeypatch):
    """Two images of one request are fetched together: each handler waits (barrier) for the
    other's request, which one-after-another fetching never sends. And while two requests'
    images hang at the server, a text request is tokenized and answered (the fetches hold no
    tokenizer thread; there are two). Nothing here is timed: the waits end by events."""
    import threading

    monkeypatch.setenv("TESSELLM_IMAGE_FETCH_TIMEOUT", "60")
    pair = threading.Barrier(2, timeout=30)
    held, release = threading.Semaphore(0), threading.Event()

    def before(path):
        if path.startswith("/pair"):
            pair.wait()
        elif path.startswith("/held"):
            held.release()
            release.wait(30)
        return 200

    async def requests(c):
        both = await c.post("/v1/chat/completions", json=_body(
            _img(f"{base}/pair/a.png"), _img(f"{base}/pair/b.png"), TEXT))
        slow = [asyncio.create_task(c.post("/v1/chat/completions", json=_body(
            _img(f"{base}/held/{i}.png"), TEXT))) for i in range(2)]
        for _ in range(2):  # both fetches have reached the server and hang there
            assert await asyncio.to_thread(held.acquire, True, 30)
        text = await asyncio.wait_for(c.post("/v1/chat/completions", json=_body(TEXT)), 60)
        release.set()
        return both, text, [await t for t in slow]

    try:
        with _png_server(_png(image(46)), before) as base:
            args = EngineArgs(model=llava_dir, dtype="float32", num_kv_blocks=64, block_size=4,
                              limit_mm_per_prompt={"image": 2})
            both, text, slow = asyncio.run(_serve(args, requests))
    finally:
        release.set()
    assert both.status_code == 200, both.text
    assert text.status_code == 200 and all(r.status_code == 200 for r in slow)
    assert text.json()["usage"]["completion_tokens"] == MAX_NEW
