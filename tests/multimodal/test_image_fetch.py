"""http(s) image URLs (tessellm.multimodal.fetch via media.load_image_url) against a local
http.server in a thread serving a PNG made with Pillow: the image arrives; an unreachable
host, an HTTP error, a page that is not an image, a body over the size cap, a slow server,
and a host (or a redirect's host) outside the allow-list are each one ValueError naming the
URL and the problem. No network beyond 127.0.0.1."""

from __future__ import annotations

import io
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from tessellm.multimodal.fetch import parse_media_domains
from tessellm.multimodal.media import load_image_url


def png_bytes(seed=0, size=(24, 20)) -> bytes:
    from PIL import Image

    rng = np.random.RandomState(seed)
    out = io.BytesIO()
    Image.fromarray(rng.randint(0, 256, (*size, 3), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


PNG = png_bytes()
BIG = png_bytes(1, (256, 256))  # ~200 KB of noise


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass

    def _send(self, body: bytes, content_type="image/png", length=True, code=200):
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        path = self.path
        if path == "/cat.png":
            self._send(PNG)
        elif path == "/big.png":
            self._send(BIG)
        elif path == "/big-unsized.png":  # no Content-Length: the cap stops the read
            self._send(BIG, length=False)
        elif path == "/page.html":
            self._send(b"<html>not an image</html>", "text/html")
        elif path == "/slow.png":
            time.sleep(1.5)
            self._send(PNG)
        elif path.startswith("/to/"):  # redirect to the rest of the path
            self.send_response(302)
            self.send_header("Location", path[len("/to/"):])
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self._send(b"missing", "text/plain", code=404)


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_an_http_image_arrives(server):
    img = load_image_url(f"{server}/cat.png")
    assert img.mode == "RGB" and img.size == (20, 24)
    want = load_image_url("data:image/png;base64," + __import__("base64").b64encode(PNG).decode())
    assert np.array_equal(np.asarray(img), np.asarray(want))


def test_allowed_domains_and_redirects(server):
    port = server.rsplit(":", 1)[1]
    assert load_image_url(f"{server}/cat.png", allowed_media_domains=["127.0.0.1"]).size == (20, 24)
    url = f"http://localhost:{port}/cat.png"
    with pytest.raises(ValueError, match=f"The image URL {url} is on host 'localhost', which is not "
                                         r"in --allowed-media-domains \(127.0.0.1\)"):
        load_image_url(url, allowed_media_domains="127.0.0.1")
    # a redirect within the allowed host is followed; one to another host is refused
    assert load_image_url(f"{server}/to/{server}/cat.png", allowed_media_domains=["127.0.0.1"])
    with pytest.raises(ValueError, match="redirected to http://localhost.*not in --allowed-media-domains"):
        load_image_url(f"{server}/to/{url}", allowed_media_domains=["127.0.0.1"])
    assert load_image_url(f"{server}/to/{url}").size == (20, 24)  # no allow-list: followed


@pytest.mark.parametrize("path,match", [
    ("/missing.png", "answered HTTP 404"),
    ("/page.html", "is not an image Pillow can read .*; it was served as text/html"),
    ("/big.png", "is larger than 102400 bytes"),
    ("/big-unsized.png", "is larger than 102400 bytes"),
    ("/slow.png", r"did not arrive within 0.5 s \(TESSELLM_IMAGE_FETCH_TIMEOUT\)"),
])
def test_each_problem_is_named_with_the_url(server, monkeypatch, path, match):
    monkeypatch.setenv("TESSELLM_IMAGE_FETCH_TIMEOUT", "0.5")
    monkeypatch.setenv("TESSELLM_IMAGE_FETCH_MAX_MB", str(100 / 1024))  # 100 KiB
    url = f"{server}{path}"
    with pytest.raises(ValueError, match=match) as info:
        load_image_url(url)
    assert url in str(info.value)
    assert load_image_url(f"{server}/cat.png").size == (20, 24)  # the small one still passes


def test_an_unreachable_host():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/cat.png"
    with pytest.raises(ValueError, match=f"The image URL {url} could not be reached"):
        load_image_url(url)


def test_bad_settings_are_refused(monkeypatch):
    monkeypatch.setenv("TESSELLM_IMAGE_FETCH_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="TESSELLM_IMAGE_FETCH_TIMEOUT='soon' is not understood"):
        load_image_url("http://127.0.0.1:9/cat.png")
    assert parse_media_domains('["A.com", "b.org"]') == ("a.com", "b.org")
    assert parse_media_domains("a.com, b.org") == ("a.com", "b.org")
    assert parse_media_domains(None) is None
    with pytest.raises(ValueError, match="must be host names"):
        parse_media_domains([3])
    from tessellm.config import EngineArgs

    with pytest.raises(ValueError, match="must be host names"):
        EngineArgs(allowed_media_domains=[""]).validate()
