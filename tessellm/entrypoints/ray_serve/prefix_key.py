"""A request's prompt prefix as a chain of chunk hashes, computed in the ingress (no tokenizer).

Invariant: two prompts that agree on their first ``k`` full chunks have equal first ``k``
hashes, and (up to hash collisions) prompts that differ inside chunk ``i`` have different
hashes from ``i`` on, because each hash covers its chunk *and* every chunk before it::

    text:    |<-- chunk 0 -->|<-- chunk 1 -->|<-- chunk 2 -->|tail|
    hashes:  h0 = H(c0)       h1 = H(h0, c1)  h2 = H(h1, c2)        (the partial tail is dropped)

This mirrors the engine's own prefix cache, which hashes full KV blocks the same way, but on
characters instead of tokens: the ingress has no tokenizer, and a prompt whose first N
characters match another's starts with (almost) the same tokens. A chat request hashes its
messages in order, each as ``role`` and ``content`` with separators, so a shared system
prompt is a shared prefix. Hashes are stable across processes (blake2b, not ``hash()``).

LoRA multiplexing: a request whose ``model`` is one of the served adapters (``lora_names``)
gets the adapter as its chain's first link, ``m = H(name)``, and its chunks chained after it::

    hashes:  m = H(adapter)   h0 = H(m, c0)   h1 = H(h0, c1) ...

so every request for an adapter shares ``m``: the router prefers the replica that served the
adapter last (its slots and its KV prefixes are there), under the same load check as prefixes.
The adapter's name is also the request's Serve *multiplexed model id* (``route_keys``): the
ingress passes it to the engine handle, the replica registers it (``serve.multiplexed``), and
the router prefers the replicas that report holding it (engine_replica.py, prefix_router.py).

Samples (``route_info``): the sequences the request makes the engine run, ``n`` (or
``best_of`` when larger) times its prompts (a completions batch); the router's load score
counts each (replica_load.py).
"""

from __future__ import annotations

import hashlib
import json
from typing import Optional

_ROUTED_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/responses")


def prefix_hashes(path: str, body: bytes, chunk_chars: int, chunk_tokens: int,
                  max_chunks: int, lora_names: frozenset = frozenset()) -> list[int]:
    """Chained chunk hashes of the request's prompt; [] when it has none (or is not JSON)."""
    return route_keys(path, body, chunk_chars, chunk_tokens, max_chunks, lora_names)[1]


def route_keys(path: str, body: bytes, chunk_chars: int, chunk_tokens: int, max_chunks: int,
               lora_names: frozenset = frozenset(), hashes: bool = True) -> tuple[str, list[int]]:
    """``(adapter, chain)``: the served adapter the request names ("" for none: the base model,
    or not a completion) and, with ``hashes``, its chunk chain (``prefix_hashes``)."""
    return route_info(path, body, chunk_chars, chunk_tokens, max_chunks, lora_names, hashes)[:2]


def route_info(path: str, body: bytes, chunk_chars: int, chunk_tokens: int, max_chunks: int,
               lora_names: frozenset = frozenset(), hashes: bool = True) -> tuple[str, list[int], int]:
    """``route_keys`` and the request's samples (module docstring; 1 when not a completion)."""
    request = _json_request(path, body)
    if request is None:
        return "", [], 1
    return (*_route_keys(request, chunk_chars, chunk_tokens, max_chunks, lora_names, hashes),
            _samples(request))


def _samples(request: dict) -> int:
    """The sequences a completion request runs: n (best_of if larger) per prompt. A bad value
    counts as 1 (the replica's server answers it with a 400)."""
    n = max((v for v in (request.get("n"), request.get("best_of"))
             if isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 1024), default=1)
    prompt = request.get("prompt")
    prompts = len(prompt) if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)) else 1
    return n * max(1, min(prompts, 1024))


def _route_keys(request: dict, chunk_chars: int, chunk_tokens: int, max_chunks: int,
                lora_names: frozenset, hashes: bool) -> tuple[str, list[int]]:
    model = request.get("model")
    if isinstance(model, str) and model in lora_names:
        if not hashes:
            return model, []
        head = _chain([model.encode("utf-8", "surrogatepass")], b"m")
        kind = head[0].to_bytes(8, "little")
        return model, head + _prompt_chain(request, chunk_chars, chunk_tokens, max_chunks - 1, kind)
    if not hashes:
        return "", []
    return "", _prompt_chain(request, chunk_chars, chunk_tokens, max_chunks, None)


def _json_request(path: str, body: bytes):
    if not path.rstrip("/").endswith(_ROUTED_PATHS) or not body:
        return None
    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return request if isinstance(request, dict) else None


def _prompt_chain(request: dict, chunk_chars: int, chunk_tokens: int, max_chunks: int,
                  parent) -> list[int]:
    """The prompt's chunk chain; ``parent``: the digest it continues (an adapter's link)."""
    if "messages" in request or "input" in request:  # chat, or /v1/responses as the chat it means
        text = _chat_text(request["messages"] if "messages" in request else _responses_messages(request))
        return _chain_text(text, chunk_chars, max_chunks, parent) if text else []
    prompt = _first_prompt(request.get("prompt"))
    if isinstance(prompt, str):
        return _chain_text(prompt, chunk_chars, max_chunks, parent)
    if isinstance(prompt, list):
        return _chain_tokens(prompt, chunk_tokens, max_chunks, parent)
    return []


def _first_prompt(prompt):
    """str | [int] -> itself; [str] | [[int]] -> the first (a batch routes by its first prompt)."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        return prompt[0]
    return prompt


def _responses_messages(request: dict) -> Optional[list]:
    """A /v1/responses body's conversation as chat messages: instructions (a system message),
    then input (a string is a user message; items without a role, such as function calls, are
    left out), so it hashes as the equivalent chat request does."""
    items = request.get("input")
    items = [{"role": "user", "content": items}] if isinstance(items, str) else items
    if not isinstance(items, list):
        return None
    instructions = request.get("instructions")
    head = [{"role": "system", "content": instructions}] if isinstance(instructions, str) and instructions else []
    return head + [i for i in items if isinstance(i, dict) and "role" in i]


def _chat_text(messages) -> Optional[str]:
    if not isinstance(messages, list):
        return None
    parts = []
    for m in messages:
        if not isinstance(m, dict):
            return None
        content = m.get("content")
        if isinstance(content, list):  # content parts: their text, in order
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        parts.append(f"{m.get('role', '')}\x1f{content if isinstance(content, str) else ''}\x1e")
    return "".join(parts)


def _chain_text(text: str, chunk_chars: int, max_chunks: int, parent=None) -> list[int]:
    chunks = [text[i:i + chunk_chars].encode("utf-8", "surrogatepass")
              for i in range(0, (len(text) // chunk_chars) * chunk_chars, chunk_chars)]
    return _chain(chunks[:max_chunks], parent or b"t")


def _chain_tokens(ids: list, chunk_tokens: int, max_chunks: int, parent=None) -> list[int]:
    if not all(isinstance(t, int) for t in ids):
        return []
    full = (len(ids) // chunk_tokens) * chunk_tokens
    chunks = [",".join(map(str, ids[i:i + chunk_tokens])).encode()
              for i in range(0, min(full, max_chunks * chunk_tokens), chunk_tokens)]
    return _chain(chunks, parent or b"i")


def _chain(chunks: list[bytes], kind: bytes) -> list[int]:
    out, parent = [], kind
    for chunk in chunks:
        digest = hashlib.blake2b(parent + b"\x00" + chunk, digest_size=8).digest()
        out.append(int.from_bytes(digest, "little"))
        parent = digest
    return out
