"""``http(s)://`` image, video and audio URLs of chat messages, fetched as vLLM fetches them: within a timeout
(``TESSELLM_IMAGE_FETCH_TIMEOUT``, vLLM's ``VLLM_IMAGE_FETCH_TIMEOUT``), up to a size cap
(``TESSELLM_IMAGE_FETCH_MAX_MB``), and, when ``allowed_media_domains`` is given (vLLM's
``--allowed-media-domains``), only from those hosts, redirects included.

Standard library only (``urllib.request``); ``fetch_url`` blocks its thread. The server
fetches a request's URLs before the chat template runs (``prefetch``): all at once, each on a
thread of the event loop's default executor, so neither the event loop nor the tokenizer
threads wait on a slow host. ``LLM.chat`` fetches in the calling thread. Every failure is a
ValueError naming the URL and the problem (the server's 400).

    connect + headers: timeout_s        body: read in pieces, each within the socket timeout,
    redirect: host checked again        the whole within timeout_s; > max_bytes: refused
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Optional
from urllib.parse import urlparse

from tessellm import envs

PIECE = 1 << 16  # bytes read at a time


@dataclass(frozen=True)
class FetchPolicy:
    timeout_s: float  # the whole fetch: connect, headers, body
    max_bytes: int  # the largest body accepted
    allowed_domains: Optional[tuple[str, ...]] = None  # hosts (lower case); None: any

    @classmethod
    def from_env(cls, allowed_domains=None) -> "FetchPolicy":
        return cls(envs.image_fetch_timeout_s(), envs.image_fetch_max_bytes(),
                   parse_media_domains(allowed_domains))


def parse_media_domains(value) -> Optional[tuple[str, ...]]:
    """``allowed_media_domains``: a list of host names, its JSON, or a comma- or space-separated
    string; None or empty: any host."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"allowed_media_domains is not valid JSON ({exc.msg}); give "
                                 "host names, e.g. 'example.com,images.example.org'.") from None
        else:
            value = text.replace(",", " ").split()
    if not isinstance(value, (list, tuple)) or not all(isinstance(d, str) and d.strip() for d in value):
        raise ValueError(f"allowed_media_domains must be host names, e.g. ['example.com'], got {value!r}.")
    return tuple(d.strip().lower() for d in value) or None


def fetch_url(url: str, policy: FetchPolicy, kind: str = "image") -> tuple[bytes, Optional[str]]:
    """(the body, its Content-Type header or None); ``kind`` (image, video, audio): what is
    asked for (``Accept: kind/*``) and named in the errors."""
    shown = shown_url(url)
    _check_host(url, policy, shown, kind)
    opener = urllib.request.build_opener(_CheckedRedirects(policy, shown, kind))
    request = urllib.request.Request(url, headers={"User-Agent": "tessellm", "Accept": f"{kind}/*"})
    deadline = time.monotonic() + policy.timeout_s
    try:
        with opener.open(request, timeout=policy.timeout_s) as response:
            content_type = response.headers.get("Content-Type")
            length = response.headers.get("Content-Length", "")
            if length.strip().isdigit() and int(length) > policy.max_bytes:
                raise _too_large(shown, policy, kind)
            return _read(response, policy, deadline, shown, kind), content_type
    except urllib.error.HTTPError as exc:
        raise ValueError(f"The {kind} URL {shown} answered HTTP {exc.code} ({exc.reason}).") from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, (socket.timeout, TimeoutError)):
            raise _timed_out(shown, policy, kind) from None
        raise ValueError(f"The {kind} URL {shown} could not be reached: {exc.reason}.") from None
    except (socket.timeout, TimeoutError):
        raise _timed_out(shown, policy, kind) from None
    except (OSError, http.client.HTTPException) as exc:
        raise ValueError(f"The {kind} URL {shown} could not be fetched: {exc or type(exc).__name__}.") from None


async def prefetch(urls, policy: FetchPolicy) -> dict:
    """url -> (body, Content-Type) or the ValueError it gave, for each distinct http(s) URL
    (``urls``: URLs of images, or (url, kind) pairs), fetched concurrently off the event loop."""
    todo = dict((u, "image") if isinstance(u, str) else tuple(u) for u in urls)
    todo = {u: k for u, k in todo.items() if urlparse(u).scheme.lower() in ("http", "https")}
    results = await asyncio.gather(*(asyncio.to_thread(_fetch_or_error, u, policy, k)
                                     for u, k in todo.items()))
    return dict(zip(todo, results))


def _fetch_or_error(url: str, policy: FetchPolicy, kind: str):
    try:
        return fetch_url(url, policy, kind)
    except ValueError as exc:
        return exc


def _read(response, policy: FetchPolicy, deadline: float, shown: str, kind: str) -> bytes:
    pieces, total = [], 0
    while True:
        if time.monotonic() > deadline:
            raise _timed_out(shown, policy, kind)
        piece = response.read1(PIECE)
        if not piece:
            return b"".join(pieces)
        total += len(piece)
        if total > policy.max_bytes:
            raise _too_large(shown, policy, kind)
        pieces.append(piece)


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects only to http(s) URLs on an allowed host."""

    def __init__(self, policy: FetchPolicy, shown: str, kind: str):
        self.policy, self.shown, self.kind = policy, shown, kind

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urlparse(newurl).scheme.lower() not in ("http", "https"):
            raise ValueError(f"The {self.kind} URL {self.shown} redirects to {shown_url(newurl)}, which is "
                             "not an http(s) URL.")
        _check_host(newurl, self.policy, f"{self.shown} (redirected to {shown_url(newurl)})", self.kind)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _check_host(url: str, policy: FetchPolicy, shown: str, kind: str) -> None:
    host = (urlparse(url).hostname or "").lower()
    if not host:
        raise ValueError(f"The {kind} URL {shown} names no host.")
    if policy.allowed_domains is not None and host not in policy.allowed_domains:
        raise ValueError(f"The {kind} URL {shown} is on host {host!r}, which is not in "
                         f"--allowed-media-domains ({', '.join(policy.allowed_domains)}).")


def _too_large(shown: str, policy: FetchPolicy, kind: str) -> ValueError:
    return ValueError(f"The {kind} at {shown} is larger than {policy.max_bytes} bytes "
                      f"(TESSELLM_IMAGE_FETCH_MAX_MB); send a smaller {kind}.")


def _timed_out(shown: str, policy: FetchPolicy, kind: str) -> ValueError:
    return ValueError(f"The {kind} URL {shown} did not arrive within {policy.timeout_s:g} s "
                      "(TESSELLM_IMAGE_FETCH_TIMEOUT).")


def shown_url(url: str) -> str:
    """The URL as an error names it (long ones cut)."""
    return url if len(url) <= 200 else url[:197] + "..."
