"""vLLM's per-request ``kv_transfer_params``: what a request may carry, and what a producer
hands back for its decode (docs/kv_transfer.md, "Routing by kv_transfer_params").

The disaggregation proxy's flow (vLLM's NIXL ``toy_proxy_server.py``)::

    proxy --{"do_remote_decode": true}, max_tokens 1-->  producer (prefill engine)
          <-- response + kv_transfer_params ----------    {"do_remote_prefill": true,
                                                           "remote_host": ..., "remote_port": ...}
    proxy --the whole request + those params --------->  consumer (decode engine): fetches the
                                                          prompt's blocks from that producer

Plain Python: the OpenAI server checks a request's params with ``check_kv_transfer_params``
before anything reaches the engine, and ``SamplingParams`` checks them offline.
"""

from __future__ import annotations

from typing import Optional

from tessellm.kv_transfer.address import host_key, join_host_port

# The keys tessellm reads, and what each may hold (others are accepted and ignored: a proxy
# may pass on keys of another connector's).
_BOOLS = ("do_remote_decode", "do_remote_prefill")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_kv_transfer_params(params: dict) -> None:
    """One ValueError naming the key and what it may hold, for a malformed object; null
    values are as if absent (vLLM's proxy sends its prefill request ``remote_host: null``...)."""
    for key in _BOOLS:
        if params.get(key) is not None and not isinstance(params[key], bool):
            raise ValueError(f"kv_transfer_params.{key} must be true or false, got {params[key]!r}.")
    if params.get("do_remote_decode") and params.get("do_remote_prefill"):
        raise ValueError("kv_transfer_params has do_remote_decode and do_remote_prefill both true: "
                         "a request is the prefill half (do_remote_decode: send it to the "
                         "producer) or the decode half (do_remote_prefill: the producer's "
                         "response params, sent to the consumer), not both.")
    host, port = params.get("remote_host"), params.get("remote_port")
    if host is not None:  # a host name, IPv4, or IPv6 bare or in brackets (address.py)
        host_key(host, "kv_transfer_params.remote_host (the producer's, as its response gave it)")
    if port is not None and (not _is_int(port) or not 0 < port < 65536):
        raise ValueError("kv_transfer_params.remote_port must be the producer's KV port, an "
                         f"integer 1-65535 (as its response gave it), got {port!r}.")
    if (host is None) != (port is None) and params.get("do_remote_prefill"):
        missing = "remote_port" if port is None else "remote_host"
        raise ValueError(f"kv_transfer_params.{missing} is missing: with do_remote_prefill, "
                         "remote_host and remote_port name the producer together (pass on the "
                         "producer's response params whole), or give neither.")
    for key, floor in (("tp_size", 1), ("remote_num_tokens", 0)):
        value = params.get(key)
        if value is not None and (not _is_int(value) or value < floor):
            raise ValueError(f"kv_transfer_params.{key} must be an integer >= {floor}, got {value!r}.")
    if params.get("remote_engine_id") is not None and not isinstance(params["remote_engine_id"], str):
        raise ValueError("kv_transfer_params.remote_engine_id must be a string, got "
                         f"{params['remote_engine_id']!r}.")
    if params.get("remote_block_ids") is not None and not isinstance(params["remote_block_ids"], list):
        raise ValueError("kv_transfer_params.remote_block_ids must be a list or null, got "
                         f"{params['remote_block_ids']!r}.")


def remote_decode(params: Optional[dict]) -> bool:
    """The request is the prefill half of a disaggregated request (vLLM's proxy sends it to
    the producer): its response waits for its saves and carries the params for the decode."""
    return bool(params and params.get("do_remote_decode"))


def remote_producer(params: Optional[dict]) -> Optional[str]:
    """``"host:port"`` of the producer a decode request names (``do_remote_prefill`` with
    ``remote_host`` and ``remote_port``: its rank 0's KV port), or None (none named, or a host
    the edge would have refused). The host lower-case, an IPv6 one in brackets
    (``[fe80::1]:14579``; ``address.py``), as ``allowed_producers`` entries are compared."""
    if not params or not params.get("do_remote_prefill"):
        return None
    host, port = params.get("remote_host"), params.get("remote_port")
    if host is None or port is None:
        return None
    try:
        return join_host_port(host_key(host, "remote_host"), port)
    except ValueError:
        return None


ANY_PRODUCER = "*"  # an allowed_producers entry: a request may name any producer


def producer_allowed(where: str, allowed) -> bool:
    """Whether a consumer may fetch from ``where`` (``"host:port"``, ``remote_producer``'s):
    ``allowed`` None (any), or ``where`` or its host among the entries (``address.producer_key``'s
    forms: host names case-blind, ``[v6]`` or ``[v6]:port``)."""
    return allowed is None or where in allowed or where.rpartition(":")[0] in allowed


def check_producer(params: Optional[dict], allowed) -> None:
    """One ValueError naming the fix, for a request whose params name a producer the consumer
    does not fetch from (``allowed``: its ``allowed_producers`` and ``kv_peer``; None: any)."""
    where = remote_producer(params)
    if where is None or producer_allowed(where, allowed):
        return
    listed = ", ".join(sorted(allowed)) or "none"
    raise ValueError(f"kv_transfer_params names the KV producer {where}, which this engine does "
                     f"not fetch from (its producers: {listed}). List it in the consumer's "
                     "--kv-transfer-config kv_connector_extra_config.allowed_producers (\"host\" "
                     "or \"host:port\", an IPv6 address in brackets; [\"*\"]: any producer a "
                     "request names, only behind a "
                     "trusted proxy), or send the request without do_remote_prefill.")


def decode_params(engine_id: str, host: str, port: int, tp_size: int, num_tokens: int) -> dict:
    """What a producer hands back for a finished ``do_remote_decode`` request (the response's
    ``kv_transfer_params``; a proxy passes it to the consumer whole):

    - ``do_remote_prefill: true``, ``do_remote_decode: false``: the consumer's request is the
      decode half, its prompt prefilled remotely;
    - ``remote_engine_id``: the producer engine's id (in messages only);
    - ``remote_host``, ``remote_port``: where the consumer fetches the blocks (the producer's
      ``kv_host`` and rank 0's ``kv_port``; rank r serves on ``remote_port + r``);
    - ``tp_size``: the producer's tensor-parallel size (a consumer of another size has another
      namespace: it shares nothing, and recomputes);
    - ``remote_num_tokens``: the prompt tokens whose blocks the producer holds (its full
      blocks): the consumer asks for no block past them.

    No ``remote_block_ids``: the blocks are found by their prefix keys, which the consumer
    computes from the prompt's tokens, not by the producer's block ids."""
    return {"do_remote_prefill": True, "do_remote_decode": False, "remote_engine_id": engine_id,
            "remote_host": host, "remote_port": port, "tp_size": tp_size,
            "remote_num_tokens": num_tokens}
