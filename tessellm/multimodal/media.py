"""Image URLs of chat messages -> PIL images.

* ``data:image/...;base64,...`` : decoded here (malformed base64 or bytes Pillow cannot read
  are refused, naming which).
* ``file://...`` : read only under ``allowed_local_media_path`` (vLLM's flag), else refused.
* ``http(s)://`` : fetched (``fetch.py``: timeout, size cap, ``allowed_media_domains``).
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from typing import Optional
from urllib.parse import unquote, urlparse


def load_image_url(url: str, allowed_local_media_path: Optional[str] = None,
                   allowed_media_domains=None, fetched: Optional[dict] = None):
    """``fetched``: http(s) URLs already fetched (``fetch.prefetch``: url -> (body,
    Content-Type) or the ValueError it gave); others are fetched here."""
    if not isinstance(url, str) or not url:
        raise ValueError("image_url.url is missing; give a data: URL (base64) of the image.")
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return _open(data_url_bytes(url), "The data: URL")
    if scheme == "file":
        return _open(local_file(url, allowed_local_media_path), "The file:// image")
    if scheme in ("http", "https"):
        from tessellm.multimodal.fetch import FetchPolicy, fetch_url, shown_url

        got = (fetched or {}).get(url)
        if isinstance(got, ValueError):
            raise got
        data, content_type = got or fetch_url(url, FetchPolicy.from_env(allowed_media_domains))
        return _open(data, f"The image at {shown_url(url)}", content_type)
    raise ValueError(f"image_url scheme {scheme or url[:16]!r} is not supported; use an "
                     "http(s) URL, a data:image/...;base64 URL or file:// under "
                     "--allowed-local-media-path.")


def load_image_file(path: str):
    """An image file the user names on the command line (``tessellm generate --image``)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ValueError(f"Image {path} could not be read: {exc.strerror}.") from None
    return _open(data, f"Image {path}")


def data_url_bytes(url: str, kind: str = "image") -> bytes:
    """A ``data:<kind>/...;base64,`` URL's bytes (``kind``: image, video or audio)."""
    example = {"image": "image/png", "audio": "audio/wav"}.get(kind, "video/mp4")
    header, sep, payload = url[len("data:"):].partition(",")
    if not sep:
        raise ValueError("The data: URL has no ',' before its payload; use "
                         f"data:{example};base64,<base64 bytes>.")
    media_type, *params = header.split(";")
    if media_type and not media_type.lower().startswith(f"{kind}/"):
        raise ValueError(f"The data: URL has media type {media_type!r}; an {kind}_url needs "
                         f"a{'n' if kind in ('image', 'audio') else ''} {kind} ({example}, ...).")
    if "base64" not in (p.strip().lower() for p in params):
        raise ValueError(f"The data: URL is not base64-encoded; use data:{example};base64,<...>.")
    try:
        return base64.b64decode(payload.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("The data: URL's payload is not valid base64.") from None


def local_file(url: str, allowed: Optional[str], kind: str = "image") -> bytes:
    if allowed is None:
        raise ValueError(f"file:// {kind} URLs are refused; start the server with "
                         "--allowed-local-media-path DIR to allow files under DIR.")
    parsed = urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise ValueError(f"file:// URL names host {parsed.netloc!r}; only local files are read.")
    path = os.path.realpath(unquote(parsed.path))
    root = os.path.realpath(allowed)
    if os.path.commonpath([path, root]) != root:
        raise ValueError(f"The file:// {kind} is outside --allowed-local-media-path ({allowed}).")
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ValueError(f"The file:// {kind} could not be read: {exc.strerror}.") from None


def _open(data: bytes, what: str, served_as: Optional[str] = None):
    try:
        from PIL import Image
    except ImportError:
        raise ValueError("Image inputs need Pillow; pip install pillow (or tessellm[vision]).") from None
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return img.convert("RGB")
    except Exception:  # noqa: BLE001 - whatever Pillow says, the bytes are not a usable image
        kind = f"; it was served as {served_as}" if served_as else ""
        raise ValueError(f"{what} is not an image Pillow can read (png, jpeg, ...){kind}.") from None
